//! `wrpo-engine`: WRPO preference training for LLaMA models on CUDA, WGPU or the CPU.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use wrpo_engine_core::backend::{select, BackendChoice, Selected};
use wrpo_engine_core::dispatch;
use wrpo_engine_core::logps::{run_logps, Head, HeadImpl, LogpsJob};
use wrpo_engine_core::model::{AttnImpl, ModelSource};

mod bench;
mod build_dataset;
mod plan;
mod plot;
mod sample;
mod score;
mod settings;
mod train;

#[derive(Parser)]
#[command(name = "wrpo-engine", version, about = "WRPO (Weighted-Reward Preference Optimization) for LLaMA models, on CUDA, WGPU or the CPU", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a LLaMA with WRPO (or the DPO / SimPO / IPO baselines) on WRPO rows.
    ///
    /// Without --model: the built-in tiny LLaMA learns the bundled dataset (a few seconds on a
    /// CPU). Settings come from the authors' WRPO defaults, then --config FILE (YAML), then flags.
    #[command(allow_negative_numbers = true)]
    Train(Box<train::TrainCmd>),
    /// Supervised fine-tuning of the target (WRPO stage one: Target-SFT on the best source
    /// responses).
    ///
    /// Rows: `{"messages": [...]}` (the last, assistant message is learnt), WRPO rows (prompt +
    /// chosen[0]) or `{"prompt", "completion"}`. Same settings, outputs, checkpoints and resume as
    /// `train`; defaults: the authors' SFT (lr 7e-6, cosine, warm-up 10 %, 1 epoch), loss on
    /// completion tokens (`--completion-only false`: all tokens). Without --model: the built-in
    /// tiny LLaMA on the bundled rows.
    #[command(allow_negative_numbers = true)]
    Sft(Box<train::TrainCmd>),
    /// Per-sequence completion log-probs of WRPO rows under a model (one JSON line per row).
    ///
    /// Without --model, uses the built-in tiny LLaMA and the bundled dataset.
    Logps(LogpsArgs),
    /// Sample N responses per prompt from a LLaMA (KV cache; temperature, top-p, top-k; seeded).
    ///
    /// Without --model: the built-in tiny LLaMA on the bundled dataset's prompts.
    #[command(allow_negative_numbers = true)]
    Sample(Box<sample::SampleCmd>),
    /// Score (prompt, response) pairs with a LlamaForSequenceClassification reward model.
    Score(score::ScoreCmd),
    /// Build WRPO rows (and the SFT split) from scored source responses and target samples.
    BuildDataset(build_dataset::BuildCmd),
    /// Show which backends this machine can use and what `--backend auto` picks.
    Backends,
    /// Backend benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The predicted peak device memory of one `train` / `sft` update, in parts (weights,
    /// gradients, optimizer, reference, activations, logits / head, workspace), from the model's
    /// config.json and the settings alone; with --memory (or --backend), whether it fits and the
    /// largest micro-batch that does.
    #[command(allow_negative_numbers = true)]
    Plan(Box<plan::PlanCmd>),
    /// Fold a PEFT LoRA adapter into its base model and write a full Hugging Face folder
    /// (f32 weights, config.json, the base's tokenizer files) that transformers loads.
    Merge {
        /// The base model folder the adapter was trained on.
        #[arg(long)]
        model: PathBuf,
        /// The adapter folder (adapter_config.json + adapter_model.safetensors), e.g. a
        /// `train --lora-r` run's final/.
        #[arg(long)]
        adapter: PathBuf,
        /// Output folder (written into a temporary folder, then renamed into place).
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the orchestrator of a multi-node (`--nodes N`) train or sft run until interrupted.
    ///
    /// Every node registers with it (`--orchestrator HOST:PORT`) before each update's all-reduce,
    /// after passing its round gate on PORT + 1 (every node has finished the previous update).
    Orchestrator {
        /// Port to listen on (all interfaces); the round gate listens on PORT + 1.
        #[arg(long)]
        port: u16,
    },
    /// Write the built-in tiny LLaMA (with its tokenizer) as a Hugging Face folder.
    ExportTiny {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Fused CubeCL token log-probs vs the composite reference on the same backend: forward and
    /// forward + backward medians, effective GB/s against the napkin floor, peak memory, parity.
    /// Then the same for the preference loss (a separate record: B rows, K+1 = 2, R = 1).
    Kernels(BenchKernelsArgs),
    /// Full WRPO updates (policy + reference forward, loss, backward, clipping, AdamW) of a random
    /// LLaMA: policy tokens/s and peak memory. Compare with `tests/reference/bench_step.py` (same
    /// knobs) for the PyTorch ratio.
    Step(BenchStepArgs),
    /// Greedy generation (`sample`'s KV-cache decode loop) of a random LLaMA on random prompt
    /// ids: generated tokens/s. Defaults: the 135M SmolLM-style configuration. Compare with
    /// `tests/reference/bench_generate.py` (same knobs) for the transformers `generate` ratio.
    Sample(BenchSampleArgs),
}

#[derive(Args)]
struct BenchStepArgs {
    #[command(flatten)]
    backend: BackendArg,
    /// Hidden size H.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 4)]
    kv_heads: usize,
    /// MLP width.
    #[arg(long, default_value_t = 688)]
    intermediate: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    /// Rows per update (3 sequences each).
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Tokens per sequence (a quarter of them prompt); a comma-separated list runs each length in
    /// a fresh process (so each peak is its own) and prints one line per length.
    #[arg(long, value_delimiter = ',', default_value = "256")]
    seq: Vec<usize>,
    /// `fused` (the default) or `dense` LM head (see `train --lm-head-impl`).
    #[arg(long, value_parser = settings::choice::<HeadImpl>(), default_value = "fused")]
    lm_head_impl: HeadImpl,
    /// Positions per block of the fused head (0 = automatic).
    #[arg(long, default_value_t = 0)]
    lm_head_chunk: usize,
    /// `tiled` (the default) or `dense` attention (see `train --attn-implementation`).
    #[arg(long, value_parser = settings::choice::<AttnImpl>(), default_value = "tiled")]
    attn_implementation: AttnImpl,
    /// Queries per block of the tiled attention.
    #[arg(long, default_value_t = 128)]
    attention_block: usize,
    /// Layer checkpointing (see `train --gradient-checkpointing`).
    #[arg(long, value_name = "BOOL", default_value_t = false, action = clap::ArgAction::Set)]
    gradient_checkpointing: bool,
    /// LoRA rank (0: a full fine-tune). With r > 0 the same shape also runs as a full fine-tune
    /// in a fresh process, and both peaks and their ratio are reported.
    #[arg(long, default_value_t = 0)]
    lora_r: usize,
    /// LoRA target modules (see `train --lora-target-modules`).
    #[arg(long, default_value = "all-linear")]
    lora_target_modules: String,
    /// With LoRA: the frozen base's storage (see `train --lora-base-dtype`); the random model is
    /// an f32 checkpoint, so `bf16` / `f16` stand for a half-precision one.
    #[arg(long, value_parser = settings::choice::<wrpo_engine_core::model::BaseDtype>(), default_value = "auto")]
    lora_base_dtype: wrpo_engine_core::model::BaseDtype,
    /// Timed updates (median reported).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed updates first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Seed of the model and tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// One JSON record on standard output.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchSampleArgs {
    #[command(flatten)]
    backend: BackendArg,
    /// Hidden size H.
    #[arg(long, default_value_t = 576)]
    hidden: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 30)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 9)]
    heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 3)]
    kv_heads: usize,
    /// MLP width.
    #[arg(long, default_value_t = 1536)]
    intermediate: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 49152)]
    vocab: usize,
    /// Tied input and output embeddings.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    tied: bool,
    /// Prompts decoded together.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Tokens generated per prompt.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Timed generations (median reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Untimed generations first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Seed of the model and prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// One JSON record on standard output.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchKernelsArgs {
    #[command(flatten)]
    backend: BackendArg,
    /// A case `N,T,V` (sequences, tokens, vocabulary); repeatable. Default: 8,256,128256
    /// (N·T = 2048 with the Llama-3 vocabulary).
    #[arg(long = "shape", value_parser = parse_shape)]
    shapes: Vec<[usize; 3]>,
    /// Untimed runs before timing, per path and direction.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Seed of the random inputs (default: from the clock; always printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Example rows B of the preference-loss case (K+1 = 2 chosen, R = 1 rejected per row);
    /// 0 skips it.
    #[arg(long, default_value_t = 128)]
    loss_rows: usize,
    /// A training-attention case `B,NH,NKV,T,HD` (causal; the tiled op — FlashAttention-2 kernels
    /// on cuda/wgpu — against the dense composite, forward and forward + backward); repeatable.
    /// None by default. LLaMA-3-8B's heads at the authors' length: 1,32,8,2048,128.
    #[arg(long = "attention", value_parser = parse_attention_shape)]
    attention: Vec<[usize; 5]>,
    /// One JSON record per case on standard output instead of a table.
    #[arg(long)]
    json: bool,
    /// Internal: measure one path's peak memory in this (fresh) process and print it.
    #[arg(long, hide = true, value_parser = ["fused", "composite"])]
    memory_probe: Option<String>,
}

fn parse_shape(s: &str) -> Result<[usize; 3], String> {
    let v: Vec<usize> = s
        .split(',')
        .map(|x| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| format!("{s:?}: expected N,T,V"))
        })
        .collect::<Result<_, _>>()?;
    match v[..] {
        [n, t, v] if n > 0 && t > 0 && v > 0 => Ok([n, t, v]),
        _ => Err(format!("{s:?}: expected three positive numbers N,T,V")),
    }
}

fn parse_attention_shape(s: &str) -> Result<[usize; 5], String> {
    let v: Vec<usize> = s
        .split(',')
        .map(|x| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| format!("{s:?}: expected B,NH,NKV,T,HD"))
        })
        .collect::<Result<_, _>>()?;
    match v[..] {
        [b, nh, nkv, t, hd] if b > 0 && nh > 0 && nkv > 0 && t > 0 && hd > 0 => {
            if nh % nkv != 0 {
                return Err(format!(
                    "{s:?}: NKV = {nkv} key/value heads must divide NH = {nh} query heads"
                ));
            }
            Ok([b, nh, nkv, t, hd])
        }
        _ => Err(format!(
            "{s:?}: expected five positive numbers B,NH,NKV,T,HD"
        )),
    }
}

#[derive(Args)]
struct BackendArg {
    /// auto (CUDA, else a GPU through wgpu, else CPU), cuda, wgpu or cpu.
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
}

#[derive(Args)]
struct LogpsArgs {
    /// Hugging Face LLaMA folder (config.json, safetensors, tokenizer). Default: built-in tiny model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// WRPO rows (JSON Lines or a JSON array). Default with the built-in model: the bundled dataset.
    #[arg(long)]
    data: Option<PathBuf>,
    /// A PEFT LoRA adapter folder applied on top of --model (adapter_config.json +
    /// adapter_model.safetensors, e.g. a `train --lora-r` run's final/).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Output JSON Lines file (written atomically). Default: standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArg,
    /// Rows per forward; all sequences of these rows are stacked into one batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Longest prompt + completion in tokens (longer rows are truncated).
    #[arg(long)]
    max_length: Option<usize>,
    /// Prompt tokens kept (from the end) when a row exceeds --max-length.
    #[arg(long)]
    max_prompt_length: Option<usize>,
    /// Skip bad rows (reported on stderr) instead of stopping at the first.
    #[arg(long)]
    skip_bad_rows: bool,
    /// `fused` (completion positions only, through the LM head a block at a time: no [N, T, V]
    /// logits) or `dense` (the full logits: the reference).
    #[arg(long, value_parser = settings::choice::<HeadImpl>(), default_value = "fused")]
    lm_head_impl: HeadImpl,
    /// Positions per block of the fused head (0 = automatic, about 16M logits per block).
    #[arg(long, default_value_t = 0)]
    lm_head_chunk: usize,
}

fn main() -> ExitCode {
    // Panics inside a backend (device lost, out of memory) end with one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        let lower = msg.to_lowercase();
        if lower.contains("out of memory")
            || lower.contains("outofmemory")
            || lower.contains("oom")
            || lower.contains("can't allocate buffer")
        {
            eprintln!("error: the device ran out of memory ({msg}). Lower --per-device-train-batch-size or --max-length, or use a larger device");
        } else if lower.contains("device lost") || lower.contains("devicelost") {
            eprintln!("error: the GPU device was lost ({msg}); the last checkpoint in --output is intact, continue with --resume");
        } else {
            eprintln!("error: internal failure: {msg}");
        }
    }));
    // Vulkan loaders probe for a Wayland display and complain on stderr when XDG_RUNTIME_DIR is
    // unset (headless machines, CI). An empty directory answers the probe quietly.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join("wrpo-engine-xdg");
        if std::fs::create_dir_all(&dir).is_ok() {
            std::env::set_var("XDG_RUNTIME_DIR", dir);
        }
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => train::train(*args, train::Recipe::Train),
        Command::Sft(args) => train::train(*args, train::Recipe::Sft),
        Command::Logps(args) => logps(args),
        Command::Sample(args) => sample::sample(*args),
        Command::Score(args) => score::score(args),
        Command::BuildDataset(args) => build_dataset::build_dataset(args),
        Command::Backends => backends(),
        Command::Plan(a) => plan::plan_cmd(*a),
        Command::Merge {
            model,
            adapter,
            out,
        } => {
            wrpo_engine_core::model::merge_adapter(&model, &adapter, &out)?;
            eprintln!(
                "merged {} into {}: wrote {}",
                adapter.display(),
                model.display(),
                out.display()
            );
            Ok(())
        }
        Command::Bench(BenchCommand::Kernels(a)) => bench_kernels(a),
        Command::Bench(BenchCommand::Step(a)) => bench_step(a),
        Command::Bench(BenchCommand::Sample(a)) => bench_sample(a),
        Command::Orchestrator { port } => {
            eprintln!(
                "orchestrator: listening on 0.0.0.0:{port}, round gate on 0.0.0.0:{} (Ctrl-C to stop)",
                port as u32 + 1
            );
            wrpo_engine_core::train::dist::run_orchestrator(port)
        }
        Command::ExportTiny { out } => export_tiny(out),
    }
}

fn device(choice: BackendChoice) -> Result<Selected> {
    let selected = select(choice)?;
    eprintln!("backend: {selected}");
    Ok(selected)
}

fn progress_bar(what: &'static str, unit: &'static str) -> impl FnMut(usize, usize) {
    let tty = std::io::stderr().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    let mut last_pct = usize::MAX;
    move |done, total| {
        if tty {
            let b = bar.get_or_insert_with(|| {
                let b = ProgressBar::new(total as u64);
                b.set_style(
                    ProgressStyle::with_template(&format!(
                        "{{msg}} [{{bar:40}}] {{pos}}/{{len}} {unit}, {{per_sec}}, ETA {{eta}}"
                    ))
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                b.set_message(what);
                b
            });
            b.set_position(done as u64);
            if done == total {
                b.finish();
            }
        } else {
            let pct = done * 10 / total.max(1);
            if pct != last_pct || done == total {
                eprintln!("{what}: {done}/{total} {unit}");
                last_pct = pct;
            }
        }
    }
}

fn logps(a: LogpsArgs) -> Result<()> {
    if a.model.is_some() && a.data.is_none() {
        anyhow::bail!(
            "--data is required with --model (the bundled dataset goes with the built-in model)"
        );
    }
    let job = LogpsJob {
        model: ModelSource::from_arg(a.model.as_deref()),
        data: a.data.clone(),
        batch_size: a.batch_size,
        max_length: a.max_length,
        max_prompt_length: a.max_prompt_length,
        skip_bad_rows: a.skip_bad_rows,
        head: Head {
            imp: a.lm_head_impl,
            chunk: a.lm_head_chunk,
        },
        adapter: a.adapter.clone(),
    };
    eprintln!("model: {}", job.model.label());
    let selected = device(a.backend.backend)?;
    let mut bar = progress_bar("logps", "rows");
    let out = dispatch!(selected, B, device => run_logps::<B>(&job, &device, &mut bar))?;
    for e in &out.skipped {
        eprintln!("skipped: {e}");
    }
    if !out.skipped.is_empty() {
        eprintln!("{} bad rows skipped", out.skipped.len());
    }
    // One line per input row, in input order; skipped rows keep their place with empty lists and
    // a `skipped` reason so that line N of the output always belongs to row N.
    let mut records: Vec<(usize, serde_json::Value)> = out
        .rows
        .iter()
        .map(|(line, r)| (*line, serde_json::to_value(r).expect("serialisable")))
        .collect();
    records.extend(out.skipped.iter().map(|e| {
        (
            e.line,
            serde_json::json!({"chosen": [], "rejected": [], "chosen_tokens": [], "rejected_tokens": [], "skipped": e.to_string()}),
        )
    }));
    records.sort_by_key(|(line, _)| *line);
    let mut text = String::new();
    for (_, r) in &records {
        text += &serde_json::to_string(r).expect("serialisable");
        text.push('\n');
    }
    match &a.out {
        Some(path) => {
            wrpo_engine_core::util::write_atomic(path, text.as_bytes())?;
            eprintln!("wrote {} rows to {}", records.len(), path.display());
        }
        None => std::io::stdout()
            .write_all(text.as_bytes())
            .context("writing to standard output")?,
    }
    Ok(())
}

/// The `bench` models' head counts: `--heads` divides `--hidden` and is a multiple of `--kv-heads`.
fn check_heads(hidden: usize, heads: usize, kv_heads: usize) -> Result<()> {
    anyhow::ensure!(
        heads > 0 && kv_heads > 0 && heads.is_multiple_of(kv_heads) && hidden.is_multiple_of(heads),
        "--heads must divide --hidden and be a multiple of --kv-heads"
    );
    Ok(())
}

fn bench_sample(a: BenchSampleArgs) -> Result<()> {
    check_heads(a.hidden, a.heads, a.kv_heads)?;
    anyhow::ensure!(
        a.batch > 0 && a.prompt_len > 0 && a.max_new_tokens > 0 && a.vocab > 0,
        "--batch, --prompt-len, --max-new-tokens and --vocab must be at least 1"
    );
    let shape = crate::bench::SampleShape {
        hidden: a.hidden,
        layers: a.layers,
        heads: a.heads,
        kv_heads: a.kv_heads,
        intermediate: a.intermediate,
        vocab: a.vocab,
        tied: a.tied,
        batch: a.batch,
        prompt_len: a.prompt_len,
        new_tokens: a.max_new_tokens,
    };
    let selected = device(a.backend.backend)?;
    let label = selected.to_string();
    let r = dispatch!(selected, B, device => crate::bench::bench_sample::<B>(&device, &label, shape, a.reps, a.warmup, a.seed))?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "greedy decode on {}: H={} L={} V={} batch {} prompt {} + {} new tokens: {:.1} ms per generation, {:.1} generated tokens/s",
            r.backend, a.hidden, a.layers, a.vocab, a.batch, a.prompt_len, a.max_new_tokens,
            r.generate_ms_median, r.tokens_per_second
        );
    }
    Ok(())
}

fn bench_step(a: BenchStepArgs) -> Result<()> {
    use crate::bench::{bench_step, StepRecord, StepShape};
    check_heads(a.hidden, a.heads, a.kv_heads)?;
    anyhow::ensure!(
        !a.seq.is_empty() && a.seq.iter().all(|&t| t >= 4) && a.batch > 0 && a.vocab > 0,
        "--seq ≥ 4 (each length of the list), --batch ≥ 1, --vocab ≥ 1"
    );
    anyhow::ensure!(
        a.attention_block > 0,
        "--attention-block must be at least 1"
    );
    let print = |r: &StepRecord| {
        let mb = |m: Option<f64>| m.map_or("n/a".to_string(), |m| format!("{m:.0} MiB"));
        println!(
            "wrpo step on {}: H={} L={} V={} batch {}×3 seq {} head {:?} attention {} checkpointing {}: {:.1} ms/update, {:.0} policy tokens/s, peak {} (before the first update {}; the memory plan predicts {})",
            r.backend, a.hidden, a.layers, a.vocab, a.batch, r.shape.seq, r.lm_head_impl, r.attn_implementation, r.gradient_checkpointing,
            r.step_ms_median, r.tokens_per_second, mb(r.peak_mb), mb(r.base_mb), mb(r.predicted_peak_mb)
        );
        if let (Some(full), Some(peak)) = (r.full_peak_mb, r.peak_mb) {
            println!(
                "  LoRA r {}: peak {peak:.0} MiB vs the full fine-tune's {full:.0} MiB (same shape, same run): {:.2}×",
                r.lora_r,
                peak / full
            );
        }
    };
    // A fresh process of this command with `set` replacing flags: a process's peak resident set
    // only grows, so each peak that is compared needs its own.
    let child = |set: &[(&str, String)]| -> Result<StepRecord> {
        let exe = std::env::current_exe().context("locating the wrpo-engine binary")?;
        let mut args: Vec<String> = std::env::args().skip(1).collect();
        for (flag, value) in set {
            let at = args
                .iter()
                .position(|x| x == flag || x.starts_with(&format!("{flag}=")));
            match at {
                Some(i) if args[i] == *flag => args[i + 1] = value.clone(),
                Some(i) => args[i] = format!("{flag}={value}"),
                None => args.extend([flag.to_string(), value.clone()]),
            }
        }
        if !args.iter().any(|x| x == "--json") {
            args.push("--json".into());
        }
        let what = set
            .iter()
            .map(|(f, v)| format!("{f} {v}"))
            .collect::<Vec<_>>()
            .join(" ");
        let out = std::process::Command::new(&exe)
            .args(&args)
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running bench step {what}"))?;
        anyhow::ensure!(
            out.status.success(),
            "bench step {what} failed ({})",
            out.status
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().rfind(|l| l.starts_with('{')).unwrap_or("");
        serde_json::from_str(line)
            .with_context(|| format!("bench step {what}: no record in {text:?}"))
    };
    if a.seq.len() > 1 {
        let records: Vec<StepRecord> = a
            .seq
            .iter()
            .map(|&t| child(&[("--seq", t.to_string())]))
            .collect::<Result<_>>()?;
        for r in &records {
            if a.json {
                println!("{}", serde_json::to_string(r).expect("serialisable"));
            } else {
                print(r);
            }
        }
        return Ok(());
    }
    let lora = match a.lora_r {
        0 => None,
        r => Some(wrpo_models::LoraConfig {
            r,
            alpha: 2.0 * r as f64,
            dropout: 0.0,
            targets: wrpo_models::Target::parse_list(&a.lora_target_modules)
                .map_err(|e| anyhow::anyhow!("--lora-target-modules: {e}"))?,
            rslora: false,
        }),
    };
    let full = match lora {
        // The full fine-tune first, in its own process.
        Some(_) => Some(child(&[("--lora-r", "0".into())])?),
        None => None,
    };
    let selected = device(a.backend.backend)?;
    let label = selected.to_string();
    let shape = StepShape {
        hidden: a.hidden,
        layers: a.layers,
        heads: a.heads,
        kv_heads: a.kv_heads,
        intermediate: a.intermediate,
        vocab: a.vocab,
        batch: a.batch,
        seq: a.seq[0],
    };
    let head = Head {
        imp: a.lm_head_impl,
        chunk: a.lm_head_chunk,
    };
    let r = dispatch!(selected, B, device => bench_step::<B>(&device, &label, shape, head, a.attn_implementation.with_block(a.attention_block), a.gradient_checkpointing, lora.clone().map(|l| (l, a.lora_base_dtype)), a.steps, a.warmup, a.seed))?;
    let r = StepRecord {
        full_peak_mb: full.and_then(|f| f.peak_mb),
        ..r
    };
    if a.json {
        println!("{}", serde_json::to_string(&r).expect("serialisable"));
    } else {
        print(&r);
    }
    Ok(())
}

fn backends() -> Result<()> {
    for (name, choice) in [
        ("cuda", BackendChoice::Cuda),
        ("wgpu", BackendChoice::Wgpu),
        ("cpu", BackendChoice::Cpu),
    ] {
        match select(choice) {
            Ok(s) => println!("{name:5} available: {s}"),
            Err(e) => println!("{name:5} unavailable: {e:#}"),
        }
    }
    println!("auto  → {}", select(BackendChoice::Auto)?);
    Ok(())
}

fn export_tiny(out: PathBuf) -> Result<()> {
    use wrpo_engine_core::backend::CpuBackend;
    use wrpo_engine_core::embedded;
    let (model, cfg) = embedded::model::<CpuBackend>(&Default::default());
    wrpo_models::save_hf(&model, &cfg, &out)?;
    wrpo_engine_core::util::write_atomic(
        &out.join("tokenizer.json"),
        embedded::TOKENIZER_JSON.as_bytes(),
    )?;
    wrpo_engine_core::util::write_atomic(
        &out.join("tokenizer_config.json"),
        embedded::TOKENIZER_CONFIG.as_bytes(),
    )?;
    eprintln!("wrote the built-in tiny LLaMA to {}", out.display());
    Ok(())
}

/// Run this binary again for one path's peak memory (a fresh process has a fresh memory pool).
fn probe_memory(backend: &str, shape: [usize; 3], seed: u64, path: &str) -> Result<Option<u64>> {
    let exe = std::env::current_exe().context("locating the wrpo-engine binary")?;
    let out = std::process::Command::new(exe)
        .args([
            "bench",
            "kernels",
            "--backend",
            backend,
            "--seed",
            &seed.to_string(),
            "--memory-probe",
            path,
        ])
        .arg("--shape")
        .arg(format!("{},{},{}", shape[0], shape[1], shape[2]))
        .output()
        .context("running the memory probe")?;
    if !out.status.success() {
        anyhow::bail!(
            "memory probe ({path}) failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .trim()
        .strip_prefix("peak_bytes=")
        .and_then(|v| v.parse().ok()))
}

fn bench_kernels(a: BenchKernelsArgs) -> Result<()> {
    use crate::bench::{bench_attention, bench_logprobs, bench_loss, peak_memory, MemoryProbe};
    if let Some(path) = &a.memory_probe {
        let selected = select(a.backend.backend)?;
        let [shape] = a.shapes[..] else {
            anyhow::bail!("--memory-probe takes exactly one --shape")
        };
        let seed = a.seed.unwrap_or(0);
        let fused = path == "fused";
        let peak = dispatch!(selected, B, device => peak_memory::<B>(&device, shape, seed, fused));
        if let Some(p) = peak {
            println!("peak_bytes={p}");
        }
        return Ok(());
    }
    let backend_arg = match a.backend.backend {
        BackendChoice::Auto => "auto",
        BackendChoice::Cuda => "cuda",
        BackendChoice::Wgpu => "wgpu",
        BackendChoice::Cpu => "cpu",
    };
    let selected = device(a.backend.backend)?;
    let label = selected.to_string();
    let limit =
        dispatch!(selected.clone(), B, device => <B as MemoryProbe>::max_buffer_bytes(&device));
    let mib = |b: u64| b as f64 / 1048576.0;
    let shapes = if a.shapes.is_empty() {
        // The default case, shrunk (fewer sequences, then fewer tokens) to the device's largest
        // buffer: the [N, T, V] logits and their gradient are single buffers.
        let [mut n, mut t, v] = [8usize, 256, 128256];
        if let Some(limit) = limit {
            while (n * t * v * 4) as u64 > limit && (n > 1 || t > 1) {
                if n > 1 {
                    n /= 2
                } else {
                    t /= 2
                }
            }
            if [n, t] != [8, 256] {
                eprintln!(
                    "note: the default case 8,256,{v} needs {:.0} MiB buffers and {label} allows at most {:.0} MiB: running {n},{t},{v}",
                    mib(8 * 256 * v as u64 * 4),
                    mib(limit)
                );
            }
        }
        vec![[n, t, v]]
    } else {
        a.shapes.clone()
    };
    if let Some(limit) = limit {
        for s in &shapes {
            let need = (s[0] as u64)
                .saturating_mul(s[1] as u64)
                .saturating_mul(s[2] as u64)
                .saturating_mul(4);
            anyhow::ensure!(
                need <= limit,
                "--shape {},{},{}: the [N, T, V] logits need a {:.0} MiB buffer and {label} allows at most {:.0} MiB; use a smaller N·T·V (at most {} elements)",
                s[0], s[1], s[2], mib(need), mib(limit), limit / 4
            );
        }
        for s in &a.attention {
            let need = [s[0], s[1], s[3], s[3], 4]
                .iter()
                .fold(1u64, |p, &x| p.saturating_mul(x as u64));
            anyhow::ensure!(
                need <= limit,
                "--attention {},{},{},{},{}: the dense reference's [B, NH, T, T] scores need a {:.0} MiB buffer and {label} allows at most {:.0} MiB; use a smaller B·NH·T²",
                s[0], s[1], s[2], s[3], s[4], mib(need), mib(limit)
            );
        }
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    anyhow::ensure!(a.reps > 0, "--reps must be at least 1");
    eprintln!(
        "seed: {seed}; {} warm-up + {} timed runs per path",
        a.warmup, a.reps
    );
    if !a.json {
        println!(
            "{:>20} {:>9} {:>12} {:>12} {:>9} {:>11} {:>10} {:>10}",
            "shape N,T,V",
            "path",
            "fwd ms",
            "fwd+bwd ms",
            "GB/s",
            "peak MiB",
            "logp err",
            "grad err"
        );
    }
    for shape in shapes {
        let mut r = dispatch!(selected.clone(), B, device => bench_logprobs::<B>(&device, &label, shape, a.warmup, a.reps, seed));
        r.fused.peak_bytes = probe_memory(backend_arg, shape, seed, "fused")?;
        r.composite.peak_bytes = probe_memory(backend_arg, shape, seed, "composite")?;
        r.memory_ratio = match (r.fused.peak_bytes, r.composite.peak_bytes) {
            (Some(f), Some(c)) if c > 0 => Some(f as f64 / c as f64),
            _ => None,
        };
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
            continue;
        }
        let mib = |b: Option<u64>| {
            b.map_or("n/a".to_string(), |b| {
                format!("{:.1}", b as f64 / 1048576.0)
            })
        };
        let name = format!("{},{},{}", shape[0], shape[1], shape[2]);
        for (path, s) in [("fused", &r.fused), ("composite", &r.composite)] {
            println!(
                "{:>20} {:>9} {:>12.3} {:>12.3} {:>9.1} {:>11} {:>10.2e} {:>10.2e}",
                name,
                path,
                s.forward_ms,
                s.forward_backward_ms,
                s.forward_backward_gbps,
                mib(s.peak_bytes),
                r.logp_max_abs_err,
                r.grad_max_rel_err
            );
        }
        println!(
            "{:>20} fused/composite: time {:.3}x, peak memory {}",
            "",
            r.time_ratio,
            r.memory_ratio
                .map_or("n/a".to_string(), |m| format!("{m:.3}x"))
        );
    }
    for shape in &a.attention {
        let r = dispatch!(selected.clone(), B, device => bench_attention::<B>(&device, &label, *shape, a.warmup, a.reps, seed));
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
            continue;
        }
        println!();
        println!(
            "{:>20} {:>9} {:>12} {:>12} {:>9} {:>11} {:>10} {:>10}",
            "attn B,NH,NKV,T,HD",
            "path",
            "fwd ms",
            "fwd+bwd ms",
            "TFLOP/s",
            "",
            "out err",
            "grad err"
        );
        let name = shape.map(|x| x.to_string()).join(",");
        for (path, s, tf) in [
            ("tiled", &r.tiled, r.tiled_tflops),
            ("dense", &r.dense, r.dense_tflops),
        ] {
            println!(
                "{:>20} {:>9} {:>12.3} {:>12.3} {:>9.3} {:>11} {:>10.2e} {:>10.2e}",
                name,
                path,
                s.forward_ms,
                s.forward_backward_ms,
                tf,
                "",
                r.out_max_rel_err,
                r.grad_max_rel_err
            );
        }
        println!(
            "{:>20} tiled/dense: forward {:.3}x, forward + backward {:.3}x",
            "", r.forward_ratio, r.time_ratio
        );
    }
    if a.loss_rows == 0 {
        return Ok(());
    }
    let shape = [a.loss_rows, 2, 1];
    let r = dispatch!(selected, B, device => bench_loss::<B>(&device, &label, shape, a.warmup, a.reps, seed));
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!();
    println!(
        "{:>20} {:>9} {:>12} {:>12} {:>9} {:>11} {:>10} {:>10}",
        "loss B,K+1,R", "path", "fwd ms", "fwd+bwd ms", "GB/s", "", "loss err", "grad err"
    );
    let name = format!("{},{},{}", shape[0], shape[1], shape[2]);
    for (path, s) in [("fused", &r.fused), ("composite", &r.composite)] {
        println!(
            "{:>20} {:>9} {:>12.3} {:>12.3} {:>9.3} {:>11} {:>10.2e} {:>10.2e}",
            name,
            path,
            s.forward_ms,
            s.forward_backward_ms,
            s.forward_backward_gbps,
            "",
            r.loss_abs_err,
            r.grad_max_rel_err
        );
    }
    println!("{:>20} fused/composite: time {:.3}x", "", r.time_ratio);
    Ok(())
}
