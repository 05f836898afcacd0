//! The only file that calls burn-collective 0.21.0: one bounded "sum over every peer" round.
//!
//! **Upstream bug worked around here.** On the global level (processes talking through
//! `start_global_orchestrator`), the first all-reduce after `register` succeeds and the second
//! hangs forever with every strategy: `SyncService::sync` (burn-collective 0.21.0,
//! `src/global/node/sync.rs`) clears a *copy* of its list of syncing peers
//! (`let mut syncing_peers = self.syncing_peers.lock().unwrap().to_vec(); … syncing_peers.clear()`),
//! so the list never empties and the next sync never matches. So each global round is
//! `register → exactly one all_reduce → finish_collective → reset_collective`, and the trainer
//! packs everything one optimizer update needs into one tensor. When an upgrade fixes `sync`,
//! register once per run in [`Round`] and drop the per-round registration (and the gate below).
//!
//! **The round gate.** Per-round registration has a race of its own: the orchestrator numbers a
//! node by how many are registered, so a node that finishes round k and registers for round k+1
//! while another node is still registered for round k gets that node's id and a "world" of one
//! (burn-collective 0.21.0, `src/global/orchestrator/state.rs`, `register`). So before each
//! global registration every node passes a gate: a small TCP service in the `wrpo-engine
//! orchestrator` process (orchestrator port + 1, [`serve_gate`]) that answers round k only when
//! every node has asked for round k, i.e. has finished round k−1. Only the first peer of a node
//! asks; its other peers wait inside burn's local registration, which needs every local peer.
//!
//! burn-collective's calls block without a timeout of their own (a peer that died, an
//! orchestrator that never answers: the websocket client retries forever). Every call here runs
//! on a helper thread and is waited for with a bound; past it the caller gets an error and the
//! process is expected to exit (the helper thread stays blocked inside burn-collective).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};
use burn_collective::{
    all_reduce, finish_collective, register, reset_collective, AllReduceStrategy, CollectiveConfig,
    CollectiveError, PeerId, ReduceOperation,
};

/// Why a round failed.
#[derive(Debug)]
pub enum RoundError {
    /// No answer within the bound, while doing `stage`.
    Timeout {
        /// `register` (waiting for every peer to join the round), `all_reduce` or `finish`.
        stage: &'static str,
    },
    /// burn-collective returned an error (or panicked inside: `Internal`).
    Collective {
        /// Stage as above.
        stage: &'static str,
        /// burn-collective's error, as text.
        error: String,
    },
}

/// Where the peers of a run are.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Peers (devices) in this process.
    pub local_peers: usize,
    /// Nodes (processes); > 1 needs the global fields.
    pub nodes: usize,
    /// This process's rank in `0..nodes`.
    pub node_rank: usize,
    /// `ws://HOST:PORT` of the orchestrator.
    pub orchestrator: String,
    /// `ws://HOST:PORT` at which the other nodes reach this node's tensor data service.
    pub node_address: String,
    /// The port of that service (bound on all interfaces by burn-communication).
    pub data_port: u16,
    /// `HOST:PORT` of the round gate ([`serve_gate`]; the orchestrator's port + 1).
    pub gate: String,
}

impl Topology {
    fn config(&self) -> CollectiveConfig {
        let cfg = CollectiveConfig::default()
            .with_num_devices(self.local_peers)
            .with_local_all_reduce_strategy(AllReduceStrategy::Tree(2));
        if self.nodes <= 1 {
            return cfg;
        }
        cfg.with_num_nodes(self.nodes as u32)
            .with_global_address(self.orchestrator.parse().expect("infallible"))
            .with_node_address(self.node_address.parse().expect("infallible"))
            .with_data_service_port(self.data_port)
            .with_global_all_reduce_strategy(AllReduceStrategy::Tree(2))
    }
}

/// Run `f` on a helper thread and wait for it at most `timeout`.
fn bounded<T: Send + 'static>(
    stage: &'static str,
    timeout: Duration,
    f: impl FnOnce() -> Result<T, CollectiveError> + Send + 'static,
) -> Result<T, RoundError> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("collective-{stage}"))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawning a thread");
    match rx.recv_timeout(timeout) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(RoundError::Collective {
            stage,
            error: format!("{e:?}"),
        }),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(RoundError::Timeout { stage }),
        // The thread ended without sending: burn-collective panicked (its tasks `expect` on
        // lost connections).
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(RoundError::Collective {
            stage,
            error: "burn-collective failed internally (a connection to a peer was lost)".into(),
        }),
    }
}

/// One peer's side of the collective.
pub struct Round<B: Backend> {
    peer: u32,
    device: B::Device,
    topology: Topology,
    timeout: Duration,
    /// Local-only runs register once (the bug is on the global level only).
    registered: bool,
    /// Rounds done so far (the gate's round number).
    rounds: u64,
}

impl<B: Backend> Round<B> {
    /// Peer `peer` (unique over the whole run: the global rank) on `device`.
    pub fn new(peer: usize, device: B::Device, topology: Topology, timeout: Duration) -> Self {
        // burn-communication installs a tracing subscriber that prints INFO lines to standard
        // output on every round (servers started, downloads); a global no-op subscriber set first
        // keeps them out (its own `try_init` then fails quietly). Failures reach the user as errors.
        let _ =
            tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::default());
        Round {
            peer: peer as u32,
            device,
            topology,
            timeout,
            registered: false,
            rounds: 0,
        }
    }

    /// The element-wise sum of `x` over every peer of the run; every peer gets the same tensor.
    pub fn sum(&mut self, x: Tensor<B, 1>) -> Result<Tensor<B, 1>, RoundError> {
        let (id, t) = (PeerId(self.peer), self.timeout);
        let global = self.topology.nodes > 1;
        if global && (self.peer as usize).is_multiple_of(self.topology.local_peers) {
            let topo = &self.topology;
            pass_gate(&topo.gate, self.rounds, topo.node_rank, topo.nodes, t)?;
        }
        self.rounds += 1;
        if !self.registered {
            let (device, cfg) = (self.device.clone(), self.topology.config());
            bounded("register", t, move || register::<B>(id, device, cfg))?;
            self.registered = !global;
        }
        let prim = x.into_primitive().tensor();
        let out = bounded("all_reduce", t, move || {
            all_reduce::<B>(id, prim, ReduceOperation::Sum)
        })?;
        if global {
            let local_peers = self.topology.local_peers;
            bounded("finish", t, move || {
                finish_collective::<B>(id)?;
                // `reset` forgets every local peer: only a process with one peer may call it
                // (with several, `finish` of the last one already leaves the server empty).
                if local_peers == 1 {
                    reset_collective::<B>();
                }
                Ok(())
            })?;
        }
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    /// Leave the collective at the end of a local-only run.
    pub fn close(self) -> Result<(), RoundError> {
        if self.registered {
            let id = PeerId(self.peer);
            bounded("finish", self.timeout, move || finish_collective::<B>(id))?;
        }
        Ok(())
    }
}

/// Ask the gate at `addr` for round `round` as node `rank` of `nodes`; returns once every node
/// has asked for it (at most `timeout`).
fn pass_gate(
    addr: &str,
    round: u64,
    rank: usize,
    nodes: usize,
    timeout: Duration,
) -> Result<(), RoundError> {
    const STAGE: &str = "the round gate (every node must finish the previous round)";
    let fail = |error: String| RoundError::Collective {
        stage: STAGE,
        error,
    };
    let target = addr
        .to_socket_addrs()
        .map_err(|e| fail(format!("{addr}: {e}")))?
        .next()
        .ok_or_else(|| fail(format!("{addr} has no address")))?;
    let mut stream = TcpStream::connect_timeout(&target, timeout.min(Duration::from_secs(10)))
        .map_err(|e| {
            fail(format!(
                "cannot connect to {addr} ({e}); the gate is served by `wrpo-engine orchestrator` on its port + 1"
            ))
        })?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| fail(e.to_string()))?;
    stream
        .write_all(format!("round {round} rank {rank} of {nodes}\n").as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    let mut answer = String::new();
    match BufReader::new(stream).take(512).read_line(&mut answer) {
        Ok(_) if answer.trim() == "go" => Ok(()),
        Ok(0) => Err(fail("the gate closed the connection".into())),
        Ok(_) => Err(fail(answer.trim().to_string())),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(RoundError::Timeout { stage: STAGE })
        }
        Err(e) => Err(fail(e.to_string())),
    }
}

/// Nodes waiting at the gate for one round.
struct Waiting {
    nodes: usize,
    /// Node rank → its open connection (answered `go` when all are here).
    at: BTreeMap<usize, TcpStream>,
}

/// Serve the round gate on `listener` until the process ends: a connection sends
/// `round K rank R of N` and gets `go` once all N ranks have sent round K. A rank that asks
/// again replaces its earlier connection, and connections closed since (a killed node of an
/// earlier run) are dropped, so a restarted run is not let through by a dead node's request.
pub fn serve_gate(listener: TcpListener) {
    let rounds: Arc<Mutex<HashMap<u64, Waiting>>> = Arc::default();
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let rounds = rounds.clone();
        std::thread::spawn(move || arrive(stream, &rounds));
    }
}

/// Parse `round K rank R of N`.
fn parse_request(line: &str) -> Option<(u64, usize, usize)> {
    let w: Vec<&str> = line.split_whitespace().collect();
    match w.as_slice() {
        ["round", k, "rank", r, "of", n] => {
            let (k, r, n) = (k.parse().ok()?, r.parse().ok()?, n.parse().ok()?);
            (r < n).then_some((k, r, n))
        }
        _ => None,
    }
}

fn arrive(mut stream: TcpStream, rounds: &Mutex<HashMap<u64, Waiting>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let request = stream
        .try_clone()
        .ok()
        .and_then(|s| BufReader::new(s).take(256).read_line(&mut line).ok())
        .and_then(|_| parse_request(&line));
    let Some((round, rank, nodes)) = request else {
        let _ = stream.write_all(b"error: expected `round K rank R of N` with R < N\n");
        return;
    };
    let mut rounds = rounds.lock().expect("gate lock");
    let waiting = rounds.entry(round).or_insert_with(|| Waiting {
        nodes,
        at: BTreeMap::new(),
    });
    if waiting.nodes != nodes {
        let msg = format!(
            "error: node rank {rank} says --nodes {nodes}, another node of round {round} says {}\n",
            waiting.nodes
        );
        let _ = stream.write_all(msg.as_bytes());
        return;
    }
    waiting.at.insert(rank, stream);
    waiting.at.retain(|_, s| still_open(s));
    if waiting.at.len() == nodes {
        for s in waiting.at.values_mut() {
            let _ = s.write_all(b"go\n");
        }
        rounds.remove(&round);
    }
}

/// Whether the other end of `s` has not closed it (a pending request sends nothing more, so a
/// non-blocking peek sees "would block" while the node waits and end-of-file once it is gone).
fn still_open(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return false;
    }
    let open = match s.peek(&mut [0u8; 1]) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    };
    open && s.set_nonblocking(false).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || serve_gate(l));
        addr
    }

    #[test]
    fn the_gate_opens_a_round_only_when_every_node_has_asked() {
        let addr = gate();
        let t = Duration::from_secs(20);
        // Three nodes, two rounds; each round must let all three through.
        for round in 0..2 {
            let hs: Vec<_> = (0..3)
                .map(|r| {
                    let a = addr.clone();
                    std::thread::spawn(move || pass_gate(&a, round, r, 3, t))
                })
                .collect();
            for h in hs {
                assert!(h.join().unwrap().is_ok());
            }
        }
        // Two of three: nobody passes (bounded wait).
        let short = Duration::from_millis(300);
        let a = addr.clone();
        let h = std::thread::spawn(move || pass_gate(&a, 5, 0, 3, short));
        let got = pass_gate(&addr, 5, 1, 3, short);
        assert!(matches!(got, Err(RoundError::Timeout { .. })), "{got:?}");
        assert!(matches!(h.join().unwrap(), Err(RoundError::Timeout { .. })));
        // Those two gave up (closed): a later arrival of the missing rank alone does not pass.
        let got = pass_gate(&addr, 5, 2, 3, short);
        assert!(matches!(got, Err(RoundError::Timeout { .. })), "{got:?}");
        // A different --nodes in the same round is refused with both numbers.
        let a = addr.clone();
        let h = std::thread::spawn(move || pass_gate(&a, 9, 0, 2, Duration::from_secs(2)));
        std::thread::sleep(Duration::from_millis(200));
        match pass_gate(&addr, 9, 1, 3, t) {
            Err(RoundError::Collective { error, .. }) => {
                assert!(
                    error.contains("--nodes 3") && error.contains("says 2"),
                    "{error}"
                )
            }
            other => panic!("{other:?}"),
        }
        let _ = h.join();
    }

    #[test]
    fn requests_are_parsed_strictly() {
        assert_eq!(parse_request("round 3 rank 1 of 2\n"), Some((3, 1, 2)));
        assert_eq!(parse_request("round 3 rank 2 of 2"), None);
        assert_eq!(parse_request("round x rank 0 of 2"), None);
        assert_eq!(parse_request("hello"), None);
    }
}
