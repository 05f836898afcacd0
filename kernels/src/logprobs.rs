//! Token log-probabilities gathered at their labels.
//!
//! Formula (per position): `logp[n,t] = z[n,t,y] − logsumexp_v z[n,t,v]` where `y = labels[n,t]`;
//! `logp = 0` where `labels[n,t] == IGNORE_INDEX`. The per-sequence log-prob is `Σ_t logp[n,t]`.
//! Source: TRL `DPOTrainer.get_batch_logps` / the WRPO authors' `concatenated_forward`
//! (log_softmax in fp32, gather, mask, sum). Every step here runs in the tensor's float dtype
//! (f32 on all our backends).
//!
//! This composite never materialises a full `[N, T, V]` log-softmax: it gathers the label's logit
//! and subtracts the log-sum-exp, which is the same quantity.

use burn::tensor::{backend::Backend, Int, Tensor};

use crate::IGNORE_INDEX;

/// Per-token log-probs at the labels, 0 at ignored positions.
///
/// # Shapes
/// - `logits`: `[N, T, V]` — already aligned with `labels` (the caller shifts)
/// - `labels`: `[N, T]`, values in `0..V` or [`IGNORE_INDEX`]
/// - returns `[N, T]`
pub fn token_logprobs<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let [n, t, _v] = logits.dims();
    let ignored = labels.clone().equal_elem(IGNORE_INDEX);
    // Ignored labels point at column 0; their value is masked to 0 below.
    let safe = labels.mask_fill(ignored.clone(), 0).reshape([n, t, 1]);
    let max = logits.clone().max_dim(2); // [N, T, 1]
    let lse = (logits.clone() - max.clone()).exp().sum_dim(2).log() + max; // [N, T, 1]
    let picked = logits.gather(2, safe); // [N, T, 1]
    (picked - lse).reshape([n, t]).mask_fill(ignored, 0.0)
}

/// Per-sequence sums of [`token_logprobs`] and the number of scored tokens.
///
/// # Shapes
/// - `logits`: `[N, T, V]`, `labels`: `[N, T]` (aligned, see [`token_logprobs`])
/// - returns (`[N]` summed log-probs, `[N]` scored-token counts as floats)
pub fn sequence_logprobs<B: Backend>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    type B = NdArray<f32>;

    /// f64 log-softmax gather, computed independently on the host.
    fn reference(logits: &[f32], labels: &[i64], v: usize) -> Vec<f64> {
        labels
            .iter()
            .enumerate()
            .map(|(i, &y)| {
                if y == IGNORE_INDEX {
                    return 0.0;
                }
                let row = &logits[i * v..(i + 1) * v];
                let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
                let lse = m + row.iter().map(|&z| (z as f64 - m).exp()).sum::<f64>().ln();
                row[y as usize] as f64 - lse
            })
            .collect()
    }

    #[test]
    fn matches_f64_with_ignored_positions() {
        let (n, t, v) = (3, 7, 11);
        // A deterministic but irregular fill (no RNG crate needed here).
        let logits: Vec<f32> = (0..n * t * v)
            .map(|i| ((i * 7919 % 1013) as f32 / 101.3 - 5.0) * 1.7)
            .collect();
        let labels: Vec<i64> = (0..n * t)
            .map(|i| {
                if i % 4 == 1 {
                    IGNORE_INDEX
                } else {
                    (i * 5 % v) as i64
                }
            })
            .collect();
        let dev = Default::default();
        let lt = Tensor::<B, 3>::from_data(TensorData::new(logits.clone(), [n, t, v]), &dev);
        let yt = Tensor::<B, 2, Int>::from_data(TensorData::new(labels.clone(), [n, t]), &dev);
        let got: Vec<f32> = token_logprobs(lt, yt).into_data().to_vec().unwrap();
        let want = reference(&logits, &labels, v);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= 1e-5 + 1e-5 * w.abs(),
                "position {i}: got {g}, want {w}"
            );
        }
        assert!(got.iter().all(|x| x.is_finite()));
    }
}
