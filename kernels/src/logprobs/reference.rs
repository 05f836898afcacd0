//! Composite reference: plain Burn tensor ops, the specification and test oracle of the fused
//! kernels, and the implementation used by backends without CubeCL (burn-flex).
//!
//! Every step runs in the tensor's float dtype (f32 on all our backends). The forward never
//! materialises a full `[N, T, V]` log-softmax: it gathers the label's logit and subtracts the
//! log-sum-exp, which is the same quantity. The hand-written [`backward`] does materialise
//! `exp(z − lse)` once (`[N, T, V]`); the fused kernel does not.

use burn::tensor::{backend::Backend, IndexingUpdateOp, Int, Tensor};

use crate::IGNORE_INDEX;

/// Row log-sum-exp with the max subtracted first (overflow-safe), and the ignored-row mask.
///
/// # Shapes
/// - `logits`: `[N, T, V]`, `labels`: `[N, T]`
/// - returns (`lse [N, T, 1]`, `picked [N, T, 1]` = the label's logit (column 0 when ignored),
///   `ignored [N, T]`)
fn lse_and_picked<B: Backend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 2, burn::tensor::Bool>) {
    let [n, t, _v] = logits.dims();
    let ignored = labels.clone().equal_elem(IGNORE_INDEX);
    // Ignored labels point at column 0; their value is masked to 0 by the callers.
    let safe = labels.mask_fill(ignored.clone(), 0).reshape([n, t, 1]);
    let max = logits.clone().max_dim(2); // [N, T, 1]
    let lse = (logits.clone() - max.clone()).exp().sum_dim(2).log() + max; // [N, T, 1]
    let picked = logits.gather(2, safe); // [N, T, 1]
    (lse, picked, ignored)
}

/// Per-token log-probs at the labels, 0 at ignored positions — the composite oracle.
///
/// Differentiable through Burn's own autodiff (no custom backward); the tests differentiate it to
/// check [`super::LogProbBackend`]'s gradient.
///
/// # Shapes
/// - `logits`: `[N, T, V]` — already aligned with `labels` (the caller shifts)
/// - `labels`: `[N, T]`, values in `0..V` or [`IGNORE_INDEX`]
/// - returns `[N, T]`
pub fn token_logprobs_reference<B: Backend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    let [n, t, _v] = logits.dims();
    let (lse, picked, ignored) = lse_and_picked(logits, labels);
    (picked - lse).reshape([n, t]).mask_fill(ignored, 0.0)
}

/// Composite forward of [`super::LogProbBackend::token_logprobs_forward`].
///
/// # Shapes
/// - `logits`: `[N, T, V]`, `labels`: `[N, T]`
/// - returns (`logp [N, T]`, `lse [N, T]`), both 0 at ignored positions
pub fn forward<B: Backend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let [n, t, _v] = logits.dims();
    let (lse, picked, ignored) = lse_and_picked(logits, labels);
    let logp = (picked - lse.clone())
        .reshape([n, t])
        .mask_fill(ignored.clone(), 0.0);
    (logp, lse.reshape([n, t]).mask_fill(ignored, 0.0))
}

/// Composite backward of [`super::LogProbBackend::token_logprobs_backward`]:
/// `dz = g·(1[v = y] − exp(z − lse))`, 0 on ignored rows.
///
/// `z − lse ≤ 0` at scored rows; it is clamped to `≤ 0` so that the ignored rows (where `lse` is
/// 0, not the log-sum-exp) give `exp(…) ≤ 1` times a zero gradient instead of `inf · 0 = NaN`.
/// At scored rows the clamp only removes rounding above 0 (`exp` changes by < 1 ulp).
///
/// # Shapes
/// - `logits`: `[N, T, V]`, `labels`: `[N, T]`, `lse`: `[N, T]`, `grad`: `[N, T]`
/// - returns `[N, T, V]`
pub fn backward<B: Backend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
    lse: Tensor<B, 2>,
    grad: Tensor<B, 2>,
) -> Tensor<B, 3> {
    let [n, t, _v] = logits.dims();
    let ignored = labels.clone().equal_elem(IGNORE_INDEX);
    let g = grad.mask_fill(ignored.clone(), 0.0).reshape([n, t, 1]);
    let safe = labels.mask_fill(ignored, 0).reshape([n, t, 1]);
    let p = (logits - lse.reshape([n, t, 1])).clamp_max(0.0).exp(); // [N, T, V]
    (p * g.clone().neg()).scatter(2, safe, g, IndexingUpdateOp::Add)
}
