//! Documented `train` features checked by what they must change: `--ref-model` (the reference is
//! another model, checked against PyTorch's log-probs of that model), `--eval-data` (the eval
//! record describes the eval file's rows, checked against `logps` on them), the logging and eval
//! intervals, and the folders `train` / `sft` save (the ones transformers loaded).

mod common;
use common::{bin, fixtures, lines, stderr, tmp};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use wrpo_tests::{assert_close, tol};

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", stderr(&o));
    o
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn mean(v: impl IntoIterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.into_iter().collect();
    v.iter().sum::<f64>() / v.len() as f64
}

/// `train_rows.jsonl` with the wrpo_k1r1 settings (β 0.1, two micro-batches of two rows per
/// update, no shuffling), into `out`, with `extra` flags.
fn train(model: &Path, out: &Path, extra: &[&str]) -> Command {
    let case = fixtures().join("train");
    let mut c = bin();
    c.args(["train", "--backend", "cpu", "--model"])
        .arg(model)
        .arg("--data")
        .arg(case.join("train_rows.jsonl"))
        .arg("--config")
        .arg(case.join("wrpo_k1r1").join("config.yaml"))
        .arg("--output")
        .arg(out)
        .args(["--save-steps", "0"])
        .args(extra);
    c
}

/// The policy is a different model from the reference: the fixture model's weights after
/// PyTorch's six WRPO updates (tests/fixtures/train/wrpo_k1r1/final_model.safetensors) with its
/// config and tokenizer. `--ref-model` names the untrained fixture model, whose log-probs on these
/// rows PyTorch recorded (`initial_ref_logps`). Update 1's metrics are computed before it changes
/// anything, so `logps/x − rewards/x / β` is the mean reference log-prob of its four rows: it must
/// be PyTorch's, and without `--ref-model` it is the policy's own.
#[test]
fn ref_model_is_the_reference() {
    let dir = tmp("ref-model");
    let policy = dir.join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    let base = fixtures().join("llama-tied");
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        std::fs::copy(base.join(f), policy.join(f)).unwrap();
    }
    std::fs::copy(
        fixtures().join("train/wrpo_k1r1/final_model.safetensors"),
        policy.join("model.safetensors"),
    )
    .unwrap();
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("train/wrpo_k1r1/expected.json")).unwrap(),
    )
    .unwrap();
    let refs = &expected["initial_ref_logps"].as_array().unwrap()[..4];
    let ref_mean = |col: &str, i: usize| mean(refs.iter().map(|r| r[col][i].as_f64().unwrap()));
    let beta = 0.1;

    let first_update = |extra: &[&str], name: &str| -> Value {
        let out = dir.join(name);
        ok(
            train(&policy, &out, &[&["--max-steps", "1"], extra].concat())
                .output()
                .unwrap(),
        );
        lines(&out.join("metrics.jsonl"))
            .into_iter()
            .find(|r| r.get("loss").is_some())
            .expect("a training record")
    };
    let rec = first_update(&["--ref-model", base.to_str().unwrap()], "with-ref");
    for (metric, col, i) in [
        ("target_chosen", "chosen", 1),
        ("source_chosen", "chosen", 0),
        ("rejected", "rejected", 0),
    ] {
        let got =
            num(&rec, &format!("logps/{metric}")) - num(&rec, &format!("rewards/{metric}")) / beta;
        let rep = assert_close(
            &format!("--ref-model: mean reference log-prob, {metric}"),
            &[got],
            &[ref_mean(col, i)],
            tol::LOGPS_F32,
        );
        println!("--ref-model {metric}: max abs {:.2e}", rep.max_abs);
    }
    // The reference really differs from the policy (the check above is not vacuous), and without
    // the flag the policy is its own reference.
    assert!(num(&rec, "rewards/margins").abs() > 0.1, "{rec}");
    let own = first_update(&[], "without-ref");
    assert_eq!(num(&own, "rewards/margins"), 0.0, "{own}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--eval-data`: the final eval record (`eval/…`) holds the means over the eval file's rows of the
/// final policy's log-probs, and of β × (final − initial) for the rewards; both measured here with
/// `logps` on the eval file, which the training rows do not share.
#[test]
fn eval_data_is_evaluated() {
    let dir = tmp("eval-data");
    let tiny = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../engine/assets/tiny/wrpo_tiny.jsonl"),
    )
    .unwrap();
    // train_rows.jsonl is the first 12 lines; these 5 follow them.
    let eval_rows: String = tiny
        .lines()
        .skip(12)
        .take(5)
        .map(|l| format!("{l}\n"))
        .collect();
    let eval = dir.join("eval.jsonl");
    std::fs::write(&eval, eval_rows).unwrap();
    let base = fixtures().join("llama-tied");
    let out = dir.join("run");
    ok(train(
        &base,
        &out,
        &["--max-steps", "2", "--eval-data", eval.to_str().unwrap()],
    )
    .output()
    .unwrap());
    let rec = lines(&out.join("metrics.jsonl"))
        .into_iter()
        .rfind(|r| r.get("eval/loss").is_some())
        .expect("an eval record");
    assert_eq!(rec["step"], 2, "{rec}");

    let logps = |model: &Path, name: &str| -> Vec<Value> {
        let path = dir.join(name);
        ok(bin()
            .args(["logps", "--backend", "cpu", "--model"])
            .arg(model)
            .arg("--data")
            .arg(&eval)
            .arg("--out")
            .arg(&path)
            .output()
            .unwrap());
        lines(&path)
    };
    let (fin, init) = (
        logps(&out.join("final"), "final.jsonl"),
        logps(&base, "initial.jsonl"),
    );
    assert_eq!(fin.len(), 5);
    let col = |rows: &[Value], key: &str, i: usize| -> Vec<f64> {
        rows.iter().map(|r| r[key][i].as_f64().unwrap()).collect()
    };
    let beta = 0.1;
    for (metric, key, i) in [
        ("target_chosen", "chosen", 1),
        ("source_chosen", "chosen", 0),
        ("rejected", "rejected", 0),
    ] {
        let (f, s) = (col(&fin, key, i), col(&init, key, i));
        // [mean final log-prob, mean (final − initial)] against the eval record's.
        let want = [
            mean(f.iter().copied()),
            mean(f.iter().zip(&s).map(|(a, b)| a - b)),
        ];
        let got = [
            num(&rec, &format!("eval/logps/{metric}")),
            num(&rec, &format!("eval/rewards/{metric}")) / beta,
        ];
        let rep = assert_close(
            &format!("--eval-data: eval/logps and eval/rewards / β, {metric}"),
            &got,
            &want,
            tol::LOGPS_F32,
        );
        println!("--eval-data {metric}: max abs {:.2e}", rep.max_abs);
    }
    // Training moved the policy, so the rewards are not trivially zero.
    assert!(
        num(&rec, "eval/rewards/target_chosen").abs() > 1e-3,
        "{rec}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The files of a Hugging Face model folder that transformers reads.
const MODEL_FILES: [&str; 8] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "tokenizer.model",
];

/// `train` and `sft` still write the folders that transformers loaded when
/// `tests/reference/make_saved_fixture.py` made tests/fixtures/saved/ (same commands, from
/// `commands.json`): the same files, the same config, the same weights (the engine's logits of
/// those folders against transformers' are in tests/tests/parity.rs).
#[test]
fn saved_folders_load_in_transformers() {
    let saved = fixtures().join("saved");
    let commands: Value =
        serde_json::from_str(&std::fs::read_to_string(saved.join("commands.json")).unwrap())
            .unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for (case, spec) in commands.as_object().unwrap() {
        let dir = tmp(&format!("saved-{case}"));
        let args: Vec<&str> = spec["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        ok(bin()
            .current_dir(&root)
            .args(&args)
            .arg("--output")
            .arg(dir.join("run"))
            .output()
            .unwrap());
        let (got, want) = (dir.join("run").join("final"), saved.join(case));
        for f in MODEL_FILES {
            let (g, w) = (got.join(f), want.join(f));
            assert_eq!(g.is_file(), w.is_file(), "{case}: {f} written?");
            if !w.is_file() || f == "model.safetensors" {
                continue;
            }
            if f.ends_with(".json") {
                let read = |p: &Path| -> Value {
                    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
                };
                assert_eq!(read(&g), read(&w), "{case}: {f}");
            } else {
                assert!(
                    std::fs::read(&g).unwrap() == std::fs::read(&w).unwrap(),
                    "{case}: {f} differs"
                );
            }
        }
        let (g, w) = wrpo_tests::paired_weights(
            &got.join("model.safetensors"),
            &want.join("model.safetensors"),
            case,
        );
        let rep = assert_close(
            &format!("{case}: weights written now vs the folder transformers loaded"),
            &g,
            &w,
            tol::TRAINED_WEIGHTS_F32,
        );
        println!("{case}: weights max abs {:.2e}", rep.max_abs);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `logging_steps`, `eval_steps` and `eval_fraction`, against the same run logged every update:
/// 12 rows, a seeded quarter held out (9 train), 4 rows per update, so each epoch's updates hold
/// 4, 4 and 1 rows. Logged every 2 updates, the loss is the mean of the interval's update losses
/// (Hugging Face's), the reward and log-prob metrics the mean over the interval's rows, the learning
/// rate and grad_norm the interval's last; the eval runs every 2 updates, and its last record
/// equals the end-of-run eval of the run logged every update.
#[test]
fn logging_and_eval_intervals() {
    let dir = tmp("intervals");
    let base = fixtures().join("llama-tied");
    let run = |name: &str, extra: &[&str]| -> Vec<Value> {
        let out = dir.join(name);
        ok(
            train(&base, &out, &[&["--eval-fraction", "0.25"], extra].concat())
                .output()
                .unwrap(),
        );
        lines(&out.join("metrics.jsonl"))
    };
    let every = run("every", &["--logging-steps", "1"]);
    let pairs = run("pairs", &["--logging-steps", "2", "--eval-steps", "2"]);
    let train_at = |recs: &[Value], step: u64| -> Value {
        recs.iter()
            .find(|r| r["step"] == step && r.get("loss").is_some())
            .unwrap_or_else(|| panic!("no training record at step {step}"))
            .clone()
    };
    let eval_steps = |recs: &[Value]| -> Vec<u64> {
        recs.iter()
            .filter(|r| r.get("eval/loss").is_some())
            .map(|r| r["step"].as_u64().unwrap())
            .collect()
    };
    let train_steps: Vec<u64> = pairs
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(train_steps, [2, 4, 6]);
    assert_eq!(eval_steps(&pairs), [2, 4, 6]);
    assert_eq!(eval_steps(&every), [6], "eval_steps 0: at the end only");

    let rows_per_update = [4.0, 4.0, 1.0, 4.0, 4.0, 1.0];
    for step in [2u64, 4, 6] {
        let (a, b, got) = (
            train_at(&every, step - 1),
            train_at(&every, step),
            train_at(&pairs, step),
        );
        let (na, nb) = (
            rows_per_update[step as usize - 2],
            rows_per_update[step as usize - 1],
        );
        let mut got_v = vec![
            num(&got, "loss"),
            num(&got, "learning_rate"),
            num(&got, "grad_norm"),
        ];
        let mut want_v = vec![
            (num(&a, "loss") + num(&b, "loss")) / 2.0,
            num(&b, "learning_rate"),
            num(&b, "grad_norm"),
        ];
        for key in ["rewards/margins", "logps/chosen", "logps/rejected"] {
            got_v.push(num(&got, key));
            want_v.push((na * num(&a, key) + nb * num(&b, key)) / (na + nb));
        }
        // The same updates; only how they are averaged differs (f64 sums of f32 values).
        assert_close(
            &format!("step {step}: loss, lr, grad_norm, margins, logps"),
            &got_v,
            &want_v,
            tol::LOGPS_F32,
        );
    }
    let last = |recs: &[Value]| -> Value {
        recs.iter()
            .rfind(|r| r.get("eval/loss").is_some())
            .unwrap()
            .clone()
    };
    let (e1, e2) = (last(&every), last(&pairs));
    for key in ["eval/loss", "eval/rewards/margins", "eval/logps/chosen"] {
        assert_eq!(num(&e1, key), num(&e2, key), "{key}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
