//! Data parallelism end to end with the `wrpo-engine` binary on the cpu backend, loopback only:
//! two nodes (processes) with per-device batch 2 against one process with batch 4 on the same
//! data (same trajectory and final weights up to f32 summation order), two device peers in one
//! process likewise, both levels at once (two nodes of two devices), and failures (a killed
//! peer, a killed or unreachable orchestrator) that end every process with an error in bounded
//! time and leave the last checkpoint intact.

mod common;
use common::{bin, stderr, tmp};
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use wrpo_engine_core::train::state::read_safetensors;
use wrpo_tests::{assert_close, paired_weights, tol};

/// A port nobody listens on right now (bind to port 0, read it, close).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the child when dropped (a failing test leaves no process behind).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The orchestrator on a free port whose port + 1 (its round gate) is free too.
fn orchestrator() -> (Guard, u16) {
    let port = loop {
        let p = free_port();
        if p < u16::MAX && TcpListener::bind(("0.0.0.0", p + 1)).is_ok() {
            break p;
        }
    };
    let child = bin()
        .args(["orchestrator", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "orchestrator did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (Guard(child), port)
}

/// The embedded tiny model on the bundled rows: 5 updates (the first at LR 0: warm-up), no eval,
/// no intermediate checkpoints; `over` replaces settings (`("save-steps", "1")`).
fn train(out: &Path, batch: usize, over: &[(&str, &str)]) -> Command {
    recipe("train", out, batch, over)
}

/// [`train`] for `train` or `sft`.
fn recipe(command: &str, out: &Path, batch: usize, over: &[(&str, &str)]) -> Command {
    let batch = batch.to_string();
    let mut settings: BTreeMap<&str, &str> = [
        ("max-steps", "5"),
        ("per-device-train-batch-size", batch.as_str()),
        ("gradient-accumulation-steps", "1"),
        ("eval-fraction", "0"),
        ("save-steps", "0"),
    ]
    .into_iter()
    .collect();
    settings.extend(over.iter().copied());
    let mut c = bin();
    c.args([command, "--backend", "cpu", "--output"]).arg(out);
    for (k, v) in settings {
        c.arg(format!("--{k}")).arg(v);
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn node(cmd: &mut Command, nodes: usize, rank: usize, orch: u16) -> &mut Command {
    cmd.args([
        "--nodes",
        &nodes.to_string(),
        "--node-rank",
        &rank.to_string(),
    ])
    .args(["--orchestrator", &format!("127.0.0.1:{orch}")])
    .args(["--data-port", &free_port().to_string()])
}

/// Wait (at most 60 s after `since`) for `child` to exit; it must fail. Returns its last
/// `error:` line (printed with the time it took).
fn fails_within(child: &mut Guard, since: Instant, who: &str, event: &str) -> String {
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "{who} still running 60 s after {event}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{who} succeeded: {err}");
    let last = err
        .lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or("")
        .to_string();
    println!(
        "{who} stopped {:.1} s after {event}: {last}",
        since.elapsed().as_secs_f64()
    );
    last
}

fn metrics(out: &Path) -> Vec<BTreeMap<String, f64>> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v.as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.as_str() != "tokens_per_second")
                .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
                .collect()
        })
        .collect()
}

/// Every metric of every update and the final weights of `got` against `want`.
fn same_run(label: &str, got: &Path, want: &Path) {
    same_run_of(label, got, want, "final/model.safetensors")
}

/// [`same_run`] with the final weights in `weights` (a LoRA run's adapter file).
fn same_run_of(label: &str, got: &Path, want: &Path, weights: &str) {
    let (g, w) = (metrics(got), metrics(want));
    assert_eq!(g.len(), w.len(), "{label}: number of records");
    assert_eq!(g.len(), 5, "{label}: one record per update");
    for key in w[0].keys() {
        // A token accuracy counts arg-max ties broken by rounding: one token either way.
        let tol = if key == "mean_token_accuracy" {
            tol::TOKEN_ACCURACY
        } else {
            tol::DATA_PARALLEL_F32
        };
        let gv: Vec<f64> = g.iter().map(|r| r[key]).collect();
        let wv: Vec<f64> = w.iter().map(|r| r[key]).collect();
        let rep = assert_close(&format!("{label} {key}"), &gv, &wv, tol);
        println!(
            "{label} {key:28} max abs {:.2e} max rel {:.2e}",
            rep.max_abs, rep.max_rel
        );
    }
    let (a, b) = paired_weights(&got.join(weights), &want.join(weights), label);
    let rep = assert_close(
        &format!("{label} final weights"),
        &a,
        &b,
        tol::DATA_PARALLEL_WEIGHTS_F32,
    );
    println!(
        "{label} final weights max abs {:.2e} max rel {:.2e}",
        rep.max_abs, rep.max_rel
    );
}

/// Node 0's and node 1's stderr of a 2-node run of [`train`] with batch 2 (both succeed).
fn two_nodes(out: &Path, over: &[(&str, &str)]) -> (String, String) {
    two_nodes_of(out, 2, None, over)
}

/// [`two_nodes`] with per-device batch `batch` and, if given, `--devices devices` on each node.
fn two_nodes_of(
    out: &Path,
    batch: usize,
    devices: Option<&str>,
    over: &[(&str, &str)],
) -> (String, String) {
    let (_orch, port) = orchestrator();
    let cmd = |rank| {
        let mut c = train(out, batch, over);
        node(&mut c, 2, rank, port);
        if let Some(d) = devices {
            c.args(["--devices", d]);
        }
        c
    };
    // Both nodes get the same --output (as on a shared file system); only rank 0 writes.
    let mut n1 = Guard(cmd(1).spawn().unwrap());
    let n0 = cmd(0).output().unwrap();
    let mut e1 = String::new();
    std::io::Read::read_to_string(&mut n1.0.stderr.take().unwrap(), &mut e1).unwrap();
    let s1 = n1.0.wait().unwrap();
    assert!(n0.status.success(), "node 0: {}", stderr(&n0));
    assert!(s1.success(), "node 1: {e1}");
    (stderr(&n0), e1)
}

#[test]
fn two_nodes_of_batch_2_match_one_process_of_batch_4() {
    let dir = tmp("nodes");
    let single = train(&dir.join("single"), 4, &[]).output().unwrap();
    assert!(single.status.success(), "{}", stderr(&single));
    let (e0, _) = two_nodes(&dir.join("dp"), &[]);
    assert!(e0.contains("all-reduce"), "{e0}");
    for line in e0
        .lines()
        .filter(|l| l.contains("all-reduce") || l.contains("tok/s"))
    {
        println!("node 0: {line}");
    }
    same_run(
        "2 nodes × batch 2 vs 1 × batch 4",
        &dir.join("dp"),
        &dir.join("single"),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Both levels at once: two nodes of two device peers each (4 peers) × batch 1, against one
/// process with the same micro-batches (batch 1 × 4 accumulation steps). Against batch 4 the
/// rows would be padded to the longest of the four, which moves f32 results by more than the
/// summation order does (log-probs 2.9e-4 instead of 1e-5 apart, measured).
#[test]
fn two_nodes_of_two_devices_match_one_process_of_batch_1_times_4() {
    let dir = tmp("nodes-devices");
    let single = train(
        &dir.join("single"),
        1,
        &[("gradient-accumulation-steps", "4")],
    )
    .output()
    .unwrap();
    assert!(single.status.success(), "{}", stderr(&single));
    let (e0, e1) = two_nodes_of(&dir.join("dp"), 1, Some("cpu,cpu"), &[]);
    assert!(e0.contains("rank 0 of 4"), "{e0}");
    assert!(e1.contains("rank 2 of 4"), "{e1}");
    same_run(
        "2 nodes × --devices cpu,cpu × batch 1 vs 1 × batch 1 × accumulation 4",
        &dir.join("dp"),
        &dir.join("single"),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--precompute-ref`: each node scores half the rows, one all-reduce shares the table, rank 0
/// caches it; the trajectory is the single process's (which scores every row itself).
#[test]
fn two_nodes_share_the_precomputed_reference() {
    let dir = tmp("precompute");
    let cache = |name: &str| dir.join(name).display().to_string();
    let (c1, c2) = (cache("cache1"), cache("cache2"));
    let single = train(
        &dir.join("single"),
        4,
        &[("precompute-ref", "true"), ("cache-dir", &c1)],
    )
    .output()
    .unwrap();
    assert!(single.status.success(), "{}", stderr(&single));
    let (e0, _) = two_nodes(
        &dir.join("dp"),
        &[("precompute-ref", "true"), ("cache-dir", &c2)],
    );
    assert!(e0.contains("computed by 2 peers"), "{e0}");
    // Rank 0 caches the shared tables (training and eval split) as a single process does.
    let count = |c: &str| {
        std::fs::read_dir(dir.join(c).join("ref-logps"))
            .unwrap()
            .count()
    };
    assert_eq!(count("cache2"), count("cache1"));
    same_run(
        "2 nodes × batch 2 vs 1 × batch 4, precomputed reference",
        &dir.join("dp"),
        &dir.join("single"),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_device_peers_in_one_process_match_one_device() {
    let dir = tmp("devices");
    let single = train(&dir.join("single"), 4, &[]).output().unwrap();
    assert!(single.status.success(), "{}", stderr(&single));
    let two = train(&dir.join("two"), 2, &[])
        .args(["--devices", "cpu,cpu"])
        .output()
        .unwrap();
    assert!(two.status.success(), "{}", stderr(&two));
    same_run(
        "--devices cpu,cpu × batch 2 vs 1 × batch 4",
        &dir.join("two"),
        &dir.join("single"),
    );
    // A checkpoint of 2 peers does not resume with 1.
    let ckpt = train(&dir.join("ck"), 2, &[("save-steps", "1")])
        .args(["--devices", "cpu,cpu"])
        .output()
        .unwrap();
    assert!(ckpt.status.success(), "{}", stderr(&ckpt));
    let again = train(&dir.join("ck"), 2, &[("save-steps", "1")])
        .arg("--resume")
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("written by a run of 2 peers (devices × nodes), this run has 1"),
        "{}",
        stderr(&again)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sft_two_device_peers_match_one_device() {
    let dir = tmp("sft");
    let single = recipe("sft", &dir.join("single"), 4, &[]).output().unwrap();
    assert!(single.status.success(), "{}", stderr(&single));
    let two = recipe("sft", &dir.join("two"), 2, &[])
        .args(["--devices", "cpu,cpu"])
        .output()
        .unwrap();
    assert!(two.status.success(), "{}", stderr(&two));
    same_run(
        "sft --devices cpu,cpu × batch 2 vs 1 × batch 4",
        &dir.join("two"),
        &dir.join("single"),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_node_stops_the_other_in_bounded_time_and_keeps_the_checkpoint() {
    let dir = tmp("kill");
    let (_orch, port) = orchestrator();
    let out = dir.join("out");
    let long = |rank| {
        let mut c = train(
            &out,
            2,
            &[
                ("max-steps", "500"),
                ("save-steps", "1"),
                ("save-total-limit", "2"),
            ],
        );
        node(&mut c, 2, rank, port).args(["--collective-timeout", "10"]);
        c
    };
    let mut n0 = Guard(long(0).spawn().unwrap());
    let mut n1 = Guard(long(1).spawn().unwrap());
    let t0 = Instant::now();
    while !out
        .join("checkpoint-1")
        .join("trainer_state.json")
        .is_file()
    {
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint-1");
        assert!(n0.0.try_wait().unwrap().is_none(), "node 0 ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    n1.0.kill().unwrap();
    n1.0.wait().unwrap();
    // Bound: the collective timeout (10 s) plus one update and the error path.
    let last = fails_within(&mut n0, Instant::now(), "node 0", "node 1 was killed");
    assert!(
        last.contains("node rank 1"),
        "the error names the peer: {last}"
    );
    // The newest checkpoint is complete: its state parses and its weights load.
    let mut ckpts: Vec<(usize, PathBuf)> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name()?.to_str()?.to_string();
            // The run's lock file stays (the OS released the lock); no temporary folder may.
            assert!(
                !name.starts_with('.') || name == ".wrpo-engine.lock",
                "a temporary folder was left: {name}"
            );
            Some((name.strip_prefix("checkpoint-")?.parse().ok()?, p))
        })
        .collect();
    ckpts.sort();
    let (step, newest) = ckpts.last().unwrap();
    let st: Value =
        serde_json::from_str(&std::fs::read_to_string(newest.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(st["global_step"].as_u64().unwrap() as usize, *step);
    assert_eq!(st["world_size"].as_u64().unwrap(), 2);
    assert!(!read_safetensors(&newest.join("model.safetensors"))
        .unwrap()
        .is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The orchestrator killed mid-run: both nodes stop within the bound, naming it.
#[test]
fn a_killed_orchestrator_stops_every_node_in_bounded_time() {
    let dir = tmp("killorch");
    let (mut orch, port) = orchestrator();
    let out = dir.join("out");
    let long = |rank| {
        let mut c = train(&out, 2, &[("max-steps", "500"), ("save-steps", "1")]);
        node(&mut c, 2, rank, port).args(["--collective-timeout", "10"]);
        Guard(c.spawn().unwrap())
    };
    let mut nodes = [long(0), long(1)];
    let t0 = Instant::now();
    while !out.join("checkpoint-2").is_dir() {
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint-2");
        for (rank, n) in nodes.iter_mut().enumerate() {
            // A node that ended early (e.g. a data port taken between free_port() and its bind)
            // fails here at once with its status instead of after the 300 s bound.
            let status = n.0.try_wait().unwrap();
            assert!(status.is_none(), "node {rank} ended early: {status:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    orch.0.kill().unwrap();
    orch.0.wait().unwrap();
    let killed = Instant::now();
    for (rank, n) in nodes.iter_mut().enumerate() {
        let who = format!("node {rank}");
        let last = fails_within(n, killed, &who, "the orchestrator was killed");
        assert!(
            last.contains(&format!(
                "the orchestrator at 127.0.0.1:{port} does not answer"
            )),
            "node {rank}: {last}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unreachable_orchestrator_is_an_error_in_bounded_time() {
    let dir = tmp("noorch");
    let port = free_port(); // nobody listens
    let t0 = Instant::now();
    let o = node(&mut train(&dir.join("out"), 2, &[]), 2, 0, port)
        .args(["--collective-timeout", "3"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(t0.elapsed() < Duration::from_secs(60));
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "the orchestrator at 127.0.0.1:{port} does not answer"
        )),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// LoRA adapters train data-parallel (their gradients are what the peers all-reduce): train and
/// sft on two device peers match one device with the same global batch.
#[test]
fn lora_two_device_peers_match_one_device() {
    let dir = tmp("lora");
    let lora = [("lora-r", "4"), ("lora-target-modules", "all-linear")];
    for command in ["train", "sft"] {
        let single = recipe(command, &dir.join(command).join("single"), 4, &lora)
            .output()
            .unwrap();
        assert!(single.status.success(), "{}", stderr(&single));
        let two = recipe(command, &dir.join(command).join("two"), 2, &lora)
            .args(["--devices", "cpu,cpu"])
            .output()
            .unwrap();
        assert!(two.status.success(), "{}", stderr(&two));
        same_run_of(
            &format!("{command} --lora-r 4 --devices cpu,cpu × batch 2 vs 1 × batch 4"),
            &dir.join(command).join("two"),
            &dir.join(command).join("single"),
            "final/adapter_model.safetensors",
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
