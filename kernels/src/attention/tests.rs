//! Parity tests of the training attention: the FlashAttention-2 CubeCL kernels (wgpu, cuda) and
//! the tiled composite (cpu, and the kernels' oracle).
//!
//! For each backend (cpu = burn-flex, wgpu = whatever adapter wgpu picks — Mesa lavapipe without a
//! GPU —, cuda `#[ignore]`d without a GPU) and each case:
//! - forward `out` and the saved `lse` of [`AttentionBackend::attention_forward`];
//! - under `Autodiff`, the gradients by name — `dq`, `dk`, `dv` — of `loss = Σ g∘out` (random
//!   `g`);
//!
//! each against an f64 host computation and against the dense path ([`attention_dense`]: full
//! scores with a device-built mask, `repeat_kv`, softmax) differentiated by Burn's autodiff on the
//! same backend, and against the tiled composite ([`reference`]) forward and backward on the same
//! backend; the dense path and the composite are themselves checked against f64. Cases cover causal-only MHA, GQA
//! and MQA, right padding, packed segments with trailing padding, head dim 128, one query per
//! block, a block longer than the sequence, and several query blocks and key tiles of the kernels
//! (T 100), at lengths that are not multiples of the block.
//! Inputs are fresh per run (seed printed; `WRPO_TEST_SEED` replays). Outputs and `lse` use the
//! fp32 table; gradients, sums over keys or queries, `SCALED_SUM_F32`.

use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData, TensorPrimitive};

use super::*;
use crate::test_util::{base_seed, check, check_grad, host, to_f64, Rng, FP32};

/// How the rows are masked.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// Causal only: every segment id 1.
    Causal,
    /// Right padding of random lengths (row 0 full): `q_seg = 1`, `k_seg = 1` at real tokens.
    Padded,
    /// Packed examples of 1..=12 tokens with ids from 1, trailing padding (id 0) in odd rows.
    Packed,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    hd: usize,
    block: usize,
    layout: Layout,
}

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    g: Vec<f32>,
    q_seg: Vec<i64>,
    k_seg: Vec<i64>,
}

fn make_inputs(c: Case, seed: u64) -> Inputs {
    let mut rng = Rng(seed);
    let mut normal =
        |n: usize, s: f64| -> Vec<f32> { (0..n).map(|_| (s * rng.normal()) as f32).collect() };
    // Queries scaled ×2: peaked softmax rows, as in trained models.
    let q = normal(c.b * c.nh * c.t * c.hd, 2.0);
    let k = normal(c.b * c.nkv * c.t * c.hd, 1.0);
    let v = normal(c.b * c.nkv * c.t * c.hd, 1.0);
    let g = normal(c.b * c.nh * c.t * c.hd, 1.0);
    let mut rng = Rng(seed ^ 0xa77e);
    let (mut q_seg, mut k_seg) = (Vec::new(), Vec::new());
    for row in 0..c.b {
        match c.layout {
            Layout::Causal => {
                q_seg.extend(std::iter::repeat_n(1, c.t));
                k_seg.extend(std::iter::repeat_n(1, c.t));
            }
            Layout::Padded => {
                let len = if row == 0 { c.t } else { 1 + rng.below(c.t) };
                q_seg.extend(std::iter::repeat_n(1, c.t));
                k_seg.extend((0..c.t).map(|j| i64::from(j < len)));
            }
            Layout::Packed => {
                let pad = if row % 2 == 1 {
                    1 + rng.below(c.t / 3)
                } else {
                    0
                };
                let (mut seg, mut id, mut left) = (Vec::new(), 1, 0);
                while seg.len() < c.t - pad {
                    if left == 0 {
                        left = 1 + rng.below(12);
                        id += 1;
                    }
                    seg.push(id - 1);
                    left -= 1;
                }
                seg.resize(c.t, 0);
                q_seg.extend(&seg);
                k_seg.extend(&seg);
            }
        }
    }
    Inputs {
        q,
        k,
        v,
        g,
        q_seg,
        k_seg,
    }
}

/// f64 host oracle.
struct Expected {
    out: Vec<f64>,
    lse: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

fn expected(c: Case, inp: &Inputs) -> Expected {
    let Case {
        b, nh, nkv, t, hd, ..
    } = c;
    let n_rep = nh / nkv;
    let scale = (hd as f64).powf(-0.5);
    let qi = |bb: usize, h: usize, i: usize| ((bb * nh + h) * t + i) * hd;
    let ki = |bb: usize, g: usize, j: usize| ((bb * nkv + g) * t + j) * hd;
    let (mut out, mut lse) = (vec![0.0; b * nh * t * hd], vec![0.0; b * nh * t]);
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; out.len()],
        vec![0.0; b * nkv * t * hd],
        vec![0.0; b * nkv * t * hd],
    );
    let dot = |a: &[f32], ao: usize, bv: &[f32], bo: usize| -> f64 {
        (0..hd).map(|d| a[ao + d] as f64 * bv[bo + d] as f64).sum()
    };
    for bb in 0..b {
        for h in 0..nh {
            let g = h / n_rep;
            for i in 0..t {
                let qs = inp.q_seg[bb * t + i];
                let vis: Vec<usize> = (0..=i).filter(|&j| inp.k_seg[bb * t + j] == qs).collect();
                assert!(!vis.is_empty(), "test inputs give every query a key");
                let s: Vec<f64> = vis
                    .iter()
                    .map(|&j| scale * dot(&inp.q, qi(bb, h, i), &inp.k, ki(bb, g, j)))
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l = mx + s.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
                lse[(bb * nh + h) * t + i] = l;
                let p: Vec<f64> = s.iter().map(|x| (x - l).exp()).collect();
                for (&j, &pj) in vis.iter().zip(&p) {
                    for d in 0..hd {
                        out[qi(bb, h, i) + d] += pj * inp.v[ki(bb, g, j) + d] as f64;
                    }
                }
                let dp: Vec<f64> = vis
                    .iter()
                    .map(|&j| dot(&inp.g, qi(bb, h, i), &inp.v, ki(bb, g, j)))
                    .collect();
                let delta: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for ((&j, &pj), &dpj) in vis.iter().zip(&p).zip(&dp) {
                    let ds = pj * (dpj - delta);
                    for d in 0..hd {
                        dq[qi(bb, h, i) + d] += scale * ds * inp.k[ki(bb, g, j) + d] as f64;
                        dk[ki(bb, g, j) + d] += scale * ds * inp.q[qi(bb, h, i) + d] as f64;
                        dv[ki(bb, g, j) + d] += pj * inp.g[qi(bb, h, i) + d] as f64;
                    }
                }
            }
        }
    }
    Expected {
        out,
        lse,
        dq,
        dk,
        dv,
    }
}

type Qkv<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);
/// (q, k, v), g, q_seg, k_seg.
type Tensors<B> = (Qkv<B>, Tensor<B, 4>, Tensor<B, 2, Int>, Tensor<B, 2, Int>);

fn tensors<B: Backend>(c: Case, inp: &Inputs, device: &B::Device) -> Tensors<B> {
    let f = |x: &Vec<f32>, n: usize| {
        Tensor::<B, 4>::from_data(TensorData::new(x.clone(), [c.b, n, c.t, c.hd]), device)
    };
    let i = |x: &Vec<i64>| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(x.clone(), [c.b, c.t]), device)
    };
    (
        (f(&inp.q, c.nh), f(&inp.k, c.nkv), f(&inp.v, c.nkv)),
        f(&inp.g, c.nh),
        i(&inp.q_seg),
        i(&inp.k_seg),
    )
}

type AdTensors<B> = (
    Tensor<Autodiff<B>, 4>,
    Tensor<Autodiff<B>, 4>,
    Tensor<Autodiff<B>, 4>,
    Tensor<Autodiff<B>, 2, Int>,
    Tensor<Autodiff<B>, 2, Int>,
);

/// `(out, dq, dk, dv)` of `loss = Σ g∘out` under autodiff, through `f`.
fn grads_of<B: Backend>(
    c: Case,
    inp: &Inputs,
    device: &B::Device,
    f: impl Fn(AdTensors<B>) -> Tensor<Autodiff<B>, 4>,
) -> [Vec<f32>; 4] {
    let ((q, k, v), g, qs, ks) = tensors::<Autodiff<B>>(c, inp, device);
    let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
    let out = f((q.clone(), k.clone(), v.clone(), qs, ks));
    let grads = (out.clone() * g).sum().backward();
    [
        host(out),
        host(q.grad(&grads).expect("dq")),
        host(k.grad(&grads).expect("dk")),
        host(v.grad(&grads).expect("dv")),
    ]
}

fn parity<B: AttentionBackend>(backend: &str, device: &B::Device, c: Case, salt: u64) {
    let base = base_seed();
    let seed = base ^ salt;
    let Case {
        b,
        nh,
        nkv,
        t,
        hd,
        block,
        layout,
    } = c;
    let name = format!("{backend} B{b} NH{nh} NKV{nkv} T{t} HD{hd} block {block} {layout:?}");
    println!("[{name}] seed {seed} (replay: WRPO_TEST_SEED={base})");
    let inp = make_inputs(c, seed);
    let want = expected(c, &inp);
    let tag = |what: &str| format!("[{name} seed {seed}] {what}");
    let (qd, kd) = ([b, nh, t, hd], [b, nkv, t, hd]);

    let ((q, k, v), _, qs, ks) = tensors::<B>(c, &inp, device);
    let (out, lse) = B::attention_forward(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        qs.into_primitive(),
        ks.into_primitive(),
        block,
    );
    let out = host(Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(out)));
    let lse = host(Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(lse)));
    let e_out = check(&tag("out vs f64"), &out, &want.out, &qd, FP32);
    let e_lse = check(&tag("lse vs f64"), &lse, &want.lse, &[b, nh, t], FP32);

    // The tiled composite on the same backend (on cpu it is the implementation itself; on
    // CubeCL backends it is the oracle of the FlashAttention-2 kernels): forward and its
    // hand-written backward with `dO = g`.
    let ((q, k, v), g, qs, ks) = tensors::<B>(c, &inp, device);
    let (c_out, c_lse) = reference::forward::<B>(
        q.clone(),
        k.clone(),
        v.clone(),
        qs.clone(),
        ks.clone(),
        block,
    );
    let (c_dq, c_dk, c_dv) =
        reference::backward::<B>(q, k, v, qs, ks, c_out.clone(), c_lse.clone(), g, block);
    let (c_out, c_lse) = (host(c_out), host(c_lse));
    let (c_dq, c_dk, c_dv) = (host(c_dq), host(c_dk), host(c_dv));
    let r_out = check(&tag("composite out vs f64"), &c_out, &want.out, &qd, FP32);
    let r_lse = check(
        &tag("composite lse vs f64"),
        &c_lse,
        &want.lse,
        &[b, nh, t],
        FP32,
    );
    let r_dq = check_grad(&tag("composite dq vs f64"), &c_dq, &want.dq, &qd);
    let r_dk = check_grad(&tag("composite dk vs f64"), &c_dk, &want.dk, &kd);
    let r_dv = check_grad(&tag("composite dv vs f64"), &c_dv, &want.dv, &kd);
    let y_out = check(&tag("out vs composite"), &out, &to_f64(&c_out), &qd, FP32);
    let y_lse = check(
        &tag("lse vs composite"),
        &lse,
        &to_f64(&c_lse),
        &[b, nh, t],
        FP32,
    );

    let [t_out, t_dq, t_dk, t_dv] = grads_of::<B>(c, &inp, device, |(q, k, v, qs, ks)| {
        attention(q, k, v, qs, ks, block)
    });
    let [d_out, d_dq, d_dk, d_dv] = grads_of::<B>(c, &inp, device, |(q, k, v, qs, ks)| {
        attention_dense(q, k, v, qs, ks)
    });
    let e_aout = check(&tag("autodiff out vs f64"), &t_out, &want.out, &qd, FP32);
    let e_dq = check_grad(&tag("dq vs f64"), &t_dq, &want.dq, &qd);
    let e_dk = check_grad(&tag("dk vs f64"), &t_dk, &want.dk, &kd);
    let e_dv = check_grad(&tag("dv vs f64"), &t_dv, &want.dv, &kd);
    let x_out = check(&tag("out vs dense"), &t_out, &to_f64(&d_out), &qd, FP32);
    let x_dq = check_grad(&tag("dq vs dense"), &t_dq, &to_f64(&d_dq), &qd);
    let x_dk = check_grad(&tag("dk vs dense"), &t_dk, &to_f64(&d_dk), &kd);
    let x_dv = check_grad(&tag("dv vs dense"), &t_dv, &to_f64(&d_dv), &kd);
    let o_out = check(&tag("dense out vs f64"), &d_out, &want.out, &qd, FP32);
    let o_dq = check_grad(&tag("dense dq vs f64"), &d_dq, &want.dq, &qd);
    let o_dk = check_grad(&tag("dense dk vs f64"), &d_dk, &want.dk, &kd);
    let o_dv = check_grad(&tag("dense dv vs f64"), &d_dv, &want.dv, &kd);
    let z_dq = check_grad(&tag("dq vs composite"), &t_dq, &to_f64(&c_dq), &qd);
    let z_dk = check_grad(&tag("dk vs composite"), &t_dk, &to_f64(&c_dk), &kd);
    let z_dv = check_grad(&tag("dv vs composite"), &t_dv, &to_f64(&c_dv), &kd);
    println!(
        "[{name}] max abs err (gradients in units of their largest |value|) — vs f64: out {:.2e}, lse {:.2e}, autodiff out {:.2e}, dq {:.2e}, dk {:.2e}, dv {:.2e}; \
         vs dense: out {:.2e}, dq {:.2e}, dk {:.2e}, dv {:.2e}; dense vs f64: out {:.2e}, dq {:.2e}, dk {:.2e}, dv {:.2e}; \
         vs composite: out {:.2e}, lse {:.2e}, dq {:.2e}, dk {:.2e}, dv {:.2e}; composite vs f64: out {:.2e}, lse {:.2e}, dq {:.2e}, dk {:.2e}, dv {:.2e}",
        e_out.max_abs, e_lse.max_abs, e_aout.max_abs, e_dq.max_abs, e_dk.max_abs, e_dv.max_abs,
        x_out.max_abs, x_dq.max_abs, x_dk.max_abs, x_dv.max_abs,
        o_out.max_abs, o_dq.max_abs, o_dk.max_abs, o_dv.max_abs,
        y_out.max_abs, y_lse.max_abs, z_dq.max_abs, z_dk.max_abs, z_dv.max_abs,
        r_out.max_abs, r_lse.max_abs, r_dq.max_abs, r_dk.max_abs, r_dv.max_abs,
    );
}

const MHA_CAUSAL: Case = Case {
    b: 2,
    nh: 3,
    nkv: 3,
    t: 37,
    hd: 16,
    block: 8,
    layout: Layout::Causal,
};
const GQA_PADDED: Case = Case {
    b: 3,
    nh: 6,
    nkv: 2,
    t: 29,
    hd: 8,
    block: 5,
    layout: Layout::Padded,
};
const MQA_PACKED: Case = Case {
    b: 2,
    nh: 4,
    nkv: 1,
    t: 41,
    hd: 32,
    block: 16,
    layout: Layout::Packed,
};
const HD128_PACKED: Case = Case {
    b: 2,
    nh: 4,
    nkv: 2,
    t: 23,
    hd: 128,
    block: 7,
    layout: Layout::Packed,
};
const ONE_PER_BLOCK: Case = Case {
    b: 2,
    nh: 2,
    nkv: 1,
    t: 9,
    hd: 4,
    block: 1,
    layout: Layout::Padded,
};
const BLOCK_OVER_T: Case = Case {
    b: 2,
    nh: 2,
    nkv: 2,
    t: 13,
    hd: 8,
    block: 64,
    layout: Layout::Packed,
};

/// Long enough for several query blocks and key tiles of the CubeCL kernels (32 queries per
/// cube, 16–32 keys per tile at HD 64).
const LONG_GQA_PADDED: Case = Case {
    b: 2,
    nh: 4,
    nkv: 2,
    t: 100,
    hd: 64,
    block: 32,
    layout: Layout::Padded,
};

macro_rules! parity_tests {
    ($backend:literal, $ty:ty, $device:expr $(, #[$attr:meta])?) => {
        #[test] $(#[$attr])?
        fn mha_causal_t37_block_8() {
            parity::<$ty>($backend, &$device, MHA_CAUSAL, 21);
        }
        #[test] $(#[$attr])?
        fn gqa_padded_t29_block_5() {
            parity::<$ty>($backend, &$device, GQA_PADDED, 22);
        }
        #[test] $(#[$attr])?
        fn mqa_packed_t41_block_16() {
            parity::<$ty>($backend, &$device, MQA_PACKED, 23);
        }
        #[test] $(#[$attr])?
        fn head_dim_128_gqa_packed_t23_block_7() {
            parity::<$ty>($backend, &$device, HD128_PACKED, 24);
        }
        #[test] $(#[$attr])?
        fn one_query_per_block() {
            parity::<$ty>($backend, &$device, ONE_PER_BLOCK, 25);
        }
        #[test] $(#[$attr])?
        fn block_longer_than_the_sequence() {
            parity::<$ty>($backend, &$device, BLOCK_OVER_T, 26);
        }
        #[test] $(#[$attr])?
        fn long_gqa_padded_t100_head_dim_64() {
            parity::<$ty>($backend, &$device, LONG_GQA_PADDED, 27);
        }
    };
}

mod cpu {
    use super::*;
    type B = burn::backend::Flex;
    parity_tests!("cpu", B, Default::default());
}

/// The kernels with one tile per launch: the forward carries `(m, l, acc)` from launch to
/// launch, dQ and dK/dV add to the previous launches' sums (at real sizes this happens past
/// [`kernel::tiles_per_launch`] tiles, e.g. T ≈ 3800 at HD 128).
fn parity_one_tile_per_launch<B: AttentionBackend>(backend: &str, device: &B::Device) {
    kernel::TEST_TILES_PER_LAUNCH.with(|c| c.set(Some(1)));
    parity::<B>(backend, device, LONG_GQA_PADDED, 28);
    parity::<B>(backend, device, MQA_PACKED, 29);
    kernel::TEST_TILES_PER_LAUNCH.with(|c| c.set(None));
}

mod wgpu {
    use super::*;
    type B = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
    parity_tests!("wgpu", B, burn::backend::wgpu::WgpuDevice::DefaultDevice);
    #[test]
    fn one_tile_per_launch() {
        parity_one_tile_per_launch::<B>("wgpu", &burn::backend::wgpu::WgpuDevice::DefaultDevice);
    }
}

mod cuda {
    use super::*;
    type B = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
    parity_tests!("cuda", B, burn::backend::cuda::CudaDevice::new(0), #[ignore = "needs CUDA: skipped without a GPU; run `cargo test -- --ignored cuda` on one"]);
    #[test]
    #[ignore = "needs CUDA: skipped without a GPU; run `cargo test -- --ignored cuda` on one"]
    fn one_tile_per_launch() {
        parity_one_tile_per_launch::<B>("cuda", &burn::backend::cuda::CudaDevice::new(0));
    }
}
