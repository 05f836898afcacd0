//! Composite default of [`super::LossBackend`]: the per-row forward of [`super::preference_loss`]
//! and the hand-derived closed-form backward (module docs of [`super`], "Gradient"), as plain
//! tensor ops. Used by backends without CubeCL (burn-flex); the fused kernels are tested against
//! it and against [`super::preference_loss`] differentiated by Burn's autodiff.
//!
//! Every step runs in the tensor's float dtype (f32 on all our backends).
//!
//! # Shapes
//! `B` examples, `K + 1` chosen columns, `R` rejected columns (see [`super::PreferenceInputs`]).

use burn::tensor::{activation::sigmoid, backend::Backend, Tensor};

use super::{pieces, scores, LossConfig, Objective, PolicyGrads, PreferenceInputs, RowLoss};

/// Composite forward of [`super::LossBackend::preference_loss_forward`]: `L_b = mean_r ℓ_{b,r}`
/// and the β-scaled rewards.
///
/// # Shapes
/// - returns `loss [B]`, `chosen/source/target_rewards [B]`, `rejected_rewards [B, R]`
pub fn forward<B: Backend>(cfg: &LossConfig, x: PreferenceInputs<B>) -> RowLoss<B> {
    let p = pieces(cfg, x);
    let beta = cfg.beta;
    let [b, _] = p.weighted.dims();
    let flat = |t: Tensor<B, 2>| (t * beta).reshape([b]);
    RowLoss {
        loss: p.per.mean_dim(1).reshape([b]),
        chosen_rewards: flat(p.weighted),
        source_rewards: flat(p.source),
        target_rewards: flat(p.target),
        rejected_rewards: p.rejected * beta,
    }
}

/// Composite backward of [`super::LossBackend::preference_loss_backward`]: the gradient of
/// `Σ_b grad[b]·L_b` w.r.t. the policy log-probs, in closed form (no autodiff).
///
/// `σ` is Burn's `sigmoid` (`exp(−log(1 + e^−x))`), finite for any f32 argument: 0 and 1 at the
/// far ends, exactly ½ at 0.
///
/// # Shapes
/// - `grad`: `[B]`; returns `policy_chosen [B, K+1]`, `policy_rejected [B, R]`
pub fn backward<B: Backend>(
    cfg: &LossConfig,
    x: PreferenceInputs<B>,
    grad: Tensor<B, 1>,
) -> PolicyGrads<B> {
    let [b, k1] = x.policy_chosen.dims();
    let [_, r] = x.policy_rejected.dims();
    let (alpha, beta, eps) = (cfg.alpha, cfg.beta, cfg.label_smoothing);
    // ∂s/∂log π: 1 (WRPO) or 1/|y| (SimPO, IPO), applied as a division at the end.
    let per_token = !matches!(cfg.objective, Objective::Wrpo);
    let (chosen_tokens, rejected_tokens) = (x.chosen_tokens.clone(), x.rejected_tokens.clone());
    let (chosen, rejected) = scores(cfg.objective, x);
    let source = if k1 == 1 {
        chosen.clone()
    } else {
        chosen.clone().narrow(1, 0, k1 - 1).mean_dim(1)
    }; // [B,1]
    let target = chosen.narrow(1, k1 - 1, 1); // [B,1]
    let weighted = source * alpha + target * (1.0 - alpha); // [B,1]
    let diff = weighted.expand([b, r]) - rejected; // [B,R]
                                                   // ℓ'(d), [B,R].
    let dl = match cfg.objective {
        Objective::Wrpo | Objective::SimpoBlend { .. } => {
            let gamma = match cfg.objective {
                Objective::SimpoBlend { gamma } => gamma,
                _ => 0.0,
            };
            let z = diff * beta - gamma;
            (sigmoid(z.clone()) * eps - sigmoid(z.neg()) * (1.0 - eps)) * beta
        }
        Objective::IpoBlend => (diff - 1.0 / (2.0 * beta)) * 2.0,
    };
    let dl = dl * grad.reshape([b, 1]) / r as f64; // [B,R]
    let d_total = dl.clone().sum_dim(1); // [B,1], D_b
    let d_rejected = dl.neg();
    let d_chosen = if k1 == 1 {
        // The single column is both source and target.
        d_total.clone() * alpha + d_total * (1.0 - alpha)
    } else {
        let source = (d_total.clone() * alpha / (k1 - 1) as f64).expand([b, k1 - 1]);
        Tensor::cat(vec![source, d_total * (1.0 - alpha)], 1)
    }; // [B,K+1]
    if per_token {
        PolicyGrads {
            policy_chosen: d_chosen / chosen_tokens,
            policy_rejected: d_rejected / rejected_tokens,
        }
    } else {
        PolicyGrads {
            policy_chosen: d_chosen,
            policy_rejected: d_rejected,
        }
    }
}
