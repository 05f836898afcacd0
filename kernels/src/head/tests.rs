//! Parity tests of the fused LM head + log-probs.
//!
//! For each backend (cpu = burn-flex, wgpu = whatever adapter wgpu picks — Mesa lavapipe without a
//! GPU —, cuda `#[ignore]`d without a GPU) and each shape:
//! - forward `logp` and the saved `lse` of [`HeadLogProbBackend::head_logprobs_forward`];
//! - under `Autodiff`, the gradients by name — `dhidden` and `dweight` (`dW_head`) — of
//!   `loss = Σ_m g[m]·logp[m]` (random `g`);
//!
//! each against an f64 host computation and against the dense path ([`head_logprobs_dense`]: the
//! whole logits, then the composite log-probs) differentiated by Burn's autodiff on the same
//! backend. Shapes are ugly on purpose: positions not a multiple of the block, one position per
//! block, ignored labels present, odd hidden and vocabulary sizes, a 128k vocabulary. Inputs are
//! fresh per run (seed printed; `WRPO_TEST_SEED` replays). Log-probs use the fp32 table; the
//! gradients, sums over the vocabulary or the positions, use `SCALED_SUM_F32` (in units of the
//! tensor's largest value; its reason is in `test_util`).

use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData, TensorPrimitive};

use super::*;
use crate::test_util::{base_seed, check, check_grad, host, to_f64, Errors, Rng, FP32};
use crate::IGNORE_INDEX;

/// One test shape.
#[derive(Debug, Clone, Copy)]
struct Case {
    m: usize,
    h: usize,
    v: usize,
    /// Positions per block.
    chunk: usize,
    /// Fraction of positions labelled [`IGNORE_INDEX`].
    ignored: f64,
}

struct Inputs {
    /// `[M, H]`
    hidden: Vec<f32>,
    /// `[V, H]`
    weight: Vec<f32>,
    /// `[M]`
    labels: Vec<i64>,
    /// `[M]`, the loss weights `g`.
    g: Vec<f32>,
}

fn make_inputs(c: Case, seed: u64) -> Inputs {
    let mut rng = Rng(seed);
    // Logits of spread ~3 around a per-vocabulary-entry offset: some entries dominate, as in a
    // trained head.
    let hidden = (0..c.m * c.h).map(|_| rng.normal() as f32).collect();
    let scale = 3.0 / (c.h as f64).sqrt();
    let weight = (0..c.v * c.h)
        .map(|_| (scale * rng.normal()) as f32)
        .collect();
    let mut labels: Vec<i64> = (0..c.m)
        .map(|_| {
            if rng.uniform() < c.ignored {
                IGNORE_INDEX
            } else {
                rng.below(c.v) as i64
            }
        })
        .collect();
    labels[0] = c.v as i64 - 1; // the last column, a boundary
    if c.m > 1 && c.ignored > 0.0 {
        labels[1] = IGNORE_INDEX;
    }
    let g = (0..c.m).map(|_| rng.normal() as f32).collect();
    Inputs {
        hidden,
        weight,
        labels,
        g,
    }
}

/// f64 host oracle.
struct Expected {
    logp: Vec<f64>,
    lse: Vec<f64>,
    dhidden: Vec<f64>,
    dweight: Vec<f64>,
}

fn expected(c: Case, inp: &Inputs) -> Expected {
    let (m, h, v) = (c.m, c.h, c.v);
    let mut logp = vec![0.0; m];
    let mut lse = vec![0.0; m];
    let mut dhidden = vec![0.0; m * h];
    let mut dweight = vec![0.0; v * h];
    let mut z = vec![0.0f64; v];
    for i in 0..m {
        let y = inp.labels[i];
        if y == IGNORE_INDEX {
            continue;
        }
        let hi = &inp.hidden[i * h..(i + 1) * h];
        for (j, zj) in z.iter_mut().enumerate() {
            let wj = &inp.weight[j * h..(j + 1) * h];
            *zj = hi.iter().zip(wj).map(|(&a, &b)| a as f64 * b as f64).sum();
        }
        let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let l = mx + z.iter().map(|&x| (x - mx).exp()).sum::<f64>().ln();
        lse[i] = l;
        logp[i] = z[y as usize] - l;
        let g = inp.g[i] as f64;
        for (j, &zj) in z.iter().enumerate() {
            let hot = if j as i64 == y { 1.0 } else { 0.0 };
            let dz = g * (hot - (zj - l).exp());
            for k in 0..h {
                dhidden[i * h + k] += dz * inp.weight[j * h + k] as f64;
                dweight[j * h + k] += dz * hi[k] as f64;
            }
        }
    }
    Expected {
        logp,
        lse,
        dhidden,
        dweight,
    }
}

fn tensors<B: Backend>(
    c: Case,
    inp: &Inputs,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 1, Int>, Tensor<B, 1>) {
    (
        Tensor::from_data(TensorData::new(inp.hidden.clone(), [c.m, c.h]), device),
        Tensor::from_data(TensorData::new(inp.weight.clone(), [c.v, c.h]), device),
        Tensor::from_data(TensorData::new(inp.labels.clone(), [c.m]), device),
        Tensor::from_data(TensorData::new(inp.g.clone(), [c.m]), device),
    )
}

/// `(logp, dhidden, dweight)` of `loss = Σ g·logp` under autodiff, through `f`.
fn grads_of<B: Backend>(
    c: Case,
    inp: &Inputs,
    device: &B::Device,
    f: impl Fn(
        Tensor<Autodiff<B>, 2>,
        Tensor<Autodiff<B>, 2>,
        Tensor<Autodiff<B>, 1, Int>,
    ) -> Tensor<Autodiff<B>, 1>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (hidden, weight, labels, g) = tensors::<Autodiff<B>>(c, inp, device);
    let (hidden, weight) = (hidden.require_grad(), weight.require_grad());
    let logp = f(hidden.clone(), weight.clone(), labels);
    let grads = (logp.clone() * g).sum().backward();
    let dh = hidden.grad(&grads).expect("dhidden");
    let dw = weight.grad(&grads).expect("dweight");
    (host(logp), host(dh), host(dw))
}

/// Run one case on one backend and check everything by name; prints the measured errors.
fn parity<B: HeadLogProbBackend>(backend: &str, device: &B::Device, c: Case, salt: u64) {
    let base = base_seed();
    let seed = base ^ salt;
    let Case { m, h, v, chunk, .. } = c;
    let name = format!("{backend} M{m} H{h} V{v} chunk {chunk}");
    println!("[{name}] seed {seed} (replay: WRPO_TEST_SEED={base})");
    let inp = make_inputs(c, seed);
    let want = expected(c, &inp);
    let tag = |what: &str| format!("[{name} seed {seed}] {what}");

    // Forward on the inner backend.
    let (hidden, weight, labels, _) = tensors::<B>(c, &inp, device);
    let (logp, lse) = B::head_logprobs_forward(
        hidden.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        labels.into_primitive(),
        chunk,
    );
    let logp = host(Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(logp)));
    let lse = host(Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(lse)));
    let e_logp = check(&tag("logp vs f64"), &logp, &want.logp, &[m], FP32);
    let e_lse = check(&tag("lse vs f64"), &lse, &want.lse, &[m], FP32);

    // Gradients under autodiff: the fused op and the dense oracle.
    let (f_logp, f_dh, f_dw) =
        grads_of::<B>(c, &inp, device, |h, w, y| head_logprobs(h, w, y, chunk));
    let (d_logp, d_dh, d_dw) = grads_of::<B>(c, &inp, device, head_logprobs_dense);
    let e_f_logp = check(
        &tag("autodiff logp vs f64"),
        &f_logp,
        &want.logp,
        &[m],
        FP32,
    );
    let e_dh = check_grad(&tag("dhidden vs f64"), &f_dh, &want.dhidden, &[m, h]);
    let e_dw = check_grad(&tag("dweight vs f64"), &f_dw, &want.dweight, &[v, h]);
    let d_logp_e = check(&tag("logp vs dense"), &f_logp, &to_f64(&d_logp), &[m], FP32);
    let d_dh_e = check_grad(&tag("dhidden vs dense"), &f_dh, &to_f64(&d_dh), &[m, h]);
    let d_dw_e = check_grad(&tag("dweight vs dense"), &f_dw, &to_f64(&d_dw), &[v, h]);
    // The oracle must agree with f64 too (a broken oracle would hide a broken op).
    let o_dh = check_grad(&tag("dense dhidden vs f64"), &d_dh, &want.dhidden, &[m, h]);
    let o_dw = check_grad(&tag("dense dweight vs f64"), &d_dw, &want.dweight, &[v, h]);
    let abs = |e: Errors| e.max_abs;
    println!(
        "[{name}] max abs err (gradients in units of their largest |value|) — vs f64: logp {:.2e}, lse {:.2e}, autodiff logp {:.2e}, dhidden {:.2e}, dweight {:.2e}; \
         vs dense: logp {:.2e}, dhidden {:.2e}, dweight {:.2e}; dense vs f64: dhidden {:.2e}, dweight {:.2e}",
        abs(e_logp),
        abs(e_lse),
        abs(e_f_logp),
        abs(e_dh),
        abs(e_dw),
        abs(d_logp_e),
        abs(d_dh_e),
        abs(d_dw_e),
        abs(o_dh),
        abs(o_dw)
    );
}

/// A frozen head (weight without gradient, as under LoRA or for a reference model), stored in
/// `dtype` (f32, or half precision as a frozen base keeps it): only `dhidden` is computed, and
/// it and `logp` match the f64 oracle over the stored values.
fn frozen_weight<B: HeadLogProbBackend>(
    backend: &str,
    device: &B::Device,
    dtype: burn::tensor::DType,
    salt: u64,
) {
    let c = UGLY;
    let seed = base_seed() ^ salt;
    let name = format!("{backend} frozen {dtype:?} head");
    println!("[{name}] seed {seed}");
    if !B::supports_dtype(device, dtype) {
        println!("[{name}] SKIPPED: the device does not store {dtype:?}");
        return;
    }
    let mut inp = make_inputs(c, seed);
    let (hidden, weight, labels, g) = tensors::<Autodiff<B>>(c, &inp, device);
    let weight = weight.cast(dtype);
    inp.weight = host(weight.clone()); // the stored values
    let want = expected(c, &inp);
    let hidden = hidden.require_grad();
    let logp = head_logprobs(hidden.clone(), weight.clone(), labels, c.chunk);
    let grads = (logp.clone() * g).sum().backward();
    assert!(
        weight.grad(&grads).is_none(),
        "a frozen head gets no gradient"
    );
    let tag = format!("[{name} seed {seed}]");
    let e_logp = check(
        &format!("{tag} logp vs f64"),
        &host(logp),
        &want.logp,
        &[c.m],
        FP32,
    );
    let dh = host(hidden.grad(&grads).expect("dhidden"));
    let e = check_grad(
        &format!("{tag} dhidden vs f64"),
        &dh,
        &want.dhidden,
        &[c.m, c.h],
    );
    println!(
        "[{name}] max abs err logp {:.2e}, dhidden {:.2e}",
        e_logp.max_abs, e.max_abs
    );
}

/// Positions not a multiple of the block, odd sizes, ignored labels.
const UGLY: Case = Case {
    m: 47,
    h: 31,
    v: 123,
    chunk: 8,
    ignored: 0.2,
};
/// One position per block.
const ONE_PER_BLOCK: Case = Case {
    m: 5,
    h: 7,
    v: 11,
    chunk: 1,
    ignored: 0.3,
};
/// A LLaMA-2-sized vocabulary with the automatic block (one block: 64 < 524).
const REALISTIC_AUTO: Case = Case {
    m: 64,
    h: 64,
    v: 32000,
    chunk: 524,
    ignored: 0.0,
};
/// The same with several blocks and a short last one.
const REALISTIC_BLOCKS: Case = Case {
    m: 64,
    h: 64,
    v: 32000,
    chunk: 24,
    ignored: 0.1,
};
/// LLaMA-3's vocabulary.
const LARGE_VOCAB: Case = Case {
    m: 9,
    h: 16,
    v: 128_256,
    chunk: 4,
    ignored: 0.2,
};

macro_rules! parity_tests {
    ($backend:literal, $ty:ty, $device:expr $(, #[$attr:meta])?) => {
        #[test] $(#[$attr])?
        fn ugly_47x31x123_chunk_8() {
            parity::<$ty>($backend, &$device, UGLY, 11);
        }
        #[test] $(#[$attr])?
        fn one_position_per_block_5x7x11() {
            parity::<$ty>($backend, &$device, ONE_PER_BLOCK, 12);
        }
        #[test] $(#[$attr])?
        fn realistic_64x64x32000_auto_chunk() {
            assert_eq!(default_chunk(32000), REALISTIC_AUTO.chunk);
            parity::<$ty>($backend, &$device, REALISTIC_AUTO, 13);
        }
        #[test] $(#[$attr])?
        fn realistic_64x64x32000_chunk_24() {
            parity::<$ty>($backend, &$device, REALISTIC_BLOCKS, 14);
        }
        #[test] $(#[$attr])?
        fn large_vocab_9x16x128256_chunk_4() {
            parity::<$ty>($backend, &$device, LARGE_VOCAB, 15);
        }
        #[test] $(#[$attr])?
        fn frozen_head_gets_no_gradient() {
            frozen_weight::<$ty>($backend, &$device, burn::tensor::DType::F32, 16);
        }
        #[test] $(#[$attr])?
        fn frozen_f16_head_is_widened() {
            frozen_weight::<$ty>($backend, &$device, burn::tensor::DType::F16, 17);
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
    type B = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
    parity_tests!("wgpu", B, burn::backend::wgpu::WgpuDevice::DefaultDevice);
}

mod cuda {
    use super::*;
    type B = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
    parity_tests!("cuda", B, burn::backend::cuda::CudaDevice::new(0), #[ignore = "needs CUDA: skipped without a GPU; run `cargo test -- --ignored cuda` on one"]);
}

#[test]
fn default_chunk_follows_the_vocabulary() {
    assert_eq!(default_chunk(128_256), 130);
    assert_eq!(default_chunk(32_000), 524);
    assert_eq!(default_chunk(1 << 30), 1, "at least one position");
    assert_eq!(default_chunk(0), DEFAULT_CHUNK_ELEMENTS);
}
