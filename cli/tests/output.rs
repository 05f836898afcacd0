//! The output folder's contracts: one run at a time (a lock), an earlier run's files are moved
//! aside rather than mixed with a fresh run's, and `--resume` refuses other data.

mod common;
use common::{bin, fixtures, stderr, tmp};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `train` of the tied fixture model on `data` into `out`, with `extra` flags.
fn train(out: &Path, data: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.args(["train", "--backend", "cpu", "--model"])
        .arg(fixtures().join("llama-tied"))
        .arg("--data")
        .arg(data)
        .arg("--output")
        .arg(out)
        .args(extra);
    c
}

fn rows(dir: &Path, name: &str, answer: &str) -> PathBuf {
    let row =
        format!(r#"{{"prompt": "1+1?", "chosen": ["{answer}", "Two."], "rejected": ["3."]}}"#);
    let p = dir.join(name);
    std::fs::write(&p, format!("{row}\n{row}\n{row}\n{row}\n")).unwrap();
    p
}

#[test]
fn resume_refuses_other_data_with_the_same_row_count() {
    let dir = tmp("fingerprint");
    let (a, b) = (
        rows(&dir, "a.jsonl", "2."),
        rows(&dir, "b.jsonl", "It is 2."),
    );
    let out = dir.join("run");
    let flags = [
        "--max-steps",
        "2",
        "--save-steps",
        "1",
        "--per-device-train-batch-size",
        "2",
    ];
    let o = train(&out, &a, &flags).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = train(&out, &b, &[&flags[..], &["--resume", "latest"]].concat())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("training data differs") && stderr(&o).contains("checkpoint-1"),
        "{}",
        stderr(&o)
    );
    // The same data resumes (the last update, then the final save).
    let o = train(&out, &a, &[&flags[..], &["--resume", "latest"]].concat())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fresh_run_moves_an_earlier_run_aside() {
    let dir = tmp("aside");
    let data = rows(&dir, "a.jsonl", "2.");
    let out = dir.join("run");
    let flags = [
        "--max-steps",
        "2",
        "--save-steps",
        "1",
        "--per-device-train-batch-size",
        "2",
    ];
    let o = train(&out, &data, &flags).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let first = std::fs::read(out.join("final/model.safetensors")).unwrap();
    let o = train(&out, &data, &["--max-steps", "1"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("earlier-run-1"), "{}", stderr(&o));
    let aside = out.join("earlier-run-1");
    for f in ["checkpoint-1", "final", "metrics.jsonl"] {
        assert!(aside.join(f).exists(), "{f} was not moved aside");
    }
    assert_eq!(
        std::fs::read(aside.join("final/model.safetensors")).unwrap(),
        first,
        "the earlier final model is kept as it was"
    );
    assert!(
        !out.join("checkpoint-1").exists(),
        "the fresh run (1 update, no checkpoint) must not see the earlier checkpoint"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_run_into_the_same_output_refuses_while_the_first_runs() {
    let dir = tmp("lock");
    let data = rows(&dir, "a.jsonl", "2.");
    let out = dir.join("run");
    let mut first = train(
        &out,
        &data,
        &["--max-steps", "1000000", "--save-steps", "0"],
    )
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    // The metrics file is opened after the lock is taken.
    let t0 = std::time::Instant::now();
    while !out.join("metrics.jsonl").exists() {
        assert!(
            t0.elapsed().as_secs() < 120,
            "the first run did not start writing"
        );
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended early"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = train(&out, &data, &["--max-steps", "1"]).output().unwrap();
    let still_running = first.try_wait().unwrap().is_none();
    if still_running {
        assert!(!o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains("another run"), "{}", stderr(&o));
    } else {
        println!("WARNING: the first run ended before the second started; lock not exercised");
    }
    first.kill().ok();
    first.wait().unwrap();
    // A killed run's lock is released by the OS: a resume or a new run proceeds.
    let o = train(&out, &data, &["--max-steps", "1"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        still_running,
        "the first run finished too fast to test the lock"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn checkpoints(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.starts_with("checkpoint-").then_some(name)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn save_total_limit_removes_the_oldest_checkpoints() {
    let dir = tmp("rotate");
    let data = rows(&dir, "a.jsonl", "2.");
    let out = dir.join("run");
    let o = train(
        &out,
        &data,
        &[
            "--max-steps",
            "5",
            "--save-steps",
            "1",
            "--save-total-limit",
            "2",
            "--per-device-train-batch-size",
            "2",
        ],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // Updates 1-4 write checkpoints (the 5th is the final model); the two newest are kept.
    assert_eq!(checkpoints(&out), ["checkpoint-3", "checkpoint-4"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resume_refuses_changed_settings_and_names_them() {
    let dir = tmp("settings");
    let data = rows(&dir, "a.jsonl", "2.");
    let out = dir.join("run");
    let flags = ["--max-steps", "2", "--save-steps", "1"];
    let o = train(&out, &data, &flags).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = train(
        &out,
        &data,
        &[&flags[..], &["--resume", "latest", "--beta", "0.2"]].concat(),
    )
    .output()
    .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("settings differ") && e.contains("beta"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A learning rate of 1e30 with no warm-up blows the weights up in the first update, so the
/// second update's loss is not finite: the run stops before applying it, exits non-zero, names
/// the update and the last checkpoint, and that checkpoint is intact.
#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let dir = tmp("nonfinite");
    let data = rows(&dir, "a.jsonl", "2.");
    let out = dir.join("run");
    let o = train(
        &out,
        &data,
        &[
            "--max-steps",
            "4",
            "--save-steps",
            "1",
            "--warmup-ratio",
            "0",
            "--lr-scheduler-type",
            "constant",
            "--learning-rate",
            "1e30",
        ],
    )
    .output()
    .unwrap();
    assert!(!o.status.success());
    assert_ne!(o.status.code(), Some(101), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("non-finite") && e.contains("update 2") && e.contains("checkpoint-1"),
        "{e}"
    );
    assert!(!e.contains("internal failure"), "{e}");
    assert_eq!(checkpoints(&out), ["checkpoint-1"]);
    let st: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoint-1/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(st["global_step"], 1);
    assert!(out.join("checkpoint-1/model.safetensors").is_file());
    assert!(
        !out.join("final").exists(),
        "no final model after a failed run"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tmpfs of `bytes` mounted at `dir` for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (and the reason) where this process may not mount: not root, or no CAP_SYS_ADMIN
    /// (an unprivileged container).
    fn mount(dir: &Path, bytes: u64) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes}"))
            .arg("tmpfs")
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !o.status.success() {
            return Err(format!("mount -t tmpfs failed: {}", stderr(&o).trim()));
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }

    fn remount(&self, opts: &str) {
        let o = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(o.status.success(), "remount {opts}: {}", stderr(&o));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

fn same_bytes(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(x == y, "{} and {} differ", a.display(), b.display());
}

/// The disk fills while checkpoint-2 is written: the run stops non-zero naming the path, no
/// partial folder is left behind, checkpoint-1 stays intact, and once there is space `--resume`
/// finishes the run exactly as an uninterrupted one. A read-only `--output` is refused by name.
/// Needs `mount` (root with CAP_SYS_ADMIN, as in CI); elsewhere it says loudly that it skipped.
#[test]
fn a_full_disk_mid_run_keeps_the_last_checkpoint_and_resume_finishes() {
    let dir = tmp("full-disk");
    let data = rows(&dir, "rows.jsonl", "2.");
    let flags = [
        "--max-steps",
        "3",
        "--save-steps",
        "1",
        "--per-device-train-batch-size",
        "2",
    ];
    // The same run with room to spare: what each file must hold.
    let whole = dir.join("whole");
    let o = train(&whole, &data, &flags).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let ckpt = dir_bytes(&whole.join("checkpoint-1"));

    // Room for the start of the run and checkpoint-1, not for checkpoint-2 as well.
    let mnt = dir.join("mnt");
    let fs = match Tmpfs::mount(&mnt, ckpt + ckpt / 2) {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!(
                "SKIPPED a_full_disk_mid_run_keeps_the_last_checkpoint_and_resume_finishes: \
                 needs a small tmpfs mount ({why})"
            );
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
    };
    let out = mnt.join("run");
    let o = train(&out, &data, &flags).output().unwrap();
    let err = stderr(&o);
    assert!(!o.status.success() && o.status.code() != Some(101), "{err}");
    assert!(!err.contains("internal failure"), "{err}");
    assert!(
        err.contains("No space left on device") && err.contains(&*out.to_string_lossy()),
        "the error names neither the cause nor the path: {err}"
    );
    println!("full disk: {}", err.lines().last().unwrap_or_default());
    assert_eq!(checkpoints(&out), ["checkpoint-1"], "{err}");
    let leftovers: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");
    for f in ["model.safetensors", "optimizer.safetensors"] {
        same_bytes(
            &out.join("checkpoint-1").join(f),
            &whole.join("checkpoint-1").join(f),
        );
    }

    // Space again: the resumed run ends where the uninterrupted one did, bit for bit.
    fs.remount(&format!("size={}", 64 << 20));
    let o = train(&out, &data, &[&flags[..], &["--resume", "latest"]].concat())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    same_bytes(
        &out.join("final/model.safetensors"),
        &whole.join("final/model.safetensors"),
    );

    // A read-only output: refused up front, by path.
    fs.remount("ro");
    let ro = mnt.join("ro-run");
    let o = train(&ro, &data, &flags).output().unwrap();
    let err = stderr(&o);
    assert!(!o.status.success() && o.status.code() != Some(101), "{err}");
    assert!(!err.contains("internal failure"), "{err}");
    assert!(
        err.contains(&*ro.to_string_lossy()) && err.contains("Read-only file system"),
        "{err}"
    );
    drop(fs);
    let _ = std::fs::remove_dir_all(&dir);
}
