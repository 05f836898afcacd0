//! Up-front memory checks: the largest single device buffers that one step allocates, checked
//! against the largest buffer the device allows (wgpu adapters have such a limit, Mesa lavapipe's
//! is under 256 MiB; on the CPU it is the host's available memory) before any weight is loaded,
//! so a run that cannot allocate them stops with the setting to change instead of failing inside
//! the backend (or being killed by the OOM killer).
//!
//! Shapes: `N` sequences in one forward, `T` their padded length, `V` vocabulary, `H` hidden,
//! `I` MLP width, `NH` attention heads.

pub mod plan;

use anyhow::{bail, Result};
use wrpo_kernels::attention::AttentionImpl;
use wrpo_models::LlamaConfig;

use crate::logps::{Head, HeadImpl};

/// One buffer of a step: what it holds, its size, and the setting that shrinks it.
#[derive(Debug, Clone, PartialEq)]
pub struct Buffer {
    /// What the buffer holds, with its shape.
    pub what: String,
    /// Size in bytes (f32 elements).
    pub bytes: u64,
    /// What makes it smaller.
    pub fix: String,
}

fn bytes(dims: &[usize]) -> u64 {
    dims.iter().fold(4u64, |p, &d| p.saturating_mul(d as u64))
}

/// The largest buffers of one forward + backward of `n` sequences of `t` tokens: the largest
/// weight, the LM head's logits (all of them, or one fused block), the dense attention scores
/// where the dense attention runs, and the widest activation.
pub fn step_buffers(
    cfg: &LlamaConfig,
    n: usize,
    t: usize,
    head: Head,
    attn: AttentionImpl,
) -> Vec<Buffer> {
    let (v, h, i, nh) = (
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
    );
    let mut out = vec![Buffer {
        what: format!("the embedding [V {v}, H {h}] (and its gradient and AdamW moments)"),
        bytes: bytes(&[v, h]),
        fix: "a device without this buffer limit (cuda), or a smaller model".into(),
    }];
    out.push(match head.imp {
        HeadImpl::Dense => Buffer {
            what: format!("the dense LM head's logits [N {n}, T {t}, V {v}]"),
            bytes: bytes(&[n, t, v]),
            fix: "--lm-head-impl fused, or a smaller --per-device-train-batch-size / --max-length"
                .into(),
        },
        HeadImpl::Fused => {
            let chunk = head.chunk_for(v);
            Buffer {
                what: format!("one block of the fused LM head [{chunk} positions, V {v}]"),
                bytes: bytes(&[chunk, v]),
                fix: "a smaller --lm-head-chunk".into(),
            }
        }
    });
    if attn == AttentionImpl::Dense {
        out.push(Buffer {
            what: format!("the dense attention scores [N {n}, NH {nh}, T {t}, T {t}]"),
            bytes: bytes(&[n, nh, t, t]),
            fix: "--attn-implementation tiled, or a smaller --per-device-train-batch-size / --max-length"
                .into(),
        });
    }
    out.push(Buffer {
        what: format!("the MLP activations [N {n}, T {t}, I {i}]"),
        bytes: bytes(&[n, t, i]),
        fix: "a smaller --per-device-train-batch-size or --max-length".into(),
    });
    out
}

/// Fail, naming every buffer over `limit` and its fix, when the device has a buffer limit.
pub fn check_buffers(limit: Option<u64>, device: &str, buffers: &[Buffer]) -> Result<()> {
    let Some(limit) = limit else { return Ok(()) };
    let mib = |b: u64| b as f64 / 1048576.0;
    let over: Vec<String> = buffers
        .iter()
        .filter(|b| b.bytes > limit)
        .map(|b| format!("{} needs {:.0} MiB (use {})", b.what, mib(b.bytes), b.fix))
        .collect();
    if !over.is_empty() {
        bail!(
            "{device} can allocate at most {:.0} MiB in one buffer, and this run needs larger ones: {}",
            mib(limit),
            over.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FUSED: Head = Head {
        imp: HeadImpl::Fused,
        chunk: 0,
    };

    fn cfg(v: usize, h: usize, i: usize, nh: usize) -> LlamaConfig {
        LlamaConfig::tiny(v, h, i, 2, nh, nh, false)
    }

    #[test]
    fn names_the_buffers_over_the_limit_and_their_fix() {
        // Llama-3 vocabulary, hidden 256: the embedding is 125.25 MiB; 6 sequences × 256 tokens
        // of dense logits are 751.5 MiB.
        let c = cfg(128256, 256, 688, 4);
        let dense = Head {
            imp: HeadImpl::Dense,
            chunk: 0,
        };
        let b = step_buffers(&c, 6, 256, dense, AttentionImpl::Dense);
        assert_eq!(b[0].bytes, 128256 * 256 * 4);
        assert_eq!(b[1].bytes, 6 * 256 * 128256 * 4);
        assert_eq!(b[2].bytes, 6 * 4 * 256 * 256 * 4);
        assert_eq!(b[3].bytes, 6 * 256 * 688 * 4);
        let e = check_buffers(Some(128 << 20), "wgpu (lavapipe)", &b)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("wgpu (lavapipe) can allocate at most 128 MiB in one buffer"),
            "{e}"
        );
        assert!(
            e.contains("[N 6, T 256, V 128256] needs 752 MiB (use --lm-head-impl fused"),
            "{e}"
        );
        assert!(
            !e.contains("embedding") && !e.contains("attention scores"),
            "{e}"
        );
        // No limit (cpu, cuda): nothing to check.
        check_buffers(None, "cpu", &b).unwrap();
        // The fused head's block fits where the dense logits do not.
        let fused = step_buffers(&c, 6, 256, FUSED, AttentionImpl::Dense);
        check_buffers(Some(128 << 20), "wgpu", &fused).unwrap();
    }

    #[test]
    fn sizes_saturate_instead_of_overflowing() {
        let c = cfg(usize::MAX / 2, 8, 8, 1);
        let b = step_buffers(&c, usize::MAX, usize::MAX, FUSED, AttentionImpl::Dense);
        assert!(b.iter().all(|b| b.bytes == u64::MAX || b.bytes > 0));
        assert!(check_buffers(Some(1 << 30), "wgpu", &b).is_err());
    }
}
