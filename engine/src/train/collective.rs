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
//! register once per run in [`Round`] and drop the per-round registration.
//!
//! burn-collective's calls block without a timeout of their own (a peer that died, an
//! orchestrator that never answers: the websocket client retries forever). Every call here runs
//! on a helper thread and is waited for with a bound; past it the caller gets an error and the
//! process is expected to exit (the helper thread stays blocked inside burn-collective).

use std::sync::mpsc;
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
    /// `ws://HOST:PORT` of the orchestrator.
    pub orchestrator: String,
    /// `ws://HOST:PORT` at which the other nodes reach this node's tensor data service.
    pub node_address: String,
    /// The port of that service (bound on all interfaces by burn-communication).
    pub data_port: u16,
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
        }
    }

    /// The element-wise sum of `x` over every peer of the run; every peer gets the same tensor.
    pub fn sum(&mut self, x: Tensor<B, 1>) -> Result<Tensor<B, 1>, RoundError> {
        let (id, t) = (PeerId(self.peer), self.timeout);
        let global = self.topology.nodes > 1;
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
