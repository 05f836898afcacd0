//! Parity tests of the preference loss op.
//!
//! For each backend (cpu = burn-flex through the composite defaults of [`LossBackend`], wgpu = the
//! fused kernels on whatever adapter wgpu picks — Mesa lavapipe on a machine without a GPU —,
//! cuda = the fused kernels, `#[ignore]`d without a GPU), each objective (WRPO, WRPO with label
//! smoothing, SimPO-blend with γ, IPO-blend), K + 1 ∈ {1, 2, 4}, R ∈ {1, 3}, B ∈ {1, 5, 300 (two
//! cubes)} and three kinds of inputs (random; margins exactly 0; |β·m| ≥ 2e4), checked:
//! - [`LossBackend::preference_loss_forward`] on the plain backend: row losses and every reward;
//! - [`preference_loss_fused`] under `Autodiff`: the mean loss, every reward, and the gradients
//!   `policy_chosen` and `policy_rejected` by name;
//! - [`LossBackend::preference_loss_backward`] with a random upstream gradient `g [B]`;
//!
//! against an f64 host computation and (loss, rewards, both gradients) against the composite
//! [`preference_loss`] differentiated by Burn's autodiff on the same backend; the composite is
//! itself checked against f64. Inputs are fresh per run (seed printed; set `WRPO_TEST_SEED` to
//! replay); kernel outputs are NaN-filled before launch under `cfg(test)` (the log-probs'
//! `kernel::output`), so an unwritten element fails. Inputs an objective must not read are NaN
//! (SimPO's reference log-probs, WRPO's token counts).
//!
//! Gradients of the *mean* loss carry a factor `1/(B·R)`; they are compared after multiplying
//! both sides by the number of pairs `B·R`, so that the fp32 atol (1e-5) is measured against
//! per-pair gradients (≈ β/2) rather than against values that shrink with the batch.

use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::*;
use crate::test_util::{base_seed, check, host, to_f64, Errors, Rng, FP32};

// ---------------------------------------------------------------------------------------------
// Cases.

/// What the inputs look like.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Realistic log-probs (≈ −0.3…−3 per token), reference within a few nats.
    Random,
    /// Every margin exactly 0: policy = reference (WRPO, IPO), or equal per-token scores with
    /// α = ½ and γ = 0 (SimPO). The WRPO/SimPO gradient is then σ(0) = ½-based.
    ZeroMargin,
    /// `|β·m| ∈ [2e4, 4e4]`, both signs (alternating rows): the loss is linear in the margin or
    /// zero, the sigmoid saturates; everything must stay finite.
    Huge,
}

/// The objectives under test, by name.
fn objectives() -> [(&'static str, LossConfig); 4] {
    [
        (
            "wrpo",
            LossConfig {
                objective: Objective::Wrpo,
                alpha: 0.3,
                beta: 0.1,
                label_smoothing: 0.0,
            },
        ),
        (
            "wrpo_smoothed",
            LossConfig {
                objective: Objective::Wrpo,
                alpha: 0.7,
                beta: 0.5,
                label_smoothing: 0.1,
            },
        ),
        (
            "simpo",
            LossConfig {
                objective: Objective::SimpoBlend { gamma: 0.5 },
                alpha: 0.4,
                beta: 2.0,
                label_smoothing: 0.0,
            },
        ),
        (
            "ipo",
            LossConfig {
                objective: Objective::IpoBlend,
                alpha: 0.3,
                beta: 0.1,
                label_smoothing: 0.0,
            },
        ),
    ]
}

/// The config a case runs with: SimPO's zero-margin inputs need α = ½ and γ = 0 (equal scores
/// then blend to exactly the same value and the margin is exactly 0).
fn case_config(cfg: LossConfig, kind: Kind) -> LossConfig {
    match (cfg.objective, kind) {
        (Objective::SimpoBlend { .. }, Kind::ZeroMargin) => LossConfig {
            objective: Objective::SimpoBlend { gamma: 0.0 },
            alpha: 0.5,
            ..cfg
        },
        _ => cfg,
    }
}

/// Host inputs of one case, row-major.
struct Inputs {
    b: usize,
    k1: usize,
    r: usize,
    /// `[B, K+1]`
    pc: Vec<f32>,
    /// `[B, R]`
    pr: Vec<f32>,
    /// `[B, K+1]`
    rc: Vec<f32>,
    /// `[B, R]`
    rr: Vec<f32>,
    /// `[B, K+1]`
    ct: Vec<f32>,
    /// `[B, R]`
    rt: Vec<f32>,
    /// `[B]`, the upstream gradient of the direct backward check.
    g: Vec<f32>,
}

/// Policy, reference and token counts of `cols` columns of one row. `side` is +1 for chosen,
/// −1 for rejected; `sign` is the row's margin sign (Huge only).
fn columns(
    rng: &mut Rng,
    cfg: &LossConfig,
    kind: Kind,
    cols: usize,
    side: f64,
    sign: f64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let simpo = matches!(cfg.objective, Objective::SimpoBlend { .. });
    let huge = 1e4 / cfg.beta; // a score change of this size moves β·m by 1e4
    let (mut p, mut rf, mut n) = (vec![], vec![], vec![]);
    for _ in 0..cols {
        let tokens = (1 + rng.below(400)) as f64;
        let normal_policy = -tokens * (0.3 + 2.7 * rng.uniform());
        let (policy, reference) = match (kind, simpo) {
            (Kind::Random, false) => (normal_policy, normal_policy - 3.0 * rng.normal()),
            (Kind::Random, true) => (normal_policy, f64::NAN),
            (Kind::ZeroMargin, false) => (normal_policy, normal_policy),
            // Score −1.5 exactly (integer × 1.5 is exact in f32).
            (Kind::ZeroMargin, true) => (-1.5 * tokens, f64::NAN),
            (Kind::Huge, false) => {
                let delta = side * sign * huge * (1.0 + rng.uniform());
                (normal_policy, normal_policy - delta)
            }
            (Kind::Huge, true) => {
                // The side that should lose gets a per-token score of −(1…2)·1e4/β.
                let loses = (side > 0.0) != (sign > 0.0);
                let score = if loses {
                    -huge * (1.0 + rng.uniform())
                } else {
                    normal_policy / tokens
                };
                (score * tokens, f64::NAN)
            }
        };
        p.push(policy as f32);
        rf.push(reference as f32);
        // WRPO never reads token counts.
        n.push(if matches!(cfg.objective, Objective::Wrpo) {
            f32::NAN
        } else {
            tokens as f32
        });
    }
    (p, rf, n)
}

fn make_inputs(cfg: &LossConfig, kind: Kind, [b, k1, r]: [usize; 3], seed: u64) -> Inputs {
    let mut rng = Rng(seed);
    let mut x = Inputs {
        b,
        k1,
        r,
        pc: vec![],
        pr: vec![],
        rc: vec![],
        rr: vec![],
        ct: vec![],
        rt: vec![],
        g: vec![],
    };
    for row in 0..b {
        let sign = if row % 2 == 0 { 1.0 } else { -1.0 };
        let (p, rf, n) = columns(&mut rng, cfg, kind, k1, 1.0, sign);
        x.pc.extend(p);
        x.rc.extend(rf);
        x.ct.extend(n);
        let (p, rf, n) = columns(&mut rng, cfg, kind, r, -1.0, sign);
        x.pr.extend(p);
        x.rr.extend(rf);
        x.rt.extend(n);
        x.g.push(rng.normal() as f32);
    }
    x
}

// ---------------------------------------------------------------------------------------------
// f64 oracle.

/// Everything the op produces, in f64.
struct Expected {
    /// Mean loss.
    loss: f64,
    /// `[B]`
    row_loss: Vec<f64>,
    /// `[B]` each.
    chosen: Vec<f64>,
    source: Vec<f64>,
    target: Vec<f64>,
    /// `[B, R]`
    rejected: Vec<f64>,
    /// d(mean loss)/dπ, `[B, K+1]` and `[B, R]`.
    d_chosen: Vec<f64>,
    d_rejected: Vec<f64>,
    /// d(Σ g·L_b)/dπ with the inputs' random `g`.
    dg_chosen: Vec<f64>,
    dg_rejected: Vec<f64>,
}

fn softplus64(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn sigmoid64(x: f64) -> f64 {
    let e = (-x.abs()).exp();
    if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

fn expected(cfg: &LossConfig, x: &Inputs) -> Expected {
    let (b, k1, r) = (x.b, x.k1, x.r);
    let (alpha, beta, eps) = (cfg.alpha, cfg.beta, cfg.label_smoothing);
    let (use_ref, per_token, gamma) = match cfg.objective {
        Objective::Wrpo => (true, false, 0.0),
        Objective::SimpoBlend { gamma } => (false, true, gamma),
        Objective::IpoBlend => (true, true, 0.0),
    };
    let score = |p: f32, rf: f32, n: f32| {
        let mut s = p as f64;
        if use_ref {
            s -= rf as f64;
        }
        if per_token {
            s /= n as f64;
        }
        s
    };
    let dscore = |n: f32| if per_token { 1.0 / n as f64 } else { 1.0 };
    let ipo = matches!(cfg.objective, Objective::IpoBlend);
    let pair_loss = |d: f64| {
        if ipo {
            (d - 1.0 / (2.0 * beta)).powi(2)
        } else {
            let z = beta * d - gamma;
            (1.0 - eps) * softplus64(-z) + eps * softplus64(z)
        }
    };
    let pair_grad = |d: f64| {
        if ipo {
            2.0 * (d - 1.0 / (2.0 * beta))
        } else {
            let z = beta * d - gamma;
            beta * (eps * sigmoid64(z) - (1.0 - eps) * sigmoid64(-z))
        }
    };
    let mut e = Expected {
        loss: 0.0,
        row_loss: vec![],
        chosen: vec![],
        source: vec![],
        target: vec![],
        rejected: vec![],
        d_chosen: vec![0.0; b * k1],
        d_rejected: vec![0.0; b * r],
        dg_chosen: vec![0.0; b * k1],
        dg_rejected: vec![0.0; b * r],
    };
    for i in 0..b {
        let c = |k: usize| score(x.pc[i * k1 + k], x.rc[i * k1 + k], x.ct[i * k1 + k]);
        let target = c(k1 - 1);
        let source = if k1 == 1 {
            target
        } else {
            (0..k1 - 1).map(c).sum::<f64>() / (k1 - 1) as f64
        };
        let w = alpha * source + (1.0 - alpha) * target;
        let mut row = 0.0;
        let mut dw = 0.0; // Σ_r ℓ'(d_r)
        for j in 0..r {
            let s = score(x.pr[i * r + j], x.rr[i * r + j], x.rt[i * r + j]);
            e.rejected.push(beta * s);
            row += pair_loss(w - s);
            let dl = pair_grad(w - s);
            dw += dl;
            let ds = dscore(x.rt[i * r + j]);
            e.d_rejected[i * r + j] = -dl / (b * r) as f64 * ds;
            e.dg_rejected[i * r + j] = -dl * x.g[i] as f64 / r as f64 * ds;
        }
        e.row_loss.push(row / r as f64);
        e.chosen.push(beta * w);
        e.source.push(beta * source);
        e.target.push(beta * target);
        for k in 0..k1 {
            let weight = if k1 == 1 {
                1.0
            } else if k == k1 - 1 {
                1.0 - alpha
            } else {
                alpha / (k1 - 1) as f64
            };
            let ds = dscore(x.ct[i * k1 + k]);
            e.d_chosen[i * k1 + k] = dw * weight / (b * r) as f64 * ds;
            e.dg_chosen[i * k1 + k] = dw * weight * x.g[i] as f64 / r as f64 * ds;
        }
    }
    e.loss = e.row_loss.iter().sum::<f64>() / b as f64;
    e
}

// ---------------------------------------------------------------------------------------------
// Running one case on one backend.

/// What one path produced.
struct Got {
    loss: Vec<f32>,
    chosen: Vec<f32>,
    source: Vec<f32>,
    target: Vec<f32>,
    rejected: Vec<f32>,
    d_chosen: Vec<f32>,
    d_rejected: Vec<f32>,
}

fn inputs<B: Backend>(x: &Inputs, device: &B::Device) -> PreferenceInputs<B> {
    let t = |v: &[f32], cols: usize| {
        Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), [x.b, cols]), device)
    };
    PreferenceInputs {
        policy_chosen: t(&x.pc, x.k1),
        policy_rejected: t(&x.pr, x.r),
        reference_chosen: t(&x.rc, x.k1),
        reference_rejected: t(&x.rr, x.r),
        chosen_tokens: t(&x.ct, x.k1),
        rejected_tokens: t(&x.rt, x.r),
    }
}

/// Mean loss, rewards and policy gradients of `loss_fn` under `Autodiff<B>`.
fn run_autodiff<B: Backend>(
    cfg: &LossConfig,
    x: &Inputs,
    device: &B::Device,
    loss_fn: impl Fn(&LossConfig, PreferenceInputs<Autodiff<B>>) -> LossOutput<Autodiff<B>>,
) -> Got {
    let mut inp = inputs::<Autodiff<B>>(x, device);
    inp.policy_chosen = inp.policy_chosen.require_grad();
    inp.policy_rejected = inp.policy_rejected.require_grad();
    let (pc, pr) = (inp.policy_chosen.clone(), inp.policy_rejected.clone());
    let out = loss_fn(cfg, inp);
    let grads = out.loss.backward();
    Got {
        loss: host(out.loss),
        chosen: host(out.chosen_rewards),
        source: host(out.source_rewards),
        target: host(out.target_rewards),
        rejected: host(out.rejected_rewards),
        d_chosen: host(pc.grad(&grads).expect("policy_chosen gradient")),
        d_rejected: host(pr.grad(&grads).expect("policy_rejected gradient")),
    }
}

/// Multiply by the number of pairs (module docs).
fn per_pair(v: &[f32], pairs: usize) -> Vec<f32> {
    v.iter()
        .map(|&g| (g as f64 * pairs as f64) as f32)
        .collect()
}

fn per_pair64(v: &[f64], pairs: usize) -> Vec<f64> {
    v.iter().map(|&g| g * pairs as f64).collect()
}

/// Largest (abs, rel) errors vs f64 of the op under test, for the summary lines.
#[derive(Default, Clone, Copy)]
struct Worst {
    forward: (f64, f64),
    d_chosen: (f64, f64),
    d_rejected: (f64, f64),
}

fn bump(slot: &mut (f64, f64), e: Errors) {
    slot.0 = slot.0.max(e.max_abs);
    slot.1 = slot.1.max(e.max_rel);
}

impl Worst {
    fn fwd(&mut self, e: Errors) {
        bump(&mut self.forward, e);
    }
    fn merge(&mut self, o: Worst) {
        for (a, b) in [
            (&mut self.forward, o.forward),
            (&mut self.d_chosen, o.d_chosen),
            (&mut self.d_rejected, o.d_rejected),
        ] {
            a.0 = a.0.max(b.0);
            a.1 = a.1.max(b.1);
        }
    }
    fn line(&self) -> String {
        let f = |(a, r): (f64, f64)| format!("abs {a:.2e} / rel {r:.2e}");
        format!(
            "forward {}; policy_chosen grad {}; policy_rejected grad {}",
            f(self.forward),
            f(self.d_chosen),
            f(self.d_rejected)
        )
    }
}

/// Run one case on one backend and check everything. Returns the max abs errors vs f64 of the
/// fused op (forward, and the per-pair gradients).
fn parity_case<B: LossBackend>(
    backend: &str,
    device: &B::Device,
    name: &str,
    cfg: LossConfig,
    kind: Kind,
    shape: [usize; 3],
    seed: u64,
) -> Worst {
    let cfg = case_config(cfg, kind);
    let [b, k1, r] = shape;
    let x = make_inputs(&cfg, kind, shape, seed);
    let want = expected(&cfg, &x);
    let tag =
        |what: &str| format!("[{backend} {name} {kind:?} B={b} K+1={k1} R={r} seed {seed}] {what}");
    let mut worst = Worst::default();

    // Forward on the plain backend: row losses and rewards.
    let rows = B::preference_loss_forward(&cfg, inputs::<B>(&x, device));
    let fwd = [
        ("row loss", host(rows.loss), &want.row_loss, vec![b]),
        (
            "chosen rewards",
            host(rows.chosen_rewards),
            &want.chosen,
            vec![b],
        ),
        (
            "source rewards",
            host(rows.source_rewards),
            &want.source,
            vec![b],
        ),
        (
            "target rewards",
            host(rows.target_rewards),
            &want.target,
            vec![b],
        ),
        (
            "rejected rewards",
            host(rows.rejected_rewards),
            &want.rejected,
            vec![b, r],
        ),
    ];
    for (what, got, w, dims) in &fwd {
        worst.fwd(check(
            &tag(&format!("forward {what} vs f64")),
            got,
            w,
            dims,
            FP32,
        ));
    }

    // Direct backward with a random upstream gradient.
    let g = Tensor::<B, 1>::from_data(TensorData::new(x.g.clone(), [b]), device);
    let grads = B::preference_loss_backward(&cfg, inputs::<B>(&x, device), g);
    let e = check(
        &tag("backward(g) policy_chosen vs f64"),
        &host(grads.policy_chosen),
        &want.dg_chosen,
        &[b, k1],
        FP32,
    );
    bump(&mut worst.d_chosen, e);
    let e = check(
        &tag("backward(g) policy_rejected vs f64"),
        &host(grads.policy_rejected),
        &want.dg_rejected,
        &[b, r],
        FP32,
    );
    bump(&mut worst.d_rejected, e);

    // The public entry under autodiff, and the composite oracle.
    let fused = run_autodiff::<B>(&cfg, &x, device, preference_loss_fused);
    let composite = run_autodiff::<B>(&cfg, &x, device, preference_loss);
    let pairs = b * r;
    // The oracle's gradients are held to fp32 on every backend too (NdArray, the cpu backend
    // until 2026-12, needed 1.5·2⁻¹²·β more: its SIMD reciprocal in Burn's `log_sigmoid`
    // backward).
    for (path, got) in [("fused", &fused), ("composite", &composite)] {
        let vs = |what: &str| tag(&format!("{path} {what} vs f64"));
        let errs = [
            check(&vs("mean loss"), &got.loss, &[want.loss], &[1], FP32),
            check(&vs("chosen rewards"), &got.chosen, &want.chosen, &[b], FP32),
            check(&vs("source rewards"), &got.source, &want.source, &[b], FP32),
            check(&vs("target rewards"), &got.target, &want.target, &[b], FP32),
            check(
                &vs("rejected rewards"),
                &got.rejected,
                &want.rejected,
                &[b, r],
                FP32,
            ),
        ];
        let dc = check(
            &vs("policy_chosen gradient × B·R"),
            &per_pair(&got.d_chosen, pairs),
            &per_pair64(&want.d_chosen, pairs),
            &[b, k1],
            FP32,
        );
        let dr = check(
            &vs("policy_rejected gradient × B·R"),
            &per_pair(&got.d_rejected, pairs),
            &per_pair64(&want.d_rejected, pairs),
            &[b, r],
            FP32,
        );
        if path == "fused" {
            errs.into_iter().for_each(|e| worst.fwd(e));
            bump(&mut worst.d_chosen, dc);
            bump(&mut worst.d_rejected, dr);
        }
    }
    // Fused vs composite, each output by name.
    let vs = |what: &str| tag(&format!("fused {what} vs composite autodiff"));
    check(
        &vs("mean loss"),
        &fused.loss,
        &to_f64(&composite.loss),
        &[1],
        FP32,
    );
    check(
        &vs("chosen rewards"),
        &fused.chosen,
        &to_f64(&composite.chosen),
        &[b],
        FP32,
    );
    check(
        &vs("source rewards"),
        &fused.source,
        &to_f64(&composite.source),
        &[b],
        FP32,
    );
    check(
        &vs("target rewards"),
        &fused.target,
        &to_f64(&composite.target),
        &[b],
        FP32,
    );
    check(
        &vs("rejected rewards"),
        &fused.rejected,
        &to_f64(&composite.rejected),
        &[b, r],
        FP32,
    );
    check(
        &vs("policy_chosen gradient × B·R"),
        &per_pair(&fused.d_chosen, pairs),
        &to_f64(&per_pair(&composite.d_chosen, pairs)),
        &[b, k1],
        FP32,
    );
    check(
        &vs("policy_rejected gradient × B·R"),
        &per_pair(&fused.d_rejected, pairs),
        &to_f64(&per_pair(&composite.d_rejected, pairs)),
        &[b, r],
        FP32,
    );

    // The first step's gradient, spelled out: σ(0) = ½, not 1.
    if kind == Kind::ZeroMargin
        && cfg.label_smoothing == 0.0
        && !matches!(cfg.objective, Objective::IpoBlend)
    {
        for (j, &d) in fused.d_rejected.iter().enumerate() {
            let n = if matches!(cfg.objective, Objective::Wrpo) {
                1.0
            } else {
                x.rt[j] as f64
            };
            let half = cfg.beta * 0.5 / pairs as f64 / n;
            assert!(
                (d as f64 - half).abs() <= 1e-6 * half,
                "{}: {d} at {j}, want β·σ(0)/(B·R) = {half}",
                tag("zero-margin policy_rejected gradient")
            );
        }
    }
    worst
}

/// Every shape and kind of one objective on one backend; prints the largest errors.
fn parity<B: LossBackend>(backend: &str, device: &B::Device, objective: usize) {
    let (name, cfg) = objectives()[objective];
    let base = base_seed();
    println!("[{backend} {name}] seed base {base} (replay: WRPO_TEST_SEED={base})");
    let mut all = Worst::default();
    let mut salt = objective as u64 * 1000;
    for kind in [Kind::Random, Kind::ZeroMargin, Kind::Huge] {
        let mut worst = Worst::default();
        for b in [1, 5, 300] {
            for k1 in [1, 2, 4] {
                for r in [1, 3] {
                    salt += 1;
                    let w =
                        parity_case::<B>(backend, device, name, cfg, kind, [b, k1, r], base ^ salt);
                    worst.merge(w);
                }
            }
        }
        println!(
            "[{backend} {name} {kind:?}] op vs f64, max err: {} (gradients per pair)",
            worst.line()
        );
        all.merge(worst);
    }
    println!(
        "[{backend} {name}] all kinds, op vs f64, max err: {}",
        all.line()
    );
}

/// Strided inputs (the trainer splits one `[B·(K+1+R)]` tensor into views) and an upstream
/// gradient with stride 0 go through the kernels' strided indexing.
fn strided<B: LossBackend>(backend: &str, device: &B::Device) {
    let (_, cfg) = objectives()[3]; // IPO: reads all six inputs.
    let seed = base_seed() ^ 0x5717;
    println!("[{backend} strided] seed {seed}");
    let [b, k1, r] = [7, 4, 3];
    let x = make_inputs(&cfg, Kind::Random, [b, k1, r], seed);
    let want = expected(&cfg, &x);
    // Each input as a transposed view (strides (1, B)) of a `[cols + 2, B]` buffer whose first two
    // rows are NaN padding: a kernel that ignores strides or offsets reads NaN.
    let wide = |v: &[f32], cols: usize| {
        let mut buf = vec![f32::NAN; 2 * b];
        buf.extend((0..cols).flat_map(|c| (0..b).map(move |i| v[i * cols + c])));
        Tensor::<B, 2>::from_data(TensorData::new(buf, [cols + 2, b]), device)
            .transpose()
            .narrow(1, 2, cols)
    };
    let inp = PreferenceInputs {
        policy_chosen: wide(&x.pc, k1),
        policy_rejected: wide(&x.pr, r),
        reference_chosen: wide(&x.rc, k1),
        reference_rejected: wide(&x.rr, r),
        chosen_tokens: wide(&x.ct, k1),
        rejected_tokens: wide(&x.rt, r),
    };
    let rows = B::preference_loss_forward(&cfg, inp.clone());
    check(
        &format!("[{backend} strided seed {seed}] row loss"),
        &host(rows.loss),
        &want.row_loss,
        &[b],
        FP32,
    );
    let ones = Tensor::<B, 1>::ones([1], device).expand([b]);
    let grads = B::preference_loss_backward(&cfg, inp, ones);
    let want_chosen: Vec<f64> = want
        .d_chosen
        .iter()
        .map(|g| g * (b * r) as f64 / r as f64)
        .collect();
    check(
        &format!("[{backend} strided seed {seed}] policy_chosen gradient (g = 1, broadcast)"),
        &host(grads.policy_chosen),
        &want_chosen,
        &[b, k1],
        FP32,
    );
}

macro_rules! parity_tests {
    ($backend:literal, $ty:ty, $device:expr $(, #[$attr:meta])?) => {
        #[test] $(#[$attr])?
        fn wrpo() {
            parity::<$ty>($backend, &$device, 0);
        }
        #[test] $(#[$attr])?
        fn wrpo_label_smoothing() {
            parity::<$ty>($backend, &$device, 1);
        }
        #[test] $(#[$attr])?
        fn simpo_blend_gamma() {
            parity::<$ty>($backend, &$device, 2);
        }
        #[test] $(#[$attr])?
        fn ipo_blend() {
            parity::<$ty>($backend, &$device, 3);
        }
        #[test] $(#[$attr])?
        fn strided_inputs() {
            strided::<$ty>($backend, &$device);
        }
    };
}

mod cpu {
    use super::*;
    type B = burn::backend::Flex;
    parity_tests!("cpu", B, Default::default());
}

mod wgpu {
    use super::*;
    /// The fused kernels through WGPU (no fusion: this is `burn::backend::Wgpu<f32, i32, u32>`).
    type B = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
    parity_tests!("wgpu", B, burn::backend::wgpu::WgpuDevice::DefaultDevice);
}

mod cuda {
    use super::*;
    /// The fused kernels through CUDA (no fusion: this is `burn::backend::Cuda<f32, i32>`).
    type B = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
    parity_tests!("cuda", B, burn::backend::cuda::CudaDevice::new(0), #[ignore = "needs CUDA"]);
}
