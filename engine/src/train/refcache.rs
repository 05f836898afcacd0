//! Reference log-probs computed once: `--precompute-ref` scores every row with the reference
//! model before training, stores the table under `CACHE/ref-logps/<key>.json` and frees the model;
//! a later run with the same reference weights and the same token ids finds the table and never
//! loads the reference. `--ref-logps FILE` takes the `logps` command's output instead.
//!
//! The key is a SHA-256 of the reference model (its `config.json` and the bytes of every
//! `*.safetensors` file; reading the weights once costs seconds against an hours-long run and is
//! the only way to notice weights replaced in place, whatever their size and mtime) and of every
//! row's token ids, so any change of weights, data, tokenizer, template or truncation gives a new
//! key. A table is checked against its rows when read: one value per response, all finite.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use wrpo_kernels::KernelBackend;
use wrpo_models::{Llama, LlamaConfig};

use crate::data::Encoded;
use crate::logps::{rows_logps, Head, RowLogps};
use crate::model::ModelSource;

/// Cache key of `rows` scored by `source`.
pub fn key(source: &ModelSource, rows: &[Encoded]) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"wrpo-engine ref-logps v2\n");
    match source {
        ModelSource::Embedded => {
            h.update(format!("embedded seed {}\n", crate::embedded::SEED));
        }
        ModelSource::Dir(d) => {
            let mut cfg = String::new();
            std::fs::File::open(d.join("config.json"))
                .and_then(|mut f| f.read_to_string(&mut cfg))
                .with_context(|| format!("reading {}/config.json", d.display()))?;
            h.update(cfg.as_bytes());
            let mut files: Vec<_> = std::fs::read_dir(d)
                .with_context(|| format!("listing {}", d.display()))?
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .collect();
            files.sort_by_key(|e| e.file_name());
            for f in files {
                let path = f.path();
                let mut file = std::fs::File::open(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                h.update(format!("{:?}\n", f.file_name()).as_bytes());
                std::io::copy(&mut file, &mut h)
                    .with_context(|| format!("reading {}", path.display()))?;
            }
        }
    }
    for r in rows {
        let mut put = |ids: &[u32]| {
            h.update((ids.len() as u64).to_le_bytes());
            ids.iter().for_each(|x| h.update(x.to_le_bytes()));
        };
        put(&r.prompt);
        r.chosen.iter().for_each(|c| put(c));
        r.rejected.iter().for_each(|c| put(c));
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Score `rows` with `model` in groups of `batch` rows, through `head`.
pub fn compute<B: KernelBackend>(
    model: &Llama<B>,
    cfg: &LlamaConfig,
    rows: &[Encoded],
    pad: u32,
    head: Head,
    device: &B::Device,
    batch: usize,
) -> Vec<RowLogps> {
    rows.chunks(batch.max(1))
        .flat_map(|c| rows_logps(model, cfg, c, pad, head, device))
        .collect()
}

/// [`compute`] once over a data-parallel run: global rank r scores rows `i ≡ r (mod peers)`
/// (or takes them from its `cached` table), and one all-reduce (a sum: every row is non-zero on
/// exactly one peer) gives every peer the whole table.
#[allow(clippy::too_many_arguments)]
pub fn compute_shared<B: KernelBackend>(
    peer: &mut super::dist::Peer<B>,
    cached: Option<&[RowLogps]>,
    model: &Llama<B>,
    cfg: &LlamaConfig,
    rows: &[Encoded],
    pad: u32,
    head: Head,
    device: &B::Device,
    batch: usize,
) -> Result<Vec<RowLogps>> {
    use burn::tensor::{Tensor, TensorData};
    if rows.is_empty() {
        return Ok(vec![]);
    }
    let (size, rank) = (peer.world().size(), peer.rank());
    let (k1, width) = (
        rows[0].chosen.len(),
        rows[0].chosen.len() + rows[0].rejected.len(),
    );
    let mine: Vec<usize> = (0..rows.len()).filter(|i| i % size == rank).collect();
    let local: Vec<RowLogps> = match cached {
        Some(t) => mine.iter().map(|&i| t[i].clone()).collect(),
        None => {
            let sub: Vec<Encoded> = mine.iter().map(|&i| rows[i].clone()).collect();
            compute(model, cfg, &sub, pad, head, device, batch)
        }
    };
    let mut flat = vec![0f32; rows.len() * width];
    for (&i, r) in mine.iter().zip(&local) {
        for (j, &x) in r.chosen.iter().chain(&r.rejected).enumerate() {
            flat[i * width + j] = x as f32;
        }
    }
    let n = flat.len();
    let t = Tensor::<B, 1>::from_data(TensorData::new(flat, [n]), device);
    let (sum, _) = peer.sum_update("the reference log-probs", vec![t], vec![])?;
    let v: Vec<f32> = sum[0]
        .clone()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32");
    Ok(rows
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let row = &v[i * width..(i + 1) * width];
            RowLogps {
                chosen: row[..k1].iter().map(|&x| x as f64).collect(),
                rejected: row[k1..].iter().map(|&x| x as f64).collect(),
                chosen_tokens: e.chosen.iter().map(Vec::len).collect(),
                rejected_tokens: e.rejected.iter().map(Vec::len).collect(),
            }
        })
        .collect())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    chosen: Vec<Vec<f64>>,
    rejected: Vec<Vec<f64>>,
}

/// Store a table (atomically).
pub fn store(path: &Path, table: &[RowLogps]) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    let s = Stored {
        chosen: table.iter().map(|r| r.chosen.clone()).collect(),
        rejected: table.iter().map(|r| r.rejected.clone()).collect(),
    };
    crate::util::write_atomic(path, serde_json::to_string(&s)?.as_bytes())?;
    Ok(())
}

/// The stored table for `rows`, if there is one. A file that is there but is not a table of
/// these rows (not JSON, another row count, a list of the wrong length, a non-finite value) is an
/// error naming the file and the row: it was not written by this engine for this key.
pub fn load(path: &Path, rows: &[Encoded]) -> Result<Option<Vec<RowLogps>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let fix = "delete it and the table is recomputed";
    let s: Stored = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a reference log-prob table ({fix})", path.display()))?;
    if s.chosen.len() != rows.len() || s.rejected.len() != rows.len() {
        bail!(
            "{}: {}/{} rows of chosen/rejected values, the data has {} rows ({fix})",
            path.display(),
            s.chosen.len(),
            s.rejected.len(),
            rows.len()
        );
    }
    rows.iter()
        .zip(s.chosen.into_iter().zip(s.rejected))
        .enumerate()
        .map(|(i, (r, (chosen, rejected)))| {
            check_shape(r, &chosen, &rejected)
                .with_context(|| format!("{}: row {} ({fix})", path.display(), i + 1))?;
            Ok(RowLogps {
                chosen,
                rejected,
                chosen_tokens: r.chosen.iter().map(Vec::len).collect(),
                rejected_tokens: r.rejected.iter().map(Vec::len).collect(),
            })
        })
        .collect::<Result<_>>()
        .map(Some)
}

/// One finite value per chosen and per rejected response of `row`.
fn check_shape(row: &Encoded, chosen: &[f64], rejected: &[f64]) -> Result<()> {
    for (field, got, want) in [
        ("chosen", chosen, row.chosen.len()),
        ("rejected", rejected, row.rejected.len()),
    ] {
        if got.len() != want {
            bail!(
                "field `{field}`: {} values, the row has {want} {field} responses",
                got.len()
            );
        }
        if let Some(j) = got.iter().position(|x| !x.is_finite()) {
            bail!("field `{field}`: value {j} is {} (must be finite)", got[j]);
        }
    }
    Ok(())
}

/// Read the `logps` command's output for `rows`: record `k` belongs to the `k`-th row of the data
/// file, whose lines are `all_lines` (kept and skipped rows, ascending). Token counts must match
/// this run's tokenisation.
pub fn read_logps_file(
    path: &Path,
    rows: &[Encoded],
    all_lines: &[usize],
) -> Result<Vec<RowLogps>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let records: Vec<(usize, serde_json::Value)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map(|v| (i + 1, v))
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))
        })
        .collect::<Result<_>>()?;
    if records.len() != all_lines.len() {
        bail!(
            "{}: {} records, but the data has {} rows (the file must be `wrpo-engine logps` output for this data)",
            path.display(),
            records.len(),
            all_lines.len()
        );
    }
    rows.iter()
        .map(|row| {
            let k = all_lines.binary_search(&row.line).expect("row line listed");
            let (line, v) = &records[k];
            let get = |f: &str| -> Result<Vec<f64>> {
                v.get(f)
                    .and_then(|x| x.as_array())
                    .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<_>>>())
                    .with_context(|| format!("{}:{line}: field `{f}`: missing or not a list of numbers", path.display()))
            };
            let (chosen, rejected) = (get("chosen")?, get("rejected")?);
            let (ct, rt) = (get("chosen_tokens")?, get("rejected_tokens")?);
            let want_c: Vec<f64> = row.chosen.iter().map(|c| c.len() as f64).collect();
            let want_r: Vec<f64> = row.rejected.iter().map(|c| c.len() as f64).collect();
            if ct != want_c || rt != want_r {
                bail!(
                    "{}:{line}: token counts {ct:?}/{rt:?} differ from this run's tokenisation {want_c:?}/{want_r:?} (other tokenizer or max_length?)",
                    path.display()
                );
            }
            check_shape(row, &chosen, &rejected)
                .with_context(|| format!("{}:{line}", path.display()))?;
            Ok(RowLogps {
                chosen,
                rejected,
                chosen_tokens: row.chosen.iter().map(Vec::len).collect(),
                rejected_tokens: row.rejected.iter().map(Vec::len).collect(),
            })
        })
        .collect()
}
