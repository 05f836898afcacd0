//! Fused CubeCL kernels for the preference loss, one source for every CubeCL runtime (CUDA, WGPU).
//!
//! One unit per example row `b` ([`ROWS_PER_CUBE`] rows per cube), looping over the K + 1 chosen
//! and R rejected columns; no shared memory, no plane operations (so it runs on lavapipe). Formula
//! and gradient: the module docs of [`super`] (scores `s`, blend `w`, margins `d_r = w − s_l_r`).
//!
//! - forward: `L_b = mean_r ℓ(d_r)` and the β-scaled rewards `β·w`, `β·s_src`, `β·s_wt`, `β·s_l_r`.
//!   `ℓ = (1−ε)·softplus(−z) + ε·softplus(z)`, `z = β·d − γ` (WRPO: γ = 0), or `(d − 1/(2β))²`
//!   (IPO); `softplus(x) = max(x, 0) + log1p(e^−|x|)`, finite for every finite `x`.
//! - backward: recomputes the scores (a few loads per row; nothing is saved by the forward) and
//!   writes `∂/∂policy_chosen [B, K+1]`, `∂/∂policy_rejected [B, R]` from the upstream `g [B]`.
//!   `σ(x) = 1/(1 + e^−|x|)` for `x ≥ 0` and `e^−|x|/(1 + e^−|x|)` otherwise: no overflow, and
//!   exactly ½ at 0 (σ(0), not the 1 a differentiated max/abs softplus gives).
//!
//! Dtypes: every input is converted to f32 on load (inputs of another float dtype are cast to the
//! policy's dtype `F` first); all arithmetic (scores, blends, `exp`, `log1p`, sums over K and R)
//! is f32; results are converted to `F` on store. The objective is a comptime choice (three
//! booleans), so each objective compiles to its own straight-line kernel.
//!
//! WGSL has no `log1p`: CubeCL lowers it to `log(1 + x)`, which loses `x < 2^−24` against 1 (an
//! absolute error below 6e-8 in the loss); CUDA's `log1pf` keeps it.
//!
//! Indexing: every tensor is read and written through its strides (views from the trainer's
//! split of the log-probs, broadcast upstream gradients), so no input is made contiguous.

use burn::tensor::{Shape, Tensor as BurnTensor, TensorPrimitive};
use burn_cubecl::{
    element::BoolElement, tensor::CubeTensor, CubeBackend, CubeRuntime, FloatElement, IntElement,
};
use cubecl::prelude::*;

use super::{
    check_shapes, LossBackend, LossConfig, Objective, PolicyGrads, PreferenceInputs, RowLoss,
};
use crate::logprobs::kernel::{cast_like, largest, output};

/// Rows (units) per cube. Loss rows are few (the micro-batch's examples); 256 is within every
/// target's limit (lavapipe: 1024).
const ROWS_PER_CUBE: u32 = 256;

/// Cubes per grid dimension; WebGPU/Vulkan guarantee 65535.
const MAX_CUBES_PER_DIM: usize = 65_535;

/// The objective as comptime switches of the kernels.
#[derive(Debug, Clone, Copy)]
struct Variant {
    /// Scores subtract the reference log-probs (WRPO, IPO).
    reference: bool,
    /// Scores divide by the token count (SimPO, IPO).
    per_token: bool,
    /// Squared loss (IPO) instead of the sigmoid loss (WRPO, SimPO).
    squared: bool,
}

impl Variant {
    fn of(objective: Objective) -> Self {
        match objective {
            Objective::Wrpo => Self {
                reference: true,
                per_token: false,
                squared: false,
            },
            Objective::SimpoBlend { .. } => Self {
                reference: false,
                per_token: true,
                squared: false,
            },
            Objective::IpoBlend => Self {
                reference: true,
                per_token: true,
                squared: true,
            },
        }
    }
}

/// The runtime scalars, converted once on the host from the f64 config (the composite converts
/// the same f64 expressions to f32 scalars).
#[derive(CubeLaunch, CubeType)]
struct Scalars {
    /// α.
    alpha: f32,
    /// 1 − α.
    one_minus_alpha: f32,
    /// β.
    beta: f32,
    /// γ (SimPO; 0 otherwise).
    gamma: f32,
    /// ε (WRPO, SimPO).
    smoothing: f32,
    /// 1 − ε.
    one_minus_smoothing: f32,
    /// 1/(2β) (IPO's target).
    ipo_target: f32,
}

/// The kernels' [`Scalars`] of a config.
fn scalars<R: CubeRuntime>(cfg: &LossConfig) -> ScalarsLaunch<R> {
    let gamma = match cfg.objective {
        Objective::SimpoBlend { gamma } => gamma,
        _ => 0.0,
    };
    ScalarsLaunch::new(
        cfg.alpha as f32,
        (1.0 - cfg.alpha) as f32,
        cfg.beta as f32,
        gamma as f32,
        cfg.label_smoothing as f32,
        (1.0 - cfg.label_smoothing) as f32,
        (1.0 / (2.0 * cfg.beta)) as f32,
    )
}

/// Element `(b, c)` of a 2-d tensor through its strides, as f32.
#[cube]
fn at<F: Float>(t: &Tensor<F>, b: usize, c: usize) -> f32 {
    f32::cast_from(t[b * t.stride(0) + c * t.stride(1)])
}

/// Score of column `c` of row `b`: `π − ref` (WRPO), `π/n` (SimPO), `(π − ref)/n` (IPO).
#[cube]
fn score<F: Float>(
    policy: &Tensor<F>,
    reference: &Tensor<F>,
    tokens: &Tensor<F>,
    b: usize,
    c: usize,
    #[comptime] use_reference: bool,
    #[comptime] per_token: bool,
) -> f32 {
    let mut s = at(policy, b, c);
    if use_reference {
        s -= at(reference, b, c);
    }
    if per_token {
        s /= at(tokens, b, c);
    }
    s
}

/// `(s_src, s_wt)` of row `b`; `s_src = s_wt` with one chosen column.
#[cube]
fn chosen_scores<F: Float>(
    policy: &Tensor<F>,
    reference: &Tensor<F>,
    tokens: &Tensor<F>,
    b: usize,
    #[comptime] use_reference: bool,
    #[comptime] per_token: bool,
) -> (f32, f32) {
    let k1 = policy.shape(1);
    let target = score(
        policy,
        reference,
        tokens,
        b,
        k1 - 1,
        use_reference,
        per_token,
    );
    let mut source = target;
    if k1 > 1 {
        let mut sum = f32::new(0.0);
        for k in 0..k1 - 1 {
            sum += score(policy, reference, tokens, b, k, use_reference, per_token);
        }
        source = sum / f32::cast_from(k1 - 1);
    }
    (source, target)
}

/// `log(1 + eˣ)` without overflow: `max(x, 0) + log1p(e^−|x|)`.
#[cube]
fn softplus(x: f32) -> f32 {
    f32::max(x, f32::new(0.0)) + f32::log1p(f32::exp(-f32::abs(x)))
}

/// `σ(x)` without overflow (see the module docs); exactly ½ at 0.
#[cube]
fn sigmoid(x: f32) -> f32 {
    let e = f32::exp(-f32::abs(x));
    let s = f32::new(1.0) / (f32::new(1.0) + e);
    select(x < f32::new(0.0), e * s, s)
}

/// Per-pair loss `ℓ(d)`.
#[cube]
fn pair_loss(d: f32, k: &Scalars, #[comptime] squared: bool) -> f32 {
    if squared {
        let h = d - k.ipo_target;
        h * h
    } else {
        let z = d * k.beta - k.gamma;
        softplus(-z) * k.one_minus_smoothing + softplus(z) * k.smoothing
    }
}

/// `ℓ'(d)`: `β·(ε·σ(z) − (1−ε)·σ(−z))` or `2·(d − 1/(2β))`.
#[cube]
fn pair_grad(d: f32, k: &Scalars, #[comptime] squared: bool) -> f32 {
    if squared {
        (d - k.ipo_target) * f32::new(2.0)
    } else {
        let z = d * k.beta - k.gamma;
        (sigmoid(z) * k.smoothing - sigmoid(-z) * k.one_minus_smoothing) * k.beta
    }
}

/// The row this unit handles (linear over a 1-d or 2-d grid of cubes).
#[cube]
fn row_index() -> usize {
    CUBE_POS * CUBE_DIM as usize + UNIT_POS as usize
}

/// Forward: row losses and β-scaled rewards (module docs). f32 arithmetic.
///
/// # Shapes
/// - `policy_chosen`, `reference_chosen`, `chosen_tokens`: `[B, K+1]`, any strides
/// - `policy_rejected`, `reference_rejected`, `rejected_tokens`: `[B, R]`, any strides
/// - `loss`, `chosen_rewards`, `source_rewards`, `target_rewards`: `[B]`; `rejected_rewards`:
///   `[B, R]` (outputs)
/// - one unit per row ([`row_cube_count`])
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn preference_loss_forward_kernel<F: Float>(
    policy_chosen: &Tensor<F>,
    policy_rejected: &Tensor<F>,
    reference_chosen: &Tensor<F>,
    reference_rejected: &Tensor<F>,
    chosen_tokens: &Tensor<F>,
    rejected_tokens: &Tensor<F>,
    loss: &mut Tensor<F>,
    chosen_rewards: &mut Tensor<F>,
    source_rewards: &mut Tensor<F>,
    target_rewards: &mut Tensor<F>,
    rejected_rewards: &mut Tensor<F>,
    k: Scalars,
    #[comptime] use_reference: bool,
    #[comptime] per_token: bool,
    #[comptime] squared: bool,
    #[define(F)] _dtype: StorageType,
) {
    let b = row_index();
    if b < policy_chosen.shape(0) {
        let (source, target) = chosen_scores(
            policy_chosen,
            reference_chosen,
            chosen_tokens,
            b,
            use_reference,
            per_token,
        );
        let weighted = source * k.alpha + target * k.one_minus_alpha;
        let r = policy_rejected.shape(1);
        let mut total = f32::new(0.0);
        for j in 0..r {
            let rejected = score(
                policy_rejected,
                reference_rejected,
                rejected_tokens,
                b,
                j,
                use_reference,
                per_token,
            );
            total += pair_loss(weighted - rejected, &k, squared);
            rejected_rewards[b * rejected_rewards.stride(0) + j * rejected_rewards.stride(1)] =
                F::cast_from(rejected * k.beta);
        }
        loss[b * loss.stride(0)] = F::cast_from(total / f32::cast_from(r));
        chosen_rewards[b * chosen_rewards.stride(0)] = F::cast_from(weighted * k.beta);
        source_rewards[b * source_rewards.stride(0)] = F::cast_from(source * k.beta);
        target_rewards[b * target_rewards.stride(0)] = F::cast_from(target * k.beta);
    }
}

/// Backward: `∂(Σ_b g_b·L_b)/∂policy` (module docs of [`super`], "Gradient"). f32 arithmetic.
///
/// # Shapes
/// - inputs as in [`preference_loss_forward_kernel`]; `grad`: `[B]`, any stride (a broadcast
///   upstream gradient has stride 0)
/// - `d_chosen`: `[B, K+1]`, `d_rejected`: `[B, R]` (outputs)
/// - one unit per row ([`row_cube_count`])
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn preference_loss_backward_kernel<F: Float>(
    policy_chosen: &Tensor<F>,
    policy_rejected: &Tensor<F>,
    reference_chosen: &Tensor<F>,
    reference_rejected: &Tensor<F>,
    chosen_tokens: &Tensor<F>,
    rejected_tokens: &Tensor<F>,
    grad: &Tensor<F>,
    d_chosen: &mut Tensor<F>,
    d_rejected: &mut Tensor<F>,
    k: Scalars,
    #[comptime] use_reference: bool,
    #[comptime] per_token: bool,
    #[comptime] squared: bool,
    #[define(F)] _dtype: StorageType,
) {
    let b = row_index();
    if b < policy_chosen.shape(0) {
        let (source, target) = chosen_scores(
            policy_chosen,
            reference_chosen,
            chosen_tokens,
            b,
            use_reference,
            per_token,
        );
        let weighted = source * k.alpha + target * k.one_minus_alpha;
        let r = policy_rejected.shape(1);
        // Upstream gradient of each pair: g_b / R.
        let g = f32::cast_from(grad[b * grad.stride(0)]) / f32::cast_from(r);
        let mut d_weighted = f32::new(0.0);
        for j in 0..r {
            let rejected = score(
                policy_rejected,
                reference_rejected,
                rejected_tokens,
                b,
                j,
                use_reference,
                per_token,
            );
            let dl = pair_grad(weighted - rejected, &k, squared) * g;
            d_weighted += dl;
            let mut d = -dl;
            if per_token {
                d /= at(rejected_tokens, b, j);
            }
            d_rejected[b * d_rejected.stride(0) + j * d_rejected.stride(1)] = F::cast_from(d);
        }
        let k1 = policy_chosen.shape(1);
        // The target column; with K + 1 = 1 it is also the source.
        let mut d_target = d_weighted * k.one_minus_alpha;
        if k1 == 1 {
            d_target += d_weighted * k.alpha;
        }
        if per_token {
            d_target /= at(chosen_tokens, b, k1 - 1);
        }
        d_chosen[b * d_chosen.stride(0) + (k1 - 1) * d_chosen.stride(1)] = F::cast_from(d_target);
        if k1 > 1 {
            let d_source = d_weighted * k.alpha / f32::cast_from(k1 - 1);
            for c in 0..k1 - 1 {
                let mut d = d_source;
                if per_token {
                    d /= at(chosen_tokens, b, c);
                }
                d_chosen[b * d_chosen.stride(0) + c * d_chosen.stride(1)] = F::cast_from(d);
            }
        }
    }
}

/// `ceil(rows / ROWS_PER_CUBE)` cubes, spilling into the second grid dimension past 65535.
fn row_cube_count(rows: usize) -> CubeCount {
    let cubes = rows.div_ceil(ROWS_PER_CUBE as usize).max(1);
    let x = cubes.min(MAX_CUBES_PER_DIM);
    let y = cubes.div_ceil(x);
    assert!(
        y <= MAX_CUBES_PER_DIM,
        "preference loss: {rows} rows exceed the launch grid"
    );
    CubeCount::Static(x as u32, y as u32, 1)
}

/// The six inputs as cube tensors of the policy log-probs' dtype.
struct CubeInputs<R: CubeRuntime> {
    pc: CubeTensor<R>,
    pr: CubeTensor<R>,
    rc: CubeTensor<R>,
    rr: CubeTensor<R>,
    ct: CubeTensor<R>,
    rt: CubeTensor<R>,
}

fn cube_inputs<R, F, I, BT>(x: PreferenceInputs<CubeBackend<R, F, I, BT>>) -> CubeInputs<R>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let pc = x.policy_chosen.into_primitive().tensor();
    let dtype = pc.dtype;
    let prim = |t: BurnTensor<CubeBackend<R, F, I, BT>, 2>| {
        let t = t.into_primitive().tensor();
        pc.assert_is_on_same_device(&t);
        cast_like(t, dtype)
    };
    CubeInputs {
        pr: prim(x.policy_rejected),
        rc: prim(x.reference_chosen),
        rr: prim(x.reference_rejected),
        ct: prim(x.chosen_tokens),
        rt: prim(x.rejected_tokens),
        pc,
    }
}

fn float<R, F, I, BT, const D: usize>(t: CubeTensor<R>) -> BurnTensor<CubeBackend<R, F, I, BT>, D>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    BurnTensor::from_primitive(TensorPrimitive::Float(t))
}

/// The fused kernels on any CubeCL runtime: `CubeBackend<CudaRuntime, …>` (= `burn::backend::Cuda`
/// without fusion) and `CubeBackend<WgpuRuntime, …>` (= `burn::backend::Wgpu` without fusion).
impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> LossBackend
    for CubeBackend<R, F, I, BT>
{
    fn preference_loss_forward(cfg: &LossConfig, x: PreferenceInputs<Self>) -> RowLoss<Self> {
        let [b, _k1, r] = check_shapes(&x);
        let v = Variant::of(cfg.objective);
        let x = cube_inputs(x);
        let loss = output(&x.pc, Shape::new([b]));
        let chosen = output(&x.pc, Shape::new([b]));
        let source = output(&x.pc, Shape::new([b]));
        let target = output(&x.pc, Shape::new([b]));
        let rejected = output(&x.pc, Shape::new([b, r]));
        if b > 0 {
            let address = largest(&[&x.pc, &x.pr, &x.rc, &x.rr, &x.ct, &x.rt, &rejected]);
            let dtype = x.pc.dtype.into();
            let client = x.pc.client.clone();
            preference_loss_forward_kernel::launch::<R>(
                &client,
                row_cube_count(b),
                CubeDim::new_1d(ROWS_PER_CUBE),
                address,
                x.pc.into_tensor_arg(),
                x.pr.into_tensor_arg(),
                x.rc.into_tensor_arg(),
                x.rr.into_tensor_arg(),
                x.ct.into_tensor_arg(),
                x.rt.into_tensor_arg(),
                loss.clone().into_tensor_arg(),
                chosen.clone().into_tensor_arg(),
                source.clone().into_tensor_arg(),
                target.clone().into_tensor_arg(),
                rejected.clone().into_tensor_arg(),
                scalars::<R>(cfg),
                v.reference,
                v.per_token,
                v.squared,
                dtype,
            );
        }
        RowLoss {
            loss: float(loss),
            chosen_rewards: float(chosen),
            source_rewards: float(source),
            target_rewards: float(target),
            rejected_rewards: float(rejected),
        }
    }

    fn preference_loss_backward(
        cfg: &LossConfig,
        x: PreferenceInputs<Self>,
        grad: BurnTensor<Self, 1>,
    ) -> PolicyGrads<Self> {
        let [b, k1, r] = check_shapes(&x);
        assert_eq!(grad.dims(), [b], "the upstream gradient must be [B]");
        let v = Variant::of(cfg.objective);
        let x = cube_inputs(x);
        let grad = cast_like(grad.into_primitive().tensor(), x.pc.dtype);
        x.pc.assert_is_on_same_device(&grad);
        let d_chosen = output(&x.pc, Shape::new([b, k1]));
        let d_rejected = output(&x.pc, Shape::new([b, r]));
        if b > 0 {
            let address = largest(&[&x.pc, &x.pr, &x.rc, &x.rr, &x.ct, &x.rt, &grad]);
            let dtype = x.pc.dtype.into();
            let client = x.pc.client.clone();
            preference_loss_backward_kernel::launch::<R>(
                &client,
                row_cube_count(b),
                CubeDim::new_1d(ROWS_PER_CUBE),
                address,
                x.pc.into_tensor_arg(),
                x.pr.into_tensor_arg(),
                x.rc.into_tensor_arg(),
                x.rr.into_tensor_arg(),
                x.ct.into_tensor_arg(),
                x.rt.into_tensor_arg(),
                grad.into_tensor_arg(),
                d_chosen.clone().into_tensor_arg(),
                d_rejected.clone().into_tensor_arg(),
                scalars::<R>(cfg),
                v.reference,
                v.per_token,
                v.squared,
                dtype,
            );
        }
        PolicyGrads {
            policy_chosen: float(d_chosen),
            policy_rejected: float(d_rejected),
        }
    }
}
