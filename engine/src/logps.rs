//! Per-sequence log-probs of completions under a model: rows stacked into one right-padded batch,
//! one forward, labels shifted and masked, summed in f32 (see `wrpo_kernels::logprobs`).
//!
//! From the final hidden states to the log-probs there are two paths ([`HeadImpl`]):
//! - **fused** (the default): only the scored positions (completion tokens) are gathered, and they
//!   go through the LM head fused with the log-prob op a block of positions at a time
//!   ([`wrpo_kernels::head`]), so the `[N, T, V]` logits never exist — neither for prompt and
//!   padding positions nor, under autodiff, for the backward (which recomputes each block);
//! - **dense**: the head on every position, then the log-prob op on the whole `[N, T, V]` logits.
//!   The reference the fused path is tested against.

use burn::tensor::{backend::Backend, Bool, IndexingUpdateOp, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use wrpo_kernels::{
    head::{default_chunk, head_logprobs, HeadLogProbBackend},
    logprobs::sequence_logprobs,
    IGNORE_INDEX,
};
use wrpo_models::{Llama, LlamaConfig};

/// How completion log-probs are computed from the final hidden states (`lm_head_impl`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadImpl {
    /// Only scored positions go through the LM head, fused with the log-probs a block at a time;
    /// no `[N, T, V]` logits (memory independent of the vocabulary beyond one block).
    #[default]
    Fused,
    /// The full `[N, T, V]` logits, then the log-prob op: the tested reference.
    Dense,
}

/// The head path and its block length.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Head {
    /// Fused or dense.
    pub imp: HeadImpl,
    /// Positions per block of the fused head; 0 = automatic ([`default_chunk`]: about 16M logits
    /// per block, 130 positions at V = 128256).
    pub chunk: usize,
}

impl Head {
    /// The dense reference path.
    pub const DENSE: Head = Head {
        imp: HeadImpl::Dense,
        chunk: 0,
    };

    /// Positions per block for a vocabulary of `vocab`.
    pub fn chunk_for(&self, vocab: usize) -> usize {
        if self.chunk == 0 {
            default_chunk(vocab)
        } else {
            self.chunk
        }
    }
}

/// The scored positions of a batch, on the host: where each label sits, its value, and the
/// sequence it belongs to.
///
/// # Shapes
/// - every vector has `M` entries, `M` = scored positions of the batch
#[derive(Debug, Clone, Default)]
pub struct Scored {
    /// Flat position `row·T + t` of each scored position.
    pub index: Vec<i64>,
    /// Its label (the next token).
    pub labels: Vec<i64>,
    /// The sequence it belongs to (a row of a padded batch; a sequence ordinal of a packed one).
    pub owner: Vec<i64>,
}

/// Per-sequence sums of the scored positions' log-probs from the final hidden states, through the
/// fused head. `None` when the batch has no scored position (the caller takes the dense path,
/// which keeps the autodiff graph connected).
///
/// # Shapes
/// - `hidden`: `[R, T, H]`; `scored` indexes its `R·T` positions and owns `n` sequences
/// - returns `[n]`
pub fn fused_sums<B: HeadLogProbBackend>(
    model: &Llama<B>,
    hidden: Tensor<B, 3>,
    scored: &Scored,
    n: usize,
    head: Head,
) -> Option<Tensor<B, 1>> {
    let m = scored.index.len();
    if m == 0 {
        return None;
    }
    let [r, t, h] = hidden.dims();
    let device = hidden.device();
    let int = |v: &[i64]| Tensor::<B, 1, Int>::from_data(TensorData::new(v.to_vec(), [m]), &device);
    let gathered = hidden.reshape([r * t, h]).select(0, int(&scored.index)); // [M, H]
    let weight = model.head_weight(); // [V, H]
    let chunk = head.chunk_for(weight.dims()[0]);
    let logp = head_logprobs(gathered, weight, int(&scored.labels), chunk); // [M]
    Some(Tensor::zeros([n], &device).select_assign(
        0,
        int(&scored.owner),
        logp,
        IndexingUpdateOp::Add,
    ))
}

use crate::data::Encoded;

/// A right-padded batch of prompt + completion sequences.
///
/// # Shapes
/// - `input_ids`, `valid`, `labels`: `[N, T]`, `T` = longest sequence
#[derive(Debug, Clone)]
pub struct Batch<B: Backend> {
    /// Token ids, padded with `pad_id`.
    pub input_ids: Tensor<B, 2, Int>,
    /// True at real tokens.
    pub valid: Tensor<B, 2, Bool>,
    /// `labels[n, t]` = the token at `t + 1` when it is a completion token, else [`IGNORE_INDEX`]
    /// (already shifted: position `t`'s logits predict it).
    pub labels: Tensor<B, 2, Int>,
    /// The scored positions on the host (owner = row).
    pub scored: Scored,
}

/// Stack `(prompt, completion)` pairs into a batch.
pub fn make_batch<B: Backend>(
    seqs: &[(&[u32], &[u32])],
    pad_id: u32,
    device: &B::Device,
) -> Batch<B> {
    let n = seqs.len();
    let t = seqs
        .iter()
        .map(|(p, c)| p.len() + c.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut ids = vec![pad_id as i64; n * t];
    let mut valid = vec![false; n * t];
    let mut labels = vec![IGNORE_INDEX; n * t];
    let mut scored = Scored::default();
    for (row, (p, c)) in seqs.iter().enumerate() {
        let base = row * t;
        for (j, &tok) in p.iter().chain(c.iter()).enumerate() {
            ids[base + j] = tok as i64;
            valid[base + j] = true;
        }
        // Completion token at position p.len() + k is predicted at position p.len() + k − 1.
        // With an empty prompt the first completion token has no predicting position.
        for (k, &tok) in c.iter().enumerate() {
            let pos = p.len() + k;
            if pos > 0 {
                labels[base + pos - 1] = tok as i64;
                scored.index.push((base + pos - 1) as i64);
                scored.labels.push(tok as i64);
                scored.owner.push(row as i64);
            }
        }
    }
    Batch {
        input_ids: Tensor::from_data(TensorData::new(ids, [n, t]), device),
        valid: Tensor::from_data(TensorData::new(valid, [n, t]), device),
        labels: Tensor::from_data(TensorData::new(labels, [n, t]), device),
        scored,
    }
}

/// Packed rows: several `(prompt, completion)` sequences per row, each with its own segment id and
/// positions restarting at 0, for [`wrpo_models::Llama::forward_packed`].
///
/// # Shapes
/// - `input_ids`, `labels`: `[R, T]`, `T` = longest row; `segments`, `positions`: `R·T` host values
#[derive(Debug, Clone)]
pub struct PackedBatch<B: Backend> {
    /// Token ids, padded with `pad_id`.
    pub input_ids: Tensor<B, 2, Int>,
    /// Labels as in [`Batch`], per segment: no position predicts the next segment's first token.
    pub labels: Tensor<B, 2, Int>,
    /// 0 at padding, `1..` = the sequence's index in its row + 1.
    pub segments: Vec<u32>,
    /// Position of each token within its sequence (0 at padding).
    pub positions: Vec<usize>,
    /// The scored positions on the host; the owner is the sequence's ordinal in packing order
    /// (row 0's sequences first, each row's in order: `rows.concat()`'s index).
    pub scored: Scored,
}

/// Pack rows of `(prompt, completion)` sequences; row `r` holds `rows[r]` back to back.
pub fn make_packed_batch<B: Backend>(
    rows: &[Vec<(&[u32], &[u32])>],
    pad_id: u32,
    device: &B::Device,
) -> PackedBatch<B> {
    let len = |row: &Vec<(&[u32], &[u32])>| row.iter().map(|(p, c)| p.len() + c.len()).sum();
    let n = rows.len();
    let t = rows.iter().map(len).max().unwrap_or(1).max(1);
    let mut ids = vec![pad_id as i64; n * t];
    let mut labels = vec![IGNORE_INDEX; n * t];
    let mut segments = vec![0u32; n * t];
    let mut positions = vec![0usize; n * t];
    let mut scored = Scored::default();
    let mut ordinal = 0i64;
    for (r, row) in rows.iter().enumerate() {
        let mut base = r * t;
        for (s, (p, c)) in row.iter().enumerate() {
            for (j, &tok) in p.iter().chain(c.iter()).enumerate() {
                ids[base + j] = tok as i64;
                segments[base + j] = s as u32 + 1;
                positions[base + j] = j;
            }
            for (k, &tok) in c.iter().enumerate() {
                let pos = p.len() + k;
                if pos > 0 {
                    labels[base + pos - 1] = tok as i64;
                    scored.index.push((base + pos - 1) as i64);
                    scored.labels.push(tok as i64);
                    scored.owner.push(ordinal);
                }
            }
            base += p.len() + c.len();
            ordinal += 1;
        }
    }
    PackedBatch {
        input_ids: Tensor::from_data(TensorData::new(ids, [n, t]), device),
        labels: Tensor::from_data(TensorData::new(labels, [n, t]), device),
        segments,
        positions,
        scored,
    }
}

/// Greedy best-fit-decreasing packing of sequence lengths into bins of `capacity` tokens
/// (TRL's `packing_strategy="bfd"`: sequences are never split; one longer than `capacity` gets a
/// bin of its own). Deterministic: longest first, ties by index; each bin lists indices in
/// ascending order and bins are ordered by their first index.
pub fn pack_bfd(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut bins: Vec<(usize, Vec<usize>)> = Vec::new(); // (free tokens, members)
    for i in order {
        let best = bins
            .iter()
            .enumerate()
            .filter(|(_, (free, _))| *free >= lengths[i])
            .min_by_key(|(b, (free, _))| (*free, *b))
            .map(|(b, _)| b);
        match best {
            Some(b) => {
                bins[b].0 -= lengths[i];
                bins[b].1.push(i);
            }
            None => bins.push((capacity.saturating_sub(lengths[i]), vec![i])),
        }
    }
    let mut bins: Vec<Vec<usize>> = bins
        .into_iter()
        .map(|(_, mut m)| {
            m.sort_unstable();
            m
        })
        .collect();
    bins.sort_by_key(|m| m[0]);
    bins
}

/// Summed completion log-probs and scored-token counts for each sequence, in one forward, through
/// `head` (fused or dense).
///
/// # Shapes
/// - returns (`[N]`, `[N]`)
pub fn batch_logps<B: wrpo_kernels::KernelBackend>(
    model: &Llama<B>,
    cfg: &LlamaConfig,
    batch: Batch<B>,
    head: Head,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [n, _t] = batch.input_ids.dims();
    let device = batch.input_ids.device();
    let hidden = model.hidden(cfg, batch.input_ids, batch.valid);
    if head.imp == HeadImpl::Fused {
        if let Some(sums) = fused_sums(model, hidden.clone(), &batch.scored, n, head) {
            let mut counts = vec![0f32; n];
            batch
                .scored
                .owner
                .iter()
                .for_each(|&o| counts[o as usize] += 1.0);
            let counts = Tensor::from_data(TensorData::new(counts, [n]), &device);
            return (sums, counts);
        }
    }
    sequence_logprobs(model.head(hidden), batch.labels)
}

/// Log-probs of one row's completions.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RowLogps {
    /// Summed log-probs of `chosen` completions.
    pub chosen: Vec<f64>,
    /// Summed log-probs of `rejected` completions.
    pub rejected: Vec<f64>,
    /// Completion token counts of `chosen`.
    pub chosen_tokens: Vec<usize>,
    /// Completion token counts of `rejected`.
    pub rejected_tokens: Vec<usize>,
}

/// Log-probs for a group of rows, all their sequences in one forward.
pub fn rows_logps<B: wrpo_kernels::KernelBackend>(
    model: &Llama<B>,
    cfg: &LlamaConfig,
    rows: &[Encoded],
    pad_id: u32,
    head: Head,
    device: &B::Device,
) -> Vec<RowLogps> {
    let seqs: Vec<(&[u32], &[u32])> = rows
        .iter()
        .flat_map(|r| {
            r.chosen
                .iter()
                .chain(&r.rejected)
                .map(|c| (r.prompt.as_slice(), c.as_slice()))
        })
        .collect();
    let (sums, _) = batch_logps(model, cfg, make_batch::<B>(&seqs, pad_id, device), head);
    let sums: Vec<f32> = sums
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 data");
    let mut at = 0;
    rows.iter()
        .map(|r| {
            let (k, m) = (r.chosen.len(), r.rejected.len());
            let out = RowLogps {
                chosen: sums[at..at + k].iter().map(|&x| x as f64).collect(),
                rejected: sums[at + k..at + k + m].iter().map(|&x| x as f64).collect(),
                chosen_tokens: r.chosen.iter().map(Vec::len).collect(),
                rejected_tokens: r.rejected.iter().map(Vec::len).collect(),
            };
            at += k + m;
            out
        })
        .collect()
}

/// Settings of the `logps` command.
#[derive(Debug, Clone)]
pub struct LogpsJob {
    /// The model.
    pub model: crate::model::ModelSource,
    /// The data file; `None` = the bundled dataset (embedded model only).
    pub data: Option<std::path::PathBuf>,
    /// Rows per forward (all their sequences go through one forward).
    pub batch_size: usize,
    /// Tokenisation limits.
    pub max_length: Option<usize>,
    /// Prompt tokens kept when a row is too long.
    pub max_prompt_length: Option<usize>,
    /// Skip bad rows instead of failing.
    pub skip_bad_rows: bool,
    /// Fused or dense LM head.
    pub head: Head,
    /// A PEFT LoRA adapter on the model (`--adapter`).
    pub adapter: Option<std::path::PathBuf>,
}

/// What a `logps` run produced.
#[derive(Debug, Clone)]
pub struct LogpsOutput {
    /// One record per kept row, in input order, with its line.
    pub rows: Vec<(usize, RowLogps)>,
    /// Rows skipped as bad (with `skip_bad_rows`).
    pub skipped: Vec<crate::data::RowError>,
}

/// Run `logps`: load tokenizer, data and model, then score every row. `progress(done, total)` is
/// called after each batch.
pub fn run_logps<B: wrpo_kernels::KernelBackend>(
    job: &LogpsJob,
    device: &B::Device,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<LogpsOutput> {
    use crate::data::EncodeOptions;
    anyhow::ensure!(job.batch_size > 0, "--batch-size must be at least 1");
    let model_cfg = job.model.config()?;
    let tok = job.model.tokenizer(&model_cfg)?;
    let vocab_size = model_cfg.vocab_size;
    let opts = EncodeOptions {
        max_length: job.max_length,
        max_prompt_length: job.max_prompt_length,
        vocab_size,
    };
    let ds =
        crate::data::load_or_bundled(job.data.as_deref(), tok.as_ref(), &opts, job.skip_bad_rows)?;
    let (model, cfg) = job
        .model
        .load_adapted::<B>(job.adapter.as_deref(), device)?;
    let pad = tok
        .as_ref()
        .and_then(|t| t.pad.as_ref().or(t.eos.as_ref()))
        .map_or(0, |(_, id)| *id);
    let mut rows = Vec::with_capacity(ds.rows.len());
    let total = ds.rows.len();
    for chunk in ds.rows.chunks(job.batch_size) {
        let out = rows_logps(&model, &cfg, chunk, pad, job.head, device);
        rows.extend(chunk.iter().map(|r| r.line).zip(out));
        progress(rows.len(), total);
    }
    Ok(LogpsOutput {
        rows,
        skipped: ds.skipped,
    })
}
