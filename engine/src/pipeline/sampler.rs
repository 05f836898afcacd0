//! Next-token choice on the host: greedy, or temperature → top-k → top-p sampling, in the order
//! of transformers' logits warpers (`TemperatureLogitsWarper`, `TopKLogitsWarper`,
//! `TopPLogitsWarper`) and vLLM.
//!
//! - temperature 0: greedy, the first index of the largest logit (`torch.argmax`).
//! - top-k (0 = off): keep the k largest logits.
//! - top-p (1 = off): keep the smallest set of most likely tokens whose probability sums to at
//!   least p (at least one token).
//!
//! Probabilities are computed in f64 from the f32 logits. Candidates are ranked by logit, ties by
//! lower id, so a draw depends only on the logits and the random number.

use rand::Rng;

/// Sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature; 0 = greedy.
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 = off.
    pub top_p: f64,
    /// Candidates kept by logit; 0 = off.
    pub top_k: usize,
}

impl SamplerConfig {
    /// Check the ranges.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.temperature >= 0.0 && self.temperature.is_finite(),
            "--temperature must be ≥ 0 (0 = greedy), got {}",
            self.temperature
        );
        anyhow::ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "--top-p must be in (0, 1], got {}",
            self.top_p
        );
        Ok(())
    }
}

/// The first index of the largest value (NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// Pick the next token from one row of logits.
pub fn pick(cfg: &SamplerConfig, logits: &[f32], rng: &mut impl Rng) -> u32 {
    if cfg.temperature == 0.0 {
        return argmax(logits);
    }
    let (ids, probs) = candidates(cfg, logits);
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (&id, &p) in ids.iter().zip(&probs) {
        if u < p {
            return id;
        }
        u -= p;
    }
    *ids.last().expect("at least one candidate")
}

/// The kept candidates, most likely first, with their unnormalised probabilities.
pub fn candidates(cfg: &SamplerConfig, logits: &[f32]) -> (Vec<u32>, Vec<f64>) {
    let t = cfg.temperature;
    let max = logits
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let weight = |x: f32| {
        if x.is_nan() {
            0.0
        } else {
            ((x as f64 - max) / t).exp()
        }
    };
    let v = logits.len();
    let k = if cfg.top_k == 0 { v } else { cfg.top_k.min(v) };
    let order = |a: &u32, b: &u32| {
        let (x, y) = (logits[*a as usize], logits[*b as usize]);
        y.partial_cmp(&x)
            .unwrap_or_else(|| x.is_nan().cmp(&y.is_nan()))
            .then(a.cmp(b))
    };
    let mut ids: Vec<u32> = (0..v as u32).collect();
    if cfg.top_p >= 1.0 {
        // Plain softmax over the top k: no ranking needed beyond the cut.
        if k < v {
            ids.select_nth_unstable_by(k - 1, order);
            ids.truncate(k);
        }
        ids.sort_unstable_by(order);
        let probs = ids.iter().map(|&i| weight(logits[i as usize])).collect();
        return (ids, probs);
    }
    // Top-p needs the candidates ranked; rank a growing prefix until it holds mass p of the
    // top-k distribution (usually a few dozen tokens, not the whole vocabulary).
    let mass_k: f64 = if k == v {
        logits.iter().map(|&x| weight(x)).sum()
    } else {
        ids.select_nth_unstable_by(k - 1, order);
        ids.truncate(k);
        ids.iter().map(|&i| weight(logits[i as usize])).sum()
    };
    let mut m = 64.min(ids.len());
    loop {
        if m < ids.len() {
            ids.select_nth_unstable_by(m - 1, order);
        }
        ids[..m].sort_unstable_by(order);
        let mut acc = 0.0;
        for (n, &i) in ids[..m].iter().enumerate() {
            acc += weight(logits[i as usize]);
            if acc >= cfg.top_p * mass_k {
                ids.truncate(n + 1);
                let probs = ids.iter().map(|&i| weight(logits[i as usize])).collect();
                return (ids, probs);
            }
        }
        if m == ids.len() {
            // Rounding left the sum a hair under p·mass: everything is kept.
            let probs = ids.iter().map(|&i| weight(logits[i as usize])).collect();
            return (ids, probs);
        }
        m = (m * 4).min(ids.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    fn cfg(temperature: f64, top_p: f64, top_k: usize) -> SamplerConfig {
        SamplerConfig {
            temperature,
            top_p,
            top_k,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0]), 1);
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(pick(&cfg(0.0, 0.5, 1), &[0.0, 3.0, 1.0, 3.0], &mut rng), 1);
    }

    #[test]
    fn top_k_and_top_p_keep_the_right_sets() {
        // probs ∝ [1, 2, 4, 8, 16] (logits ln of those): sorted 16, 8, 4, 2, 1 of 31.
        let logits: Vec<f32> = [1.0f32, 2.0, 4.0, 8.0, 16.0]
            .iter()
            .map(|x| x.ln())
            .collect();
        let (ids, _) = candidates(&cfg(1.0, 1.0, 2), &logits);
        assert_eq!(ids, vec![4, 3]);
        // 16/31 = 0.516 < 0.6 ≤ 24/31 = 0.774: two tokens.
        let (ids, _) = candidates(&cfg(1.0, 0.6, 0), &logits);
        assert_eq!(ids, vec![4, 3]);
        // Exactly 0.516… is enough for one token.
        let (ids, _) = candidates(&cfg(1.0, 16.0 / 31.0 - 1e-9, 0), &logits);
        assert_eq!(ids, vec![4]);
        // top-p within top-k: of {16, 8, 4} (28), 0.6·28 = 16.8 needs two.
        let (ids, _) = candidates(&cfg(1.0, 0.6, 3), &logits);
        assert_eq!(ids, vec![4, 3]);
        // Everything with p = 1; ties ranked by id.
        let (ids, _) = candidates(&cfg(1.0, 1.0, 0), &[0.5, 0.5, 0.0]);
        assert_eq!(ids, vec![0, 1, 2]);
    }

    #[test]
    fn top_p_over_a_large_flat_vocabulary_grows_the_prefix() {
        // 1000 equal logits: p = 0.5 keeps 500 tokens (beyond the first 64-token prefix).
        let logits = vec![0.25f32; 1000];
        let (ids, _) = candidates(&cfg(0.7, 0.5, 0), &logits);
        assert_eq!(ids.len(), 500);
        assert_eq!(ids[..3], [0, 1, 2]);
    }

    #[test]
    fn sampling_frequencies_follow_the_tempered_distribution() {
        // logits [0, ln 3] at temperature 1 → probs 1/4, 3/4; at temperature 2 → ∝ 1, √3.
        let logits = [0.0f32, 3.0f32.ln()];
        let mut rng = StdRng::seed_from_u64(7);
        let n = 20000;
        let ones = (0..n)
            .filter(|_| pick(&cfg(1.0, 1.0, 0), &logits, &mut rng) == 1)
            .count() as f64
            / n as f64;
        assert!((ones - 0.75).abs() < 0.015, "{ones}");
        let ones = (0..n)
            .filter(|_| pick(&cfg(2.0, 1.0, 0), &logits, &mut rng) == 1)
            .count() as f64
            / n as f64;
        let want = 3f64.sqrt() / (1.0 + 3f64.sqrt());
        assert!((ones - want).abs() < 0.015, "{ones} vs {want}");
        // Same seed, same draws.
        let a: Vec<u32> = {
            let mut r = StdRng::seed_from_u64(3);
            (0..50)
                .map(|_| pick(&cfg(1.0, 0.9, 0), &logits, &mut r))
                .collect()
        };
        let b: Vec<u32> = {
            let mut r = StdRng::seed_from_u64(3);
            (0..50)
                .map(|_| pick(&cfg(1.0, 0.9, 0), &logits, &mut r))
                .collect()
        };
        assert_eq!(a, b);
    }
}
