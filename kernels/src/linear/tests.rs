//! Parity tests of the frozen-weight linear layer.
//!
//! For each backend (cpu = burn-flex in bf16 and f16, wgpu = whatever adapter wgpu picks — Mesa
//! lavapipe without a GPU — in f16 where the adapter stores it, cuda `#[ignore]`d without a GPU)
//! and an odd shape: the forward `y` and, under `Autodiff`, the gradient `dx` of
//! `loss = Σ dy∘y` (random `dy`), each against an f64 host computation over the weight's stored
//! values and against the composite differentiated by Burn's autodiff. The weight gets no gradient
//! (asserted), and one that requires a gradient takes the composite path and gets it. Inputs are
//! fresh per run (seed printed; `WRPO_TEST_SEED` replays). `y` uses the fp32 table; `dx`, a sum
//! over `N`, uses `SCALED_SUM_F32`.

use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

use super::*;
use crate::test_util::{base_seed, check, check_grad, host, to_f64, Rng, FP32};

const M: usize = 37;
const K: usize = 53;
const N: usize = 29;

/// `(x [M, K], w [N, K] stored in dtype, dy [M, N])` and `w`'s stored values widened to f32.
fn inputs<B: Backend>(
    seed: u64,
    dtype: DType,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>, Vec<f32>) {
    let mut rng = Rng(seed);
    let mut normal =
        |n: usize, s: f64| -> Vec<f32> { (0..n).map(|_| (s * rng.normal()) as f32).collect() };
    let x = normal(M * K, 1.0);
    let w = normal(N * K, 1.0 / (K as f64).sqrt());
    let dy = normal(M * N, 1.0);
    let w = Tensor::<B, 2>::from_data(TensorData::new(w, [N, K]), device).cast(dtype);
    assert_eq!(w.dtype(), dtype, "the weight is stored in {dtype:?}");
    let stored = host(w.clone());
    (
        Tensor::from_data(TensorData::new(x, [M, K]), device),
        w,
        Tensor::from_data(TensorData::new(dy, [M, N]), device),
        stored,
    )
}

/// f64 `y = x·Wᵀ` and `dx = dy·W`.
fn expected(x: &[f32], w: &[f32], dy: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; M * N];
    let mut dx = vec![0.0; M * K];
    for m in 0..M {
        for n in 0..N {
            let mut s = 0.0;
            for k in 0..K {
                s += x[m * K + k] as f64 * w[n * K + k] as f64;
                dx[m * K + k] += dy[m * N + n] as f64 * w[n * K + k] as f64;
            }
            y[m * N + n] = s;
        }
    }
    (y, dx)
}

/// `(y, dx)` of `Σ dy∘f(x, w)` under autodiff; asserts the frozen weight got no gradient.
fn grads_of<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    dy: Tensor<B, 2>,
    f: impl Fn(Tensor<Autodiff<B>, 2>, Tensor<Autodiff<B>, 2>) -> Tensor<Autodiff<B>, 2>,
) -> (Vec<f32>, Vec<f32>) {
    let x = Tensor::<Autodiff<B>, 2>::from_inner(x).require_grad();
    let w = Tensor::<Autodiff<B>, 2>::from_inner(w);
    let y = f(x.clone(), w.clone());
    assert_eq!(y.dtype(), x.dtype(), "y is in the activations' dtype");
    let grads = (y.clone() * Tensor::from_inner(dy)).sum().backward();
    assert!(w.grad(&grads).is_none(), "a frozen weight gets no gradient");
    (host(y), host(x.grad(&grads).expect("dx")))
}

fn parity<B: FrozenLinearBackend>(backend: &str, device: &B::Device, dtype: DType, salt: u64) {
    let base = base_seed();
    let seed = base ^ salt;
    let name = format!("{backend} {dtype:?} M{M} K{K} N{N}");
    println!("[{name}] seed {seed} (replay: WRPO_TEST_SEED={base})");
    if !B::supports_dtype(device, dtype) {
        println!("[{name}] SKIPPED: the device does not store {dtype:?}");
        return;
    }
    let tag = |what: &str| format!("[{name} seed {seed}] {what}");
    let (x, w, dy, stored) = inputs::<B>(seed, dtype, device);
    let (want_y, want_dx) = expected(&host(x.clone()), &stored, &host(dy.clone()));

    let y = host(frozen_linear(x.clone(), w.clone()));
    let e_y = check(&tag("y vs f64"), &y, &want_y, &[M, N], FP32);
    let (a_y, a_dx) = grads_of(x.clone(), w.clone(), dy.clone(), frozen_linear);
    let (o_y, o_dx) = grads_of(x.clone(), w.clone(), dy.clone(), frozen_linear_reference);
    let e_ay = check(&tag("autodiff y vs f64"), &a_y, &want_y, &[M, N], FP32);
    let e_dx = check_grad(&tag("dx vs f64"), &a_dx, &want_dx, &[M, K]);
    let e_oy = check(&tag("composite y vs f64"), &o_y, &want_y, &[M, N], FP32);
    let e_odx = check_grad(&tag("composite dx vs f64"), &o_dx, &want_dx, &[M, K]);
    let e_vs = check_grad(&tag("dx vs composite"), &a_dx, &to_f64(&o_dx), &[M, K]);

    // A weight that wants a gradient takes the composite and gets `dW = dyᵀ·x`, in its dtype.
    let xa = Tensor::<Autodiff<B>, 2>::from_inner(x.clone()).require_grad();
    let wa = Tensor::<Autodiff<B>, 2>::from_inner(w).require_grad();
    let grads = (frozen_linear(xa.clone(), wa.clone()) * Tensor::from_inner(dy))
        .sum()
        .backward();
    let dw = wa
        .grad(&grads)
        .expect("a trainable weight gets its gradient");
    assert_eq!(dw.dtype(), dtype, "dW in the weight's dtype");
    let e_tdx = check_grad(
        &tag("trainable-weight dx vs f64"),
        &host(xa.grad(&grads).expect("dx")),
        &want_dx,
        &[M, K],
    );
    println!(
        "[{name}] max abs err — y {:.2e}, autodiff y {:.2e}, dx {:.2e} (units of max|dx|), composite y {:.2e}, composite dx {:.2e}, dx vs composite {:.2e}, trainable-weight dx {:.2e}",
        e_y.max_abs, e_ay.max_abs, e_dx.max_abs, e_oy.max_abs, e_odx.max_abs, e_vs.max_abs, e_tdx.max_abs
    );
}

mod cpu {
    use super::*;
    type B = burn::backend::Flex;
    #[test]
    fn bf16_weight() {
        parity::<B>("cpu", &Default::default(), DType::BF16, 21);
    }
    #[test]
    fn f16_weight() {
        parity::<B>("cpu", &Default::default(), DType::F16, 22);
    }
}

mod wgpu {
    use super::*;
    type B = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
    #[test]
    fn f16_weight() {
        parity::<B>(
            "wgpu",
            &burn::backend::wgpu::WgpuDevice::DefaultDevice,
            DType::F16,
            23,
        );
    }
}

mod cuda {
    use super::*;
    type B = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
    #[test]
    #[ignore = "needs CUDA: skipped without a GPU; run `cargo test -- --ignored cuda` on one"]
    fn bf16_weight() {
        parity::<B>(
            "cuda",
            &burn::backend::cuda::CudaDevice::new(0),
            DType::BF16,
            24,
        );
    }
}
