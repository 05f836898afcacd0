//! The bad-input suite: every command given broken files, flags and settings. Each case must end
//! with a non-zero exit code (never the panic hook's 101), a message naming the file, line,
//! field or flag at fault, and no "internal failure". All cases run, then every failure is
//! reported together.

mod common;
use common::fixtures;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A copy of the `llama-tied` fixture folder under `dir/name`, with `edit` applied to it.
fn model_copy(dir: &Path, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(fixtures().join("llama-tied")).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with("expected") {
            continue;
        }
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    edit(&d);
    d
}

fn edit_config(d: &Path, key: &str, value: serde_json::Value) {
    let p = d.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c[key] = value;
    std::fs::write(&p, c.to_string()).unwrap();
}

struct Case {
    name: &'static str,
    args: Vec<String>,
    /// Every one of these must appear in stderr.
    want: Vec<String>,
}

fn case(name: &'static str, args: &[&str], want: &[&str]) -> Case {
    Case {
        name,
        args: args.iter().map(|s| s.to_string()).collect(),
        want: want.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn bad_input_ends_in_clear_errors_never_in_panics() {
    let dir = std::env::temp_dir().join(format!("wrpo-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).unwrap();
        p(name)
    };
    let fx = |name: &str| fixtures().join(name).to_string_lossy().into_owned();
    let s = |p: &Path| p.to_string_lossy().into_owned();

    // Files.
    let good = r#"{"prompt": "1+1?", "chosen": ["2.", "Two."], "rejected": ["3."]}"#;
    let rows = write("rows.jsonl", &format!("{good}\n{good}\n"));
    // Rows long enough that 300 of them in one micro-batch need dense logits over lavapipe's
    // buffer limit (3 × 300 sequences × ~200 tokens × V 512 × 4 bytes ≈ 350 MiB).
    let long = format!(
        r#"{{"prompt": "{}", "chosen": ["2.", "Two."], "rejected": ["3."]}}"#,
        "What is 1+1? ".repeat(40)
    );
    let many_long = write("many_long.jsonl", &format!("{long}\n").repeat(300));
    let not_json = write("not_json.jsonl", &format!("{good}\n{{\"prompt\": \n"));
    let no_prompt = write(
        "no_prompt.jsonl",
        r#"{"chosen": ["2.", "Two."], "rejected": ["3."]}"#,
    );
    let chosen_str = write(
        "chosen_str.jsonl",
        r#"{"prompt": "1+1?", "chosen": "2.", "rejected": ["3."]}"#,
    );
    let empty = write("empty.jsonl", "");
    let short_ref = write(
        "short_ref.jsonl",
        &[r#"{"chosen": [-1.0], "rejected": [-2.0], "chosen_tokens": [2, 3], "rejected_tokens": [2]}"#; 2]
            .join("\n"),
    );
    let huge_ref = write(
        "huge_ref.jsonl",
        &[r#"{"chosen": [-1.0, 1e999], "rejected": [-2.0], "chosen_tokens": [2, 3], "rejected_tokens": [2]}"#; 2]
            .join("\n"),
    );
    let one_ref = write(
        "one_ref.jsonl",
        r#"{"chosen": [-1.0, -2.0], "rejected": [-2.0], "chosen_tokens": [2, 3], "rejected_tokens": [2]}"#,
    );
    let bad_yaml = write("bad.yaml", "learning_rate: [1e-6\n");
    let typo_yaml = write("typo.yaml", "beta_typo: 0.1\n");
    let prompts_bad = write("prompts.jsonl", "{\"prompt\": 3}\n");
    let score_bad = write("score.jsonl", "{\"prompt\": \"a\"}\n");
    let sources_bad = write(
        "sources.jsonl",
        "{\"prompt_id\": \"p\", \"prompt\": \"a\", \"response\": 7}\n",
    );
    let sft_rows = write("sft.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n");
    let targets_ok = write(
        "targets.jsonl",
        "{\"prompt\": \"a\", \"responses\": [\"x\"], \"scores\": [1.0]}\n",
    );

    // Models.
    let heads0 = model_copy(&dir, "heads0", |d| {
        edit_config(d, "num_attention_heads", serde_json::json!(0))
    });
    let vocab0 = model_copy(&dir, "vocab0", |d| {
        edit_config(d, "vocab_size", serde_json::json!(0))
    });
    let layers0 = model_copy(&dir, "layers0", |d| {
        edit_config(d, "num_hidden_layers", serde_json::json!(0))
    });
    let wide = model_copy(&dir, "wide", |d| {
        edit_config(d, "intermediate_size", serde_json::json!(1000))
    });
    let cfg_not_json = model_copy(&dir, "cfgjson", |d| {
        std::fs::write(d.join("config.json"), "{ not json").unwrap()
    });
    let truncated = model_copy(&dir, "truncated", |d| {
        let w = std::fs::read(d.join("model.safetensors")).unwrap();
        std::fs::write(d.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    });
    let garbage = model_copy(&dir, "garbage", |d| {
        std::fs::write(
            d.join("model.safetensors"),
            b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage",
        )
        .unwrap();
    });
    let header_lie = model_copy(&dir, "headerlie", |d| {
        // A valid 8-byte length that claims more header than the file holds.
        let mut w = 1_000_000u64.to_le_bytes().to_vec();
        w.extend_from_slice(b"{\"a\":");
        std::fs::write(d.join("model.safetensors"), w).unwrap();
    });
    let no_weights = model_copy(&dir, "noweights", |d| {
        std::fs::remove_file(d.join("model.safetensors")).unwrap()
    });
    let tok_bad = model_copy(&dir, "tokbad", |d| {
        std::fs::write(d.join("tokenizer.json"), "{\"version\": ").unwrap()
    });
    let tok_missing = model_copy(&dir, "tokmissing", |d| {
        std::fs::remove_file(d.join("tokenizer.json")).unwrap()
    });
    let tied = fx("llama-tied");

    let train = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["train", "--backend", "cpu", "--output"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.push(p("out"));
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let with = |c: Case, args: Vec<String>| Case { args, ..c };
    let mut cases = vec![
        // train: flags and settings.
        with(
            case("collective timeout 1e300", &[], &["--collective-timeout"]),
            train(&["--devices", "cpu,cpu", "--collective-timeout", "1e300"]),
        ),
        with(
            case(
                "collective timeout negative",
                &[],
                &["--collective-timeout"],
            ),
            train(&["--devices", "cpu,cpu", "--collective-timeout", "-1"]),
        ),
        with(
            case(
                "train on wgpu: dense logits over the buffer limit",
                &[],
                &["--lm-head-impl fused", "MiB", "V 512]"],
            ),
            [
                "train",
                "--backend",
                "wgpu",
                "--output",
                &p("out-wgpu"),
                "--model",
                &tied,
                "--data",
                &many_long,
                "--lm-head-impl",
                "dense",
                "--per-device-train-batch-size",
                "300",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ),
        with(
            case("devices without kind", &[], &["--devices"]),
            train(&["--devices", "0,1"]),
        ),
        with(
            case("devices of two backends", &[], &["--devices"]),
            train(&["--devices", "cpu,wgpu:0"]),
        ),
        with(
            case("nodes without orchestrator", &[], &["--orchestrator"]),
            train(&["--nodes", "2"]),
        ),
        with(
            case("orchestrator without port", &[], &["--orchestrator"]),
            train(&["--nodes", "2", "--orchestrator", "nohost"]),
        ),
        with(
            case("node rank out of range", &[], &["--node-rank"]),
            train(&[
                "--nodes",
                "2",
                "--node-rank",
                "2",
                "--orchestrator",
                "127.0.0.1:1",
            ]),
        ),
        with(
            case("negative learning rate", &[], &["learning_rate"]),
            train(&["--learning-rate", "-1"]),
        ),
        with(case("beta nan", &[], &["beta"]), train(&["--beta", "nan"])),
        with(
            case("batch size 0", &[], &["per_device_train_batch_size"]),
            train(&["--per-device-train-batch-size", "0"]),
        ),
        with(
            case("accumulation 0", &[], &["gradient_accumulation_steps"]),
            train(&["--gradient-accumulation-steps", "0"]),
        ),
        with(
            case("epochs overflow", &[], &["num_train_epochs"]),
            train(&["--num-train-epochs", "18446744073709551615"]),
        ),
        with(
            case("warmup ratio 5", &[], &["warmup_ratio"]),
            train(&["--warmup-ratio", "5"]),
        ),
        with(
            case("eval fraction 2", &[], &["eval_fraction"]),
            train(&["--eval-fraction", "2"]),
        ),
        with(
            case("max length 0", &[], &["max_length"]),
            train(&["--max-length", "0"]),
        ),
        with(
            case("attention block 0", &[], &["attention_block"]),
            train(&["--attention-block", "0"]),
        ),
        with(
            case("unknown head impl", &[], &["--lm-head-impl"]),
            train(&["--lm-head-impl", "sparse"]),
        ),
        with(
            case("unknown loss type", &[], &["--loss-type"]),
            train(&["--loss-type", "kto"]),
        ),
        with(
            case("resume with nothing", &[], &["--resume"]),
            train(&["--resume"]),
        ),
        with(
            case("config not yaml", &[], &["bad.yaml"]),
            train(&["--config", &bad_yaml]),
        ),
        with(
            case("config unknown key", &[], &["typo.yaml", "beta_typo"]),
            train(&["--config", &typo_yaml]),
        ),
        with(
            case("config missing", &[], &["nope.yaml"]),
            train(&["--config", &p("nope.yaml")]),
        ),
        // train: data.
        with(
            case("data missing", &[], &["missing.jsonl"]),
            train(&["--data", &p("missing.jsonl")]),
        ),
        with(
            case("data line not json", &[], &["not_json.jsonl:2"]),
            train(&["--data", &not_json]),
        ),
        with(
            case("data without prompt", &[], &["no_prompt.jsonl:1", "prompt"]),
            train(&["--data", &no_prompt]),
        ),
        with(
            case(
                "data chosen not a list",
                &[],
                &["chosen_str.jsonl:1", "chosen"],
            ),
            train(&["--data", &chosen_str]),
        ),
        with(
            case("data empty", &[], &["empty.jsonl"]),
            train(&["--data", &empty]),
        ),
        with(
            case("eval data missing", &[], &["eval-missing.jsonl"]),
            train(&["--data", &rows, "--eval-data", &p("eval-missing.jsonl")]),
        ),
        // train: reference log-probs.
        with(
            case(
                "ref-logps list too short",
                &[],
                &["short_ref.jsonl:1", "chosen"],
            ),
            train(&["--model", &tied, "--data", &rows, "--ref-logps", &short_ref]),
        ),
        with(
            case("ref-logps value out of range", &[], &["huge_ref.jsonl:1"]),
            train(&["--model", &tied, "--data", &rows, "--ref-logps", &huge_ref]),
        ),
        with(
            case(
                "ref-logps too few records",
                &[],
                &["one_ref.jsonl", "records"],
            ),
            train(&["--model", &tied, "--data", &rows, "--ref-logps", &one_ref]),
        ),
        with(
            case("ref-logps missing", &[], &["gone.jsonl"]),
            train(&["--data", &rows, "--ref-logps", &p("gone.jsonl")]),
        ),
        // train: models.
        with(
            case("config heads 0", &[], &["heads0", "num_attention_heads"]),
            train(&["--model", &s(&heads0), "--data", &rows]),
        ),
        with(
            case("config vocab 0", &[], &["vocab0", "vocab_size"]),
            train(&["--model", &s(&vocab0), "--data", &rows]),
        ),
        with(
            case("config layers 0", &[], &["layers0", "num_hidden_layers"]),
            train(&["--model", &s(&layers0), "--data", &rows]),
        ),
        with(
            case("config disagrees with weights", &[], &["wide", "mlp"]),
            train(&["--model", &s(&wide), "--data", &rows]),
        ),
        with(
            case("config not json", &[], &["cfgjson", "config.json"]),
            train(&["--model", &s(&cfg_not_json), "--data", &rows]),
        ),
        with(
            case("model folder missing", &[], &["no-such-model"]),
            train(&["--model", &p("no-such-model"), "--data", &rows]),
        ),
        with(
            case("weights truncated", &[], &["truncated", "safetensors"]),
            train(&["--model", &s(&truncated), "--data", &rows]),
        ),
        with(
            case("weights garbage", &[], &["garbage", "safetensors"]),
            train(&["--model", &s(&garbage), "--data", &rows]),
        ),
        with(
            case(
                "weights header longer than file",
                &[],
                &["headerlie", "safetensors"],
            ),
            train(&["--model", &s(&header_lie), "--data", &rows]),
        ),
        with(
            case("weights missing", &[], &["noweights", "safetensors"]),
            train(&["--model", &s(&no_weights), "--data", &rows]),
        ),
        with(
            case("tokenizer corrupt", &[], &["tokbad", "tokenizer.json"]),
            train(&["--model", &s(&tok_bad), "--data", &rows]),
        ),
        with(
            case(
                "tokenizer missing",
                &[],
                &["rows.jsonl:1", "tokenizer.json"],
            ),
            train(&["--model", &s(&tok_missing), "--data", &rows]),
        ),
        // sft.
        case(
            "sft data without prompt",
            &[
                "sft",
                "--backend",
                "cpu",
                "--data",
                &no_prompt,
                "--output",
                &p("sft"),
            ],
            &["no_prompt.jsonl:1", "prompt"],
        ),
        case(
            "sft truncated weights",
            &[
                "sft",
                "--backend",
                "cpu",
                "--model",
                &s(&truncated),
                "--data",
                &sft_rows,
                "--output",
                &p("sft"),
            ],
            &["truncated", "safetensors"],
        ),
        // logps.
        case(
            "logps batch size 0",
            &["logps", "--backend", "cpu", "--batch-size", "0"],
            &["--batch-size"],
        ),
        case(
            "logps bad row",
            &["logps", "--backend", "cpu", "--data", &not_json],
            &["not_json.jsonl:2"],
        ),
        case(
            "logps corrupt tokenizer",
            &[
                "logps",
                "--backend",
                "cpu",
                "--model",
                &s(&tok_bad),
                "--data",
                &rows,
            ],
            &["tokenizer.json"],
        ),
        // sample.
        case(
            "sample n 0",
            &[
                "sample",
                "--backend",
                "cpu",
                "--n",
                "0",
                "--out",
                &p("s.jsonl"),
            ],
            &["--n"],
        ),
        case(
            "sample negative temperature",
            &[
                "sample",
                "--backend",
                "cpu",
                "--temperature",
                "-1",
                "--out",
                &p("s.jsonl"),
            ],
            &["--temperature"],
        ),
        case(
            "sample top-p 2",
            &[
                "sample",
                "--backend",
                "cpu",
                "--top-p",
                "2",
                "--out",
                &p("s.jsonl"),
            ],
            &["--top-p"],
        ),
        case(
            "sample prompt not a string",
            &[
                "sample",
                "--backend",
                "cpu",
                "--prompts",
                &prompts_bad,
                "--out",
                &p("s.jsonl"),
            ],
            &["prompts.jsonl:1", "prompt"],
        ),
        case(
            "sample prompts missing",
            &[
                "sample",
                "--backend",
                "cpu",
                "--prompts",
                &p("gone-prompts.jsonl"),
                "--out",
                &p("s.jsonl"),
            ],
            &["gone-prompts.jsonl"],
        ),
        case(
            "sample garbage weights",
            &[
                "sample",
                "--backend",
                "cpu",
                "--model",
                &s(&garbage),
                "--prompts",
                &sft_rows,
                "--out",
                &p("s.jsonl"),
            ],
            &["garbage", "safetensors"],
        ),
        // score.
        case(
            "score a causal LM",
            &[
                "score",
                "--backend",
                "cpu",
                "--model",
                &tied,
                "--data",
                &rows,
                "--out",
                &p("sc.jsonl"),
            ],
            &["llama-tied"],
        ),
        case(
            "score row without responses",
            &[
                "score",
                "--backend",
                "cpu",
                "--model",
                &fx("reward-llama"),
                "--data",
                &score_bad,
                "--out",
                &p("sc.jsonl"),
            ],
            &["score.jsonl:1"],
        ),
        // build-dataset.
        case(
            "build sources missing",
            &[
                "build-dataset",
                "--sources",
                &p("gone-src.jsonl"),
                "--targets",
                &targets_ok,
                "--out",
                &p("b.jsonl"),
            ],
            &["gone-src.jsonl"],
        ),
        case(
            "build response not a string",
            &[
                "build-dataset",
                "--sources",
                &sources_bad,
                "--targets",
                &targets_ok,
                "--out",
                &p("b.jsonl"),
            ],
            &["sources.jsonl:1", "response"],
        ),
        case(
            "build sft fraction 2",
            &[
                "build-dataset",
                "--sources",
                &targets_ok,
                "--targets",
                &targets_ok,
                "--out",
                &p("b.jsonl"),
                "--sft-fraction",
                "2",
            ],
            &["--sft-fraction"],
        ),
        // bench.
        case(
            "bench step seq 0",
            &["bench", "step", "--backend", "cpu", "--seq", "0"],
            &["--seq"],
        ),
        case(
            "bench kernels shape of two",
            &["bench", "kernels", "--backend", "cpu", "--shape", "1,2"],
            &["--shape"],
        ),
        case(
            "bench kernels reps 0",
            &["bench", "kernels", "--backend", "cpu", "--reps", "0"],
            &["--reps"],
        ),
        case(
            "bench kernels over the wgpu buffer limit",
            &[
                "bench",
                "kernels",
                "--backend",
                "wgpu",
                "--shape",
                "64,1024,128256",
            ],
            &["--shape", "MiB"],
        ),
        case(
            "bench step: dense logits over the wgpu buffer limit",
            &[
                "bench",
                "step",
                "--backend",
                "wgpu",
                "--vocab",
                "128256",
                "--lm-head-impl",
                "dense",
            ],
            &["--lm-head-impl fused", "MiB", "[N 6, T 256, V 128256]"],
        ),
        case(
            "bench step on cpu: dense attention scores larger than the host's memory",
            &[
                "bench",
                "step",
                "--backend",
                "cpu",
                "--seq",
                "65536",
                "--attn-implementation",
                "dense",
            ],
            &["--attn-implementation tiled", "attention scores", "MiB"],
        ),
        // LoRA.
        with(
            case(
                "LoRA on the LM head",
                &[],
                &["lm_head", "not supported", "all-linear"],
            ),
            train(&["--lora-r", "4", "--lora-target-modules", "q_proj,lm_head"]),
        ),
        with(
            case("an unknown LoRA target", &[], &["\"qproj\"", "q_proj"]),
            train(&["--lora-r", "4", "--lora-target-modules", "qproj"]),
        ),
        with(
            case("LoRA dropout of 1", &[], &["lora_dropout", "[0, 1)"]),
            train(&["--lora-r", "4", "--lora-dropout", "1"]),
        ),
        case(
            "a bf16 LoRA base on wgpu (no bf16 in WGSL)",
            &[
                "train",
                "--backend",
                "wgpu",
                "--output",
                &p("out-wgpu-bf16"),
                "--lora-r",
                "4",
                "--lora-base-dtype",
                "bf16",
            ],
            &["--lora-base-dtype bf16", "does not store", "auto"],
        ),
        with(
            case(
                "--adapter without adapter_config.json",
                &[],
                &["--adapter", "no-such-adapter", "adapter_config.json"],
            ),
            train(&["--adapter", &p("no-such-adapter")]),
        ),
        with(
            case(
                "--adapter whose rank disagrees with --lora-r",
                &[],
                &["--adapter", "lora_r 8 (adapter: 4)", "leave lora_r at 0"],
            ),
            train(&[
                "--model",
                &fx("llama-tied"),
                "--data",
                &fx("train/train_rows.jsonl"),
                "--lora-r",
                "8",
                "--lora-target-modules",
                "all-linear",
                "--adapter",
                &fx("lora/lora_wrpo_k1r1/initial_adapter"),
            ]),
        ),
        case(
            "an adapter folder passed as --model",
            &[
                "logps",
                "--model",
                &fx("lora/lora_wrpo_k1r1/final_adapter"),
                "--data",
                &fx("train/train_rows.jsonl"),
            ],
            &[
                "final_adapter",
                "PEFT LoRA adapter",
                "--adapter",
                "wrpo-engine merge",
            ],
        ),
        case(
            "merge: an adapter for another model",
            &[
                "merge",
                "--model",
                &fx("llama-gqa"),
                "--adapter",
                &fx("lora/lora_wrpo_k1r1/final_adapter"),
                "--out",
                &p("merged"),
            ],
            &[
                "llama-gqa",
                "lora_B.weight: expected [32, 4], found [64, 4]",
            ],
        ),
        // plan.
        case(
            "plan: a memory size in an unknown unit",
            &["plan", "--memory", "80XB"],
            &["--memory", "80XB", "unknown unit"],
        ),
        case(
            "plan: sft with several sequences per row",
            &["plan", "--recipe", "sft", "--sequences-per-row", "3"],
            &["--sequences-per-row", "sft"],
        ),
        case(
            "plan: a model folder without config.json",
            &["plan", "--model", &p("no-such-model")],
            &["no-such-model", "config.json"],
        ),
        // export-tiny.
        case(
            "export-tiny into a file",
            &["export-tiny", "--out", &rows],
            &["rows.jsonl"],
        ),
    ];
    // A corrupted reference cache: written by one run, then damaged.
    let cache = p("cache");
    let warm = Command::new(env!("CARGO_BIN_EXE_wrpo-engine"))
        .args(train(&[
            "--precompute-ref",
            "true",
            "--cache-dir",
            &cache,
            "--max-steps",
            "1",
            "--data",
            &rows,
        ]))
        .output()
        .unwrap();
    assert!(
        warm.status.success(),
        "{}",
        String::from_utf8_lossy(&warm.stderr)
    );
    for e in std::fs::read_dir(dir.join("cache").join("ref-logps")).unwrap() {
        std::fs::write(e.unwrap().path(), "{\"chosen\": [[-1.0]], \"rejected\": [[").unwrap();
    }
    let out2 = p("out2");
    cases.push(case(
        "reference cache corrupted",
        &[
            "train",
            "--backend",
            "cpu",
            "--output",
            &out2,
            "--precompute-ref",
            "true",
            "--cache-dir",
            &cache,
            "--max-steps",
            "1",
            "--data",
            &rows,
        ],
        &["ref-logps", ".json"],
    ));

    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = vec![];
    for c in &cases {
        let o = Command::new(env!("CARGO_BIN_EXE_wrpo-engine"))
            .args(&c.args)
            .env("XDG_RUNTIME_DIR", std::env::temp_dir())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let code = o.status.code();
        let missing: Vec<&String> = c.want.iter().filter(|w| !err.contains(*w)).collect();
        let ok = !o.status.success()
            && code != Some(101)
            && code.is_some()
            && !err.contains("internal failure")
            && !err.contains("panicked")
            && missing.is_empty();
        println!(
            "{} {:<40} exit {:?}: {}",
            if ok { "ok  " } else { "FAIL" },
            c.name,
            code,
            err.trim().lines().last().unwrap_or("")
        );
        if !ok {
            failures.push(format!(
                "{}: exit {code:?}, missing {missing:?}\n  args: {:?}\n  stderr: {}",
                c.name,
                c.args,
                err.trim()
            ));
        }
    }
    println!("{} cases, {} failed", cases.len(), failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let _ = std::fs::remove_dir_all(&dir);
}
