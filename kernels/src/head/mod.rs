//! The LM head fused with the token log-probs: from final hidden states, the head weight and the
//! labels straight to per-token log-probs, without ever building the `[N, T, V]` logits.
//!
//! Formula (per scored position `m`, label `y = labels[m]`, head weight `W: [V, H]`):
//! - logits `z[m, v] = Σ_h hidden[m, h]·W[v, h]` (`z = hidden·Wᵀ`, what `lm_head` computes);
//! - forward: `lse[m] = log Σ_v exp(z[m, v])`, `logp[m] = z[m, y] − lse[m]`; 0 where
//!   `y == IGNORE_INDEX`;
//! - backward, for an upstream gradient `g[m]` of `logp`: `dz[m, v] = g[m]·(1[v = y] − exp(z[m, v]
//!   − lse[m]))` (see [`crate::logprobs`]), then `dhidden = dz·W` (`[M, H]`) and
//!   `dW = dzᵀ·hidden` (`[V, H]`).
//!
//! Source: Apple's Cut Cross-Entropy (Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary
//! Language Models"): compute the logits a block at a time, keep only the log-sum-exp, recompute
//! the block in the backward. Liger-Kernel's fused linear cross-entropy chunks the same way over
//! tokens.
//!
//! # Chunking
//! Positions go through the head `chunk` at a time: `[chunk, H]·[H, V]` gives one logits block
//! `[chunk, V]`, the log-prob op ([`crate::logprobs::LogProbBackend`], the fused CubeCL kernel on
//! CUDA/WGPU) reduces it to `logp` and `lse`, and the block is dropped. The forward keeps only
//! `lse [M]`; the backward recomputes each block, turns it into `dz` with the log-prob backward and
//! accumulates `dhidden` and `dW` block by block. Peak memory beyond the inputs and the gradients
//! is about two `[chunk, V]` blocks. [`default_chunk`] sizes the block by the vocabulary (about
//! [`DEFAULT_CHUNK_ELEMENTS`] logits), so a 128k vocabulary gets short blocks and a small one long
//! blocks; chunking the vocabulary as well would only matter for blocks of a single position,
//! which are at most `V` floats, so it is not done.
//!
//! Dtypes: every block is in the hidden states' float dtype (f32 on our backends); the log-prob
//! op accumulates in f32 (see [`crate::logprobs`]); `dW` is accumulated in that dtype across
//! blocks and returned in the weight's. A weight stored in half precision (a frozen base under
//! LoRA) is widened to the hidden states' dtype once per forward and once per backward; the
//! autodiff node keeps the stored weight, so the widened copy lives for one call.
//!
//! # Tiers (each the oracle of the next)
//! - [`head_logprobs_dense`]: the dense path — the whole logits tensor, then
//!   [`crate::logprobs::token_logprobs_reference`] — differentiated by Burn's autodiff: the
//!   specification and test oracle (and what the trainer runs with `lm_head_impl: dense`).
//! - [`mod@reference`]: the chunked forward and the chunked hand-written backward above, written
//!   with Burn tensor ops over any [`LogProbBackend`] (so each block's log-probs go through the
//!   fused kernel on CubeCL backends and through the composite on the CPU). This is the
//!   implementation of [`HeadLogProbBackend`] on every backend: a block is a matmul plus the
//!   fused log-prob kernel, so a hand-fused head kernel would save no memory, only the block's
//!   round trip through device memory.
//! - `backward`: [`HeadLogProbBackend`] for `Autodiff<B>`: the inner forward plus a custom
//!   backward node (parents: the hidden states and the head weight) that calls
//!   `B::head_logprobs_backward` with the saved log-sum-exp. Under autodiff the node keeps only
//!   the hidden states, the weight (a parameter, alive anyway), the labels and `lse`.
//!
//! # Shapes
//! `M` positions (the scored positions of a batch, gathered), `H` hidden size, `V` vocabulary.
//! `hidden: [M, H]`, `weight: [V, H]` (the checkpoint layout of `lm_head.weight`, or
//! `model.embed_tokens.weight` when tied), `labels: [M]`.

use burn::tensor::{
    backend::Backend,
    ops::{FloatTensor, IntTensor},
    Int, Tensor,
};

use crate::{float, prim};

use crate::logprobs::{token_logprobs_reference, LogProbBackend};

mod backward;
pub mod reference;
#[cfg(test)]
mod tests;

/// About this many logits per block when the chunk is chosen automatically: 2^24 f32 values,
/// 64 MiB (a quarter of the smallest buffer limit we meet, Mesa lavapipe's 256 MiB).
pub const DEFAULT_CHUNK_ELEMENTS: usize = 1 << 24;

/// The automatic block length for a vocabulary of `vocab` entries:
/// `max(1, DEFAULT_CHUNK_ELEMENTS / vocab)` positions (524 at V = 32000, 130 at V = 128256).
pub fn default_chunk(vocab: usize) -> usize {
    (DEFAULT_CHUNK_ELEMENTS / vocab.max(1)).max(1)
}

/// Backend extension: the LM head fused with the token log-probs.
///
/// The default methods are the chunked composite ([`reference::forward`],
/// [`reference::backward`]), which every backend uses; `Autodiff` overrides the forward to
/// register the custom backward.
pub trait HeadLogProbBackend: LogProbBackend + crate::linear::FrozenLinearBackend {
    /// Per-position log-probs at the labels and the log-sum-exp of each position's logits.
    ///
    /// # Shapes
    /// - `hidden`: `[M, H]`, `weight`: `[V, H]`, `labels`: `[M]` int in `0..V` or
    ///   [`crate::IGNORE_INDEX`]; `M ≥ 1`
    /// - `chunk`: positions per block, `≥ 1`
    /// - returns (`logp [M]`, `lse [M]`), 0 at ignored positions
    fn head_logprobs_forward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        labels: IntTensor<Self>,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (logp, lse) = reference::forward::<Self>(
            float(hidden),
            float(weight),
            Tensor::from_primitive(labels),
            chunk,
        );
        (prim(logp), prim(lse))
    }

    /// Gradients of `Σ_m g[m]·logp[m]` w.r.t. the hidden states and the head weight, each only
    /// when asked for (a frozen head needs no `dW`, and a leaf input no `dhidden`).
    ///
    /// # Shapes
    /// - `hidden`: `[M, H]`, `weight`: `[V, H]`, `labels`: `[M]`, `lse`: `[M]` (from the forward),
    ///   `grad`: `[M]`
    /// - returns (`dhidden [M, H]` if `want_hidden`, `dW [V, H]` if `want_weight`)
    #[allow(clippy::too_many_arguments)]
    fn head_logprobs_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        labels: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        chunk: usize,
        want_hidden: bool,
        want_weight: bool,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        let (dh, dw) = reference::backward::<Self>(
            float(hidden),
            float(weight),
            Tensor::from_primitive(labels),
            float(lse),
            float(grad),
            chunk,
            want_hidden,
            want_weight,
        );
        (dh.map(prim), dw.map(prim))
    }
}

/// burn-flex (the `cpu` backend): the chunked composite, each block through the composite log-probs.
impl HeadLogProbBackend for burn::backend::Flex {}

/// CubeCL backends (CUDA, WGPU): the chunked composite, each block a Burn matmul plus the fused
/// log-prob kernels.
impl<R, F, I, BT> HeadLogProbBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::element::BoolElement,
{
}

/// Per-position log-probs through the LM head, fused ([`HeadLogProbBackend`]; differentiable
/// under `Autodiff` with the chunked backward).
///
/// # Shapes
/// - `hidden`: `[M, H]` (`M ≥ 1`), `weight`: `[V, H]`, `labels`: `[M]`; returns `[M]`
pub fn head_logprobs<B: HeadLogProbBackend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    chunk: usize,
) -> Tensor<B, 1> {
    let (logp, _lse) = B::head_logprobs_forward(
        prim(hidden),
        prim(weight),
        labels.into_primitive(),
        chunk.max(1),
    );
    float(logp)
}

/// The dense path: the whole `[M, V]` logits, then the composite log-probs — the oracle of
/// [`head_logprobs`], differentiable through Burn's own autodiff.
///
/// # Shapes
/// - `hidden`: `[M, H]`, `weight`: `[V, H]`, `labels`: `[M]`; returns `[M]`
pub fn head_logprobs_dense<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    let [m, _h] = hidden.dims();
    let logits = hidden.matmul(weight.transpose()).unsqueeze::<3>(); // [1, M, V]
    token_logprobs_reference(logits, labels.reshape([1, m])).reshape([m])
}
