//! Shared helpers for the parity tests: fixture paths, the tolerance table, comparisons that print
//! count, worst index and both values on failure.
#![warn(missing_docs)]

use std::path::PathBuf;

/// `|got − want| ≤ atol + rtol·|want|`.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    /// Absolute tolerance.
    pub atol: f64,
    /// Relative tolerance.
    pub rtol: f64,
}

/// The one tolerance table of the parity tests (f32 compute vs transformers/PyTorch f32).
pub mod tol {
    use super::Tol;
    /// Logits of a 2-layer model, |logit| ≲ 9: f32 rounding through matmuls, softmax and RMSNorm
    /// accumulates to a few 1e-6 absolute; different summation orders (Burn vs ATen) are the only
    /// source of difference.
    pub const LOGITS_F32: Tol = Tol {
        atol: 5e-5,
        rtol: 1e-5,
    };
    /// Summed sequence log-probs (the target: ≤ 1e-5 relative). The absolute term covers
    /// sums near zero.
    pub const LOGPS_F32: Tol = Tol {
        atol: 1e-4,
        rtol: 1e-5,
    };
    /// A few-update training trajectory (loss, grad_norm, rewards, learning rate, α) vs the
    /// PyTorch reference trainer: f32 differences in the forward (≈1e-7 relative) carried through
    /// a few Adam updates and clipping. Measured over the 6 cases on cpu and wgpu (lavapipe) and
    /// padding-free: loss 4.3e-6 abs (rel 4.9e-6), grad_norm 9.9e-5 abs at |13| (rel 7.6e-6),
    /// rewards 6.2e-6 abs (rel up to 7.6e-5 on rewards near 0.01): the absolute term covers small
    /// rewards, the relative one grad_norm. Log-probs have their own entry below.
    pub const TRAJECTORY_F32: Tol = Tol {
        atol: 5e-5,
        rtol: 2e-5,
    };
    /// The summed log-prob metrics (`logps/*`, |value| ≲ 110) of those trajectories: measured
    /// 3.6e-5 abs, 3.5e-7 relative (cpu and wgpu).
    pub const TRAJECTORY_LOGPS_F32: Tol = Tol {
        atol: 5e-5,
        rtol: 3e-6,
    };
    /// Two engine paths of the same SFT updates (packed vs unpacked rows, one global batch): the
    /// same sums in another order. Measured loss 4.8e-7 abs (|5.5|), grad_norm 9.5e-7 (|7.5|).
    pub const PACKED_VS_UNPACKED_F32: Tol = Tol {
        atol: 1e-6,
        rtol: 5e-7,
    };
    /// SFT mean token accuracy over ~50 tokens: an arg-max whose top two logits are within f32
    /// rounding may flip, so one token (1/50) either way is allowed.
    pub const TOKEN_ACCURACY: Tol = Tol {
        atol: 0.021,
        rtol: 0.0,
    };
    /// Final weights after the trajectory (|w| ≲ 1, moved by ≲ 6e-3). The reference's own
    /// f32-vs-f64 spread is 3.6e-6, but Adam divides by √v̂: an element whose gradient is at f32
    /// rounding level moves by an order-one fraction of the learning rate (1e-3 here) either way,
    /// so rounding differences in the gradient show up at ~1e-5–1e-4 in isolated elements
    /// (measured with the tiled attention: wgpu 1.2e-5, cpu 4.9e-6; NdArray, the earlier cpu
    /// backend, put 1 of 115008 elements 3.6e-4 off through its 12-bit SIMD reciprocal).
    pub const TRAINED_WEIGHTS_F32: Tol = Tol {
        atol: 1e-4,
        rtol: 1e-4,
    };
    /// Metrics of a data-parallel run (2 peers × batch 2, or 2 nodes × 2 devices) vs one
    /// process, same rows: the same computation except the order in which per-row gradients,
    /// losses and metric sums are added (and the loss and metric sums crossing the all-reduce as
    /// f32). Measured over the 8 runs of cli/tests/dp.rs: grad_norm 1.2e-6 abs (|3|), loss
    /// 2.4e-7, rewards 4.7e-7, log-probs 5.7e-6 (|100|, rel 1.1e-7); every metric ≤ 1.9e-6 abs
    /// except the log-probs.
    pub const DATA_PARALLEL_F32: Tol = Tol {
        atol: 5e-6,
        rtol: 5e-7,
    };
    /// Final weights of those runs: measured 1.9e-7 abs (the updates are small enough that no
    /// element's Adam step flips).
    pub const DATA_PARALLEL_WEIGHTS_F32: Tol = Tol {
        atol: 2e-6,
        rtol: 0.0,
    };
    /// Parameter gradients of the same log-probs computed in two batch layouts (padded rows vs
    /// padding-free packed rows), in units of the largest gradient element: same arithmetic per
    /// sequence except matmul shapes and summation order, and an element's rounding error scales
    /// with the largest terms of its sum, not with the element. Measured: wgpu 5e-7–1.8e-6, cpu
    /// (burn-flex) 9e-7–4.1e-6 over two seeds (a wrong layout gives errors of order 1; NdArray,
    /// the earlier cpu backend, reached 1.1e-4 through its 12-bit SIMD reciprocal).
    pub const LAYOUT_GRADIENTS_F32: Tol = Tol {
        atol: 4e-5,
        rtol: 0.0,
    };
    /// The first update's loss while the policy still equals its reference: log 2 exactly, up to
    /// the f32 rounding of softplus(0) and of the mean over rows. Measured 1.9e-9 (f32(ln 2));
    /// one f32 ulp at 0.69 is 6e-8, so two ulps.
    pub const LOSS_AT_REFERENCE_F32: Tol = Tol {
        atol: 1.2e-7,
        rtol: 0.0,
    };
    /// `bench kernels`: the largest relative difference between the fused log-prob gradient and
    /// the composite's on the cpu backend (two f32 formulas of the same gradient). Measured
    /// 4.2e-8–1.8e-7 over seeds 1–5 of the 2,3,11 case.
    pub const FUSED_VS_COMPOSITE_GRAD_REL_F32: f64 = 1e-6;
    /// The memory plan's predicted peak vs the measured one (`cli/tests/plan.rs`), relative:
    /// the bound. Not a rounding tolerance: the plan is a model (it bounds the scored
    /// positions of the fused head by every position, and does not see allocator pages).
    /// Measured −11 % to +10 % over the 6 cases (BENCHMARKS.md, "Memory plan").
    pub const PLAN_VS_MEASURED_PEAK: f64 = 0.15;
}

/// Two safetensors files' weights as flat f64 vectors, tensor by tensor in name order, after
/// checking that they hold the same tensors with the same shapes (`what` names the pair).
pub fn paired_weights(
    got: &std::path::Path,
    want: &std::path::Path,
    what: &str,
) -> (Vec<f64>, Vec<f64>) {
    use wrpo_engine_core::train::state::read_safetensors;
    let got = read_safetensors(got).unwrap();
    let want = read_safetensors(want).unwrap();
    assert_eq!(got.len(), want.len(), "{what}: tensor count");
    let mut names: Vec<&String> = want.keys().collect();
    names.sort();
    let (mut g, mut w) = (vec![], vec![]);
    for n in names {
        assert_eq!(got[n].0, want[n].0, "{what}: shape of {n}");
        g.extend(got[n].1.iter().map(|&x| x as f64));
        w.extend(want[n].1.iter().map(|&x| x as f64));
    }
    (g, w)
}

/// Root of the committed fixtures: `$WRPO_FIXTURES` if set (prebuilt test binaries run from another
/// checkout, e.g. the GPU check), else `tests/fixtures` of this source tree.
pub fn fixtures() -> PathBuf {
    std::env::var_os("WRPO_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures"))
}

/// Summary of a comparison.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Largest absolute error.
    pub max_abs: f64,
    /// Largest relative error (|err| / max(|want|, 1e-30)).
    pub max_rel: f64,
}

/// Compare element-wise; panic with count, worst index and both values when out of tolerance.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: Tol) -> Report {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: length {} vs expected {}",
        got.len(),
        want.len()
    );
    let (mut bad, mut worst, mut worst_excess) = (0usize, 0usize, f64::NEG_INFINITY);
    let (mut max_abs, mut max_rel) = (0f64, 0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let allowed = tol.atol + tol.rtol * w.abs();
        let excess = if err.is_nan() {
            f64::INFINITY
        } else {
            err - allowed
        };
        if excess > 0.0 {
            bad += 1;
        }
        if excess > worst_excess {
            worst_excess = excess;
            worst = i;
        }
        max_abs = max_abs.max(err);
        max_rel = max_rel.max(err / w.abs().max(1e-30));
    }
    assert!(
        bad == 0,
        "{what}: {bad} of {} values out of tolerance {tol:?}; worst at index {worst}: got {}, want {} (max abs {max_abs:.3e})",
        got.len(),
        got[worst],
        want[worst]
    );
    Report { max_abs, max_rel }
}

/// The wgpu device the tests use; panics (fails the test, never skips) without an adapter.
pub fn wgpu_device() -> burn::backend::wgpu::WgpuDevice {
    use wrpo_engine_core::backend::{select, BackendChoice, Selected};
    match select(BackendChoice::Wgpu) {
        Ok(Selected::Wgpu(d, name)) => {
            println!("wgpu adapter: {name}");
            d
        }
        Ok(other) => panic!("--backend wgpu selected {other}"),
        Err(e) => panic!("{e:#}"),
    }
}

/// The CUDA device (tests that use it are `#[ignore]`d without a GPU).
pub fn cuda_device() -> burn::backend::cuda::CudaDevice {
    use wrpo_engine_core::backend::{select, BackendChoice, Selected};
    match select(BackendChoice::Cuda) {
        Ok(Selected::Cuda(d)) => d,
        Ok(other) => panic!("--backend cuda selected {other}"),
        Err(e) => panic!("{e:#}"),
    }
}
