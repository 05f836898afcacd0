//! `wrpo-engine sample`: argument parsing and progress output around
//! [`wrpo_engine_core::pipeline::sample::run_sample`].

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use wrpo_engine_core::dispatch;
use wrpo_engine_core::model::ModelSource;
use wrpo_engine_core::pipeline::sample::{run_sample, SampleJob, SampleProgress};
use wrpo_engine_core::pipeline::sampler::SamplerConfig;
use wrpo_engine_core::pipeline::to_jsonl;

use crate::BackendArg;

#[derive(Args)]
pub struct SampleCmd {
    /// Hugging Face LLaMA folder (config.json, safetensors, tokenizer). Default: the built-in tiny
    /// LLaMA, with the bundled dataset's prompts.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A PEFT LoRA adapter folder applied on top of --model (adapter_config.json +
    /// adapter_model.safetensors, e.g. a `train --lora-r` run's final/).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Prompts, JSON Lines: `prompt` (a string, a message or a list of messages) and an optional
    /// `prompt_id` (default: the line number). Required with --model.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Output JSON Lines `{"prompt_id", "prompt", "responses": [...]}` (written atomically).
    #[arg(long)]
    out: PathBuf,
    /// Responses per prompt.
    #[arg(long, default_value_t = 5)]
    n: usize,
    /// Most new tokens per response (the stop token included).
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Softmax temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed of the sampling streams (one per prompt and sample, independent of --batch-size).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Prompts per batch; each batch decodes batch-size × n sequences.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Skip bad prompt rows (reported on stderr) instead of stopping at the first.
    #[arg(long)]
    skip_bad_rows: bool,
    #[command(flatten)]
    backend: BackendArg,
}

pub fn sample(a: SampleCmd) -> Result<()> {
    if a.model.is_some() && a.prompts.is_none() {
        anyhow::bail!(
            "--prompts is required with --model (the bundled prompts go with the built-in model)"
        );
    }
    let job = SampleJob {
        model: ModelSource::from_arg(a.model.as_deref()),
        adapter: a.adapter.clone(),
        prompts: a.prompts.clone(),
        n: a.n,
        max_new_tokens: a.max_new_tokens,
        sampler: SamplerConfig {
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
        },
        seed: a.seed,
        batch_size: a.batch_size,
        skip_bad_rows: a.skip_bad_rows,
    };
    eprintln!("model: {}", job.model.label());
    let selected = crate::device(a.backend.backend)?;
    let mut view = TokenProgress::new();
    let out =
        dispatch!(selected, B, device => run_sample::<B>(&job, &device, &mut |p| view.update(p)))?;
    view.finish();
    for e in &out.skipped {
        eprintln!("skipped: {e}");
    }
    if !out.skipped.is_empty() {
        eprintln!("{} bad prompt rows skipped", out.skipped.len());
    }
    let rows: Vec<serde_json::Value> = out
        .rows
        .iter()
        .map(|r| serde_json::to_value(r).expect("serialisable"))
        .collect();
    wrpo_engine_core::util::write_atomic(&a.out, to_jsonl(&rows).as_bytes())?;
    let responses = out.rows.len() * a.n;
    eprintln!(
        "wrote {responses} responses for {} prompts to {}: {} tokens in {:.1} s ({:.1} tokens/s); {} responses reached --max-new-tokens; stop tokens {:?}",
        out.rows.len(),
        a.out.display(),
        out.tokens,
        out.seconds,
        out.tokens as f64 / out.seconds.max(1e-9),
        out.truncated,
        out.stop_ids
    );
    Ok(())
}

/// A bar over prompts with the decode rate on a terminal; a line every 10% otherwise.
struct TokenProgress {
    bar: Option<ProgressBar>,
    tty: bool,
    last_decile: usize,
}

impl TokenProgress {
    fn new() -> Self {
        Self {
            bar: None,
            tty: std::io::stderr().is_terminal(),
            last_decile: usize::MAX,
        }
    }

    fn update(&mut self, p: SampleProgress) {
        let rate = p.tokens as f64 / p.seconds.max(1e-9);
        if self.tty {
            let b = self.bar.get_or_insert_with(|| {
                let b = ProgressBar::new(p.prompts_total as u64);
                b.set_style(
                    ProgressStyle::with_template(
                        "sample [{bar:40}] {pos}/{len} prompts · {msg} · ETA {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                b
            });
            b.set_position(p.prompts_done as u64);
            b.set_message(format!("{} tokens · {rate:.1} tokens/s", p.tokens));
        } else {
            let decile = p.prompts_done * 10 / p.prompts_total.max(1);
            if decile != self.last_decile {
                eprintln!(
                    "sample: {}/{} prompts, {} tokens, {rate:.1} tokens/s",
                    p.prompts_done, p.prompts_total, p.tokens
                );
                self.last_decile = decile;
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
