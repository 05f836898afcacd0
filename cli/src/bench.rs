//! `wrpo-engine bench kernels`: the fused CubeCL token log-prob op against its composite reference
//! on the same backend, forward and forward + backward, with device-synchronised medians after
//! warm-up, effective bandwidth against the napkin floor, peak memory and the parity error of
//! each run.
//!
//! Napkin floor: the forward must read the logits once (`4·N·T·V` bytes); forward + backward must
//! read them once and write their gradient once (`8·N·T·V` bytes). Effective GB/s = floor / time.
//!
//! Peak memory (CubeCL backends) is measured by [`peak_memory`] in a fresh process per path (the CLI
//! re-runs itself): the inputs are created, then one forward + backward of the path runs, and the
//! growth of the memory pool's reserved bytes is reported. A fresh pool only grows, so the growth
//! is the high-water mark of that path's allocations (inputs excluded, its outputs included).
//! Measuring in the timing process instead would see pages left over from earlier runs.
//!
//! The preference loss ([`bench_loss`]) is a separate record: the fused CubeCL loss
//! (`preference_loss_fused`) against the composite (`preference_loss`) on `[B, K+1, R]`
//! per-sequence log-probs, forward and forward + backward under autodiff. Its napkin floor is
//! tiny (the six `[B, ·]` inputs read once per direction, the outputs and gradients written once),
//! so at trainer sizes both paths are bound by launch latency, not bandwidth; the record still
//! reports GB/s against that floor. Peak memory is not probed for it (a few KiB).

use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Distribution, Int, Tensor, TensorData};
use serde::Serialize;
use wrpo_kernels::logprobs::{token_logprobs, token_logprobs_reference, LogProbBackend};
use wrpo_kernels::loss::{
    preference_loss, preference_loss_fused, LossBackend, LossConfig, LossOutput, Objective,
    PreferenceInputs,
};
use wrpo_kernels::IGNORE_INDEX;

pub use wrpo_kernels::device::MemoryProbe;

/// Timings and memory of one path.
#[derive(Debug, Clone, Serialize)]
pub struct PathStats {
    /// Median forward time, ms.
    pub forward_ms: f64,
    /// Median forward + backward time, ms.
    pub forward_backward_ms: f64,
    /// Effective bandwidth of forward + backward against the floor, GB/s.
    pub forward_backward_gbps: f64,
    /// Peak pool growth during one forward + backward, bytes, from [`peak_memory`] in a fresh
    /// process (None on the cpu backend, and until the caller fills it in).
    pub peak_bytes: Option<u64>,
}

/// One benchmark case: both paths on one shape.
#[derive(Debug, Clone, Serialize)]
pub struct KernelRecord {
    /// Always `token_logprobs`.
    pub op: &'static str,
    /// The backend, as printed by `--backend`.
    pub backend: String,
    /// `[N, T, V]`.
    pub shape: [usize; 3],
    /// Seed of the random inputs.
    pub seed: u64,
    /// The CubeCL kernel (the composite on backends without one).
    pub fused: PathStats,
    /// Plain Burn ops under Burn's autodiff.
    pub composite: PathStats,
    /// fused / composite, forward + backward time.
    pub time_ratio: f64,
    /// fused / composite, peak memory.
    pub memory_ratio: Option<f64>,
    /// Max |fused − composite| of the per-token log-probs.
    pub logp_max_abs_err: f64,
    /// Max |fused − composite| of the logits gradient, relative to max |composite gradient|.
    pub grad_max_rel_err: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn sync<B: Backend>(device: &B::Device) {
    B::sync(device).expect("device synchronisation failed");
}

/// Run one case. `reps` timed runs after `warmup` untimed ones, per path and direction.
pub fn bench_logprobs<B: LogProbBackend + MemoryProbe>(
    device: &B::Device,
    backend: &str,
    [n, t, v]: [usize; 3],
    warmup: usize,
    reps: usize,
    seed: u64,
) -> KernelRecord {
    let (logits, labels, weights) = inputs::<B>(device, [n, t, v], seed);
    let forward = |fused: bool| -> Tensor<B, 2> {
        if fused {
            token_logprobs(logits.clone(), labels.clone())
        } else {
            token_logprobs_reference(logits.clone(), labels.clone())
        }
    };
    let both = |fused: bool| forward_backward(&logits, &labels, &weights, fused);
    let floor_bytes = 8.0 * (n * t * v) as f64;
    let stats = |fused: bool| {
        path_stats::<B>(
            device,
            (warmup, reps),
            floor_bytes,
            &|| drop(forward(fused)),
            &|| drop(both(fused)),
        )
    };
    let fused = stats(true);
    let composite = stats(false);
    let (lf, gf) = both(true);
    let (lc, gc) = both(false);
    let logp_max_abs_err = (lf - lc).abs().max().into_scalar().elem::<f64>();
    let grad_scale = gc
        .clone()
        .abs()
        .max()
        .into_scalar()
        .elem::<f64>()
        .max(f64::MIN_POSITIVE);
    let grad_max_rel_err = (gf - gc).abs().max().into_scalar().elem::<f64>() / grad_scale;
    KernelRecord {
        op: "token_logprobs",
        backend: backend.to_string(),
        shape: [n, t, v],
        seed,
        time_ratio: fused.forward_backward_ms / composite.forward_backward_ms,
        // Filled in by the caller from `peak_memory` runs in fresh processes.
        memory_ratio: None,
        fused,
        composite,
        logp_max_abs_err,
        grad_max_rel_err,
    }
}

use burn::tensor::ElementConversion;

/// Random logits `~ N(0, 2²)`, labels with ~30% ignored, loss weights `~ U(−1, 1)`.
fn inputs<B: Backend>(
    device: &B::Device,
    [n, t, v]: [usize; 3],
    seed: u64,
) -> (Tensor<B, 3>, Tensor<B, 2, Int>, Tensor<B, 2>) {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    B::seed(device, seed);
    let logits = Tensor::<B, 3>::random([n, t, v], Distribution::Normal(0.0, 2.0), device);
    let mut rng = StdRng::seed_from_u64(seed);
    let labels: Vec<i64> = (0..n * t)
        .map(|_| {
            if rng.random::<f32>() < 0.3 {
                IGNORE_INDEX
            } else {
                rng.random_range(0..v as i64)
            }
        })
        .collect();
    let labels = Tensor::<B, 2, Int>::from_data(TensorData::new(labels, [n, t]), device);
    let weights = Tensor::<B, 2>::random([n, t], Distribution::Uniform(-1.0, 1.0), device);
    (logits, labels, weights)
}

/// One forward + backward of `Σ w·logp` through the fused op or the composite under autodiff.
/// Returns (`logp [N, T]`, `dlogits [N, T, V]`).
fn forward_backward<B: LogProbBackend>(
    logits: &Tensor<B, 3>,
    labels: &Tensor<B, 2, Int>,
    weights: &Tensor<B, 2>,
    fused: bool,
) -> (Tensor<B, 2>, Tensor<B, 3>) {
    let x = Tensor::<Autodiff<B>, 3>::from_inner(logits.clone()).require_grad();
    let y = Tensor::<Autodiff<B>, 2, Int>::from_inner(labels.clone());
    let lp = if fused {
        token_logprobs(x.clone(), y)
    } else {
        token_logprobs_reference(x.clone(), y)
    };
    let loss = (lp.clone() * Tensor::from_inner(weights.clone())).sum();
    let grads = loss.backward();
    (lp.inner(), x.grad(&grads).expect("logits gradient"))
}

/// Device-synchronised median times (ms) of a path's forward and forward + backward, after
/// `warmup` untimed runs each, and the effective bandwidth against `floor_bytes`.
fn path_stats<B: Backend>(
    device: &B::Device,
    (warmup, reps): (usize, usize),
    floor_bytes: f64,
    forward: &dyn Fn(),
    forward_backward: &dyn Fn(),
) -> PathStats {
    let time = |f: &dyn Fn()| -> f64 {
        for _ in 0..warmup {
            f();
        }
        sync::<B>(device);
        median(
            (0..reps)
                .map(|_| {
                    let start = Instant::now();
                    f();
                    sync::<B>(device);
                    start.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        )
    };
    let forward_ms = time(forward);
    let forward_backward_ms = time(forward_backward);
    PathStats {
        forward_ms,
        forward_backward_ms,
        forward_backward_gbps: floor_bytes / (forward_backward_ms * 1e-3) / 1e9,
        peak_bytes: None,
    }
}

/// Peak pool growth of one forward + backward of a path; call in a fresh process (see the module
/// docs). `None` on backends without a memory pool to ask (cpu).
pub fn peak_memory<B: LogProbBackend + MemoryProbe>(
    device: &B::Device,
    shape: [usize; 3],
    seed: u64,
    fused: bool,
) -> Option<u64> {
    let (logits, labels, weights) = inputs::<B>(device, shape, seed);
    sync::<B>(device);
    let base = B::reserved_bytes(device)?;
    let out = forward_backward(&logits, &labels, &weights, fused);
    sync::<B>(device);
    let peak = B::reserved_bytes(device)?.saturating_sub(base);
    drop(out);
    Some(peak)
}

/// Shape of a `bench step` run (same knobs as `tests/reference/bench_step.py`).
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct StepShape {
    /// H.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// NH.
    pub heads: usize,
    /// NKV.
    pub kv_heads: usize,
    /// MLP width.
    pub intermediate: usize,
    /// V.
    pub vocab: usize,
    /// Rows per step (each: a source, a target and a rejected response).
    pub batch: usize,
    /// Tokens per sequence (the first quarter is the prompt).
    pub seq: usize,
}

/// Result of `bench step`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StepRecord {
    /// Always `wrpo_step`.
    pub op: String,
    /// The backend.
    pub backend: String,
    /// The model and batch.
    pub shape: StepShape,
    /// Median wall time of one update, ms.
    pub step_ms_median: f64,
    /// Policy tokens per second (`3·batch·seq` per update, as the PyTorch script counts).
    pub tokens_per_second: f64,
    /// Peak resident memory of the process (cpu) or device pool reservation (CubeCL), MiB.
    pub peak_mb: Option<f64>,
    /// The same measure after the models, parameters and tokens were set up and before the first
    /// update, MiB: `peak_mb − base_mb` is what the updates themselves add (activations, logits,
    /// gradients, AdamW moments).
    pub base_mb: Option<f64>,
    /// The memory plan's predicted peak for this update (`wrpo-engine plan`), MiB: the
    /// process's on the CPU, the pool's on CubeCL backends.
    #[serde(default)]
    pub predicted_peak_mb: Option<f64>,
    /// The LM-head path (`fused` or `dense`).
    pub lm_head_impl: wrpo_engine_core::logps::HeadImpl,
    /// The attention (`tiled, block N` or `dense`).
    #[serde(default)]
    pub attn_implementation: String,
    /// Layer checkpointing on.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// LoRA rank (0: a full fine-tune).
    #[serde(default)]
    pub lora_r: usize,
    /// With LoRA: the frozen base's storage dtype.
    #[serde(default)]
    pub lora_base_dtype: Option<String>,
    /// With LoRA: the full fine-tune's peak of the same shape, measured in a fresh process of the
    /// same run, MiB.
    #[serde(default)]
    pub full_peak_mb: Option<f64>,
}

/// Peak resident set size of this process (Linux `VmHWM`), bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kb("VmHWM:").map(|kb| kb * 1024)
}

/// Current resident set size of this process (Linux `VmRSS`), bytes.
pub fn rss_bytes() -> Option<u64> {
    proc_status_kb("VmRSS:").map(|kb| kb * 1024)
}

fn proc_status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Time full WRPO updates (policy forward + reference forward + loss + backward + global clipping +
/// AdamW) of a random LLaMA on random tokens: `warmup` untimed, then `steps` timed; the LM head
/// through `head` (fused or dense), the attention `attn` (tiled or dense), layer checkpointing
/// when `checkpoint`.
#[allow(clippy::too_many_arguments)]
pub fn bench_step<B: wrpo_kernels::KernelBackend + MemoryProbe>(
    device: &B::Device,
    backend: &str,
    shape: StepShape,
    head: wrpo_engine_core::logps::Head,
    attn: wrpo_kernels::attention::AttentionImpl,
    checkpoint: bool,
    lora: Option<(wrpo_models::LoraConfig, wrpo_engine_core::model::BaseDtype)>,
    steps: usize,
    warmup: usize,
    seed: u64,
) -> anyhow::Result<StepRecord> {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use wrpo_engine_core::data::Encoded;
    use wrpo_engine_core::train::optim::{clip_global_norm, AdamState, AdamW};
    use wrpo_engine_core::train::params::Params;
    use wrpo_engine_core::train::step::{micro_step, Layout, Reference};
    use wrpo_kernels::loss::{LossConfig, Objective};

    let cfg = wrpo_models::LlamaConfig::tiny(
        shape.vocab,
        shape.hidden,
        shape.intermediate,
        shape.layers,
        shape.heads,
        shape.kv_heads,
        false,
    );
    let mut cfg = cfg;
    cfg.attn_implementation = attn;
    // The frozen base's storage under LoRA (the random model stands for an f32 checkpoint).
    let base = match &lora {
        Some((_, d)) => d.resolve(|d| B::supports_dtype(device, d))?(burn::tensor::DType::F32),
        None => burn::tensor::DType::F32,
    };
    let (lora, base_name) = match lora {
        Some((l, _)) => (Some(l), Some(format!("{base:?}").to_lowercase())),
        None => (None, None),
    };
    wrpo_engine_core::memory::check_buffers(
        B::max_buffer_bytes(device),
        backend,
        &wrpo_engine_core::memory::step_buffers(&cfg, 3 * shape.batch, shape.seq, head, attn),
    )?;
    let predicted = wrpo_engine_core::memory::plan::plan(
        &cfg,
        &wrpo_engine_core::memory::plan::Workload {
            sequences: 3 * shape.batch,
            tokens: shape.seq,
            micro_batches: 1,
            head,
            attn,
            checkpoint,
            reference: wrpo_engine_core::memory::plan::ReferenceMemory::Model,
            host: B::reserved_bytes(device).is_none(),
            pool_page: wrpo_engine_core::train::driver::wgpu_pool_page::<B>(device),
            // The completions: every sequence past its prompt quarter.
            scored: Some((3 * shape.batch * (shape.seq - shape.seq / 4)) as u64),
            lora: lora
                .as_ref()
                .map(|l| wrpo_engine_core::memory::plan::LoraShape::of(l).with_base(base)),
        },
    )
    .peak;
    let model = wrpo_models::Llama::<B>::random_as(&cfg, seed, 0.02, base, device);
    let mut params = match &lora {
        None => Params::full(&model),
        Some(l) => Params::lora(&model, l.clone(), l.init(&cfg, seed), device),
    };
    let reference = Reference::Model(Box::new(model), Box::new(cfg.clone()));
    let mut rng = StdRng::seed_from_u64(seed);
    let prompt_len = shape.seq / 4;
    let mut ids = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| rng.random_range(0..shape.vocab as u32))
            .collect()
    };
    let rows: Vec<Encoded> = (0..shape.batch)
        .map(|i| Encoded {
            line: i + 1,
            prompt: ids(prompt_len),
            chosen: vec![ids(shape.seq - prompt_len), ids(shape.seq - prompt_len)],
            rejected: vec![ids(shape.seq - prompt_len)],
        })
        .collect();
    let batch: Vec<&Encoded> = rows.iter().collect();
    let idx: Vec<usize> = (0..rows.len()).collect();
    let loss_cfg = LossConfig {
        objective: Objective::Wrpo,
        alpha: 0.1,
        beta: 0.1,
        label_smoothing: 0.0,
    };
    let adamw = AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut opt = AdamState::new(&params.trainable);
    let memory = || match B::reserved_bytes(device) {
        Some(b) => Some(b),
        None => rss_bytes(),
    };
    let base = memory();
    let mut times = vec![];
    for i in 0..warmup + steps.max(1) {
        let t0 = Instant::now();
        let out = micro_step(
            &cfg,
            &params,
            &reference,
            &loss_cfg,
            &batch,
            &idx,
            Layout {
                pad: 0,
                packed: false,
                head,
                checkpoint,
            },
            1.0,
            device,
        );
        let mut grads = out.grads;
        clip_global_norm(&mut grads, 1.0);
        adamw.step(1e-6, &mut params.trainable, grads, &mut opt);
        let _ = params.trainable.values[0]
            .clone()
            .narrow(0, 0, 1)
            .into_data(); // waits for the update
        sync::<B>(device);
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let med = median(times);
    let peak = match B::reserved_bytes(device) {
        Some(b) => Some(b),
        None => peak_rss_bytes(),
    };
    Ok(StepRecord {
        op: "wrpo_step".to_string(),
        backend: backend.to_string(),
        shape,
        step_ms_median: med * 1e3,
        tokens_per_second: (3 * shape.batch * shape.seq) as f64 / med,
        peak_mb: peak.map(|b| b as f64 / (1024.0 * 1024.0)),
        base_mb: base.map(|b| b as f64 / (1024.0 * 1024.0)),
        predicted_peak_mb: Some(predicted as f64 / (1024.0 * 1024.0)),
        lm_head_impl: head.imp,
        attn_implementation: match attn {
            wrpo_kernels::attention::AttentionImpl::Tiled { block } => {
                format!("tiled, block {block}")
            }
            wrpo_kernels::attention::AttentionImpl::Dense => "dense".to_string(),
        },
        gradient_checkpointing: checkpoint,
        lora_r: lora.map_or(0, |l| l.r),
        lora_base_dtype: base_name,
        full_peak_mb: None,
    })
}

/// The preference-loss case: both paths on one `[B, K+1, R]` shape.
#[derive(Debug, Clone, Serialize)]
pub struct LossRecord {
    /// Always `preference_loss`.
    pub op: &'static str,
    /// The backend, as printed by `--backend`.
    pub backend: String,
    /// `[B, K+1, R]`: example rows, chosen columns, rejected columns.
    pub shape: [usize; 3],
    /// Seed of the random inputs.
    pub seed: u64,
    /// The CubeCL kernels (the composite defaults on backends without them).
    pub fused: PathStats,
    /// `preference_loss` (plain Burn ops) under Burn's autodiff.
    pub composite: PathStats,
    /// fused / composite, forward + backward time.
    pub time_ratio: f64,
    /// |fused − composite| of the mean loss.
    pub loss_abs_err: f64,
    /// Max |fused − composite| of both policy gradients, relative to max |composite gradient|.
    /// On cpu the fused path is the closed-form composite backward, so this compares two f32
    /// formulas of the same gradient.
    pub grad_max_rel_err: f64,
}

/// The loss settings of the benchmark: WRPO with the authors' defaults (α = 0.1, β = 0.01).
fn loss_config() -> LossConfig {
    LossConfig {
        objective: Objective::Wrpo,
        alpha: 0.1,
        beta: 0.01,
        label_smoothing: 0.0,
    }
}

/// Random per-sequence log-probs for `[B, K+1, R]`: policy `~ −U(10, 300)`, reference = policy
/// + U(−5, 5) (margins of a few nats), token counts in `1..=400`.
fn loss_inputs<B: Backend>(
    device: &B::Device,
    [b, k1, r]: [usize; 3],
    seed: u64,
) -> PreferenceInputs<B> {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed ^ 0x1055);
    let mut side = |cols: usize| {
        let n = b * cols;
        let policy: Vec<f32> = (0..n).map(|_| -rng.random_range(10.0..300.0f32)).collect();
        let reference = policy
            .iter()
            .map(|p| p + rng.random_range(-5.0..5.0f32))
            .collect();
        let tokens = (0..n).map(|_| rng.random_range(1..=400) as f32).collect();
        let t = |v: Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(v, [b, cols]), device);
        (t(policy), t(reference), t(tokens))
    };
    let (policy_chosen, reference_chosen, chosen_tokens) = side(k1);
    let (policy_rejected, reference_rejected, rejected_tokens) = side(r);
    PreferenceInputs {
        policy_chosen,
        policy_rejected,
        reference_chosen,
        reference_rejected,
        chosen_tokens,
        rejected_tokens,
    }
}

/// One forward + backward of the mean loss through the fused entry or the composite under
/// autodiff. Returns (`loss [1]`, `d policy_chosen [B, K+1]`, `d policy_rejected [B, R]`).
fn loss_forward_backward<B: LossBackend>(
    cfg: &LossConfig,
    x: &PreferenceInputs<B>,
    fused: bool,
) -> (Tensor<B, 1>, Tensor<B, 2>, Tensor<B, 2>) {
    let lift = |t: &Tensor<B, 2>| Tensor::<Autodiff<B>, 2>::from_inner(t.clone());
    let pc = lift(&x.policy_chosen).require_grad();
    let pr = lift(&x.policy_rejected).require_grad();
    let inp = PreferenceInputs {
        policy_chosen: pc.clone(),
        policy_rejected: pr.clone(),
        reference_chosen: lift(&x.reference_chosen),
        reference_rejected: lift(&x.reference_rejected),
        chosen_tokens: lift(&x.chosen_tokens),
        rejected_tokens: lift(&x.rejected_tokens),
    };
    let out = if fused {
        preference_loss_fused(cfg, inp)
    } else {
        preference_loss(cfg, inp)
    };
    let grads = out.loss.backward();
    (
        out.loss.inner(),
        pc.grad(&grads).expect("policy_chosen gradient"),
        pr.grad(&grads).expect("policy_rejected gradient"),
    )
}

/// Run the loss case. `reps` timed runs after `warmup` untimed ones, per path and direction.
pub fn bench_loss<B: LossBackend>(
    device: &B::Device,
    backend: &str,
    [b, k1, r]: [usize; 3],
    warmup: usize,
    reps: usize,
    seed: u64,
) -> LossRecord {
    let cfg = loss_config();
    let x = loss_inputs::<B>(device, [b, k1, r], seed);
    let forward = |fused: bool| -> LossOutput<B> {
        if fused {
            preference_loss_fused(&cfg, x.clone())
        } else {
            preference_loss(&cfg, x.clone())
        }
    };
    // Floor of forward + backward: the six inputs read in each direction, the forward's loss and
    // rewards (4·B + B·R) and the gradients (B·(K+1) + B·R) written once; 4 bytes each.
    let inputs = 3 * b * (k1 + r);
    let floor_bytes = 4.0 * (2 * inputs + 4 * b + b * r + b * (k1 + r)) as f64;
    let stats = |fused: bool| {
        path_stats::<B>(
            device,
            (warmup, reps),
            floor_bytes,
            &|| drop(forward(fused)),
            &|| drop(loss_forward_backward(&cfg, &x, fused)),
        )
    };
    let fused = stats(true);
    let composite = stats(false);
    let (lf, cf, rf) = loss_forward_backward(&cfg, &x, true);
    let (lc, cc, rc) = loss_forward_backward(&cfg, &x, false);
    let max = |t: Tensor<B, 2>| t.abs().max().into_scalar().elem::<f64>();
    let loss_abs_err = (lf - lc).abs().into_scalar().elem::<f64>();
    let grad_scale = max(cc.clone()).max(max(rc.clone())).max(f64::MIN_POSITIVE);
    let grad_max_rel_err = max(cf - cc).max(max(rf - rc)) / grad_scale;
    LossRecord {
        op: "preference_loss",
        backend: backend.to_string(),
        shape: [b, k1, r],
        seed,
        time_ratio: fused.forward_backward_ms / composite.forward_backward_ms,
        fused,
        composite,
        loss_abs_err,
        grad_max_rel_err,
    }
}

/// The training-attention case: the tiled op (FlashAttention-2 kernels on CubeCL backends, the
/// tiled composite on cpu) against the dense composite, causal, on one `[B, NH, NKV, T, HD]`
/// shape.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionRecord {
    /// Always `attention`.
    pub op: &'static str,
    /// The backend, as printed by `--backend`.
    pub backend: String,
    /// `[B, NH, NKV, T, HD]`.
    pub shape: [usize; 5],
    /// Seed of the random inputs.
    pub seed: u64,
    /// [`wrpo_kernels::attention::attention`] (no bandwidth floor: `forward_backward_gbps` is 0).
    pub tiled: PathStats,
    /// [`wrpo_kernels::attention::attention_dense`] under Burn's autodiff.
    pub dense: PathStats,
    /// Causal arithmetic of forward + backward: `3.5 · 2·B·NH·T²·HD` FLOP (the forward's `QKᵀ` and
    /// `PV` over the visible half of the scores, `2·B·NH·T²·HD`; the backward about 2.5× that).
    pub flops: f64,
    /// `flops` / tiled forward + backward time, TFLOP/s.
    pub tiled_tflops: f64,
    /// `flops` / dense forward + backward time, TFLOP/s (the dense path does about twice the
    /// arithmetic: it computes the masked half too).
    pub dense_tflops: f64,
    /// tiled / dense, forward time.
    pub forward_ratio: f64,
    /// tiled / dense, forward + backward time.
    pub time_ratio: f64,
    /// Max |tiled − dense| of the output, relative to max |dense output|.
    pub out_max_rel_err: f64,
    /// Max |tiled − dense| over `dq`, `dk`, `dv`, each relative to its max |dense value|.
    pub grad_max_rel_err: f64,
}

/// Forward + backward of `Σ g∘attention(q, k, v)` under autodiff through `attn`. Returns
/// (`out`, `dq`, `dk`, `dv`).
fn attention_forward_backward<B: wrpo_kernels::attention::AttentionBackend>(
    attn: wrpo_kernels::attention::AttentionImpl,
    (q, k, v, g): (&Tensor<B, 4>, &Tensor<B, 4>, &Tensor<B, 4>, &Tensor<B, 4>),
    seg: &Tensor<B, 2, Int>,
) -> [Tensor<B, 4>; 4] {
    let lift = |t: &Tensor<B, 4>| Tensor::<Autodiff<B>, 4>::from_inner(t.clone()).require_grad();
    let (qa, ka, va) = (lift(q), lift(k), lift(v));
    let s = Tensor::<Autodiff<B>, 2, Int>::from_inner(seg.clone());
    let out = attn.run(qa.clone(), ka.clone(), va.clone(), s.clone(), s);
    let grads = (out.clone() * Tensor::from_inner(g.clone()))
        .sum()
        .backward();
    [
        out.inner(),
        qa.grad(&grads).expect("dq"),
        ka.grad(&grads).expect("dk"),
        va.grad(&grads).expect("dv"),
    ]
}

/// Run the attention case (causal, one segment per row). `reps` timed runs after `warmup`
/// untimed ones, per path and direction.
pub fn bench_attention<B: wrpo_kernels::attention::AttentionBackend>(
    device: &B::Device,
    backend: &str,
    [b, nh, nkv, t, hd]: [usize; 5],
    warmup: usize,
    reps: usize,
    seed: u64,
) -> AttentionRecord {
    use wrpo_kernels::attention::{AttentionImpl, DEFAULT_BLOCK};
    B::seed(device, seed ^ 0xa77e);
    let normal = Distribution::Normal(0.0, 1.0);
    let q = Tensor::<B, 4>::random([b, nh, t, hd], normal, device);
    let k = Tensor::<B, 4>::random([b, nkv, t, hd], normal, device);
    let v = Tensor::<B, 4>::random([b, nkv, t, hd], normal, device);
    let g = Tensor::<B, 4>::random([b, nh, t, hd], normal, device);
    let seg = Tensor::<B, 2, Int>::ones([b, t], device);
    let tiled_impl = AttentionImpl::Tiled {
        block: DEFAULT_BLOCK,
    };
    let flops = 3.5 * 2.0 * (b * nh * t * t * hd) as f64;
    let stats = |attn: AttentionImpl| {
        path_stats::<B>(
            device,
            (warmup, reps),
            0.0,
            &|| {
                drop(attn.run(q.clone(), k.clone(), v.clone(), seg.clone(), seg.clone()));
            },
            &|| drop(attention_forward_backward(attn, (&q, &k, &v, &g), &seg)),
        )
    };
    let tflops = |s: &PathStats| flops / (s.forward_backward_ms * 1e-3) / 1e12;
    let tiled = stats(tiled_impl);
    let dense = stats(AttentionImpl::Dense);
    let x = attention_forward_backward(tiled_impl, (&q, &k, &v, &g), &seg);
    let y = attention_forward_backward(AttentionImpl::Dense, (&q, &k, &v, &g), &seg);
    let rel = |a: &Tensor<B, 4>, b: &Tensor<B, 4>| {
        let scale = b.clone().abs().max().into_scalar().elem::<f64>();
        let err = (a.clone() - b.clone())
            .abs()
            .max()
            .into_scalar()
            .elem::<f64>();
        err / scale.max(f64::MIN_POSITIVE)
    };
    let out_max_rel_err = rel(&x[0], &y[0]);
    let grad_max_rel_err = (1..4).map(|i| rel(&x[i], &y[i])).fold(0.0, f64::max);
    AttentionRecord {
        op: "attention",
        backend: backend.to_string(),
        shape: [b, nh, nkv, t, hd],
        seed,
        forward_ratio: tiled.forward_ms / dense.forward_ms,
        time_ratio: tiled.forward_backward_ms / dense.forward_backward_ms,
        tiled_tflops: tflops(&tiled),
        dense_tflops: tflops(&dense),
        tiled,
        dense,
        flops,
        out_max_rel_err,
        grad_max_rel_err,
    }
}

/// Shape of a `bench sample` run (same knobs as `tests/reference/bench_generate.py`).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SampleShape {
    /// H.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// NH.
    pub heads: usize,
    /// NKV.
    pub kv_heads: usize,
    /// MLP width.
    pub intermediate: usize,
    /// V.
    pub vocab: usize,
    /// Tied input and output embeddings.
    pub tied: bool,
    /// Prompts decoded together.
    pub batch: usize,
    /// Tokens per prompt.
    pub prompt_len: usize,
    /// Tokens generated per prompt (no stop token: every row runs to the end).
    pub new_tokens: usize,
}

/// Result of `bench sample`.
#[derive(Debug, Clone, Serialize)]
pub struct SampleRecord {
    /// Always `greedy_decode`.
    pub op: String,
    /// The backend.
    pub backend: String,
    /// The model and batch.
    pub shape: SampleShape,
    /// Median wall time of one whole generation (prefill + every step), ms.
    pub generate_ms_median: f64,
    /// Generated tokens per second (`batch · new_tokens` per generation, as the PyTorch script
    /// counts).
    pub tokens_per_second: f64,
}

/// Time greedy generation (`wrpo-engine sample`'s decode loop: KV-cache prefill of the prompts,
/// then one token per row per step, logits of the last position only, host-side greedy pick) of a
/// random LLaMA on random prompt ids: `warmup` untimed generations, then `reps` timed.
pub fn bench_sample<B: wrpo_kernels::KernelBackend>(
    device: &B::Device,
    backend: &str,
    shape: SampleShape,
    reps: usize,
    warmup: usize,
    seed: u64,
) -> anyhow::Result<SampleRecord> {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use wrpo_engine_core::pipeline::sample::{generate, GenerateOptions};
    use wrpo_engine_core::pipeline::sampler::SamplerConfig;

    let cfg = wrpo_models::LlamaConfig::tiny(
        shape.vocab,
        shape.hidden,
        shape.intermediate,
        shape.layers,
        shape.heads,
        shape.kv_heads,
        shape.tied,
    );
    let model = wrpo_models::Llama::<B>::random(&cfg, seed, 0.02, device);
    let mut rng = StdRng::seed_from_u64(seed);
    let prompts: Vec<Vec<u32>> = (0..shape.batch)
        .map(|_| {
            (0..shape.prompt_len)
                .map(|_| rng.random_range(0..shape.vocab as u32))
                .collect()
        })
        .collect();
    let opts = GenerateOptions {
        n: 1,
        max_new_tokens: shape.new_tokens,
        sampler: SamplerConfig {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
        },
        stop_ids: vec![],
        pad_id: 0,
        seed,
    };
    let mut times = vec![];
    for i in 0..warmup + reps.max(1) {
        let t0 = Instant::now();
        let out = generate(&model, &cfg, &prompts, 0, &opts, device, &mut |_| {});
        let made: usize = out.iter().flatten().map(|g| g.tokens.len()).sum();
        anyhow::ensure!(
            made == shape.batch * shape.new_tokens,
            "bench sample: {made} tokens generated, expected {}",
            shape.batch * shape.new_tokens
        );
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let med = median(times);
    Ok(SampleRecord {
        op: "greedy_decode".into(),
        backend: backend.to_string(),
        shape,
        generate_ms_median: med * 1e3,
        tokens_per_second: (shape.batch * shape.new_tokens) as f64 / med,
    })
}
