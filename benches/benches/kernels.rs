//! Criterion benches of the token log-prob op: the fused CubeCL kernel vs the composite reference,
//! forward + backward, on wgpu (lavapipe on a CPU-only machine) and on the cpu backend. Same cases
//! as `wrpo-engine bench kernels`, which also reports GB/s, peak memory and parity.
//!
//! Run: `cargo bench -p wrpo-benches` (set `WRPO_BENCH_SHAPES=N,T,V;N,T,V` to change the cases).

use burn::backend::Autodiff;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use criterion::{criterion_group, criterion_main, Criterion};
use wrpo_kernels::logprobs::{token_logprobs, token_logprobs_reference, LogProbBackend};

fn shapes() -> Vec<[usize; 3]> {
    std::env::var("WRPO_BENCH_SHAPES")
        .ok()
        .map(|s| {
            s.split(';')
                .map(|c| {
                    let v: Vec<usize> = c
                        .split(',')
                        .map(|x| x.trim().parse().expect("N,T,V"))
                        .collect();
                    [v[0], v[1], v[2]]
                })
                .collect()
        })
        .unwrap_or_else(|| vec![[3, 7, 11], [4, 64, 32000]])
}

fn cases<B: LogProbBackend>(c: &mut Criterion, name: &str, device: &B::Device) {
    for [n, t, v] in shapes() {
        let logits = Tensor::<B, 3>::random([n, t, v], Distribution::Normal(0.0, 2.0), device);
        let labels: Vec<i64> = (0..n * t)
            .map(|i| {
                if i % 3 == 0 {
                    -100
                } else {
                    (i * 7919 % v) as i64
                }
            })
            .collect();
        let labels = Tensor::<B, 2, Int>::from_data(TensorData::new(labels, [n, t]), device);
        for fused in [true, false] {
            let id = format!(
                "{name}/{}/{n}x{t}x{v}",
                if fused { "fused" } else { "composite" }
            );
            c.bench_function(&id, |bench| {
                bench.iter(|| {
                    let x = Tensor::<Autodiff<B>, 3>::from_inner(logits.clone()).require_grad();
                    let y = Tensor::<Autodiff<B>, 2, Int>::from_inner(labels.clone());
                    let lp = if fused {
                        token_logprobs(x.clone(), y)
                    } else {
                        token_logprobs_reference(x.clone(), y)
                    };
                    let grads = lp.sum().backward();
                    let g = x.grad(&grads).expect("gradient");
                    B::sync(device).expect("sync");
                    g
                })
            });
        }
    }
}

fn kernels(c: &mut Criterion) {
    cases::<burn::backend::NdArray<f32>>(c, "cpu", &Default::default());
    cases::<burn::backend::Wgpu<f32, i32, u32>>(
        c,
        "wgpu",
        &burn::backend::wgpu::WgpuDevice::DefaultDevice,
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = kernels
}
criterion_main!(benches);
