//! The training and eval splits: rows loaded and checked for one batch layout, and the seeded
//! hold-out when no eval file is given.

use std::path::Path;

use anyhow::{bail, Result};

use super::config::TrainConfig;
use super::schedule::epoch_order;
use super::Event;
use crate::data::{Dataset, EncodeOptions, Encoded, RowError};

/// All rows must have as many chosen and rejected responses as the first (one batch layout);
/// others fail the load or, with `skip`, are skipped and counted.
pub(super) fn check_row_shapes(
    ds: &mut Dataset,
    path: &Path,
    skip: bool,
) -> Result<(usize, usize)> {
    let first = &ds.rows[0];
    let (k1, r) = (first.chosen.len(), first.rejected.len());
    let mut kept = Vec::with_capacity(ds.rows.len());
    for row in std::mem::take(&mut ds.rows) {
        let bad = if row.chosen.len() != k1 {
            Some(("chosen", row.chosen.len(), k1))
        } else if row.rejected.len() != r {
            Some(("rejected", row.rejected.len(), r))
        } else {
            None
        };
        match bad {
            None => kept.push(row),
            Some((field, n, want)) => {
                let e = RowError {
                    path: path.to_path_buf(),
                    line: row.line,
                    field: field.into(),
                    msg: format!("has {n} responses but the rows before it have {want}: every row of a run needs the same count"),
                };
                if !skip {
                    return Err(anyhow::Error::new(e)
                        .context("bad row (pass --skip-bad-rows to skip such rows)"));
                }
                ds.skipped.push(e);
            }
        }
    }
    ds.rows = kept;
    Ok((k1, r))
}

/// Load and check one split.
pub(super) fn load_split(
    path: Option<&Path>,
    tok: Option<&crate::tokenizer::TextTokenizer>,
    opts: &EncodeOptions,
    cfg: &TrainConfig,
    on: &mut dyn FnMut(Event),
) -> Result<(Dataset, usize, usize)> {
    let mut ds = crate::data::load_or_bundled(path, tok, opts, cfg.skip_bad_rows)?;
    let label = path.map_or_else(
        || Path::new(crate::embedded::LABEL).join("wrpo_tiny.jsonl"),
        Path::to_path_buf,
    );
    let (k1, r) = check_row_shapes(&mut ds, &label, cfg.skip_bad_rows)?;
    if !ds.skipped.is_empty() {
        on(Event::Note(format!(
            "{}: skipped {} bad rows (first: {})",
            label.display(),
            ds.skipped.len(),
            ds.skipped[0]
        )));
    }
    if cfg.loss_type.blends() && k1 < 2 {
        bail!(
            "{}: --loss-type {:?} needs at least 2 chosen responses per row (K ≥ 1 sources, then the target); these rows have {k1}. Use --loss-type dpo|simpo|ipo for pairwise data",
            label.display(),
            cfg.loss_type
        );
    }
    Ok((ds, k1, r))
}

/// Move a seeded `fraction` of the rows (at least one) into an eval split.
pub(super) fn hold_out(rows: &mut Vec<Encoded>, fraction: f64, seed: u64) -> Result<Vec<Encoded>> {
    let n = rows.len();
    let k = ((fraction * n as f64).ceil() as usize).max(1);
    if k >= n {
        bail!("eval_fraction {fraction} leaves no training rows out of {n}");
    }
    let order = epoch_order(n, usize::MAX, true, seed);
    let mut is_eval = vec![false; n];
    order[..k].iter().for_each(|&i| is_eval[i] = true);
    let (mut train, mut eval) = (vec![], vec![]);
    for (i, row) in std::mem::take(rows).into_iter().enumerate() {
        if is_eval[i] {
            eval.push(row)
        } else {
            train.push(row)
        }
    }
    *rows = train;
    Ok(eval)
}
