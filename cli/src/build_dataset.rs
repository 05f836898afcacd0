//! `wrpo-engine build-dataset`: argument parsing and the report around
//! [`wrpo_engine_core::pipeline::build::build`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use wrpo_engine_core::model::require_file;
use wrpo_engine_core::pipeline::build::{build, parse_sources, parse_targets, BuildOptions};
use wrpo_engine_core::pipeline::to_jsonl;
use wrpo_engine_core::util::write_atomic;

#[derive(Args)]
pub struct BuildCmd {
    /// Scored source responses, JSON Lines `{"prompt_id", "prompt", "model", "response",
    /// "score"}`; several files separated by commas.
    #[arg(long, value_delimiter = ',', required = true)]
    sources: Vec<PathBuf>,
    /// Scored target samples: `score` output of `sample` rows (`prompt_id`, `prompt`,
    /// `responses`, `scores`). Needs --out.
    #[arg(long, requires = "out")]
    targets: Option<PathBuf>,
    /// WRPO rows `{"prompt_id", "prompt", "chosen": [y_ws…, y_wt], "rejected": [y_l]}`.
    #[arg(long, requires = "targets")]
    out: Option<PathBuf>,
    /// Source responses per row: the best response of each source model, K best models.
    #[arg(long, default_value_t = 1)]
    sources_k: usize,
    /// Fraction of the source prompts for the target's SFT stage (the authors: 0.333); those
    /// prompts are left out of the WRPO rows.
    #[arg(long)]
    sft_fraction: Option<f64>,
    /// SFT rows `{"prompt_id", "prompt", "chosen": [best source response]}` of the SFT split.
    #[arg(long, requires = "sft_fraction")]
    sft_out: Option<PathBuf>,
    /// `{"prompt_id", "prompt"}` rows of the WRPO split: the --prompts of `sample`.
    #[arg(long)]
    prompts_out: Option<PathBuf>,
    /// Seed of the SFT/WRPO split.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Skip and count bad rows and unusable target prompts instead of stopping at the first.
    #[arg(long)]
    skip_bad_rows: bool,
}

fn read(path: &Path, what: &str) -> Result<String> {
    require_file(path, what)?;
    std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))
}

pub fn build_dataset(a: BuildCmd) -> Result<()> {
    if a.out.is_none() && a.sft_out.is_none() && a.prompts_out.is_none() {
        anyhow::bail!("nothing to write: give --targets with --out, --sft-out or --prompts-out");
    }
    let mut sources = Vec::new();
    for path in &a.sources {
        sources.extend(parse_sources(path, &read(path, "--sources")?));
    }
    let targets = match &a.targets {
        Some(path) => Some(parse_targets(path, &read(path, "--targets")?)),
        None => None,
    };
    let opts = BuildOptions {
        sources_k: a.sources_k,
        sft_fraction: a.sft_fraction,
        seed: a.seed,
        skip_bad_rows: a.skip_bad_rows,
    };
    let out = build(sources, targets, &opts)?;
    for e in &out.report.skipped_rows {
        eprintln!("skipped: {e}");
    }
    for (reason, ids) in &out.report.dropped {
        let shown: Vec<&str> = ids.iter().take(5).map(String::as_str).collect();
        let more = if ids.len() > 5 { ", …" } else { "" };
        eprintln!("dropped ({reason}): prompt_id {}{more}", shown.join(", "));
    }
    eprint!("{}", out.report);
    for (path, rows, what) in [
        (&a.out, &out.wrpo, "WRPO rows"),
        (&a.sft_out, &out.sft, "SFT rows"),
        (&a.prompts_out, &out.prompts, "prompts to sample"),
    ] {
        if let Some(path) = path {
            write_atomic(path, to_jsonl(rows.iter()).as_bytes())?;
            eprintln!("wrote {} {what} to {}", rows.len(), path.display());
        }
    }
    Ok(())
}
