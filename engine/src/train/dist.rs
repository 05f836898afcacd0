//! Data parallelism: the world (nodes × devices), which rows each peer takes, and the one
//! gradient all-reduce per optimizer update.
//!
//! Every process loads the whole dataset and draws the same seeded epoch order, so every peer
//! knows the rows of each global batch (`per_device_train_batch_size × gradient_accumulation_steps
//! × devices × nodes`); global rank r takes the r-th contiguous slice of
//! `per_device_train_batch_size × gradient_accumulation_steps` rows ([`Peer::shard`]). Each
//! micro-batch's loss is scaled by `rows in the micro-batch / rows in the global batch`, so the
//! per-peer gradient sums add up, over peers, to the gradient of the global-batch mean: the
//! collective **sums** (not averages) gradients, loss and metric sums. One update's gradients and
//! statistics travel as one flat tensor in one round (see [`super::collective`] for why one).
//! Clipping and AdamW then run on identical numbers on every peer, so weights stay identical.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::collective::{Round, RoundError, Topology};
use super::{Event, TrainSummary};

/// How a run is spread: `nodes` processes (one per machine, or several on one machine) of
/// `devices` peers each.
#[derive(Debug, Clone)]
pub struct World {
    /// Processes.
    pub nodes: usize,
    /// This process's rank in `0..nodes`.
    pub node_rank: usize,
    /// Peers (devices) in this process.
    pub devices: usize,
    /// `HOST:PORT` of the orchestrator (`wrpo-engine orchestrator`); needed with `nodes > 1`.
    pub orchestrator: Option<String>,
    /// Where the other nodes reach this one (default: this machine's address on the route to the
    /// orchestrator).
    pub node_host: Option<String>,
    /// Port of this node's tensor data service (default: orchestrator port + 2 + node rank).
    pub data_port: Option<u16>,
    /// Bound on every collective call.
    pub timeout: Duration,
}

impl Default for World {
    fn default() -> Self {
        World {
            nodes: 1,
            node_rank: 0,
            devices: 1,
            orchestrator: None,
            node_host: None,
            data_port: None,
            timeout: Duration::from_secs(120),
        }
    }
}

impl World {
    /// Peers in the run.
    pub fn size(&self) -> usize {
        self.nodes * self.devices
    }

    /// Check the flags; the error names the flag.
    pub fn validate(&self) -> Result<()> {
        if self.nodes == 0 || self.devices == 0 {
            bail!("--nodes and the number of --devices must be at least 1");
        }
        if self.node_rank >= self.nodes {
            bail!(
                "--node-rank {} is out of range for --nodes {} (ranks are 0..{})",
                self.node_rank,
                self.nodes,
                self.nodes - 1
            );
        }
        if self.nodes > 1 && self.orchestrator.is_none() {
            bail!("--nodes {} needs --orchestrator HOST:PORT (start one with `wrpo-engine orchestrator --port PORT`)", self.nodes);
        }
        if let Some(o) = &self.orchestrator {
            split_host_port(o).with_context(|| format!("--orchestrator {o}"))?;
        }
        if self.timeout.is_zero() {
            bail!("--collective-timeout must be positive");
        }
        Ok(())
    }

    fn topology(&self) -> Result<Topology> {
        if self.nodes <= 1 {
            return Ok(Topology {
                local_peers: self.devices,
                nodes: 1,
                node_rank: 0,
                orchestrator: String::new(),
                node_address: String::new(),
                data_port: 0,
                gate: String::new(),
            });
        }
        let orch = self
            .orchestrator
            .as_deref()
            .context("--nodes > 1 needs --orchestrator HOST:PORT")?;
        let (host, port) = split_host_port(orch)?;
        let data_port = match self.data_port {
            Some(p) => p,
            None => u16::try_from(port as usize + 2 + self.node_rank).context(
                "the default --data-port (orchestrator port + 2 + node rank) is above 65535",
            )?,
        };
        let node_host = match &self.node_host {
            Some(h) => h.clone(),
            None => route_to(&host, port).with_context(|| {
                format!("finding this machine's address towards {orch}; pass --node-host")
            })?,
        };
        let gate_port = port
            .checked_add(1)
            .context("the orchestrator's port + 1 (its round gate) is above 65535")?;
        Ok(Topology {
            local_peers: self.devices,
            nodes: self.nodes,
            node_rank: self.node_rank,
            orchestrator: format!("ws://{host}:{port}"),
            node_address: format!("ws://{node_host}:{data_port}"),
            data_port,
            gate: format!("{host}:{gate_port}"),
        })
    }
}

/// `HOST:PORT` (a bracketed IPv6 host is accepted).
fn split_host_port(s: &str) -> Result<(String, u16)> {
    let (h, p) = s
        .rsplit_once(':')
        .context("expected HOST:PORT, e.g. 10.0.0.1:29500")?;
    let port: u16 = p.parse().with_context(|| format!("bad port {p:?}"))?;
    if h.is_empty() {
        bail!("expected HOST:PORT, the host is empty");
    }
    Ok((h.to_string(), port))
}

/// This machine's address on the route to `host:port` (a UDP "connect" sends nothing).
fn route_to(host: &str, port: u16) -> Result<String> {
    use std::net::{ToSocketAddrs, UdpSocket};
    let target = (host, port)
        .to_socket_addrs()?
        .next()
        .context("the host has no address")?;
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = UdpSocket::bind(bind)?;
    sock.connect(target)?;
    Ok(sock.local_addr()?.ip().to_string())
}

/// Start the orchestrator the nodes of a multi-node run register with (on `port`) and its round
/// gate (on `port + 1`, see [`super::collective`]), and serve until interrupted (Ctrl-C / SIGTERM).
pub fn run_orchestrator(port: u16) -> Result<()> {
    // burn-communication binds 0.0.0.0:PORT and only logs a failure; check first for a clear error.
    drop(
        std::net::TcpListener::bind(("0.0.0.0", port))
            .with_context(|| format!("orchestrator: cannot listen on port {port}"))?,
    );
    let gate_port = port
        .checked_add(1)
        .context("orchestrator: the round gate needs port + 1, which is above 65535")?;
    let gate = std::net::TcpListener::bind(("0.0.0.0", gate_port)).with_context(|| {
        format!("orchestrator: cannot listen on port {gate_port} (the round gate, port + 1)")
    })?;
    std::thread::Builder::new()
        .name("round-gate".into())
        .spawn(move || super::collective::serve_gate(gate))
        .context("starting the round gate")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the orchestrator's runtime")?;
    rt.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}

/// One peer of the run: its place in the world and its side of the collective.
pub struct Peer<B: Backend> {
    world: World,
    local_rank: usize,
    round: Option<Round<B>>,
    /// Shared by the peers of this process: a global round's `finish` of every local peer must
    /// be done before any of them registers for the next round.
    local_barrier: Option<Arc<LocalBarrier>>,
    /// Time spent in collective rounds (for the all-reduce time per update).
    pub comm_time: Duration,
    synced: usize,
}

impl<B: Backend> Peer<B> {
    /// Peer `local_rank` of this process on `device`; `barrier` is shared by the process's peers
    /// (needed when `devices > 1`).
    pub fn new(
        world: &World,
        local_rank: usize,
        device: &B::Device,
        barrier: Option<Arc<LocalBarrier>>,
    ) -> Result<Self> {
        world.validate()?;
        let round = if world.size() > 1 {
            let rank = world.node_rank * world.devices + local_rank;
            Some(Round::new(
                rank,
                device.clone(),
                world.topology()?,
                world.timeout,
            ))
        } else {
            None
        };
        Ok(Peer {
            world: world.clone(),
            local_rank,
            round,
            local_barrier: barrier,
            comm_time: Duration::ZERO,
            synced: 0,
        })
    }

    /// A run of one peer (no collective).
    pub fn single() -> Self {
        Peer {
            world: World::default(),
            local_rank: 0,
            round: None,
            local_barrier: None,
            comm_time: Duration::ZERO,
            synced: 0,
        }
    }

    /// Updates summed over peers so far.
    pub fn updates_synced(&self) -> usize {
        self.synced
    }

    /// The world.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// Global rank in `0..world.size()`.
    pub fn rank(&self) -> usize {
        self.world.node_rank * self.world.devices + self.local_rank
    }

    /// Whether this peer writes metrics, checkpoints and the final model (global rank 0).
    pub fn writes(&self) -> bool {
        self.rank() == 0
    }

    /// This peer's rows of a global batch `ids`: the rank-th slice of `per_peer` rows (empty
    /// when a last, partial batch runs out before it).
    pub fn shard<'a>(&self, ids: &'a [usize], per_peer: usize) -> &'a [usize] {
        let start = (self.rank() * per_peer).min(ids.len());
        &ids[start..(start + per_peer).min(ids.len())]
    }

    /// Sum `grads` (flat, in parameter order) and `stats` over every peer, in one round.
    /// `what` names the round in errors (`update 3`). A single peer returns its inputs untouched.
    pub fn sum_update(
        &mut self,
        what: &str,
        grads: Vec<Tensor<B, 1>>,
        stats: Vec<f64>,
    ) -> Result<(Vec<Tensor<B, 1>>, Vec<f64>)> {
        let Some(round) = self.round.as_mut() else {
            return Ok((grads, stats));
        };
        let t0 = Instant::now();
        let device = grads[0].device();
        let lens: Vec<usize> = grads.iter().map(|g| g.dims()[0]).collect();
        // The last slot counts the peers that took part: a check that every peer was in the round.
        let mut tail: Vec<f32> = stats.iter().map(|&x| x as f32).collect();
        tail.push(1.0);
        let n_tail = tail.len();
        let mut parts = grads;
        parts.push(Tensor::from_data(TensorData::new(tail, [n_tail]), &device));
        let flat = Tensor::cat(parts, 0);
        let summed = round.sum(flat).map_err(|e| explain(&self.world, what, e))?;
        if let Some(b) = &self.local_barrier {
            b.wait(self.world.timeout).with_context(|| {
                format!("{what}: waiting for this process's other device peers")
            })?;
        }
        let total: usize = lens.iter().sum();
        let tail: Vec<f32> = summed
            .clone()
            .narrow(0, total, n_tail)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32");
        let peers = tail[n_tail - 1].round() as usize;
        if peers != self.world.size() {
            bail!(
                "{what}: the all-reduce combined {peers} peers instead of {}: a node re-registered with the orchestrator before another had left the previous round (a race of the per-update registration that burn-collective 0.21 forces). Stopped before applying the update; restart from the last checkpoint with --resume",
                self.world.size()
            );
        }
        let mut out = Vec::with_capacity(lens.len());
        let mut at = 0;
        for n in lens {
            out.push(summed.clone().narrow(0, at, n));
            at += n;
        }
        self.comm_time += t0.elapsed();
        self.synced += 1;
        Ok((out, tail[..n_tail - 1].iter().map(|&x| x as f64).collect()))
    }

    /// Leave the collective at the end of the run.
    pub fn close(&mut self) -> Result<()> {
        match self.round.take() {
            Some(r) => r
                .close()
                .map_err(|e| explain(&self.world, "the end of the run", e)),
            None => Ok(()),
        }
    }
}

/// A barrier of this process's peers with a bound (std's `Barrier` waits forever).
pub struct LocalBarrier {
    n: usize,
    state: Mutex<(usize, u64)>,
    cv: Condvar,
}

impl LocalBarrier {
    /// A barrier of `n` threads.
    pub fn new(n: usize) -> Self {
        LocalBarrier {
            n,
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
        }
    }

    /// Wait until all `n` have arrived, at most `timeout`.
    pub fn wait(&self, timeout: Duration) -> Result<()> {
        let mut g = self.state.lock().expect("barrier lock");
        let generation = g.1;
        g.0 += 1;
        if g.0 == self.n {
            *g = (0, generation + 1);
            self.cv.notify_all();
            return Ok(());
        }
        let (g, res) = self
            .cv
            .wait_timeout_while(g, timeout, |g| g.1 == generation)
            .expect("barrier lock");
        if res.timed_out() && g.1 == generation {
            bail!("no answer within {}s", timeout.as_secs_f64());
        }
        Ok(())
    }
}

/// Run `recipe` data-parallel: one peer per device of `devices` in this process (threads), as
/// node `world.node_rank` of `world.nodes` ([`on_each_device`]). `recipe` runs one peer
/// (`run_train_peer`, `run_sft_peer`).
#[allow(clippy::type_complexity)]
pub fn run_recipe<B: Backend>(
    job: &super::TrainJob,
    world: &World,
    devices: &[B::Device],
    on: &mut dyn FnMut(Event),
    recipe: fn(
        &super::TrainJob,
        &mut Peer<B>,
        &B::Device,
        &mut dyn FnMut(Event),
    ) -> Result<TrainSummary>,
) -> Result<TrainSummary> {
    let job = job.clone();
    on_each_device(
        world,
        devices,
        on,
        Arc::new(
            move |peer: &mut Peer<B>, device: &B::Device, on: &mut dyn FnMut(Event)| {
                recipe(&job, peer, device, on)
            },
        ),
    )
}

/// Run `run` once per device of `devices`, each as one peer of `world` (threads; the first
/// device's peer runs on this thread and reports `on`'s events). Returns the first peer's
/// summary, or the first error; an error of this thread's peer returns at once (the others are
/// blocked in the collective and end with the process).
pub fn on_each_device<B, F>(
    world: &World,
    devices: &[B::Device],
    on: &mut dyn FnMut(Event),
    run: Arc<F>,
) -> Result<TrainSummary>
where
    B: Backend,
    F: Fn(&mut Peer<B>, &B::Device, &mut dyn FnMut(Event)) -> Result<TrainSummary>
        + Send
        + Sync
        + 'static,
{
    if devices.is_empty() {
        bail!("--devices: no device given");
    }
    let mut world = world.clone();
    world.devices = devices.len();
    world.validate()?;
    let barrier =
        (world.devices > 1 && world.nodes > 1).then(|| Arc::new(LocalBarrier::new(world.devices)));
    let mut handles = vec![];
    for (local, device) in devices.iter().enumerate().skip(1) {
        let mut peer = Peer::<B>::new(&world, local, device, barrier.clone())?;
        let (device, run) = (device.clone(), run.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("peer-{local}"))
                .spawn(move || run(&mut peer, &device, &mut |_: Event| {}))
                .context("starting a device thread")?,
        );
    }
    let mut peer = Peer::<B>::new(&world, 0, &devices[0], barrier)?;
    let first = run(&mut peer, &devices[0], on)?;
    for (i, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(r) => {
                r.with_context(|| format!("device peer {} of this process", i + 1))?;
            }
            Err(_) => bail!("device peer {} of this process panicked", i + 1),
        }
    }
    Ok(first)
}

/// A failed round as a message that names what is missing: the orchestrator (unreachable), or the
/// other nodes (with two nodes, the one other rank).
fn explain(world: &World, what: &str, e: RoundError) -> anyhow::Error {
    let others: Vec<String> = (0..world.nodes)
        .filter(|&r| r != world.node_rank)
        .map(|r| r.to_string())
        .collect();
    let peers = if world.nodes <= 1 {
        "another device's peer in this process".to_string()
    } else if others.len() == 1 {
        format!("node rank {}", others[0])
    } else {
        format!("one of node ranks {}", others.join(", "))
    };
    let orch = world.orchestrator.as_deref().unwrap_or("");
    let orch_up = world.nodes > 1
        && split_host_port(orch).is_ok_and(|(h, p)| {
            use std::net::ToSocketAddrs;
            (h.as_str(), p).to_socket_addrs().is_ok_and(|mut a| {
                a.any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
            })
        });
    let failure = match &e {
        RoundError::Timeout { stage } => format!(
            "no answer within {}s (--collective-timeout) in {stage}",
            world.timeout.as_secs_f64()
        ),
        RoundError::Collective { stage, error } => format!("{stage} failed: {error}"),
    };
    let cause = if world.nodes > 1 && !orch_up {
        format!("the orchestrator at {orch} does not answer (stopped, or wrong --orchestrator)")
    } else {
        format!("{peers} stopped, crashed or cannot be reached")
    };
    anyhow::anyhow!(
        "node rank {} of {}: the all-reduce of {what} failed: {failure}. Likely cause: {cause}. This node stops; the last checkpoint in --output is intact",
        world.node_rank,
        world.nodes
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_global_batch_in_rank_order() {
        let ids: Vec<usize> = (10..17).collect(); // a partial batch of 7 rows
        let world = |node_rank, devices| World {
            nodes: 2,
            node_rank,
            devices,
            orchestrator: Some("127.0.0.1:1".into()),
            ..Default::default()
        };
        let mut got = vec![];
        for node in 0..2 {
            for local in 0..2 {
                let p = Peer::<crate::backend::CpuBackend> {
                    world: world(node, 2),
                    local_rank: local,
                    round: None,
                    local_barrier: None,
                    comm_time: Duration::ZERO,
                    synced: 0,
                };
                got.push(p.shard(&ids, 2).to_vec());
            }
        }
        assert_eq!(
            got,
            vec![vec![10, 11], vec![12, 13], vec![14, 15], vec![16]]
        );
        // Ranks past the end of a partial batch get no rows.
        assert!(got.concat() == ids);
    }

    #[test]
    fn flags_are_checked_with_their_names() {
        let w = World {
            nodes: 2,
            ..Default::default()
        };
        assert!(w
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--orchestrator"));
        let w = World {
            nodes: 2,
            node_rank: 2,
            orchestrator: Some("h:1".into()),
            ..Default::default()
        };
        assert!(w
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--node-rank 2"));
        let w = World {
            nodes: 2,
            orchestrator: Some("nohostport".into()),
            ..Default::default()
        };
        assert!(format!("{:#}", w.validate().unwrap_err()).contains("HOST:PORT"));
    }
}
