//! Shared helpers of the kernel parity tests: the fp32 tolerance table, seeds, a small RNG and an
//! elementwise comparison that fails loudly.

use std::time::{SystemTime, UNIX_EPOCH};

use burn::tensor::{backend::Backend, Tensor};

// ---------------------------------------------------------------------------------------------
// Tolerances: |got − want| ≤ atol + rtol·|want|, elementwise.

/// An absolute + relative tolerance.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tol {
    pub(crate) atol: f64,
    pub(crate) rtol: f64,
}

/// fp32, the STYLE starting point; used for every fp32 comparison here, without loosening.
pub(crate) const FP32: Tol = Tol {
    atol: 1e-5,
    rtol: 5e-4,
};

/// fp32 gradients that are long sums (the fused head's `dhidden = dz·W` sums over the whole
/// vocabulary, `dW = dzᵀ·hidden` over every position), compared in units of the tensor's largest
/// |value|: their rounding error scales with the sum of |terms|, not with the (often cancelling)
/// result, so an element-relative bound is ill-posed for small elements. Measured, in these
/// units, on cpu and wgpu/lavapipe at V up to 128256 over three runs: ≤ 4.8e-5 (wgpu, the dense
/// oracle's `dhidden` at 9×16×128256; the fused op's worst is 3.4e-5 there, 1e-5 on cpu), so
/// this bound is about 10× the measurement.
/// Applied as `atol = SCALED_SUM_F32.atol · max|want|`, `rtol = 0`.
pub(crate) const SCALED_SUM_F32: Tol = Tol {
    atol: 5e-4,
    rtol: 0.0,
};

// ---------------------------------------------------------------------------------------------
// Seeds and random inputs.

/// The run's base seed: `WRPO_TEST_SEED` if set, else the clock. Printed by every test.
pub(crate) fn base_seed() -> u64 {
    match std::env::var("WRPO_TEST_SEED") {
        Ok(s) => s.trim().parse().expect("WRPO_TEST_SEED must be a u64"),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed),
    }
}

/// SplitMix64: small, seedable, good enough for test inputs.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub(crate) fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }
    /// Uniform in `0..n`.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n
    }
}

// ---------------------------------------------------------------------------------------------
// Comparison.

/// Largest errors of one comparison.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Errors {
    pub(crate) max_abs: f64,
    pub(crate) max_rel: f64,
}

/// Compare elementwise; on failure panic with the count of bad elements, the worst index (in
/// `dims` coordinates) and both values there. Non-finite `got` always fails.
pub(crate) fn check(what: &str, got: &[f32], want: &[f64], dims: &[usize], tol: Tol) -> Errors {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert_eq!(got.len(), dims.iter().product::<usize>(), "{what}: dims");
    let (mut bad, mut worst, mut worst_excess) = (0usize, None, f64::NEG_INFINITY);
    let (mut max_abs, mut max_rel) = (0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        let err = (g - w).abs();
        let allowed = tol.atol + tol.rtol * w.abs();
        let excess = if g.is_finite() {
            err - allowed
        } else {
            f64::INFINITY
        };
        if excess > 0.0 {
            bad += 1;
        }
        if excess > worst_excess {
            worst_excess = excess;
            worst = Some(i);
        }
        if g.is_finite() {
            max_abs = max_abs.max(err);
            max_rel = max_rel.max(err / w.abs().max(tol.atol));
        }
    }
    if bad > 0 {
        let i = worst.expect("a worst element");
        let mut idx = vec![0; dims.len()];
        let mut rest = i;
        for (k, d) in dims.iter().enumerate().rev() {
            idx[k] = rest % d;
            rest /= d;
        }
        panic!(
            "{what}: {bad} of {} elements outside atol {:e} + rtol {:e}; worst at {idx:?}: got {}, want {}",
            got.len(),
            tol.atol,
            tol.rtol,
            got[i],
            want[i]
        );
    }
    Errors { max_abs, max_rel }
}

/// Widen for comparisons against an f64 oracle.
pub(crate) fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// A tensor's values on the host, as f32.
pub(crate) fn host<B: Backend, const D: usize>(x: Tensor<B, D>) -> Vec<f32> {
    x.into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 tensor data")
}

/// [`check`] of a gradient under [`SCALED_SUM_F32`]: the tolerance is in units of `want`'s largest
/// |value|; the returned `max_abs` is in those units too.
pub(crate) fn check_grad(what: &str, got: &[f32], want: &[f64], dims: &[usize]) -> Errors {
    let scale = want
        .iter()
        .fold(0f64, |m, w| m.max(w.abs()))
        .max(f64::MIN_POSITIVE);
    let tol = Tol {
        atol: SCALED_SUM_F32.atol * scale,
        rtol: 0.0,
    };
    let e = check(
        &format!("{what} (max |want| {scale:.3e})"),
        got,
        want,
        dims,
        tol,
    );
    Errors {
        max_abs: e.max_abs / scale,
        max_rel: e.max_rel,
    }
}
