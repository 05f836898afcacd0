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
