//! Incremental forward with a KV cache, for generation.
//!
//! Batched prompts of different lengths are **left-padded**: every row's last prompt token sits
//! in the last column, so each decode step appends one column to every row at once. A token's
//! RoPE position is the number of real tokens before it in its row (transformers' `generate`:
//! `position_ids = attention_mask.cumsum(-1) − 1`), so a padded row sees the same positions as
//! the prompt run alone; padded keys are masked for every query. Keys are cached after RoPE,
//! values as projected, per layer, as `[B, NKV, Tc, HD]`; a step concatenates the new columns
//! (simple, and the copy is small next to the matmuls of a real model; a preallocated cache is a
//! later optimisation).
//!
//! The specification of this path is the full forward ([`Llama::forward`]): at every step the
//! cached logits equal the full forward's logits of the unpadded sequence (tested below and in
//! `tests/tests/generate.rs`).

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::config::LlamaConfig;
use crate::llama::Llama;
use crate::rope;

/// Per-layer keys and values of the tokens seen so far, with each row's key validity and
/// position counter.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// Per layer: keys after RoPE and values, `[B, NKV, Tc, HD]`; `None` before the first step.
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    /// `valid[b][j]`: column `j` of row `b` is a real token (host copy, `[B][Tc]`).
    valid: Vec<Vec<bool>>,
    /// Real tokens seen per row: the position of the row's next real token.
    seen: Vec<usize>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `batch` rows.
    pub fn new(cfg: &LlamaConfig, batch: usize) -> Self {
        Self {
            layers: vec![None; cfg.num_layers],
            valid: vec![Vec::new(); batch],
            seen: vec![0; batch],
        }
    }

    /// Rows (`B`).
    pub fn batch(&self) -> usize {
        self.seen.len()
    }

    /// Cached columns (`Tc`), padding included.
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }

    /// Whether no column is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Real tokens seen per row (the next token's RoPE position).
    pub fn positions(&self) -> &[usize] {
        &self.seen
    }

    /// Keep the rows `rows`, in this order; an index may repeat. Used to expand one prefilled
    /// prompt into N samples and to drop finished rows.
    pub fn select(&mut self, rows: &[usize]) {
        assert!(
            rows.iter().all(|&r| r < self.batch()),
            "KvCache::select: row out of range"
        );
        for (k, v) in self.layers.iter_mut().flatten() {
            let device = k.device();
            let idx = Tensor::<B, 1, Int>::from_data(
                TensorData::new(rows.iter().map(|&r| r as i64).collect(), [rows.len()]),
                &device,
            );
            *k = k.clone().select(0, idx.clone());
            *v = v.clone().select(0, idx);
        }
        self.valid = rows.iter().map(|&r| self.valid[r].clone()).collect();
        self.seen = rows.iter().map(|&r| self.seen[r]).collect();
    }
}

impl<B: wrpo_kernels::linear::FrozenLinearBackend> Llama<B> {
    /// Final hidden states of `input_ids`, which continue the cached tokens; the cache grows by
    /// `S` columns.
    ///
    /// `valid[b·S + s]` is false at padding (left padding in a prompt batch). Padding gets no
    /// position and is never attended to.
    ///
    /// # Shapes
    /// - `input_ids`: `[B, S]`; `valid`: `B·S` host flags, row-major
    /// - returns `[B, S, H]`
    pub fn hidden_cached(
        &self,
        cfg: &LlamaConfig,
        input_ids: Tensor<B, 2, Int>,
        valid: &[bool],
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let [b, s] = input_ids.dims();
        assert_eq!(
            b,
            cache.batch(),
            "hidden_cached: batch differs from the cache's"
        );
        assert_eq!(
            valid.len(),
            b * s,
            "hidden_cached: valid must hold B·S flags"
        );
        let device = input_ids.device();
        let past = cache.len();
        let total = past + s;
        // Positions of the new tokens and the grown validity rows.
        let mut positions = Vec::with_capacity(b * s);
        for (row, flags) in valid.chunks(s).enumerate() {
            for &v in flags {
                positions.push(if v { cache.seen[row] } else { 0 });
                cache.seen[row] += usize::from(v);
            }
            cache.valid[row].extend_from_slice(flags);
        }
        // mask[b, 0, i, j]: key j is after query past + i, or padding.
        let mut mask = Vec::with_capacity(b * s * total);
        for row in &cache.valid {
            for i in 0..s {
                mask.extend((0..total).map(|j| j > past + i || !row[j]));
            }
        }
        let mask =
            Tensor::<B, 4, Bool>::from_data(TensorData::new(mask, [b, 1, s, total]), &device);
        let (cos, sin) = rope::tables_at::<B>(cfg, &positions, &device);
        let hd = cfg.head_dim;
        let (cos, sin) = (cos.reshape([b, 1, s, hd]), sin.reshape([b, 1, s, hd]));
        let mut x = self.model.embed(input_ids);
        for (layer, slot) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            let attn = &layer.self_attn;
            let (q, k, v) = attn.project(layer.input_layernorm.forward(x.clone()), &cos, &sin);
            let (k, v) = match slot.take() {
                None => (k, v),
                Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            };
            *slot = Some((k.clone(), v.clone()));
            x = x + attn.attend(q, k, v, mask.clone());
            let h = layer
                .mlp
                .forward(layer.post_attention_layernorm.forward(x.clone()));
            x = x + h;
        }
        self.model.norm.forward(x)
    }

    /// Logits of the last column only (the next-token distribution of every row; with left
    /// padding the last column is every row's newest real token).
    ///
    /// # Shapes
    /// - `input_ids`: `[B, S]`; `valid`: `B·S` host flags
    /// - returns `[B, V]`
    pub fn forward_cached_last(
        &self,
        cfg: &LlamaConfig,
        input_ids: Tensor<B, 2, Int>,
        valid: &[bool],
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 2> {
        let [b, s] = input_ids.dims();
        let hidden = self.hidden_cached(cfg, input_ids, valid, cache);
        let last = hidden.narrow(1, s - 1, 1);
        let v = cfg.vocab_size;
        self.head(last).reshape([b, v])
    }
}
