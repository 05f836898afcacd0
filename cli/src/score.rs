//! `wrpo-engine score`: argument parsing around
//! [`wrpo_engine_core::pipeline::score::run_score`].

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use wrpo_engine_core::dispatch;
use wrpo_engine_core::pipeline::score::{run_score, ScoreJob};

use crate::BackendArg;

#[derive(Args)]
pub struct ScoreCmd {
    /// Reward model: a Hugging Face LlamaForSequenceClassification folder with num_labels 1
    /// (config.json, safetensors with `score.weight`, tokenizer).
    #[arg(long)]
    model: PathBuf,
    /// Rows with `prompt` + `response` (→ `score`) or `prompt` + `responses` (→ `scores`), JSON
    /// Lines; other fields are kept.
    #[arg(long)]
    data: PathBuf,
    /// Output JSON Lines, one row per input row (written atomically).
    #[arg(long)]
    out: PathBuf,
    /// (prompt, response) sequences per forward.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Skip bad rows (kept in the output with a `skipped` reason and no score) instead of
    /// stopping at the first.
    #[arg(long)]
    skip_bad_rows: bool,
    #[command(flatten)]
    backend: BackendArg,
}

pub fn score(a: ScoreCmd) -> Result<()> {
    let job = ScoreJob {
        model: a.model.clone(),
        data: a.data.clone(),
        batch_size: a.batch_size,
        skip_bad_rows: a.skip_bad_rows,
    };
    eprintln!("reward model: {}", a.model.display());
    let selected = crate::device(a.backend.backend)?;
    let mut bar = crate::progress_bar("score", "pairs");
    let out = dispatch!(selected, B, device => run_score::<B>(&job, &device, &mut bar))?;
    for e in &out.skipped {
        eprintln!("skipped: {e}");
    }
    if !out.skipped.is_empty() {
        eprintln!("{} bad rows skipped", out.skipped.len());
    }
    wrpo_engine_core::util::write_atomic(&a.out, out.to_jsonl().as_bytes())?;
    eprintln!(
        "wrote {} rows ({} scored pairs) to {}",
        out.rows.len(),
        out.pairs,
        a.out.display()
    );
    Ok(())
}
