//! The weighted-reward preference loss (WRPO) and its baselines, as a pure function of
//! per-sequence log-probs — the trainer never hands logits to the loss (torchtune `DPOLoss` style).
//!
//! With `Δ_y = log π_θ(y|x) − log π_ref(y|x)` (summed completion log-probs), K ≥ 1 source
//! responses `y_ws_k`, the target's best `y_wt` and R ≥ 1 rejected `y_l_r`
//! (../shared/reference/WRPO.md; arXiv 2412.03187, Eq. 6):
//!
//! - **WRPO** (`Objective::Wrpo`): `Δ_s = mean_k Δ_ws_k`, `m_r = α·Δ_s + (1−α)·Δ_wt − Δ_l_r`,
//!   `ℓ = (1−ε)·softplus(−β m_r) + ε·softplus(β m_r)`. α = 0 is DPO on (y_wt, y_l); static α = 1
//!   is DPO on (y_ws, y_l). **DPO** is this objective with α held fixed by the trainer.
//! - **SimPO-blend** (`Objective::SimpoBlend`): `r(y) = (β/|y|)·log π_θ(y|x)` (no reference),
//!   `m_r = α·r_s + (1−α)·r_wt − r_l_r − γ`, `ℓ = (1−ε)·softplus(−m_r) + ε·softplus(m_r)`;
//!   SimPO is α = 0.
//! - **IPO-blend** (`Objective::IpoBlend`): per-token averaged log-ratios `Δ̄_y = Δ_y/|y|`,
//!   `h_r = α·Δ̄_s + (1−α)·Δ̄_wt − Δ̄_l_r`, `ℓ = (h_r − 1/(2β))²`; IPO is α = 0.
//!
//! The loss is the mean of `ℓ` over the R rejected responses and the B examples. Every step is
//! computed in the tensor's float dtype (f32); softplus is stable for any argument ([`softplus`]
//! through Burn's `log_sigmoid` in the composites, `max(x,0) + log1p(e^−|x|)` in the kernel;
//! Burn's `activation::softplus` overflows for large inputs).
//!
//! # Gradient (closed form; what [`LossBackend::preference_loss_backward`] computes)
//! Write every objective as a per-column *score* `s` (WRPO: `Δ`; SimPO: `log π/|y|`; IPO:
//! `Δ/|y|`), `w = α·s_src + (1−α)·s_wt` with `s_src = mean_k s_ws_k` (`= s_wt` when K + 1 = 1),
//! `d_r = w − s_l_r`, and the row loss `L_b = mean_r ℓ(d_r)`. With `softplus' = σ`:
//! - WRPO / SimPO: `z = β·d − γ` (γ = 0 for WRPO), `ℓ'(d) = β·(ε·σ(z) − (1−ε)·σ(−z))`;
//! - IPO: `ℓ'(d) = 2·(d − 1/(2β))`.
//!
//! For an upstream gradient `g_b` of `L_b`: `D_b = (g_b/R)·Σ_r ℓ'(d_r)`;
//! `∂/∂s_l_r = −(g_b/R)·ℓ'(d_r)`, `∂/∂s_wt = (1−α)·D_b` (plus `α·D_b` when K + 1 = 1: the target
//! is then also the source), `∂/∂s_ws_k = α·D_b/K`; and `∂s/∂log π_θ = 1` (WRPO) or `1/|y|`
//! (SimPO, IPO). Reference log-probs and token counts get no gradient. At `d = 0` (policy =
//! reference, the first step) WRPO's gradient is `−β/2·g_b/R·(…)`, σ(0) = ½.
//!
//! # Tiers (each the oracle of the next)
//! - [`preference_loss`]: plain Burn tensor ops differentiated by Burn's autodiff — the
//!   specification, the trainer's path today and the test oracle.
//! - [`mod@reference`]: the same forward per row plus the closed-form backward above, as tensor
//!   ops: the default (composite) implementation of [`LossBackend`], used by burn-flex.
//! - `kernel`: the fused CubeCL kernels, one `#[cube]` source for every CubeCL runtime (CUDA and
//!   WGPU): one unit per example row, looping over the K + 1 chosen and R rejected columns.
//! - `backward`: [`LossBackend`] for `Autodiff<B>`: the inner backend's forward plus a custom
//!   backward node (parents: the two policy tensors) that calls `B::preference_loss_backward`.
//!
//! [`preference_loss_fused`] is the entry through [`LossBackend`], with the inputs and outputs of
//! [`preference_loss`]. Backends: as for the log-probs op (see [`crate::logprobs`]), the trait is
//! implemented for `CubeBackend<R, F, I, BT>`, `Autodiff<B, C>` and burn-flex, not for Burn's fusion
//! wrapper (the workspace builds Burn without `fusion`).
//!
//! # Shapes
//! - `B`: examples, `K + 1`: chosen columns (sources, then the target), `R`: rejected columns

use burn::tensor::{backend::Backend, Tensor};

mod backward;
mod kernel;
pub mod reference;
#[cfg(test)]
mod tests;

/// Which preference objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// WRPO (and DPO with α fixed): sigmoid loss on reference-relative log-ratios.
    Wrpo,
    /// SimPO blend: length-normalised, reference-free, with target margin γ.
    SimpoBlend {
        /// Target reward margin γ.
        gamma: f64,
    },
    /// IPO blend: squared loss on per-token log-ratios.
    IpoBlend,
}

impl Objective {
    /// Whether the objective reads reference log-probs.
    pub fn needs_reference(&self) -> bool {
        !matches!(self, Objective::SimpoBlend { .. })
    }
}

/// Scalars of one loss evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    /// The objective.
    pub objective: Objective,
    /// Weight of the source responses, α ∈ [0, 1] (the α schedule lives in the trainer).
    pub alpha: f64,
    /// β.
    pub beta: f64,
    /// Label smoothing ε (WRPO and SimPO; ignored by IPO).
    pub label_smoothing: f64,
}

/// Per-sequence inputs of a batch.
#[derive(Debug, Clone)]
pub struct PreferenceInputs<B: Backend> {
    /// Policy log-probs of the chosen responses, `[B, K+1]` (sources first, target last).
    pub policy_chosen: Tensor<B, 2>,
    /// Policy log-probs of the rejected responses, `[B, R]`.
    pub policy_rejected: Tensor<B, 2>,
    /// Reference log-probs, `[B, K+1]` (unused by SimPO: pass zeros).
    pub reference_chosen: Tensor<B, 2>,
    /// Reference log-probs, `[B, R]`.
    pub reference_rejected: Tensor<B, 2>,
    /// Completion token counts, `[B, K+1]` (used by SimPO and IPO).
    pub chosen_tokens: Tensor<B, 2>,
    /// Completion token counts, `[B, R]`.
    pub rejected_tokens: Tensor<B, 2>,
}

/// The loss and the per-example quantities the metrics need.
#[derive(Debug, Clone)]
pub struct LossOutput<B: Backend> {
    /// Mean loss, `[1]` (differentiable w.r.t. the policy log-probs).
    pub loss: Tensor<B, 1>,
    /// Weighted chosen reward `α·r_s + (1−α)·r_wt`, `[B]`.
    pub chosen_rewards: Tensor<B, 1>,
    /// Mean source reward `r_s`, `[B]`.
    pub source_rewards: Tensor<B, 1>,
    /// Target reward `r_wt`, `[B]`.
    pub target_rewards: Tensor<B, 1>,
    /// Rejected rewards, `[B, R]`.
    pub rejected_rewards: Tensor<B, 2>,
}

/// Per-row results of [`LossBackend::preference_loss_forward`].
#[derive(Debug, Clone)]
pub struct RowLoss<B: Backend> {
    /// Row loss `L_b = mean_r ℓ_{b,r}`, `[B]` (the only differentiable output under `Autodiff`).
    pub loss: Tensor<B, 1>,
    /// Weighted chosen reward `α·r_s + (1−α)·r_wt`, `[B]`.
    pub chosen_rewards: Tensor<B, 1>,
    /// Mean source reward `r_s`, `[B]`.
    pub source_rewards: Tensor<B, 1>,
    /// Target reward `r_wt`, `[B]`.
    pub target_rewards: Tensor<B, 1>,
    /// Rejected rewards, `[B, R]`.
    pub rejected_rewards: Tensor<B, 2>,
}

/// Gradients of [`LossBackend::preference_loss_backward`] w.r.t. the policy log-probs.
#[derive(Debug, Clone)]
pub struct PolicyGrads<B: Backend> {
    /// `∂/∂policy_chosen`, `[B, K+1]`.
    pub policy_chosen: Tensor<B, 2>,
    /// `∂/∂policy_rejected`, `[B, R]`.
    pub policy_rejected: Tensor<B, 2>,
}

/// Backend extension: the preference loss per example row, and its closed-form gradient.
///
/// The default methods are the composite reference ([`reference::forward`],
/// [`reference::backward`]); CubeCL backends override them with the fused kernels and `Autodiff`
/// overrides the forward to register a custom backward. The methods take and return `Tensor`s
/// (not primitives) because the inputs already travel as the [`PreferenceInputs`] struct.
pub trait LossBackend: Backend {
    /// Row losses and rewards (β-scaled scores; see [`LossOutput`]).
    ///
    /// # Shapes
    /// - inputs: see [`PreferenceInputs`] (`[B, K+1]` and `[B, R]`)
    /// - returns `loss [B]`, `chosen/source/target_rewards [B]`, `rejected_rewards [B, R]`
    fn preference_loss_forward(cfg: &LossConfig, x: PreferenceInputs<Self>) -> RowLoss<Self> {
        reference::forward(cfg, x)
    }

    /// Gradient of `Σ_b grad[b]·L_b` w.r.t. the policy log-probs (module docs, "Gradient").
    ///
    /// # Shapes
    /// - inputs: see [`PreferenceInputs`]; `grad`: `[B]` (upstream gradient of the row losses)
    /// - returns `policy_chosen [B, K+1]`, `policy_rejected [B, R]`
    fn preference_loss_backward(
        cfg: &LossConfig,
        x: PreferenceInputs<Self>,
        grad: Tensor<Self, 1>,
    ) -> PolicyGrads<Self> {
        reference::backward(cfg, x, grad)
    }
}

/// burn-flex (the `cpu` backend) uses the composite reference for both directions.
impl LossBackend for burn::backend::Flex {}

/// The preference loss through [`LossBackend`] (fused on CubeCL backends, composite elsewhere):
/// the same inputs and outputs as [`preference_loss`]. Under `Autodiff` the mean loss is
/// differentiable w.r.t. the two policy tensors and its backward calls
/// `B::preference_loss_backward`; the rewards are constants (as `preference_loss`'s detached ones).
///
/// # Shapes
/// - inputs: see [`PreferenceInputs`]; returns `loss [1]` and the rewards of [`LossOutput`]
pub fn preference_loss_fused<B: LossBackend>(
    cfg: &LossConfig,
    x: PreferenceInputs<B>,
) -> LossOutput<B> {
    check_shapes(&x);
    let rows = B::preference_loss_forward(cfg, x);
    LossOutput {
        loss: rows.loss.mean(),
        chosen_rewards: rows.chosen_rewards,
        source_rewards: rows.source_rewards,
        target_rewards: rows.target_rewards,
        rejected_rewards: rows.rejected_rewards,
    }
}

/// Panics unless the six inputs are `[B, K+1]` / `[B, R]` with `K + 1 ≥ 1`, `R ≥ 1`.
/// Returns `[B, K+1, R]`.
pub(crate) fn check_shapes<B: Backend>(x: &PreferenceInputs<B>) -> [usize; 3] {
    let [b, k1] = x.policy_chosen.dims();
    let [b2, r] = x.policy_rejected.dims();
    assert!(k1 >= 1, "chosen needs at least the target column");
    assert!(r >= 1, "at least one rejected response per row");
    assert_eq!(b, b2, "chosen and rejected must have the same rows");
    for (name, t, want) in [
        ("reference_chosen", &x.reference_chosen, [b, k1]),
        ("chosen_tokens", &x.chosen_tokens, [b, k1]),
        ("reference_rejected", &x.reference_rejected, [b, r]),
        ("rejected_tokens", &x.rejected_tokens, [b, r]),
    ] {
        assert_eq!(
            t.dims(),
            want,
            "{name} must match the policy log-probs' shape"
        );
    }
    [b, k1, r]
}

/// `softplus(x) = log(1 + eˣ) = −log σ(−x)`, stable for any x, with the exact gradient σ(x)
/// everywhere — including x = 0, the margin of every row at the first step (policy = reference).
/// (`max(x, 0) + log1p(e^−|x|)` has the right value but autodiff gives it gradient 1 instead of
/// ½ at 0, through the kinks of `max` and `|x|`: twice DPO's first gradient.)
pub fn softplus<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    burn::tensor::activation::log_sigmoid(x.neg()).neg()
}

/// Composite reference of the preference loss (plain tensor ops: autodiff gives the gradient).
/// Rewards are `β·Δ` (WRPO), `(β/|y|)·log π` (SimPO), `β·Δ̄` (IPO).
pub fn preference_loss<B: Backend>(cfg: &LossConfig, x: PreferenceInputs<B>) -> LossOutput<B> {
    let p = pieces(cfg, x);
    let beta = cfg.beta;
    let [b, _] = p.weighted.dims();
    let loss = p.per.mean().reshape([1]);
    let flat = |t: Tensor<B, 2>| (t * beta).reshape([b]);
    LossOutput {
        loss,
        chosen_rewards: flat(p.weighted.detach()),
        source_rewards: flat(p.source.detach()),
        target_rewards: flat(p.target.detach()),
        rejected_rewards: p.rejected.detach() * beta,
    }
}

/// The composite's intermediates, shared by [`preference_loss`] and [`reference::forward`].
pub(crate) struct Pieces<B: Backend> {
    /// Per-pair loss ℓ, `[B, R]`.
    pub(crate) per: Tensor<B, 2>,
    /// `α·s_src + (1−α)·s_wt`, `[B, 1]` (unscaled scores, see the module docs).
    pub(crate) weighted: Tensor<B, 2>,
    /// `s_src`, `[B, 1]`.
    pub(crate) source: Tensor<B, 2>,
    /// `s_wt`, `[B, 1]`.
    pub(crate) target: Tensor<B, 2>,
    /// `s_l`, `[B, R]`.
    pub(crate) rejected: Tensor<B, 2>,
}

/// Scores, their α-blend and the per-pair loss, as plain tensor ops.
pub(crate) fn pieces<B: Backend>(cfg: &LossConfig, x: PreferenceInputs<B>) -> Pieces<B> {
    let [b, k1] = x.policy_chosen.dims();
    let [_, r] = x.policy_rejected.dims();
    assert!(k1 >= 1, "chosen needs at least the target column");
    let (alpha, beta) = (cfg.alpha, cfg.beta);
    let (chosen, rejected) = scores(cfg.objective, x);
    // With one chosen column (pairwise data for the DPO/SimPO/IPO baselines, α = 0) the source
    // reward is reported equal to the target's.
    let source = if k1 == 1 {
        chosen.clone()
    } else {
        chosen.clone().narrow(1, 0, k1 - 1).mean_dim(1)
    }; // [B,1]
    let target = chosen.narrow(1, k1 - 1, 1); // [B,1]
    let weighted = source.clone() * alpha + target.clone() * (1.0 - alpha); // [B,1]
    let diff = weighted.clone().expand([b, r]) - rejected.clone(); // [B,R]
    let eps = cfg.label_smoothing;
    let per = match cfg.objective {
        Objective::Wrpo => {
            softplus(diff.clone().neg() * beta) * (1.0 - eps) + softplus(diff * beta) * eps
        }
        Objective::SimpoBlend { gamma } => {
            let m = diff * beta - gamma;
            softplus(m.clone().neg()) * (1.0 - eps) + softplus(m) * eps
        }
        Objective::IpoBlend => (diff - 1.0 / (2.0 * beta)).powi_scalar(2),
    };
    Pieces {
        per,
        weighted,
        source,
        target,
        rejected,
    }
}

/// Per-sequence scores whose weighted difference is the margin: `Δ` (WRPO), `log π/|y|` (SimPO),
/// `Δ/|y|` (IPO). Returns (`[B, K+1]`, `[B, R]`).
pub(crate) fn scores<B: Backend>(
    objective: Objective,
    x: PreferenceInputs<B>,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    match objective {
        Objective::Wrpo => (
            x.policy_chosen - x.reference_chosen,
            x.policy_rejected - x.reference_rejected,
        ),
        Objective::SimpoBlend { .. } => (
            x.policy_chosen / x.chosen_tokens,
            x.policy_rejected / x.rejected_tokens,
        ),
        Objective::IpoBlend => (
            (x.policy_chosen - x.reference_chosen) / x.chosen_tokens,
            (x.policy_rejected - x.reference_rejected) / x.rejected_tokens,
        ),
    }
}

/// Hand-derived numbers for the composite reference (the fused op is checked against the
/// composite and an f64 computation in `tests.rs`).
#[cfg(test)]
mod hand_derived {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::TensorData;

    type A = Autodiff<Flex>;

    fn t(v: &[f32], rows: usize) -> Tensor<A, 2> {
        Tensor::from_data(
            TensorData::new(v.to_vec(), [rows, v.len() / rows]),
            &Default::default(),
        )
    }

    fn sp(x: f64) -> f64 {
        (1.0 + x.exp()).ln()
    }
    fn sig(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    struct Run {
        loss: f64,
        d_chosen: Vec<f64>,
        d_rejected: Vec<f64>,
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        cfg: LossConfig,
        pc: &[f32],
        pr: &[f32],
        rc: &[f32],
        rr: &[f32],
        nc: &[f32],
        nr: &[f32],
        rows: usize,
    ) -> Run {
        let policy_chosen = t(pc, rows).require_grad();
        let policy_rejected = t(pr, rows).require_grad();
        let out = preference_loss(
            &cfg,
            PreferenceInputs {
                policy_chosen: policy_chosen.clone(),
                policy_rejected: policy_rejected.clone(),
                reference_chosen: t(rc, rows),
                reference_rejected: t(rr, rows),
                chosen_tokens: t(nc, rows),
                rejected_tokens: t(nr, rows),
            },
        );
        let loss: f32 = out.loss.clone().into_scalar();
        let grads = out.loss.backward();
        let g = |x: &Tensor<A, 2>| -> Vec<f64> {
            x.grad(&grads)
                .unwrap()
                .into_data()
                .to_vec::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect()
        };
        Run {
            loss: loss as f64,
            d_chosen: g(&policy_chosen),
            d_rejected: g(&policy_rejected),
        }
    }

    fn close(a: f64, b: f64, what: &str) {
        assert!(
            (a - b).abs() <= 1e-6 + 1e-5 * b.abs(),
            "{what}: got {a}, hand-derived {b}"
        );
    }

    #[test]
    fn wrpo_single_example_hand_derived() {
        // Δ_s = 2 − 0 = 2, Δ_t = 1.5 − 0.5 = 1, Δ_l = −1 − 0 = −1; α = 0.25, β = 0.1:
        // m = 0.25·2 + 0.75·1 + 1 = 2.25; L = softplus(−0.225).
        let cfg = LossConfig {
            objective: Objective::Wrpo,
            alpha: 0.25,
            beta: 0.1,
            label_smoothing: 0.0,
        };
        let r = run(
            cfg,
            &[2.0, 1.5],
            &[-1.0],
            &[0.0, 0.5],
            &[0.0],
            &[1.0, 1.0],
            &[1.0],
            1,
        );
        close(r.loss, sp(-0.225), "loss");
        // ∂L/∂logπ = −β σ(−βm) × (α, 1−α, −1)
        let s = -0.1 * sig(-0.225);
        close(r.d_chosen[0], s * 0.25, "d source");
        close(r.d_chosen[1], s * 0.75, "d target");
        close(r.d_rejected[0], -s, "d rejected");
    }

    /// Policy = reference (every row at the first step): m = 0 exactly, L = log 2 and
    /// ∂L/∂logπ = −β/2 × (α, 1−α, −1) — σ(0) = ½, not the 1 a max/abs softplus's kinks give.
    /// Also the single-chosen-column layout (pairwise data, α = 0).
    #[test]
    fn zero_margin_gradient_is_half() {
        for (pc, rc) in [
            (&[-3.0f32, -2.0][..], &[-3.0f32, -2.0][..]),
            (&[-2.0][..], &[-2.0][..]),
        ] {
            let alpha = if pc.len() == 1 { 0.0 } else { 0.25 };
            let cfg = LossConfig {
                objective: Objective::Wrpo,
                alpha,
                beta: 0.1,
                label_smoothing: 0.0,
            };
            let ones = vec![1.0; pc.len()];
            let r = run(cfg, pc, &[-4.0], rc, &[-4.0], &ones, &[1.0], 1);
            close(r.loss, 2f64.ln(), "loss");
            let s = -0.1 * 0.5;
            if pc.len() == 2 {
                close(r.d_chosen[0], s * alpha, "d source");
            }
            close(*r.d_chosen.last().unwrap(), s * (1.0 - alpha), "d target");
            close(r.d_rejected[0], -s, "d rejected");
        }
    }

    /// The stable softplus at extreme arguments: finite values and gradients.
    #[test]
    fn softplus_is_stable_far_out() {
        let x = t(&[-200.0, -30.0, 0.0, 30.0, 200.0], 1).require_grad();
        let y = softplus(x.clone());
        let v: Vec<f32> = y.clone().into_data().to_vec().unwrap();
        let want = [0.0, 9.357623e-14, std::f32::consts::LN_2, 30.0, 200.0];
        for (a, b) in v.iter().zip(want) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "softplus {a} vs {b}"
            );
        }
        let g: Vec<f32> = x
            .grad(&y.sum().backward())
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap();
        let want = [0.0, 9.357623e-14, 0.5, 1.0, 1.0];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() <= 1e-6, "softplus' {a} vs {b}");
        }
    }

    #[test]
    fn alpha_zero_is_dpo_on_target_vs_rejected() {
        let pc = [-3.0, -5.0, -4.0, -6.0];
        let rc = [-2.0, -5.5, -4.5, -5.0];
        let (pr, rr) = ([-7.0, -2.0], [-6.0, -3.0]);
        let cfg = LossConfig {
            objective: Objective::Wrpo,
            alpha: 0.0,
            beta: 0.5,
            label_smoothing: 0.0,
        };
        let r = run(cfg, &pc, &pr, &rc, &rr, &[1.0; 4], &[1.0; 2], 2);
        // DPO per example: softplus(−β((π_w − ref_w) − (π_l − ref_l))), mean over B = 2.
        let dpo0 = sp(-0.5 * ((-5.0 - -5.5) - (-7.0 - -6.0)));
        let dpo1 = sp(-0.5 * ((-6.0 - -5.0) - (-2.0 - -3.0)));
        close(r.loss, (dpo0 + dpo1) / 2.0, "loss");
        close(r.d_chosen[0], 0.0, "source column has no gradient at α = 0");
    }

    #[test]
    fn label_smoothing_k2_r2() {
        // K = 2 sources, R = 2 rejected, ε = 0.1, one example, reference = 0.
        let cfg = LossConfig {
            objective: Objective::Wrpo,
            alpha: 0.4,
            beta: 0.2,
            label_smoothing: 0.1,
        };
        let r = run(
            cfg,
            &[1.0, 3.0, 0.5],
            &[-1.0, 2.0],
            &[0.0; 3],
            &[0.0; 2],
            &[1.0; 3],
            &[1.0; 2],
            1,
        );
        let w = 0.4 * 2.0 + 0.6 * 0.5; // Δ_s = mean(1, 3) = 2
        let l = |m: f64| 0.9 * sp(-0.2 * m) + 0.1 * sp(0.2 * m);
        close(r.loss, (l(w + 1.0) + l(w - 2.0)) / 2.0, "loss");
        // d/dm of ℓ: −β(0.9 σ(−βm) − 0.1 σ(βm)); source columns each get α/K of it, averaged over R.
        let dl = |m: f64| -0.2 * (0.9 * sig(-0.2 * m) - 0.1 * sig(0.2 * m));
        let dm = (dl(w + 1.0) + dl(w - 2.0)) / 2.0;
        close(r.d_chosen[0], dm * 0.4 / 2.0, "d source 0");
        close(r.d_chosen[2], dm * 0.6, "d target");
        close(r.d_rejected[1], -dl(w - 2.0) / 2.0, "d rejected 1");
    }

    #[test]
    fn simpo_and_ipo_hand_derived() {
        // SimPO: r = β/|y| log π; β = 2, γ = 0.5, α = 0.5: r_s = 2·(−4/4) = −2, r_t = 2·(−3/2) = −3,
        // r_l = 2·(−8/4) = −4; m = 0.5·(−2) + 0.5·(−3) + 4 − 0.5 = 1.0; L = softplus(−1).
        let cfg = LossConfig {
            objective: Objective::SimpoBlend { gamma: 0.5 },
            alpha: 0.5,
            beta: 2.0,
            label_smoothing: 0.0,
        };
        let r = run(
            cfg,
            &[-4.0, -3.0],
            &[-8.0],
            &[9.0, 9.0],
            &[9.0],
            &[4.0, 2.0],
            &[4.0],
            1,
        );
        close(r.loss, sp(-1.0), "simpo loss (reference ignored)");
        close(r.d_rejected[0], sig(-1.0) * 2.0 / 4.0, "simpo d rejected");
        // IPO: Δ̄ = Δ/|y|; α = 0.5, β = 0.25 → 1/(2β) = 2. Δ̄_s = (−4 − −6)/4 = 0.5,
        // Δ̄_t = (−3 − −4)/2 = 0.5, Δ̄_l = (−8 − −6)/4 = −0.5; h = 1; L = (1 − 2)² = 1.
        let cfg = LossConfig {
            objective: Objective::IpoBlend,
            alpha: 0.5,
            beta: 0.25,
            label_smoothing: 0.0,
        };
        let r = run(
            cfg,
            &[-4.0, -3.0],
            &[-8.0],
            &[-6.0, -4.0],
            &[-6.0],
            &[4.0, 2.0],
            &[4.0],
            1,
        );
        close(r.loss, 1.0, "ipo loss");
        close(r.d_chosen[1], 2.0 * (1.0 - 2.0) * 0.5 / 2.0, "ipo d target");
    }

    #[test]
    fn softplus_is_stable() {
        let x =
            Tensor::<Flex, 1>::from_floats([-1000.0, -1.0, 0.0, 1.0, 1000.0], &Default::default());
        let y: Vec<f32> = softplus(x).into_data().to_vec().unwrap();
        let want = [
            0.0,
            sp(-1.0) as f32,
            std::f32::consts::LN_2,
            sp(1.0) as f32,
            1000.0,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
