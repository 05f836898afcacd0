//! Criterion benches of the token log-prob op and the preference loss: the fused CubeCL kernels vs
//! the composite references, forward + backward, on wgpu (lavapipe on a CPU-only machine) and on
//! the cpu backend. Same cases as `wrpo-engine bench kernels`, which also reports GB/s, peak
//! memory and parity.
//!
//! Run: `cargo bench -p wrpo-benches` (set `WRPO_BENCH_SHAPES=N,T,V;N,T,V` to change the log-prob
//! cases, `WRPO_BENCH_LOSS_ROWS=B` the loss rows; the loss case has K+1 = 2, R = 1).

use burn::backend::Autodiff;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use criterion::{criterion_group, criterion_main, Criterion};
use wrpo_kernels::logprobs::{token_logprobs, token_logprobs_reference, LogProbBackend};
use wrpo_kernels::loss::{
    preference_loss, preference_loss_fused, LossBackend, LossConfig, Objective, PreferenceInputs,
};

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

/// The preference loss (WRPO, α = 0.1, β = 0.01) on `[B, 2]` chosen / `[B, 1]` rejected log-probs.
fn loss_cases<B: LossBackend>(c: &mut Criterion, name: &str, device: &B::Device) {
    let b: usize = std::env::var("WRPO_BENCH_LOSS_ROWS")
        .ok()
        .map(|s| s.trim().parse().expect("WRPO_BENCH_LOSS_ROWS=B"))
        .unwrap_or(128);
    let cfg = LossConfig {
        objective: Objective::Wrpo,
        alpha: 0.1,
        beta: 0.01,
        label_smoothing: 0.0,
    };
    let t = |cols: usize, lo: f64, hi: f64| {
        Tensor::<B, 2>::random([b, cols], Distribution::Uniform(lo, hi), device)
    };
    let (pc, pr) = (t(2, -300.0, -10.0), t(1, -300.0, -10.0));
    let (rc, rr) = (pc.clone() + t(2, -5.0, 5.0), pr.clone() + t(1, -5.0, 5.0));
    let (nc, nr) = (t(2, 1.0, 400.0), t(1, 1.0, 400.0));
    for fused in [true, false] {
        let id = format!(
            "{name}/loss_{}/{b}x2x1",
            if fused { "fused" } else { "composite" }
        );
        c.bench_function(&id, |bench| {
            bench.iter(|| {
                let lift = |t: &Tensor<B, 2>| Tensor::<Autodiff<B>, 2>::from_inner(t.clone());
                let (x, y) = (lift(&pc).require_grad(), lift(&pr).require_grad());
                let inp = PreferenceInputs {
                    policy_chosen: x.clone(),
                    policy_rejected: y.clone(),
                    reference_chosen: lift(&rc),
                    reference_rejected: lift(&rr),
                    chosen_tokens: lift(&nc),
                    rejected_tokens: lift(&nr),
                };
                let out = if fused {
                    preference_loss_fused(&cfg, inp)
                } else {
                    preference_loss(&cfg, inp)
                };
                let grads = out.loss.backward();
                let g = (x.grad(&grads), y.grad(&grads));
                B::sync(device).expect("sync");
                g
            })
        });
    }
}

fn kernels(c: &mut Criterion) {
    cases::<burn::backend::Flex>(c, "cpu", &Default::default());
    cases::<burn::backend::Wgpu<f32, i32, u32>>(
        c,
        "wgpu",
        &burn::backend::wgpu::WgpuDevice::DefaultDevice,
    );
    loss_cases::<burn::backend::Flex>(c, "cpu", &Default::default());
    loss_cases::<burn::backend::Wgpu<f32, i32, u32>>(
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
