//! Causal self-attention for training in memory linear in `T`: the forward keeps only the output
//! and the per-row log-sum-exp, the backward recomputes the scores block by block.
//!
//! Formula (per batch row `b`, query head `h` with key/value head `g = h / n_rep`, query `i`,
//! key `j`, scale `s = HD^-½`):
//! - visible `j ≤ i` and `k_seg[b, j] == q_seg[b, i]` (so no `[T, T]` mask is ever built on the
//!   host: the masks of padding, `padding_free` and packing are all segment ids);
//! - scores `S[i, j] = s·⟨q[b,h,i], k[b,g,j]⟩` where visible, else the most negative f32 (as the
//!   dense path fills them);
//! - `lse[i] = log Σ_j exp S[i, j]`, `P = exp(S − lse)`, `out[i] = Σ_j P[i, j]·v[b,g,j]`;
//! - backward (FlashAttention-2, Dao 2023, Algorithm 2), for an upstream `dO`:
//!   `δ[i] = ⟨dO[i], out[i]⟩`, `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P∘(dP − δ)`,
//!   `dQ = s·dS·K`, `dK = s·dSᵀ·Q` (summed over the `n_rep` query heads of each key/value head).
//!
//! # Segment ids
//! - Padded rows (right padding): `q_seg = 1` everywhere, `k_seg = 1` at real tokens and 0 at
//!   padding. A real query sees the real keys before it; a padding query sees every real key
//!   (transformers' additive padding mask, so even unscored positions match the dense path).
//! - Packed rows: `q_seg = k_seg =` the example id of each token (0 = padding, which sees only
//!   padding). Positions restart per example in the caller's RoPE tables.
//!
//! A query that sees no key at all (only an all-padding row) gets a finite, unspecified output;
//! such positions are never scored.
//!
//! # Tiers (each the oracle of the next)
//! - [`attention_dense`]: the whole `[B, NH, T, T]` scores with a mask built on the device from
//!   the segment ids and `repeat_kv`, differentiated by Burn's autodiff: the specification, the
//!   test oracle, and what `attn_implementation: dense` runs.
//! - [`mod@reference`]: the query-block-tiled forward and hand-written backward above in Burn
//!   tensor ops over any backend. A block of `tq` queries needs only the keys `0..q1` (causality),
//!   so it costs about half the dense arithmetic and `O(B·NH·tq·T)` memory; GQA/MQA reshape the
//!   block's query heads to `[B, NKV, n_rep·tq, HD]` so the key/value heads are never repeated.
//!   This is the implementation of [`AttentionBackend`] on the CPU (burn-flex), and the oracle of
//!   the kernels.
//! - `kernel`: FlashAttention-2 as three CubeCL kernels (forward; dQ; dK/dV), one source for
//!   CUDA and WGPU, no plane operations (so it runs on Mesa lavapipe): the implementation of
//!   [`AttentionBackend`] on `CubeBackend`. Scores live only in registers and shared-memory tiles;
//!   the `block` argument does not apply.
//! - `backward`: [`AttentionBackend`] for `Autodiff<B>`: the inner forward plus a custom backward
//!   node over `q`, `k`, `v` that keeps only them, the output, `lse [B, NH, T]` and the segment
//!   ids — never a score block.
//!
//! # Shapes
//! `q: [B, NH, T, HD]`, `k`, `v: [B, NKV, T, HD]` (`NKV` divides `NH`), `q_seg`, `k_seg: [B, T]`
//! int, `out: [B, NH, T, HD]`, `lse: [B, NH, T]`.

use burn::tensor::{
    backend::Backend,
    ops::{FloatTensor, IntTensor},
    Int, Tensor,
};

use crate::{float, prim};

mod backward;
pub(crate) mod kernel;
pub mod reference;
#[cfg(test)]
mod tests;

/// Queries per block when none is configured. Memory of a block is about
/// `4 · B·NH·block·T` floats, so 128 keeps it linear in `T` and under 100 MB at T 4096 for a few
/// sequences of 32 heads; larger blocks mean fewer, larger matmuls.
pub const DEFAULT_BLOCK: usize = 128;

/// Which attention the training forward runs (transformers' `attn_implementation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionImpl {
    /// Query-block tiled ([`attention`]), memory linear in `T`: the default.
    Tiled {
        /// Queries per block (`≥ 1`).
        block: usize,
    },
    /// The dense `[B, NH, T, T]` path ([`attention_dense`]): the tested reference.
    Dense,
}

impl Default for AttentionImpl {
    fn default() -> Self {
        AttentionImpl::Tiled {
            block: DEFAULT_BLOCK,
        }
    }
}

impl AttentionImpl {
    /// Run this attention. Shapes as in the module docs; returns `[B, NH, T, HD]`.
    pub fn run<B: AttentionBackend>(
        self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        q_seg: Tensor<B, 2, Int>,
        k_seg: Tensor<B, 2, Int>,
    ) -> Tensor<B, 4> {
        match self {
            AttentionImpl::Tiled { block } => attention(q, k, v, q_seg, k_seg, block),
            AttentionImpl::Dense => attention_dense(q, k, v, q_seg, k_seg),
        }
    }
}

/// Backend extension: causal, segment-masked attention with a recomputing backward.
///
/// The default methods are the tiled composite ([`reference::forward`], [`reference::backward`]);
/// `Autodiff` overrides the forward to register the custom backward.
pub trait AttentionBackend: Backend {
    /// Output and per-row log-sum-exp.
    ///
    /// # Shapes
    /// `q: [B, NH, T, HD]`, `k`, `v: [B, NKV, T, HD]`, `q_seg`, `k_seg: [B, T]`, `block ≥ 1`;
    /// returns (`out [B, NH, T, HD]`, `lse [B, NH, T]`).
    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        q_seg: IntTensor<Self>,
        k_seg: IntTensor<Self>,
        block: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (out, lse) = reference::forward::<Self>(
            float(q),
            float(k),
            float(v),
            Tensor::from_primitive(q_seg),
            Tensor::from_primitive(k_seg),
            block,
        );
        (prim(out), prim(lse))
    }

    /// Gradients of `Σ dO∘out` w.r.t. `q`, `k`, `v`.
    ///
    /// # Shapes
    /// as the forward, plus `out`, `dout: [B, NH, T, HD]` and `lse: [B, NH, T]`; returns
    /// (`dq [B, NH, T, HD]`, `dk [B, NKV, T, HD]`, `dv [B, NKV, T, HD]`).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        q_seg: IntTensor<Self>,
        k_seg: IntTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        block: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dq, dk, dv) = reference::backward::<Self>(
            float(q),
            float(k),
            float(v),
            Tensor::from_primitive(q_seg),
            Tensor::from_primitive(k_seg),
            float(out),
            float(lse),
            float(dout),
            block,
        );
        (prim(dq), prim(dk), prim(dv))
    }
}

/// burn-flex (the `cpu` backend): the tiled composite.
impl AttentionBackend for burn::backend::Flex {}

/// Tiled attention ([`AttentionBackend`]; differentiable under `Autodiff` with the recomputing
/// backward). Shapes as in the module docs; returns `[B, NH, T, HD]`.
pub fn attention<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    q_seg: Tensor<B, 2, Int>,
    k_seg: Tensor<B, 2, Int>,
    block: usize,
) -> Tensor<B, 4> {
    let (out, _lse) = B::attention_forward(
        prim(q),
        prim(k),
        prim(v),
        q_seg.into_primitive(),
        k_seg.into_primitive(),
        block.max(1),
    );
    float(out)
}

/// The dense path: the whole scores with a device-built mask, `repeat_kv` and softmax — the
/// oracle of [`attention`], differentiable through Burn's own autodiff. Shapes as in the module
/// docs; returns `[B, NH, T, HD]`.
pub fn attention_dense<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    q_seg: Tensor<B, 2, Int>,
    k_seg: Tensor<B, 2, Int>,
) -> Tensor<B, 4> {
    let [b, nh, t, hd] = q.dims();
    let n_rep = nh / k.dims()[1];
    let (k, v) = (repeat_kv(k, n_rep), repeat_kv(v, n_rep)); // [B,NH,T,HD]
    let mask = reference::mask::<B>(&q_seg, &k_seg, 0..t, t).reshape([b, 1, t, t]);
    let scores = q.matmul(k.swap_dims(2, 3)) * (hd as f64).powf(-0.5); // [B,NH,T,T]
    let probs = burn::tensor::activation::softmax(scores.mask_fill(mask, f32::MIN), 3);
    probs.matmul(v)
}

/// `[B, NKV, T, HD]` → `[B, NKV·n, T, HD]`, each key/value head repeated `n` times (transformers'
/// `repeat_kv`).
pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n: usize) -> Tensor<B, 4> {
    if n == 1 {
        return x;
    }
    let [b, nkv, t, hd] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, nkv, n, t, hd])
        .reshape([b, nkv * n, t, hd])
}
