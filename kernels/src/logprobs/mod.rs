//! Token log-probabilities gathered at their labels, and their gradient w.r.t. the logits.
//!
//! Formula (per position `(n, t)`, `y = labels[n, t]`):
//! - forward: `lse[n,t] = log Σ_v exp(z[n,t,v])`, `logp[n,t] = z[n,t,y] − lse[n,t]`;
//!   `logp = 0` where `y == IGNORE_INDEX`. The per-sequence log-prob is `Σ_t logp[n,t]`.
//! - backward: `dz[n,t,v] = g[n,t] · (1[v = y] − exp(z[n,t,v] − lse[n,t]))`, `0` on ignored rows.
//!
//! Source: TRL `DPOTrainer.get_batch_logps` / the WRPO authors' `concatenated_forward`
//! (log_softmax in fp32, gather, mask, sum). All arithmetic accumulates in f32.
//!
//! # Tiers (each the oracle of the next)
//! - [`mod@reference`]: plain Burn tensor ops. [`token_logprobs_reference`] is differentiated by Burn's
//!   autodiff and is the test oracle; [`reference::forward`] / [`reference::backward`] are the
//!   default (composite) implementation of [`LogProbBackend`], used by burn-flex.
//! - `kernel`: the fused CubeCL kernels, one `#[cube]` source for every CubeCL runtime (CUDA and
//!   WGPU): one pass over `V` per row for the forward, one elementwise pass for the backward.
//! - `backward`: the [`LogProbBackend`] implementation for `Autodiff<B>`, whose backward calls
//!   `B::token_logprobs_backward` with the saved log-sum-exp instead of differentiating the
//!   composite (which would keep several `[N, T, V]` intermediates alive).
//!
//! # Which backends: fusion off
//! The extension trait is implemented for `CubeBackend<R, F, I, BT>` (any CubeCL runtime), for
//! `Autodiff<B, C>` over any implementor, and for burn-flex. It is **not** implemented for Burn's
//! fusion wrapper (`Fusion<CubeBackend<…>>`): the workspace builds Burn without its `fusion`
//! feature, so `burn::backend::Cuda<f32, i32>` *is* `CubeBackend<CudaRuntime, f32, i32, u8>` and
//! `burn::backend::Wgpu<f32, i32, u32>` *is* `CubeBackend<WgpuRuntime, f32, i32, u32>`, and the
//! trainer's backends reach the fused kernels directly. Turning fusion on would need a fusion
//! implementation of this trait (a custom fusion op) — a deliberate change, not a feature flag.
//!
//! # Shapes
//! `N` sequences, `T` positions, `V` vocabulary (see the crate glossary). `logits: [N, T, V]`,
//! `labels: [N, T]` (already aligned: position `t`'s logits predict `labels[n, t]`).

use burn::tensor::{
    backend::Backend,
    ops::{FloatTensor, IntTensor},
    Int, Tensor, TensorPrimitive,
};

use crate::IGNORE_INDEX;

mod backward;
pub(crate) mod kernel;
pub mod reference;
#[cfg(test)]
mod tests;

pub use reference::token_logprobs_reference;

/// Backend extension: fused token log-probs with a saved log-sum-exp, and its gradient.
///
/// The default methods are the composite reference ([`reference::forward`],
/// [`reference::backward`]); CubeCL backends override them with the fused kernels and `Autodiff`
/// overrides the forward to register a custom backward.
pub trait LogProbBackend: Backend {
    /// Per-token log-probs at the labels and the per-row log-sum-exp.
    ///
    /// # Shapes
    /// - `logits`: `[N, T, V]` float
    /// - `labels`: `[N, T]` int, values in `0..V` or [`IGNORE_INDEX`]
    /// - returns (`logp [N, T]`, `lse [N, T]`), both in the logits' float dtype; `logp = 0` and
    ///   `lse = 0` at ignored positions (the fused kernel does not read those rows).
    fn token_logprobs_forward(
        logits: FloatTensor<Self>,
        labels: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (logp, lse) = reference::forward::<Self>(
            Tensor::from_primitive(TensorPrimitive::Float(logits)),
            Tensor::from_primitive(labels),
        );
        (
            logp.into_primitive().tensor(),
            lse.into_primitive().tensor(),
        )
    }

    /// Gradient of `Σ g·logp` w.r.t. the logits:
    /// `dlogits[n,t,v] = g[n,t]·(1[v = y] − exp(z[n,t,v] − lse[n,t]))`, `0` on ignored rows.
    ///
    /// # Shapes
    /// - `logits`: `[N, T, V]`, `labels`: `[N, T]`, `lse`: `[N, T]` (from the forward),
    ///   `grad`: `[N, T]` (upstream gradient of `logp`)
    /// - returns `[N, T, V]`
    fn token_logprobs_backward(
        logits: FloatTensor<Self>,
        labels: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::backward::<Self>(
            Tensor::from_primitive(TensorPrimitive::Float(logits)),
            Tensor::from_primitive(labels),
            Tensor::from_primitive(TensorPrimitive::Float(lse)),
            Tensor::from_primitive(TensorPrimitive::Float(grad)),
        )
        .into_primitive()
        .tensor()
    }
}

/// burn-flex (the `cpu` backend) uses the composite reference for both directions.
impl LogProbBackend for burn::backend::Flex {}

/// Per-token log-probs at the labels, 0 at ignored positions, through [`LogProbBackend`]
/// (fused on CubeCL backends, composite elsewhere; differentiable under `Autodiff`).
///
/// # Shapes
/// - `logits`: `[N, T, V]` — already aligned with `labels` (the caller shifts)
/// - `labels`: `[N, T]`, values in `0..V` or [`IGNORE_INDEX`]
/// - returns `[N, T]`
pub fn token_logprobs<B: LogProbBackend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    let (logp, _lse) =
        B::token_logprobs_forward(logits.into_primitive().tensor(), labels.into_primitive());
    Tensor::from_primitive(TensorPrimitive::Float(logp))
}

/// Per-sequence sums of [`token_logprobs`] and the number of scored tokens.
///
/// # Shapes
/// - `logits`: `[N, T, V]`, `labels`: `[N, T]` (aligned, see [`token_logprobs`])
/// - returns (`[N]` summed log-probs, `[N]` scored-token counts as floats)
pub fn sequence_logprobs<B: LogProbBackend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let counts = labels
        .clone()
        .equal_elem(IGNORE_INDEX)
        .bool_not()
        .float()
        .sum_dim(1)
        .squeeze_dim(1);
    let sums = token_logprobs(logits, labels).sum_dim(1).squeeze_dim(1);
    (sums, counts)
}
