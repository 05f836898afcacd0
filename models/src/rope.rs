//! Rotary position embeddings, transformers' "rotate half" convention.
//!
//! Source: transformers `modeling_rope_utils.py` (`_compute_default_rope_parameters`,
//! `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`) and
//! `LlamaRotaryEmbedding.forward`. Frequencies and angles are computed on the host in f32, in the
//! same order of operations as transformers, so positions match it bit for bit or within an ulp.

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::config::{LlamaConfig, RopeKind};

/// `inv_freq[i]`, `i < HD/2`, after the configured scaling.
pub fn inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let dim = cfg.head_dim as f32;
    let base = cfg.rope_theta as f32;
    let plain = (0..cfg.head_dim)
        .step_by(2)
        .map(|i| 1.0f32 / base.powf(i as f32 / dim));
    match cfg.rope {
        RopeKind::Default => plain.collect(),
        RopeKind::Linear { factor } => plain.map(|f| f / factor as f32).collect(),
        RopeKind::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high, old) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                original_max_position_embeddings as f32,
            );
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            plain
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    // transformers: `~(wavelen < high) * ~(wavelen > low)`; wavelengths are finite, so this is the closed range.
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// `cos` and `sin` tables for positions `0..t`.
///
/// # Shapes
/// - returns (`[T, HD]`, `[T, HD]`): `emb = cat(freqs, freqs)` as in transformers
pub fn tables<B: Backend>(
    cfg: &LlamaConfig,
    t: usize,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let positions: Vec<usize> = (0..t).collect();
    tables_at(cfg, &positions, device)
}

/// `cos` and `sin` tables for arbitrary positions (one row per entry of `positions`), e.g. the
/// per-row positions of a left-padded batch.
///
/// # Shapes
/// - returns (`[N, HD]`, `[N, HD]`), `N = positions.len()`
pub fn tables_at<B: Backend>(
    cfg: &LlamaConfig,
    positions: &[usize],
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let inv = inv_freq(cfg);
    let hd = cfg.head_dim;
    let n = positions.len();
    let mut cos = Vec::with_capacity(n * hd);
    let mut sin = Vec::with_capacity(n * hd);
    for &p in positions {
        for _half in 0..2 {
            for f in &inv {
                // transformers: `inv_freq @ position_ids` in f32, one product per entry.
                let angle = f * p as f32;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [n, hd]), device),
        Tensor::from_data(TensorData::new(sin, [n, hd]), device),
    )
}

/// Apply RoPE: `x·cos + rotate_half(x)·sin`, `rotate_half(x) = cat(−x₂, x₁)`.
///
/// # Shapes
/// - `x`: `[B, NH, T, HD]`; `cos`, `sin`: `[T, HD]`; returns `[B, NH, T, HD]`
pub fn apply<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 4> {
    apply4(
        x,
        &cos.clone().unsqueeze::<4>(),
        &sin.clone().unsqueeze::<4>(),
    )
}

/// [`apply`] with tables already broadcastable to `x`: `[1, 1, T, HD]` (shared positions) or
/// `[B, 1, T, HD]` (per-row positions).
///
/// # Shapes
/// - `x`: `[B, NH, T, HD]`; returns `[B, NH, T, HD]`
pub fn apply4<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let [_, _, _, hd] = x.dims();
    let half = hd / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rope: &str) -> LlamaConfig {
        LlamaConfig::from_json(&format!(
            r#"{{"vocab_size":10,"hidden_size":64,"intermediate_size":16,"num_hidden_layers":1,
                "num_attention_heads":2,"rope_theta":500000.0,"rope_scaling":{rope}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn llama3_scaling_regions() {
        // With original context 32, low wavelen = 32, high wavelen = 8: frequencies with
        // wavelength < 8 are untouched, > 32 divided by the factor, in between interpolated.
        let plain = inv_freq(&cfg("null"));
        let scaled = inv_freq(&cfg(
            r#"{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
                "original_max_position_embeddings":32}"#,
        ));
        let mut seen = [false; 3];
        for (p, s) in plain.iter().zip(&scaled) {
            let wl = 2.0 * std::f32::consts::PI / p;
            if wl < 8.0 {
                assert_eq!(p, s);
                seen[0] = true;
            } else if wl > 32.0 {
                assert!((s - p / 8.0).abs() <= 1e-12 + p.abs() * 1e-6);
                seen[2] = true;
            } else {
                assert!(*s < *p && *s > p / 8.0, "{s} not between {p}/8 and {p}");
                seen[1] = true;
            }
        }
        assert_eq!(seen, [true, true, true]);
        let lin = inv_freq(&cfg(r#"{"type":"linear","factor":4.0}"#));
        assert!(lin
            .iter()
            .zip(&plain)
            .all(|(l, p)| (l * 4.0 - p).abs() <= p * 1e-6));
    }
}
