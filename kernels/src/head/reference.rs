//! The chunked composite of the fused head: Burn tensor ops over any [`LogProbBackend`], one
//! `[chunk, V]` logits block at a time (see the module docs of [`super`] for the formulas).
//! This is the implementation of [`super::HeadLogProbBackend`] on every backend.

use burn::tensor::{Int, Tensor, TensorPrimitive};

use crate::linear::{widen_like, FrozenLinearBackend};
use crate::logprobs::LogProbBackend;

/// `(start, len)` of each block of `chunk` positions covering `0..m` (the last one may be short).
fn blocks(m: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk.max(1);
    (0..m).step_by(chunk).map(move |s| (s, chunk.min(m - s)))
}

/// One block's logits, `[1, c, V]` (the layout of [`LogProbBackend`]).
fn block_logits<B: LogProbBackend>(
    hidden: &Tensor<B, 2>,
    weight_t: &Tensor<B, 2>,
    start: usize,
    len: usize,
) -> Tensor<B, 3> {
    hidden
        .clone()
        .narrow(0, start, len)
        .matmul(weight_t.clone())
        .unsqueeze::<3>()
}

/// Chunked forward: `(logp [M], lse [M])`, 0 at ignored positions.
///
/// # Shapes
/// - `hidden`: `[M, H]` (`M ≥ 1`), `weight`: `[V, H]`, `labels`: `[M]`
pub fn forward<B: LogProbBackend + FrozenLinearBackend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    chunk: usize,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [m, _h] = hidden.dims();
    assert!(m > 0, "head_logprobs: at least one position");
    // A half-precision weight (a frozen base) widened once, for this call only.
    let weight_t = widen_like(weight, &hidden).transpose(); // [H, V], a view
    let (mut logps, mut lses) = (Vec::new(), Vec::new());
    for (start, len) in blocks(m, chunk) {
        let z = block_logits(&hidden, &weight_t, start, len); // [1, c, V]
        let y = labels.clone().narrow(0, start, len).reshape([1, len]);
        let (logp, lse) =
            B::token_logprobs_forward(z.into_primitive().tensor(), y.into_primitive());
        logps.push(Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(logp)).reshape([len]));
        lses.push(Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(lse)).reshape([len]));
    }
    (Tensor::cat(logps, 0), Tensor::cat(lses, 0))
}

/// Chunked backward: each block's logits recomputed, `dz` from the log-prob backward, then
/// `dhidden[block] = dz·W` and `dW += dzᵀ·hidden[block]`.
///
/// # Shapes
/// - `hidden`: `[M, H]`, `weight`: `[V, H]`, `labels`, `lse`, `grad`: `[M]`
/// - returns (`dhidden [M, H]` if `want_hidden`, `dW [V, H]` if `want_weight`)
#[allow(clippy::too_many_arguments)]
pub fn backward<B: LogProbBackend + FrozenLinearBackend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    lse: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    chunk: usize,
    want_hidden: bool,
    want_weight: bool,
) -> (Option<Tensor<B, 2>>, Option<Tensor<B, 2>>) {
    if !(want_hidden || want_weight) {
        return (None, None);
    }
    let [m, _h] = hidden.dims();
    let [v, _] = weight.dims();
    let stored = weight.dtype();
    let weight = widen_like(weight, &hidden); // widened once, for this call only
    let weight_t = weight.clone().transpose();
    let mut dhidden = Vec::new();
    let mut dweight: Option<Tensor<B, 2>> = None;
    for (start, len) in blocks(m, chunk) {
        let z = block_logits(&hidden, &weight_t, start, len);
        let part = |x: &Tensor<B, 1>| x.clone().narrow(0, start, len).reshape([1, len]);
        let y = labels.clone().narrow(0, start, len).reshape([1, len]);
        let dz = B::token_logprobs_backward(
            z.into_primitive().tensor(),
            y.into_primitive(),
            part(&lse).into_primitive().tensor(),
            part(&grad).into_primitive().tensor(),
        );
        let dz = Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(dz)).reshape([len, v]);
        if want_weight {
            // [V, c]·[c, H]
            let block = dz
                .clone()
                .transpose()
                .matmul(hidden.clone().narrow(0, start, len));
            dweight = Some(match dweight {
                None => block,
                Some(acc) => acc + block,
            });
        }
        if want_hidden {
            dhidden.push(dz.matmul(weight.clone())); // [c, V]·[V, H]
        }
    }
    let dhidden = want_hidden.then(|| Tensor::cat(dhidden, 0));
    // The gradient in the weight's own dtype.
    let dweight = dweight.map(|d| {
        if d.dtype() == stored {
            d
        } else {
            d.cast(stored)
        }
    });
    (dhidden, dweight)
}
