//! The memory plan (`wrpo-engine plan`, printed by `train` / `sft`) against measured peaks, and the
//! up-front refusal of a run that cannot fit.
//!
//! The measure is `bench step`'s: the process's peak resident set on the CPU (`VmHWM`), the wgpu
//! memory pool's reservation on lavapipe; each configuration runs in a fresh process (one warm-up
//! update, one timed), so the peak includes the reference copy that appears once the weights
//! move. `bench step` reports the plan's prediction for the same update beside the measure, and
//! `plan_command_prints_the_bench_prediction` checks that `wrpo-engine plan` gives the same number.

mod common;

use std::time::Instant;

use common::{bin, fixtures, stderr, tmp};
use wrpo_tests::tol::PLAN_VS_MEASURED_PEAK;

/// Model and batch of one configuration, as `bench step` flags.
const CPU_CASES: [&str; 4] = [
    // activations dominate (T 512)
    "--hidden 256 --layers 2 --heads 4 --kv-heads 4 --intermediate 688 --vocab 8000 --batch 1 --seq 512",
    // parameters dominate: the optimizer step sets the peak
    "--hidden 512 --layers 2 --heads 8 --kv-heads 8 --intermediate 1376 --vocab 32000 --batch 1 --seq 128",
    // layer checkpointing, GQA, two rows
    "--hidden 256 --layers 4 --heads 4 --kv-heads 2 --intermediate 688 --vocab 8000 --batch 2 --seq 512 --gradient-checkpointing true",
    // the dense attention and the dense LM head
    "--hidden 256 --layers 2 --heads 4 --kv-heads 2 --intermediate 688 --vocab 16000 --batch 1 --seq 256 --attn-implementation dense --lm-head-impl dense",
];

const WGPU_CASES: [&str; 2] = [
    "--hidden 256 --layers 2 --heads 4 --kv-heads 2 --intermediate 688 --vocab 8000 --batch 1 --seq 512",
    "--hidden 256 --layers 2 --heads 4 --kv-heads 4 --intermediate 688 --vocab 32000 --batch 1 --seq 128",
];

/// `bench step` once: (measured peak MiB, predicted MiB).
fn measure(backend: &str, case: &str) -> Option<(f64, f64)> {
    let o = bin()
        .args([
            "bench",
            "step",
            "--backend",
            backend,
            "--steps",
            "1",
            "--warmup",
            "1",
            "--json",
        ])
        .args(case.split_whitespace())
        .output()
        .unwrap();
    assert!(o.status.success(), "bench step {case}: {}", stderr(&o));
    let rec: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    Some((rec["peak_mb"].as_f64()?, rec["predicted_peak_mb"].as_f64()?))
}

fn check(backend: &str, cases: &[&str]) {
    let mut worst = 0f64;
    let mut failures = vec![];
    for case in cases {
        let t0 = Instant::now();
        let Some((measured, predicted)) = measure(backend, case) else {
            panic!("bench step {case} on {backend} reported no peak");
        };
        let rel = (predicted - measured) / measured;
        eprintln!(
            "{backend} {case}: measured {measured:.0} MiB, planned {predicted:.0} MiB, {:+.1} % ({:.0} s)",
            100.0 * rel,
            t0.elapsed().as_secs_f64()
        );
        worst = worst.max(rel.abs());
        if rel.abs() > PLAN_VS_MEASURED_PEAK {
            failures.push(format!("{case}: {:+.1} %", 100.0 * rel));
        }
    }
    eprintln!(
        "{backend}: worst |planned − measured| / measured = {:.1} % (limit {:.0} %)",
        100.0 * worst,
        100.0 * PLAN_VS_MEASURED_PEAK
    );
    assert!(
        failures.is_empty(),
        "plan off by more than the limit: {failures:?}"
    );
}

#[test]
fn plan_agrees_with_the_measured_cpu_peak() {
    check("cpu", &CPU_CASES);
}

/// LoRA where parameters dominate (the issue's criterion, at a smaller shape for CI): `bench step
/// --lora-r 16` runs the full fine-tune of the same shape in a fresh process of the same run; the
/// LoRA peak must be at most 0.4× the full fine-tune's, and the plan (frozen base, adapters,
/// their AdamW state, no reference copy) must agree with it. The same with the frozen base stored
/// in bf16 (`--lora-base-dtype bf16`, a bf16 checkpoint's storage): the resident set before the
/// first update (the model) shrinks by 2 bytes per parameter, the peak drops, and the plan holds.
#[test]
fn lora_peak_is_a_fraction_of_the_full_fine_tune_and_planned() {
    let case = "--hidden 512 --layers 4 --heads 8 --kv-heads 8 --intermediate 1376 --vocab 32000 --batch 1 --seq 128 --lora-r 16";
    // P of that shape: 4 layers × (4·512² + 3·512·1376) + 2 · 32000 · 512 (untied head).
    let params = 4.0 * (4.0 * 512.0 * 512.0 + 3.0 * 512.0 * 1376.0) + 2.0 * 32000.0 * 512.0;
    let mut records = vec![];
    for base in ["f32", "bf16"] {
        let t0 = Instant::now();
        let o = bin()
            .args(["bench", "step", "--backend", "cpu", "--steps", "1"])
            .args(["--warmup", "1", "--json", "--lora-base-dtype", base])
            .args(case.split_whitespace())
            .output()
            .unwrap();
        assert!(o.status.success(), "bench step {case}: {}", stderr(&o));
        let rec: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let (peak, full, planned) = (
            rec["peak_mb"].as_f64().unwrap(),
            rec["full_peak_mb"].as_f64().unwrap(),
            rec["predicted_peak_mb"].as_f64().unwrap(),
        );
        let rel = (planned - peak) / peak;
        eprintln!(
            "{case} --lora-base-dtype {base}: LoRA peak {peak:.0} MiB (model loaded: {:.0} MiB), full fine-tune {full:.0} MiB ({:.2}×), planned {planned:.0} MiB ({:+.1} %) ({:.0} s)",
            rec["base_mb"].as_f64().unwrap(),
            peak / full,
            100.0 * rel,
            t0.elapsed().as_secs_f64()
        );
        assert!(
            peak <= 0.4 * full,
            "{base}: LoRA peak {peak:.0} MiB > 0.4 × {full:.0} MiB"
        );
        assert!(
            rel.abs() <= PLAN_VS_MEASURED_PEAK,
            "{base}: LoRA plan off by {:+.1} %",
            100.0 * rel
        );
        records.push(rec);
    }
    let mib = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap();
    let saved = mib(&records[0], "base_mb") - mib(&records[1], "base_mb");
    let expected = 2.0 * params / (1024.0 * 1024.0);
    eprintln!("bf16 base storage: the loaded model is {saved:.0} MiB smaller (2 bytes × P = {expected:.0} MiB)");
    assert!(
        (saved - expected).abs() <= PLAN_VS_MEASURED_PEAK * expected,
        "bf16 storage saved {saved:.0} MiB of the model, expected about {expected:.0}"
    );
    assert!(
        mib(&records[1], "peak_mb") < mib(&records[0], "peak_mb"),
        "bf16 base storage did not lower the peak"
    );
}

#[test]
#[ignore = "3–4 min per case on lavapipe in a fresh clone (Burn autotunes every matmul shape of a fresh process; cached per working directory afterwards); run with --ignored. Measured +5.6 % and +4.5 % (BENCHMARKS.md, \"Memory plan\")"]
fn plan_agrees_with_the_measured_wgpu_pool_peak() {
    check("wgpu", &WGPU_CASES);
}

/// A model whose optimizer step sets the peak (a 128k vocabulary on a narrow, shallow body), so
/// that the plan does not depend on the rows' lengths: `plan` and `train` predict the same bytes.
fn wide_vocab_model(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("tokenizer-llama3").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":128256,
            "hidden_size":512,"intermediate_size":1376,"num_hidden_layers":2,
            "num_attention_heads":8,"num_key_value_heads":8,"rms_norm_eps":1e-5,
            "rope_theta":500000.0,"max_position_embeddings":2048,"tie_word_embeddings":false,
            "torch_dtype":"float32"}"#,
    )
    .unwrap();
}

const SETTINGS: [&str; 8] = [
    "--per-device-train-batch-size",
    "2",
    "--gradient-accumulation-steps",
    "1",
    "--max-length",
    "128",
    "--max-prompt-length",
    "64",
];

/// `wrpo-engine plan --json` for a cpu run of `model` with `settings`.
fn plan_json(model: &std::path::Path, settings: &[&str]) -> serde_json::Value {
    let o = bin()
        .args([
            "plan",
            "--json",
            "--backend",
            "cpu",
            "--memory",
            "1TiB",
            "--model",
        ])
        .arg(model)
        .args(settings)
        .output()
        .unwrap();
    assert!(o.status.success(), "plan: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn planned_peak(model: &std::path::Path, extra: &[&str]) -> (u64, u64) {
    let settings: Vec<&str> = SETTINGS.iter().chain(extra).copied().collect();
    let rec = plan_json(model, &settings);
    assert_eq!(rec["plan"]["peak_phase"], "update", "{rec}");
    (
        rec["plan"]["peak"].as_u64().unwrap(),
        rec["plan"]["parameters"].as_u64().unwrap(),
    )
}

#[test]
fn a_run_that_cannot_fit_stops_in_under_a_second_with_the_plan_and_advice() {
    let d = tmp("nofit");
    let model = d.join("model");
    wide_vocab_model(&model);
    let (peak, params) = planned_peak(&model, &[]);
    let (peak_pre, _) = planned_peak(&model, &["--precompute-ref", "true"]);
    // The reference copy is the difference.
    assert_eq!(peak - peak_pre, 4 * params);
    // A limit between the two: only --precompute-ref fits.
    let limit = peak - 2 * params;
    let out = d.join("out");
    // `recipe` on the fixture rows into `out`, with the device memory capped at `limit`.
    let run = |limit: String, recipe: &str, settings: &[&str]| {
        bin()
            .env("WRPO_MEMORY_LIMIT", limit)
            .args([recipe, "--backend", "cpu", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(fixtures().join("train/train_rows.jsonl"))
            .arg("--output")
            .arg(&out)
            .args(settings)
            .output()
            .unwrap()
    };
    let t0 = Instant::now();
    let o = run(limit.to_string(), "train", &SETTINGS);
    let secs = t0.elapsed().as_secs_f64();
    let e = stderr(&o);
    eprintln!("{e}\n(stopped after {secs:.2} s)");
    assert!(!o.status.success());
    for want in [
        "this run needs more memory than the device (",
        "nothing was loaded or written",
        "weights",
        "optimizer",
        "reference",
        "activations",
        "logits / head",
        "workspace",
        "predicted peak of one update, during the optimizer step",
        "settings that fit:",
        "--precompute-ref true",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
    assert!(
        !e.contains("--gradient-checkpointing true   (predicted"),
        "checkpointing does not shrink the optimizer step:\n{e}"
    );
    assert!(!out.exists(), "{} was created", out.display());
    assert!(secs < 1.0, "took {secs:.2} s to refuse");
    // sft checks the same plan (no reference); with 1 MiB nothing fits, and it says so.
    let o = run("1MiB".into(), "sft", &[]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("none (a log-prob table, a reference-free loss, or sft)")
            && e.contains("no setting of this trainer fits it")
            && !out.exists(),
        "{e}"
    );
    // With room for the plan, the same run goes on to load the weights (this folder has none).
    let o = run((peak + (1 << 20)).to_string(), "train", &SETTINGS);
    let e = stderr(&o);
    assert!(
        !e.contains("needs more memory") && e.contains("no model.safetensors"),
        "refused with room for the plan, or did not reach the weights:\n{e}"
    );
}

#[test]
fn plan_command_prints_the_bench_prediction() {
    // `bench step`'s model as a config.json: the same plan from `wrpo-engine plan` (144 scored
    // positions of 192 in bench step, both above the fused head's block of 130, so the plan's
    // bound on the scored positions does not change the blocks).
    let d = tmp("same");
    let model = d.join("model");
    wide_vocab_model(&model);
    let o = bin()
        .args(["bench", "step", "--backend", "cpu", "--steps", "1", "--warmup", "0", "--json"])
        .args("--hidden 512 --layers 2 --heads 8 --kv-heads 8 --intermediate 1376 --vocab 128256 --batch 1 --seq 64".split_whitespace())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let rec: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let bench = rec["predicted_peak_mb"].as_f64().unwrap();
    let plan = plan_json(
        &model,
        &[
            "--per-device-train-batch-size",
            "1",
            "--gradient-accumulation-steps",
            "1",
            "--max-length",
            "64",
            "--max-prompt-length",
            "16",
        ],
    );
    let planned = plan["plan"]["peak"].as_f64().unwrap() / 1048576.0;
    assert!(
        (planned - bench).abs() < 1e-6,
        "plan {planned} MiB vs bench step {bench} MiB"
    );
    assert_eq!(plan["fits"], true);
    assert!(plan["largest_micro_batch"].as_u64().unwrap() > 1000);
}

/// `plan --adapter` plans the adapter's rank and targets (PEFT's adapter_config.json), and the
/// frozen base in its checkpoint's dtype: 2 bytes a parameter for a bf16 checkpoint, 4 for f32.
#[test]
fn plan_takes_the_adapter_and_the_checkpoint_dtype() {
    let adapter = fixtures().join("lora/lora_bf16_base/initial_adapter");
    // r 4 on all seven projections of 2 layers, H 64, I 128: per layer 4 · (64 + 64) · 4 for
    // q/k/v/o, 4 · (64 + 128) · 3 for gate/up/down.
    let adapters = 2 * (4 * 128 * 4 + 4 * 192 * 3);
    for (base, bytes) in [("lora/base_bf16", 2), ("llama-tied", 4)] {
        let rec = plan_json(
            &fixtures().join(base),
            &["--adapter", adapter.to_str().unwrap()],
        );
        let plan = &rec["plan"];
        assert_eq!(
            plan["trainable"].as_u64().unwrap(),
            adapters,
            "{base}: {rec}"
        );
        let weights: u64 = plan["parts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"] == "weights")
            .map(|p| p["bytes"].as_u64().unwrap())
            .sum();
        let p = plan["parameters"].as_u64().unwrap();
        assert_eq!(weights, bytes * p + 4 * adapters, "{base}: {rec}");
    }
}
