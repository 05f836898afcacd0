//! `sample`, `score` and `build-dataset` end to end: exit codes, messages, output files.

mod common;
use common::{bin, fixtures, lines, stderr, tmp};
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::{json, Value};
use wrpo_tests::{assert_close, tol};

fn run(args: &[&str], paths: &[(&str, &Path)]) -> Output {
    let mut c = bin();
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    c.output().unwrap()
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn sample_on_the_embedded_model_is_seeded_and_keeps_the_format() {
    let dir = tmp("embedded");
    let sample = |name: &str, extra: &[&str]| -> Vec<Value> {
        let out = dir.join(name);
        let mut args = vec![
            "sample",
            "--backend",
            "cpu",
            "--n",
            "2",
            "--max-new-tokens",
            "6",
        ];
        args.extend(extra);
        let o = run(&args, &[("--out", &out)]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains("tokens/s"), "{}", stderr(&o));
        lines(&out)
    };
    let greedy = sample("greedy.jsonl", &["--temperature", "0"]);
    assert_eq!(greedy.len(), 64, "one row per bundled prompt");
    for r in &greedy {
        let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["prompt", "prompt_id", "responses"]);
        let resp = r["responses"].as_array().unwrap();
        assert_eq!(resp.len(), 2);
        assert_eq!(resp[0], resp[1], "greedy samples are equal");
    }
    assert_eq!(greedy[0]["prompt_id"], "tiny-000");
    assert_eq!(
        greedy[0]["prompt"],
        json!({"role": "user", "content": "What is 8 + 16?"})
    );
    let a = sample("a.jsonl", &["--seed", "3"]);
    let b = sample("b.jsonl", &["--seed", "3"]);
    let c = sample("c.jsonl", &["--seed", "4"]);
    assert_eq!(a, b, "same seed, same samples");
    assert_ne!(a, c, "another seed, other samples");
    assert!(
        a.iter().any(|r| r["responses"][0] != r["responses"][1]),
        "samples of a prompt differ"
    );
}

#[test]
fn sample_errors_are_clear_and_leave_the_output_alone() {
    let dir = tmp("sample-errors");
    let out = dir.join("out.jsonl");
    std::fs::write(&out, "previous\n").unwrap();
    let model = fixtures().join("llama-gqa");
    let o = run(
        &["sample", "--backend", "cpu"],
        &[("--model", &model), ("--out", &out)],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--prompts is required with --model"),
        "{}",
        stderr(&o)
    );
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"Hi\"}\n{\"prompt_id\": \"x\"}\n").unwrap();
    let o = run(
        &["sample", "--backend", "cpu", "--max-new-tokens", "4"],
        &[
            ("--model", &model),
            ("--prompts", &prompts),
            ("--out", &out),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!("{}:2: field `prompt`: missing", prompts.display())),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous\n");
    let o = run(
        &[
            "sample",
            "--backend",
            "cpu",
            "--max-new-tokens",
            "4",
            "--n",
            "3",
            "--skip-bad-rows",
        ],
        &[
            ("--model", &model),
            ("--prompts", &prompts),
            ("--out", &out),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("1 bad prompt rows skipped"),
        "{}",
        stderr(&o)
    );
    let rows = lines(&out);
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0]["prompt_id"], "1",
        "default prompt_id: the line number"
    );
    assert_eq!(rows[0]["responses"].as_array().unwrap().len(), 3);
    let o = run(
        &["sample", "--backend", "cpu", "--top-p", "0"],
        &[("--out", &out)],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--top-p must be in (0, 1]"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn score_matches_transformers_and_names_bad_rows() {
    let dir = tmp("score");
    let rm = fixtures().join("reward-llama");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(rm.join("expected_scores.json")).unwrap())
            .unwrap();
    let pairs = expected["pairs"].as_array().unwrap();
    // Single-response rows, and one `responses` row holding the first three responses.
    let mut rows: Vec<Value> = pairs
        .iter()
        .map(|p| json!({"prompt_id": p["prompt_id"], "prompt": p["prompt"], "model": "m", "response": p["response"]}))
        .collect();
    rows.push(json!({"prompt_id": "multi", "prompt": pairs[0]["prompt"], "responses": [pairs[0]["response"], pairs[1]["response"], pairs[2]["response"]]}));
    let data = dir.join("pairs.jsonl");
    write_jsonl(&data, &rows);
    let out = dir.join("scored.jsonl");
    let o = run(
        &["score", "--backend", "cpu", "--batch-size", "4"],
        &[("--model", &rm), ("--data", &data), ("--out", &out)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = lines(&out);
    assert_eq!(got.len(), rows.len());
    // A reward model's score is a logit.
    let close = |a: &Value, b: &Value| {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        assert_close("score", &[a], &[b], tol::LOGITS_F32);
    };
    for (g, p) in got.iter().zip(pairs) {
        close(&g["score"], &p["score"]);
        assert_eq!(g["model"], "m", "other fields are kept");
    }
    let multi = got.last().unwrap()["scores"].as_array().unwrap();
    for (s, p) in multi.iter().zip(pairs) {
        close(s, &p["score"]);
    }
    // A bad row names file:line:field; the output is not replaced.
    std::fs::write(&data, "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\", \"responses\": [\"b\", {\"role\": \"user\", \"content\": \"c\"}]}\n").unwrap();
    let before = std::fs::read_to_string(&out).unwrap();
    let o = run(
        &["score", "--backend", "cpu"],
        &[("--model", &rm), ("--data", &data), ("--out", &out)],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!(
            "{}:2: field `responses[1].role`: a response must be an assistant message",
            data.display()
        )),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), before);
    let o = run(
        &["score", "--backend", "cpu", "--skip-bad-rows"],
        &[("--model", &rm), ("--data", &data), ("--out", &out)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = lines(&out);
    assert!(got[0]["score"].is_number());
    assert!(got[1]["skipped"].as_str().unwrap().contains(":2: "));
    // A causal LM is not a reward model.
    let o = run(
        &["score", "--backend", "cpu"],
        &[
            ("--model", &fixtures().join("llama-tied")),
            ("--data", &data),
            ("--out", &out),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("LlamaForSequenceClassification"),
        "{}",
        stderr(&o)
    );
}

/// sample (embedded model) → score (fixture reward model) → build-dataset → train, each step
/// reading the previous step's output; then the errors and counts of build-dataset.
/// The whole WRPO pipeline on the built-in tiny model, each step reading the previous step's
/// output: score the sources → split (SFT part, WRPO prompts) → `sft` the target on the SFT part →
/// `sample` the SFT model → `score` → `build-dataset` → `train` the SFT model on the WRPO rows →
/// a valid checkpoint (the README's "Whole pipeline" section runs the same commands).
#[test]
fn sft_sample_score_build_dataset_train_chain() {
    let dir = tmp("chain");
    let rm = fixtures().join("reward-llama");
    // Sources: the bundled example (the first 12 prompts of the bundled dataset, their two chosen
    // responses as two source models `m1`, `m2`), as in the README.
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/assets/tiny/pipeline_sources.jsonl");
    let src_scored = dir.join("sources.scored.jsonl");
    let o = run(
        &["score", "--backend", "cpu"],
        &[("--model", &rm), ("--data", &src), ("--out", &src_scored)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // Stage 1: split, prompts of the WRPO part to sample.
    let (sft, prompts) = (dir.join("sft.jsonl"), dir.join("prompts.jsonl"));
    let o = run(
        &["build-dataset", "--sft-fraction", "0.25", "--seed", "1"],
        &[
            ("--sources", &src_scored),
            ("--sft-out", &sft),
            ("--prompts-out", &prompts),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!((lines(&sft).len(), lines(&prompts).len()), (3, 9));
    // Target-SFT on the SFT part (the sources' best responses).
    let sft_out = dir.join("sft-out");
    let o = run(
        &[
            "sft",
            "--backend",
            "cpu",
            "--num-train-epochs",
            "2",
            "--per-device-train-batch-size",
            "3",
            "--gradient-accumulation-steps",
            "1",
            "--logging-steps",
            "1",
        ],
        &[("--data", &sft), ("--output", &sft_out)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let sft_model = sft_out.join("final");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(sft_model.join(f).is_file(), "sft final/{f}");
    }
    let sft_steps = lines(&sft_out.join("metrics.jsonl"));
    assert_eq!(sft_steps.len(), 2, "2 epochs of one 3-row update");
    // Stage 2: sample the WRPO prompts with the SFT model, score, build.
    let samples = dir.join("samples.jsonl");
    let o = run(
        &[
            "sample",
            "--backend",
            "cpu",
            "--n",
            "3",
            "--max-new-tokens",
            "8",
        ],
        &[
            ("--model", &sft_model),
            ("--prompts", &prompts),
            ("--out", &samples),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let scored = dir.join("samples.scored.jsonl");
    let o = run(
        &["score", "--backend", "cpu"],
        &[("--model", &rm), ("--data", &samples), ("--out", &scored)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let wrpo = dir.join("wrpo.jsonl");
    let o = run(
        &[
            "build-dataset",
            "--sft-fraction",
            "0.25",
            "--seed",
            "1",
            "--sources-k",
            "2",
        ],
        &[
            ("--sources", &src_scored),
            ("--targets", &scored),
            ("--out", &wrpo),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("kept: 9 WRPO rows") && err.contains("ties: 0"),
        "{err}"
    );
    let rows = lines(&wrpo);
    assert_eq!(rows.len(), 9);
    let sft_ids: Vec<Value> = lines(&sft).iter().map(|r| r["prompt_id"].clone()).collect();
    for r in &rows {
        assert_eq!(
            r["chosen"].as_array().unwrap().len(),
            3,
            "K = 2 sources + the target"
        );
        assert_eq!(r["rejected"].as_array().unwrap().len(), 1);
        assert!(
            !sft_ids.contains(&r["prompt_id"]),
            "SFT prompts stay out of the WRPO rows"
        );
    }
    // The WRPO rows train the SFT model that sampled them (two updates) into a valid checkpoint.
    let train_out = dir.join("train");
    let o = run(
        &[
            "train",
            "--backend",
            "cpu",
            "--max-steps",
            "2",
            "--per-device-train-batch-size",
            "2",
            "--gradient-accumulation-steps",
            "1",
        ],
        &[
            ("--model", &sft_model),
            ("--data", &wrpo),
            ("--output", &train_out),
            ("--cache-dir", &dir.join("cache")),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(train_out.join("final").join(f).is_file(), "final/{f}");
    }
    let steps = lines(&train_out.join("metrics.jsonl"));
    let first = steps.iter().find(|r| r.get("loss").is_some()).unwrap();
    // The first WRPO loss is log 2: the reference is the SFT model itself.
    assert_close(
        &format!("first loss {first}"),
        &[first["loss"].as_f64().unwrap()],
        &[2f64.ln()],
        tol::LOSS_AT_REFERENCE_F32,
    );

    // Errors: a target row with one sample; a missing score; both named with file:line:field,
    // no output written; --skip-bad-rows drops and counts.
    let mut bad = lines(&scored);
    bad[1]["responses"] = json!(["only one"]);
    bad[1]["scores"] = json!([0.5]);
    bad[2].as_object_mut().unwrap().remove("scores");
    let bad_path = dir.join("bad.jsonl");
    write_jsonl(&bad_path, &bad);
    let out2 = dir.join("wrpo2.jsonl");
    let o = run(
        &["build-dataset", "--sft-fraction", "0.25", "--seed", "1"],
        &[
            ("--sources", &src_scored),
            ("--targets", &bad_path),
            ("--out", &out2),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!(
            "{}:2: field `responses`: 1 sample(s)",
            bad_path.display()
        )),
        "{}",
        stderr(&o)
    );
    assert!(!out2.exists());
    let o = run(
        &[
            "build-dataset",
            "--sft-fraction",
            "0.25",
            "--seed",
            "1",
            "--skip-bad-rows",
        ],
        &[
            ("--sources", &src_scored),
            ("--targets", &bad_path),
            ("--out", &out2),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("kept: 7 WRPO rows"), "{err}");
    assert!(
        err.contains("dropped: 1 (fewer than 2 target samples: 1)"),
        "{err}"
    );
    assert!(err.contains("bad rows skipped: 1"), "{err}");
    assert!(err.contains(":3: field `scores`: missing"), "{err}");
    // Nothing to write / inconsistent flags.
    let o = run(&["build-dataset"], &[("--sources", &src_scored)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nothing to write"), "{}", stderr(&o));
    let o = run(
        &["build-dataset"],
        &[("--sources", &src_scored), ("--out", &out2)],
    );
    assert!(!o.status.success());
    // Unscored sources.
    let o = run(
        &["build-dataset"],
        &[("--sources", &src), ("--prompts-out", &out2)],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!("{}:1: field `score`: missing", src.display())),
        "{}",
        stderr(&o)
    );
}
