//! The `wrpo-engine` binary end to end: exit codes, messages, output contract.

mod common;
use common::{bin, fixtures, stderr, tmp};
use wrpo_tests::{assert_close, tol};

#[test]
fn embedded_default_runs_and_keeps_the_output_contract() {
    let o = bin().args(["logps", "--backend", "cpu"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout.clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 64, "one line per bundled row");
    for l in &lines {
        let keys: Vec<&String> = l.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["chosen", "chosen_tokens", "rejected", "rejected_tokens"]
        );
        assert_eq!(l["chosen"].as_array().unwrap().len(), 2);
        assert!(l["chosen"][0].as_f64().unwrap() < 0.0);
    }
    assert!(stderr(&o).contains("backend: cpu"));
}

#[test]
fn logps_file_agrees_with_transformers() {
    let out = tmp("agree").join("out.jsonl");
    let model = fixtures().join("llama-tied");
    let o = bin()
        .args(["logps", "--backend", "cpu", "--batch-size", "3", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(fixtures().join("rows.jsonl"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("expected_logps.json")).unwrap())
            .unwrap();
    let want = &expected["cases"][0];
    assert!(want["max_length"].is_null());
    let got: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rows = want["rows"].as_array().unwrap();
    assert_eq!(got.len(), rows.len());
    for (g, w) in got.iter().zip(rows) {
        for key in ["chosen", "rejected"] {
            for (a, b) in g[key]
                .as_array()
                .unwrap()
                .iter()
                .zip(w[key].as_array().unwrap())
            {
                let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
                assert_close(&format!("logps {key}"), &[a], &[b], tol::LOGPS_F32);
            }
        }
        assert_eq!(g["chosen_tokens"], w["chosen_tokens"]);
        assert_eq!(g["rejected_tokens"], w["rejected_tokens"]);
    }
}

#[test]
fn bad_row_fails_with_file_line_field_and_keeps_existing_output() {
    let dir = tmp("bad");
    let data = dir.join("bad.jsonl");
    std::fs::write(&data, "{\"prompt\": \"a\", \"chosen\": [\"x\"], \"rejected\": [\"y\"]}\n{\"prompt\": \"b\", \"chosen\": [\"x\"], \"rejected\": [{\"role\": \"bot\", \"content\": \"y\"}]}\n").unwrap();
    let out = dir.join("out.jsonl");
    std::fs::write(&out, "previous results\n").unwrap();
    let o = bin()
        .args(["logps", "--backend", "cpu", "--model"])
        .arg(fixtures().join("llama-gqa"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "{}:2: field `rejected[0].role`: unknown role \"bot\"",
            data.display()
        )),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous results\n");
    // --skip-bad-rows: the bad row keeps its place, marked skipped.
    let o = bin()
        .args(["logps", "--backend", "cpu", "--skip-bad-rows", "--model"])
        .arg(fixtures().join("llama-gqa"))
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8(o.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["chosen"].as_array().unwrap().len(), 1);
    assert!(lines[1]["skipped"].as_str().unwrap().contains(":2:"));
    assert!(stderr(&o).contains("1 bad rows skipped"));
}

#[test]
fn unavailable_backend_is_a_clear_error_not_a_panic() {
    let o = bin().args(["logps", "--backend", "cuda"]).output().unwrap();
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "{err}");
    if !o.status.success() {
        assert!(err.contains("--backend cuda:"), "{err}");
    } else {
        eprintln!("NOTE: a CUDA device is present; the no-driver message was not exercised");
    }
    let o = bin().args(["logps", "--backend", "tpu"]).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown backend \"tpu\""));
}

#[test]
fn missing_files_name_the_path() {
    let o = bin()
        .args([
            "logps",
            "--backend",
            "cpu",
            "--model",
            "/nonexistent/model",
            "--data",
            "x.jsonl",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("/nonexistent/model/config.json"),
        "{}",
        stderr(&o)
    );
}

fn records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The README's first command: the built-in tiny model learns the bundled set, the loss falls and
/// the reward accuracy rises, on train and held-out rows; the outputs contract is there.
#[test]
fn train_embedded_default_learns() {
    let out = tmp("train-default");
    let o = bin()
        .args(["train", "--backend", "cpu", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let recs = records(&out.join("metrics.jsonl"));
    let train: Vec<&serde_json::Value> = recs.iter().filter(|r| r.get("loss").is_some()).collect();
    let eval: Vec<&serde_json::Value> = recs
        .iter()
        .filter(|r| r.get("eval/loss").is_some())
        .collect();
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap();
    // The first loss is log 2 (policy = reference).
    assert_close(
        "first loss",
        &[f(train[0], "loss")],
        &[2f64.ln()],
        tol::LOSS_AT_REFERENCE_F32,
    );
    let tail = &train[train.len() - 4..];
    let late_loss = tail.iter().map(|r| f(r, "loss")).sum::<f64>() / 4.0;
    let late_acc = tail.iter().map(|r| f(r, "rewards/accuracies")).sum::<f64>() / 4.0;
    assert!(late_loss < 0.3 * 2f64.ln(), "train loss fell: {late_loss}");
    assert!(late_acc > 0.9, "train reward accuracy rose: {late_acc}");
    assert!(f(eval.last().unwrap(), "eval/loss") < f(eval[0], "eval/loss"));
    assert!(f(eval.last().unwrap(), "eval/rewards/accuracies") >= 0.75);
    for k in [
        "step",
        "epoch",
        "loss",
        "learning_rate",
        "grad_norm",
        "cur_alpha",
        "rewards/chosen",
        "rewards/source_chosen",
        "rewards/target_chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "rewards/source_accuracies",
        "rewards/pivot_accuracies",
        "logps/chosen",
        "logps/source_chosen",
        "logps/target_chosen",
        "logps/rejected",
        "tokens_per_second",
    ] {
        assert!(train[0].get(k).is_some(), "metrics.jsonl lacks {k}");
    }
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "optimizer.safetensors",
        "trainer_state.json",
        "training_config.yaml",
        "training_curves.png",
    ] {
        assert!(out.join("final").join(f).is_file(), "final/{f} missing");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn train_bad_input_fails_clearly() {
    let out = tmp("train-bad");
    let good = r#"{"prompt": "1+1?", "chosen": ["2.", "Two."], "rejected": ["3."]}"#;
    let three = r#"{"prompt": "2+2?", "chosen": ["4.", "Four.", "4!"], "rejected": ["5."]}"#;
    let data = out.join("rows.jsonl");
    std::fs::write(&data, format!("{good}\n{three}\n{good}\n")).unwrap();
    let model = fixtures().join("llama-tied");
    let run_in = |dir: &str, extra: &[&str]| {
        let mut c = bin();
        c.args(["train", "--backend", "cpu", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&data);
        c.arg("--output").arg(out.join(dir)).args(extra);
        c.output().unwrap()
    };
    let run = |extra: &[&str]| run_in("o", extra);
    // A row whose chosen count differs: file:line and field.
    let o = run(&[]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("rows.jsonl:2") && e.contains("chosen") && e.contains("--skip-bad-rows"),
        "{e}"
    );
    // Skipped and counted with --skip-bad-rows.
    let o = run(&["--skip-bad-rows", "true", "--max-steps", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("skipped 1 bad rows"), "{}", stderr(&o));
    // Unknown configuration key: named, with the file.
    let cfg = out.join("bad.yaml");
    std::fs::write(&cfg, "learning_rate: 1e-6\nbeta_typo: 0.1\n").unwrap();
    let o = run(&["--config", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("bad.yaml") && stderr(&o).contains("beta_typo"),
        "{}",
        stderr(&o)
    );
    // WRPO on pairwise rows: says what to use instead.
    std::fs::write(
        &data,
        r#"{"prompt": "1+1?", "chosen": ["2."], "rejected": ["3."]}"#,
    )
    .unwrap();
    let o = run(&[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--loss-type dpo"), "{}", stderr(&o));
    let o = run(&["--loss", "dpo", "--max-steps", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Nothing to resume from.
    let o = run_in("empty", &["--resume", "--loss", "dpo"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--resume latest"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&out);
}

/// `sft` on the embedded default: the token loss falls; `--packing` packs and says how.
#[test]
fn sft_embedded_default_learns_and_packs() {
    let out = tmp("sft-default");
    let o = bin()
        .args(["sft", "--backend", "cpu", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let recs = records(&out.join("metrics.jsonl"));
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap();
    let (first, last) = (&recs[0], recs.last().unwrap());
    assert!(f(last, "loss") < 0.5 * f(first, "loss"), "sft loss fell");
    assert!(f(last, "mean_token_accuracy") > f(first, "mean_token_accuracy"));
    assert!(out.join("final/model.safetensors").is_file());
    let o = bin()
        .args(["sft", "--backend", "cpu", "--packing", "true", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("packed into"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&out);
}

/// `bench kernels --json`: one record per log-prob case, then the preference-loss record, each
/// with its `op`, shape, both paths' timings and the parity errors.
#[test]
fn bench_kernels_json_records() {
    let o = bin()
        .args([
            "bench",
            "kernels",
            "--backend",
            "cpu",
            "--shape",
            "2,3,11",
            "--reps",
            "1",
            "--warmup",
            "0",
            "--loss-rows",
            "5",
            "--seed",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8(o.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["op"], "token_logprobs");
    assert_eq!(lines[0]["shape"], serde_json::json!([2, 3, 11]));
    assert_eq!(lines[1]["op"], "preference_loss");
    assert_eq!(lines[1]["shape"], serde_json::json!([5, 2, 1]));
    for l in &lines {
        assert_eq!(l["seed"], 1);
        for path in ["fused", "composite"] {
            assert!(l[path]["forward_ms"].as_f64().unwrap() > 0.0, "{l}");
            assert!(
                l[path]["forward_backward_ms"].as_f64().unwrap() > 0.0,
                "{l}"
            );
        }
        assert!(l["time_ratio"].as_f64().unwrap() > 0.0, "{l}");
        assert!(
            l["grad_max_rel_err"].as_f64().unwrap() <= tol::FUSED_VS_COMPOSITE_GRAD_REL_F32,
            "{l}"
        );
    }
    // Without CubeCL kernels (cpu) both loss paths are the composite: the same numbers.
    assert_eq!(
        lines[1]["loss_abs_err"].as_f64().unwrap(),
        0.0,
        "{}",
        lines[1]
    );
    // --loss-rows 0 skips the loss record.
    let o = bin()
        .args([
            "bench",
            "kernels",
            "--backend",
            "cpu",
            "--shape",
            "2,3,11",
            "--reps",
            "1",
            "--loss-rows",
            "0",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8(o.stdout).unwrap().lines().count(), 1);
}

#[test]
fn bench_sample_json_record() {
    // A tiny model: the record's shape and counts (the bench itself checks that every row
    // generated exactly --max-new-tokens tokens).
    let o = bin()
        .args(["bench", "sample", "--backend", "cpu", "--json", "--reps", "1", "--warmup", "0"])
        .args("--hidden 64 --layers 2 --heads 4 --kv-heads 2 --intermediate 128 --vocab 256 --batch 3 --prompt-len 5 --max-new-tokens 4".split_whitespace())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["op"], "greedy_decode");
    assert_eq!(r["shape"]["batch"], 3);
    assert_eq!(r["shape"]["new_tokens"], 4);
    let (ms, tps) = (
        r["generate_ms_median"].as_f64().unwrap(),
        r["tokens_per_second"].as_f64().unwrap(),
    );
    assert!(ms > 0.0 && (tps * ms / 1e3 - 12.0).abs() < 1e-6, "{r}");
}
