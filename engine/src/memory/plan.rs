//! The memory plan: the predicted peak device memory of one training update, in parts, from the
//! model's `config.json` and the run's settings alone (nothing is loaded).
//!
//! # The model of one update
//! Held for the whole run (f32, `P` parameters, 4 bytes each):
//! - **weights** `4P`; **optimizer** (AdamW `exp_avg`, `exp_avg_sq`) `8P`;
//! - **reference** `4P` where the reference log-probs come from a model (the initial weights,
//!   kept once the policy's move, or `--ref-model`); 0 with `precompute_ref`, `--ref-logps`, a
//!   reference-free loss or `sft`;
//! - the **runtime** (host backends only: the process, its code and allocator, measured).
//!
//! One update then passes three moments of high memory ([`Phase`]), and the plan takes the
//! largest:
//! - **the head's backward** (the start of the backward, every saved activation alive): the
//!   **activations** of the micro-batch, the **logits / head** (the fused head's two recomputed
//!   `[chunk, V]` blocks; the dense path's log-softmax keeps `exp(z − max)` `[N, T, V]` for its
//!   backward, which makes one gradient of that shape at a time: two `[N, T, V]`) and the
//!   head weight's gradient (`[V, H]`, the first gradient the backward makes);
//! - **the backward through the layers**: the same without the head's blocks, plus the tiled
//!   attention's block of scores (with checkpointing: the layer inputs and one recomputed layer);
//! - **the optimizer step**: the **gradients** (`4P`) plus the AdamW **workspace**: the update
//!   runs tensor by tensor and keeps the old weight and moments alive while it computes their new
//!   values, four temporaries of the largest tensor (new `m`, new `v`, the denominator, the new
//!   weight).
//!
//! With gradient accumulation the sum of the earlier micro-batches' gradients (`4P`) is held in
//! all three, and a micro-batch's gradients (`4P`) join it while they are added.
//!
//! Activations saved for the backward, per token and layer (f32 elements; `H` hidden, `Q = NH·HD`,
//! `KV = NKV·HD`, `I` MLP width), counted from the forward in `wrpo_models::llama`:
//! - two RMSNorms: their input, `x / rms` and the output, `3H` each → `6H`;
//! - the RoPE outputs of queries `Q` and keys `KV`, and the values `KV` (a product saves an
//!   operand only when the other one is tracked, so `x · cos` and `rotate(x) · sin` keep nothing
//!   of `x`);
//! - attention: its output `Q` and the contiguous copy the output projection reads `Q`;
//! - SwiGLU: gate, `sigmoid(gate)`, `silu(gate)`, up and their product → `5I`.
//!
//! Total `6H + 3Q + 2KV + 5I` per token and layer, plus `4H` per token outside the layers
//! (embedding output, final norm, gathered positions). With `gradient_checkpointing` a layer keeps
//! only its input (`H`), and one layer at a time is recomputed. The dense attention adds its
//! scores, masked scores and probabilities, `3·NH·T` per token and layer.
//!
//! On wgpu the measure is the memory pool's reservation, which grows by whole pages: CubeCL's
//! pool (`MemoryConfiguration::SubSlices`) has three size classes below the adapter's largest
//! buffer `M` (pages of `M`, `M/4` and `M/16`), and the plan adds half a page of each, the
//! expected rounding of the last page. The CUDA pool's pages are a quarter of the GPU's memory;
//! its rounding is not modelled (no GPU has been lent to measure it).
//!
//! The model is validated against measured peaks (`bench step`: the CPU's peak resident set, the
//! wgpu pool's reservation on lavapipe) in `cli/tests/plan.rs`; BENCHMARKS.md records the
//! comparison. Not modelled: the collective's host buffers under data parallelism, and
//! the allocator's fragmentation on GPUs (the CUDA pool reserves in large pages).

use burn::tensor::DType;
use serde::Serialize;
use wrpo_kernels::attention::AttentionImpl;
use wrpo_models::{LlamaConfig, LoraConfig, Target};

use crate::logps::{Head, HeadImpl};
use crate::train::config::TrainConfig;

const F32: u64 = 4;

/// Bytes of the process and its runtime on a host backend (the `cpu` backend), measured: the
/// resident set of `bench step` before its model is created is 25–35 MiB.
pub const HOST_RUNTIME_BYTES: u64 = 32 << 20;

/// Where the reference log-probs come from, as far as memory goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReferenceMemory {
    /// A frozen model of the policy's size (the initial weights, or `--ref-model`).
    Model,
    /// A table of log-probs (`precompute_ref`, `--ref-logps`), or no reference at all.
    None,
}

/// What one update runs: the inputs of the plan.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Sequences in one forward (a micro-batch's rows × sequences per row, or packed rows).
    pub sequences: usize,
    /// Their padded length `T`.
    pub tokens: usize,
    /// Micro-batches per update on one device (gradient accumulation).
    pub micro_batches: usize,
    /// The LM head path.
    pub head: Head,
    /// The attention.
    pub attn: AttentionImpl,
    /// Layer checkpointing.
    pub checkpoint: bool,
    /// The reference.
    pub reference: ReferenceMemory,
    /// A host backend (the process runtime counts).
    pub host: bool,
    /// The largest page of a CubeCL memory pool whose rounding is modelled (wgpu), if any.
    pub pool_page: Option<u64>,
    /// Scored positions of a micro-batch (completion tokens), where known; else every position
    /// (`sequences × tokens`), an upper bound.
    pub scored: Option<u64>,
    /// LoRA: the base frozen, only adapters of this shape train.
    pub lora: Option<LoraShape>,
}

/// The shape of a run's LoRA adapters, for the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraShape {
    /// Rank r.
    pub r: usize,
    /// The adapted modules, a bit per [`Target::ALL`] entry.
    targets: u8,
    /// The frozen base's storage dtype (`lora_base_dtype` resolved): f32, or bf16/f16 widened to
    /// f32 at the point of use.
    pub base: DType,
}

impl LoraShape {
    /// The shape of `lora`, over a base stored in f32.
    pub fn of(lora: &LoraConfig) -> Self {
        let targets = Target::ALL
            .iter()
            .enumerate()
            .filter(|(_, t)| lora.targets.contains(t))
            .fold(0u8, |m, (i, _)| m | 1 << i);
        LoraShape {
            r: lora.r,
            targets,
            base: DType::F32,
        }
    }

    /// The same over a base stored in `base`.
    pub fn with_base(self, base: DType) -> Self {
        LoraShape { base, ..self }
    }

    fn targets(self) -> impl Iterator<Item = Target> {
        Target::ALL
            .into_iter()
            .enumerate()
            .filter(move |(i, _)| self.targets & (1 << i) != 0)
            .map(|(_, t)| t)
    }

    /// Adapter parameters of `cfg` (every layer: `r·(in + out)` per target).
    pub fn parameters(self, cfg: &LlamaConfig) -> u64 {
        let per_layer: u64 = self
            .targets()
            .map(|t| {
                let (out, inn) = t.dims(cfg);
                (self.r * (inn + out)) as u64
            })
            .sum();
        per_layer * cfg.num_layers as u64
    }

    /// The largest adapter tensor's elements.
    fn largest(self, cfg: &LlamaConfig) -> u64 {
        self.targets()
            .map(|t| {
                let (out, inn) = t.dims(cfg);
                (self.r * inn.max(out)) as u64
            })
            .max()
            .unwrap_or(0)
    }
}

impl Workload {
    /// The workload of `train` (`sequences_per_row` = chosen + rejected columns, 3 for WRPO
    /// quadruples; `ref_table`: reference log-probs read from `--ref-logps`) or `sft`
    /// (`sequences_per_row` 1, no reference) for a run configuration, with rows padded to `tokens`
    /// and every row of the micro-batch present.
    pub fn of(cfg: &TrainConfig, run: &Run) -> Self {
        let reference =
            if run.sft || run.ref_table || cfg.precompute_ref || !cfg.loss_type.needs_reference() {
                ReferenceMemory::None
            } else {
                ReferenceMemory::Model
            };
        Workload {
            sequences: cfg.per_device_train_batch_size * run.sequences_per_row,
            tokens: run.tokens,
            micro_batches: cfg.gradient_accumulation_steps,
            head: cfg.head(),
            attn: match cfg.attn_implementation {
                crate::model::AttnImpl::Tiled => AttentionImpl::Tiled {
                    block: cfg.attention_block,
                },
                crate::model::AttnImpl::Dense => AttentionImpl::Dense,
            },
            checkpoint: cfg.gradient_checkpointing,
            reference,
            host: run.host,
            pool_page: run.pool_page,
            scored: None,
            lora: cfg.lora().as_ref().map(|l| {
                // An explicit dtype the device does not store fails at load; plan it as f32.
                let base = cfg
                    .lora_base_dtype
                    .resolve(|d| run.half.stores(d))
                    .map_or(DType::F32, |store| store(run.checkpoint_dtype));
                LoraShape::of(l).with_base(base)
            }),
        }
    }
}

/// Which half-precision dtypes a device stores (where a frozen base may stay in its checkpoint's
/// bf16/f16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HalfStorage {
    /// bf16 (the CPU and CUDA; not wgpu).
    pub bf16: bool,
    /// f16 (the CPU, CUDA, wgpu adapters with SHADER_F16).
    pub f16: bool,
}

impl HalfStorage {
    /// Both (the CPU and CUDA: what `plan` assumes without `--backend`).
    pub const BOTH: HalfStorage = HalfStorage {
        bf16: true,
        f16: true,
    };

    /// What `device` stores.
    pub fn of<B: burn::tensor::backend::Backend>(device: &B::Device) -> Self {
        HalfStorage {
            bf16: B::supports_dtype(device, DType::BF16),
            f16: B::supports_dtype(device, DType::F16),
        }
    }

    /// Whether `dtype` is stored (f32 always).
    pub fn stores(self, dtype: DType) -> bool {
        match dtype {
            DType::BF16 => self.bf16,
            DType::F16 => self.f16,
            _ => true,
        }
    }
}

/// What a run is, beyond its settings: the recipe and the data's shape.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// `sft` (else `train`).
    pub sft: bool,
    /// Reference log-probs read from a file (`--ref-logps`).
    pub ref_table: bool,
    /// Sequences a row brings to the forward (chosen + rejected; 1 for `sft`).
    pub sequences_per_row: usize,
    /// The padded length `T`.
    pub tokens: usize,
    /// A host backend.
    pub host: bool,
    /// The wgpu memory pool's largest page (see [`Workload::pool_page`]).
    pub pool_page: Option<u64>,
    /// The dtype the checkpoint is saved in ([`LlamaConfig::checkpoint_dtype`]).
    pub checkpoint_dtype: DType,
    /// The half-precision dtypes the device stores.
    pub half: HalfStorage,
}

/// A moment of one update at which memory peaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The start of the backward: the LM head's backward, every saved activation alive.
    Head,
    /// The backward through the layers (with checkpointing: one layer recomputed at a time).
    Layers,
    /// The optimizer step.
    Update,
}

impl Phase {
    const ALL: [Phase; 3] = [Phase::Head, Phase::Layers, Phase::Update];

    fn describe(self) -> &'static str {
        match self {
            Phase::Head => "at the start of the backward (the LM head's)",
            Phase::Layers => "in the backward through the layers",
            Phase::Update => "during the optimizer step",
        }
    }
}

/// One part of the plan.
#[derive(Debug, Clone, Serialize)]
pub struct Part {
    /// Its name (weights, gradients, optimizer, reference, activations, logits / head, workspace).
    pub name: &'static str,
    /// What it holds.
    pub detail: String,
    /// Bytes.
    pub bytes: u64,
    /// When it is held: empty = for the whole run.
    pub phases: Vec<Phase>,
}

/// The predicted peak of one update, in parts.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryPlan {
    /// Parameters `P` of the model.
    pub parameters: u64,
    /// Trainable parameters: `P`, or the LoRA adapters'.
    pub trainable: u64,
    /// The parts; the peak is the sum of the parts held at the [`MemoryPlan::peak_phase`].
    pub parts: Vec<Part>,
    /// The moment that sets the peak.
    pub peak_phase: Phase,
    /// Predicted peak bytes.
    pub peak: u64,
}

/// `P` of a LLaMA (`wrpo_models::llama::param_specs`).
pub fn parameters(cfg: &LlamaConfig) -> u64 {
    wrpo_models::llama::param_specs(cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum()
}

/// The largest parameter tensor's elements.
fn largest_tensor(cfg: &LlamaConfig) -> u64 {
    wrpo_models::llama::param_specs(cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .max()
        .unwrap_or(0)
}

/// The largest weight of a decoder layer's linear layers, in elements.
fn largest_layer_weight(cfg: &LlamaConfig) -> u64 {
    wrpo_models::llama::body_param_specs(cfg)
        .iter()
        .filter(|(n, s)| n.starts_with("model.layers.") && s.len() == 2)
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .max()
        .unwrap_or(0)
}

/// A dtype as the plan prints it.
fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// A product that saturates instead of overflowing (absurd settings give an absurd plan, not a
/// panic).
fn mul(xs: &[u64]) -> u64 {
    xs.iter().fold(1u64, |a, &x| a.saturating_mul(x))
}

/// The plan of `w` on the model `cfg`.
pub fn plan(cfg: &LlamaConfig, w: &Workload) -> MemoryPlan {
    use Phase::{Head as HD, Layers as LY, Update as UP};
    let p = parameters(cfg);
    let (h, i, v, l) = (
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
        cfg.vocab_size as u64,
        cfg.num_layers as u64,
    );
    let q = (cfg.num_heads * cfg.head_dim) as u64;
    let kv = (cfg.num_kv_heads * cfg.head_dim) as u64;
    let nh = cfg.num_heads as u64;
    let (n, t) = (w.sequences.max(1) as u64, w.tokens.max(1) as u64);
    let tokens = mul(&[n, t]);
    let mut parts = vec![];
    let mut part = |name, detail: String, bytes: u64, phases: &[Phase]| {
        parts.push(Part {
            name,
            detail,
            bytes,
            phases: phases.to_vec(),
        })
    };

    // The optimizer's parameters: every weight, or the adapters.
    let (tp, largest) = match w.lora {
        None => {
            part(
                "weights",
                format!("{} trainable parameters, f32", count(p)),
                F32 * p,
                &[],
            );
            (p, largest_tensor(cfg))
        }
        Some(lora) => {
            let a = lora.parameters(cfg);
            let base = lora.base.size() as u64;
            part(
                "weights",
                format!(
                    "{} frozen base parameters, {}",
                    count(p),
                    dtype_name(lora.base)
                ),
                base * p,
                &[],
            );
            if base < F32 {
                // Widened at the point of use: the head's weight in its forward and backward,
                // one layer weight at a time in the layers'.
                part(
                    "workspace",
                    format!("the head weight [V {v}, H {h}] widened to f32"),
                    F32 * v * h,
                    &[HD],
                );
                part(
                    "workspace",
                    "one decoder-layer weight widened to f32".into(),
                    F32 * largest_layer_weight(cfg),
                    &[LY],
                );
            }
            part(
                "weights",
                format!("{} trainable LoRA parameters (r {}), f32", count(a), lora.r),
                F32 * a,
                &[],
            );
            (a, lora.largest(cfg))
        }
    };
    part(
        "optimizer",
        "AdamW exp_avg and exp_avg_sq, f32".into(),
        2 * F32 * tp,
        &[],
    );
    match w.reference {
        _ if w.lora.is_some() => part(
            "reference",
            "the frozen base with the adapters off (shared, no copy)".into(),
            0,
            &[],
        ),
        ReferenceMemory::Model => part(
            "reference",
            "a frozen f32 copy of the weights (none with precompute_ref)".into(),
            F32 * p,
            &[],
        ),
        ReferenceMemory::None => part(
            "reference",
            "none (a log-prob table, a reference-free loss, or sft)".into(),
            0,
            &[],
        ),
    }

    // Saved activations, in elements (the module docs count them).
    let dense_attn = matches!(w.attn, AttentionImpl::Dense);
    // LoRA saves each adapter's `x·Aᵀ` (`r` per token and target) for B's gradient.
    let lora_per_token = w.lora.map_or(0, |x| (x.r * x.targets().count()) as u64);
    let per_token = 6 * h
        + 3 * q
        + 2 * kv
        + 5 * i
        + lora_per_token
        + if dense_attn { mul(&[3, nh, t]) } else { 0 };
    let per_layer = mul(&[per_token, tokens]);
    let outside = mul(&[4, h, tokens]);
    if w.checkpoint {
        part(
            "activations",
            format!("N {n} × T {t}: the inputs of {l} checkpointed layers"),
            mul(&[F32, l, h, tokens]).saturating_add(mul(&[F32, outside])),
            &[HD, LY],
        );
        part(
            "activations",
            "one layer recomputed in the backward".into(),
            mul(&[F32, per_layer]),
            &[LY],
        );
    } else {
        part(
            "activations",
            format!("N {n} × T {t}, {l} layers, saved for the backward"),
            mul(&[F32, l, per_layer]).saturating_add(mul(&[F32, outside])),
            &[HD, LY],
        );
    }
    match w.head.imp {
        HeadImpl::Fused => {
            let scored = w.scored.unwrap_or(tokens).min(tokens);
            let chunk = (w.head.chunk_for(cfg.vocab_size) as u64).min(scored);
            part(
                "logits / head",
                format!("fused head: two [{chunk}, V {v}] blocks recomputed in the backward"),
                2 * F32 * chunk * v,
                &[HD],
            );
        }
        HeadImpl::Dense => part(
            "logits / head",
            format!("dense head: exp(logits − max) [N {n}, T {t}, V {v}], saved, and one gradient of that shape"),
            mul(&[2, F32, tokens, v]),
            &[HD],
        ),
    }
    if w.lora.is_none() {
        part(
            "logits / head",
            format!("the head weight's gradient [V {v}, H {h}]"),
            F32 * v * h,
            &[HD, LY],
        );
    }
    if let AttentionImpl::Tiled { block } = w.attn {
        let block = (block as u64).min(t);
        part(
            "workspace",
            format!("tiled attention: scores of a {block}-query block, in the backward"),
            mul(&[3, F32, n, nh, block, t]),
            &[LY],
        );
    }
    if w.micro_batches > 1 {
        part(
            "gradients",
            format!(
                "f32, the sum over {} micro-batches (accumulated)",
                w.micro_batches
            ),
            F32 * tp,
            &[HD, LY, UP],
        );
        part(
            "gradients",
            "one micro-batch's, added to the sum".into(),
            F32 * tp,
            &[UP],
        );
    } else {
        part("gradients", "f32".into(), F32 * tp, &[UP]);
    }
    part(
        "workspace",
        "AdamW: four temporaries of the largest tensor".into(),
        4 * F32 * largest,
        &[UP],
    );
    if let Some(page) = w.pool_page {
        part(
            "workspace",
            format!(
                "the memory pool's rounding to pages: half a page of each size class ({}, {}, {})",
                human(page),
                human(page / 4),
                human(page / 16)
            ),
            (page + page / 4 + page / 16) / 2,
            &[],
        );
    }
    if w.host {
        part(
            "workspace",
            "the process and its runtime (host backend)".into(),
            HOST_RUNTIME_BYTES,
            &[],
        );
    }
    let at = |ph: Phase| -> u64 {
        parts
            .iter()
            .filter(|x| x.phases.is_empty() || x.phases.contains(&ph))
            .fold(0u64, |a, x| a.saturating_add(x.bytes))
    };
    let (peak_phase, peak) = Phase::ALL
        .into_iter()
        .map(|ph| (ph, at(ph)))
        .max_by_key(|&(_, b)| b)
        .expect("three phases");
    MemoryPlan {
        parameters: p,
        trainable: tp,
        parts,
        peak_phase,
        peak,
    }
}

impl MemoryPlan {
    /// The plan as lines of text (MiB, GiB from 10 GiB); `*` marks the parts held at the peak.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for part in &self.parts {
            let when = match part.phases.as_slice() {
                [] => "always".to_string(),
                ph => ph
                    .iter()
                    .map(|p| match p {
                        Phase::Head => "head bwd",
                        Phase::Layers => "layers bwd",
                        Phase::Update => "optimizer",
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            let counted = part.phases.is_empty() || part.phases.contains(&self.peak_phase);
            s.push_str(&format!(
                "  {} {:<14} {:>10}  {:<22} {}\n",
                if counted { "*" } else { " " },
                part.name,
                human(part.bytes),
                when,
                part.detail,
            ));
        }
        s.push_str(&format!(
            "  = {:<14} {:>10}  predicted peak of one update, {} (the sum of the * parts)\n",
            "peak",
            human(self.peak),
            self.peak_phase.describe()
        ));
        s
    }
}

/// A parameter count: 124.4M, 8.03B.
pub fn count(p: u64) -> String {
    if p >= 1_000_000_000 {
        format!("{:.2}B", p as f64 / 1e9)
    } else {
        format!("{:.1}M", p as f64 / 1e6)
    }
}

/// Bytes as MiB, or GiB from 10 GiB.
pub fn human(b: u64) -> String {
    if b >= 10 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", b as f64 / 1048576.0)
    }
}

/// Parse a memory size: `80GB`, `80G`, `24GiB`, `512MiB`, `512M`, or bytes. GB and GiB are both
/// 2^30 (GPU memory is quoted in binary units: an "80 GB" H100 has 80 GiB).
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a memory size (e.g. 80GB, 24GiB, 512MiB)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (use B, KiB, MiB, GiB, TiB or KB/MB/GB/TB)"
            ))
        }
    };
    if !(x > 0.0 && x.is_finite()) {
        return Err(format!("{s:?}: a memory size must be positive"));
    }
    Ok((x * mult as f64) as u64)
}

/// The largest micro-batch (rows per device) of `base` whose plan fits in `memory` bytes, with
/// `sequences_per_row` sequences a row; `None` when not even one row fits.
pub fn largest_micro_batch(
    cfg: &LlamaConfig,
    base: &Workload,
    sequences_per_row: usize,
    memory: u64,
) -> Option<usize> {
    let fits = |rows: usize| {
        let w = Workload {
            sequences: rows * sequences_per_row,
            scored: None,
            ..*base
        };
        plan(cfg, &w).peak <= memory
    };
    if !fits(1) {
        return None;
    }
    // The peak grows with the rows: double, then bisect.
    let mut hi = 1usize;
    while hi < 1 << 20 && fits(hi * 2) {
        hi *= 2;
    }
    let (mut lo, mut hi) = (hi, hi * 2);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid) {
            lo = mid
        } else {
            hi = mid
        }
    }
    Some(lo)
}

/// Settings that make `cfg`'s run fit in `memory` bytes, each with its predicted peak: the ones a
/// user sets first (`precompute_ref`, `gradient_checkpointing`, the fused head, the tiled
/// attention), then the largest micro-batch that fits with more accumulation to keep the global
/// batch, then all of them together.
pub fn advice(
    model: &LlamaConfig,
    cfg: &TrainConfig,
    run: &Run,
    memory: u64,
) -> Vec<(String, u64)> {
    let (sft, sequences_per_row) = (run.sft, run.sequences_per_row);
    let peak = |c: &TrainConfig| plan(model, &Workload::of(c, run)).peak;
    let mut out = vec![];
    let mut all = cfg.clone();
    let try_one = |name: String, c: TrainConfig, out: &mut Vec<(String, u64)>| {
        let b = peak(&c);
        if b <= memory {
            out.push((name, b));
        }
    };
    if !sft && !cfg.precompute_ref && Workload::of(cfg, run).reference == ReferenceMemory::Model {
        let c = TrainConfig {
            precompute_ref: true,
            ..cfg.clone()
        };
        all.precompute_ref = true;
        try_one("--precompute-ref true".into(), c, &mut out);
    }
    if !cfg.gradient_checkpointing {
        let c = TrainConfig {
            gradient_checkpointing: true,
            ..cfg.clone()
        };
        all.gradient_checkpointing = true;
        try_one("--gradient-checkpointing true".into(), c, &mut out);
    }
    if cfg.lm_head_impl == HeadImpl::Dense {
        let c = TrainConfig {
            lm_head_impl: HeadImpl::Fused,
            ..cfg.clone()
        };
        all.lm_head_impl = HeadImpl::Fused;
        try_one("--lm-head-impl fused".into(), c, &mut out);
    }
    if cfg.attn_implementation == crate::model::AttnImpl::Dense {
        let c = TrainConfig {
            attn_implementation: crate::model::AttnImpl::Tiled,
            ..cfg.clone()
        };
        all.attn_implementation = crate::model::AttnImpl::Tiled;
        try_one("--attn-implementation tiled".into(), c, &mut out);
    }
    if cfg.lora_r == 0 {
        // LoRA on every linear layer, at a common rank (frozen base, no reference copy).
        let c = lora_preset(cfg);
        all = lora_preset(&all);
        try_one(LORA_ADVICE.into(), c, &mut out);
    }
    let global = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps;
    let smaller = |c: &TrainConfig| -> Option<TrainConfig> {
        let w = Workload::of(c, run);
        let rows = largest_micro_batch(
            model,
            &Workload {
                micro_batches: 2,
                ..w
            },
            sequences_per_row,
            memory,
        )?
        .min(c.per_device_train_batch_size);
        (rows < c.per_device_train_batch_size).then(|| TrainConfig {
            per_device_train_batch_size: rows,
            gradient_accumulation_steps: global.div_ceil(rows),
            ..c.clone()
        })
    };
    let describe = |c: &TrainConfig| {
        format!(
            "--per-device-train-batch-size {} --gradient-accumulation-steps {}",
            c.per_device_train_batch_size, c.gradient_accumulation_steps
        )
    };
    if let Some(c) = smaller(cfg) {
        try_one(describe(&c), c, &mut out);
    }
    if out.is_empty() {
        let both = smaller(&all).unwrap_or(all);
        let mut name = vec![];
        for (on, flag) in [
            (
                both.precompute_ref && !cfg.precompute_ref,
                "--precompute-ref true",
            ),
            (
                both.gradient_checkpointing && !cfg.gradient_checkpointing,
                "--gradient-checkpointing true",
            ),
            (
                both.lm_head_impl != cfg.lm_head_impl,
                "--lm-head-impl fused",
            ),
            (
                both.attn_implementation != cfg.attn_implementation,
                "--attn-implementation tiled",
            ),
            (both.lora_r != cfg.lora_r, LORA_ADVICE),
        ] {
            if on {
                name.push(flag.to_string());
            }
        }
        if both.per_device_train_batch_size != cfg.per_device_train_batch_size {
            name.push(describe(&both));
        }
        if !name.is_empty() {
            try_one(name.join(" "), both, &mut out);
        }
    }
    out
}

/// The LoRA settings [`advice`] proposes.
const LORA_ADVICE: &str = "--lora-r 16 --lora-alpha 32 --lora-target-modules all-linear";

fn lora_preset(cfg: &TrainConfig) -> TrainConfig {
    TrainConfig {
        lora_r: 16,
        lora_alpha: 32.0,
        lora_target_modules: crate::train::config::LoraTargets(Target::ALL.to_vec()),
        ..cfg.clone()
    }
}

/// Stop when `plan` exceeds `memory` (the device's, when it reports one): the plan, and the
/// settings that would fit ([`advice`]).
pub fn check_fits(
    plan: &MemoryPlan,
    memory: Option<u64>,
    device: &str,
    advice: impl FnOnce(u64) -> Vec<(String, u64)>,
) -> anyhow::Result<()> {
    let Some(memory) = memory else { return Ok(()) };
    if plan.peak <= memory {
        return Ok(());
    }
    let fixes = advice(memory);
    let fixes = if fixes.is_empty() {
        format!(
            "no setting of this trainer fits it, LoRA included (its frozen base alone needs {} in bf16/f16, {} in f32; a sharded optimizer is not available yet); use a device with more memory or a smaller model",
            human(2 * plan.parameters),
            human(4 * plan.parameters)
        )
    } else {
        fixes
            .iter()
            .map(|(f, b)| format!("  {f}   (predicted peak {})", human(*b)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    anyhow::bail!(
        "this run needs more memory than {device} has: predicted peak {} > {} available (the memory plan above; nothing was loaded or written)\nsettings that fit:\n{fixes}",
        human(plan.peak),
        human(memory),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama(v: usize, h: usize, i: usize, l: usize, nh: usize, nkv: usize) -> LlamaConfig {
        LlamaConfig::tiny(v, h, i, l, nh, nkv, false)
    }

    fn work(sequences: usize, tokens: usize) -> Workload {
        Workload {
            sequences,
            tokens,
            micro_batches: 1,
            head: Head {
                imp: HeadImpl::Fused,
                chunk: 0,
            },
            attn: AttentionImpl::Tiled { block: 128 },
            checkpoint: false,
            reference: ReferenceMemory::Model,
            host: false,
            pool_page: None,
            scored: None,
            lora: None,
        }
    }

    fn part(p: &MemoryPlan, name: &str) -> u64 {
        p.parts
            .iter()
            .filter(|x| x.name == name)
            .map(|x| x.bytes)
            .sum()
    }

    /// LoRA: the base's weights stay (4P), the adapters carry weights, gradients and AdamW state
    /// (16A + workspace), no reference copy and no head-weight gradient; the count of adapter
    /// parameters is PEFT's `r·(in + out)` per targeted layer.
    #[test]
    fn lora_plan_holds_the_frozen_base_and_the_adapters() {
        let cfg = llama(1000, 64, 96, 2, 4, 2);
        let full = plan(
            &cfg,
            &Workload {
                reference: ReferenceMemory::Model,
                ..work(3, 32)
            },
        );
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec![Target::Q, Target::Down],
            rslora: false,
        };
        let shape = LoraShape::of(&lora);
        let a = shape.parameters(&cfg);
        assert_eq!(a, lora.count(&cfg) as u64);
        // q: 4·(64 + 64), down: 4·(96 + 64), per layer, 2 layers.
        assert_eq!(a, 2 * (4 * 128 + 4 * 160));
        let w = Workload {
            reference: ReferenceMemory::Model,
            lora: Some(shape),
            ..work(3, 32)
        };
        let p = plan(&cfg, &w);
        assert_eq!(part(&p, "weights"), 4 * (p.parameters + a));
        assert_eq!(part(&p, "optimizer"), 8 * a);
        assert_eq!(part(&p, "reference"), 0);
        assert_eq!(part(&p, "gradients"), 4 * a);
        assert_eq!(p.trainable, a);
        assert!(part(&p, "logits / head") < part(&full, "logits / head"));
        assert!(p.peak < full.peak, "{} vs {}", p.peak, full.peak);

        // A bf16 base: 2 bytes per frozen parameter, plus the widened f32 copies in use (the
        // head's [V, H] at the head's backward, the largest layer weight, down's [H, I], in
        // the layers').
        let half = plan(
            &cfg,
            &Workload {
                lora: Some(shape.with_base(DType::BF16)),
                ..w
            },
        );
        assert_eq!(part(&half, "weights"), 2 * half.parameters + 4 * a);
        let widened: Vec<u64> = half
            .parts
            .iter()
            .filter(|x| x.detail.contains("widened"))
            .map(|x| x.bytes)
            .collect();
        assert_eq!(widened, vec![4 * 1000 * 64, 4 * 96 * 64]);
        assert!(half.peak < p.peak);
    }

    /// `lora_base_dtype auto` keeps a half-precision checkpoint's dtype where the device stores
    /// it, f32 elsewhere; an explicit dtype the device lacks is an error naming the flag.
    #[test]
    fn base_dtype_follows_the_checkpoint_and_the_device() {
        use crate::model::BaseDtype;
        let wgpu = HalfStorage {
            bf16: false,
            f16: true,
        };
        let auto = BaseDtype::Auto
            .resolve(|d| HalfStorage::BOTH.stores(d))
            .unwrap();
        assert_eq!(auto(DType::BF16), DType::BF16);
        assert_eq!(auto(DType::F16), DType::F16);
        assert_eq!(auto(DType::F32), DType::F32);
        let auto = BaseDtype::Auto.resolve(|d| wgpu.stores(d)).unwrap();
        assert_eq!(auto(DType::BF16), DType::F32);
        assert_eq!(auto(DType::F16), DType::F16);
        let forced = BaseDtype::F16.resolve(|d| wgpu.stores(d)).unwrap();
        assert_eq!(forced(DType::F32), DType::F16);
        let f32 = BaseDtype::F32.resolve(|d| wgpu.stores(d)).unwrap();
        assert_eq!(f32(DType::BF16), DType::F32);
        let err = BaseDtype::Bf16
            .resolve(|d| wgpu.stores(d))
            .err()
            .expect("bf16 on a device without it")
            .to_string();
        assert!(
            err.contains("--lora-base-dtype bf16") && err.contains("f16"),
            "{err}"
        );
    }

    #[test]
    fn parameters_and_the_parts_held_throughout() {
        // Llama-3-8B: 8,030,261,248 parameters (the published count).
        let c = llama(128256, 4096, 14336, 32, 32, 8);
        assert_eq!(parameters(&c), 8_030_261_248);
        let p = plan(&c, &work(6, 2048));
        assert_eq!(part(&p, "weights"), 4 * 8_030_261_248);
        assert_eq!(part(&p, "optimizer"), 8 * 8_030_261_248);
        assert_eq!(part(&p, "reference"), 4 * 8_030_261_248);
        // The peak is the sum of what its phase holds.
        let at: u64 = p
            .parts
            .iter()
            .filter(|x| x.phases.is_empty() || x.phases.contains(&p.peak_phase))
            .map(|x| x.bytes)
            .sum();
        assert_eq!(at, p.peak);
    }

    #[test]
    fn settings_move_the_parts_they_should() {
        let c = llama(32000, 512, 1376, 4, 8, 2);
        let base = plan(&c, &work(6, 1024));
        let ckpt = plan(
            &c,
            &Workload {
                checkpoint: true,
                ..work(6, 1024)
            },
        );
        assert!(part(&ckpt, "activations") < part(&base, "activations") / 2);
        let no_ref = plan(
            &c,
            &Workload {
                reference: ReferenceMemory::None,
                ..work(6, 1024)
            },
        );
        assert_eq!(base.peak - no_ref.peak, 4 * base.parameters);
        // Activations grow linearly in T with the tiled attention, quadratically with the dense.
        let act = |t: usize, attn| part(&plan(&c, &Workload { attn, ..work(6, t) }), "activations");
        let tiled = AttentionImpl::Tiled { block: 128 };
        assert_eq!(act(2048, tiled), 2 * act(1024, tiled));
        let dense = AttentionImpl::Dense;
        assert!(act(2048, dense) > 2 * act(1024, dense) + act(1024, dense) / 4);
        // Accumulation holds the running sum through the backward.
        let acc = plan(
            &c,
            &Workload {
                micro_batches: 4,
                ..work(6, 1024)
            },
        );
        assert!(acc.peak >= base.peak + 4 * base.parameters);
    }

    #[test]
    fn largest_micro_batch_is_the_edge_of_fitting() {
        let c = llama(32000, 512, 1376, 4, 8, 8);
        let w = work(3, 512);
        for gib in [2u64, 3, 8] {
            let m = gib << 30;
            let b = largest_micro_batch(&c, &w, 3, m).expect("one row fits");
            let at = |rows| {
                plan(
                    &c,
                    &Workload {
                        sequences: 3 * rows,
                        ..w
                    },
                )
                .peak
            };
            assert!(at(b) <= m && at(b + 1) > m, "{gib} GiB: {b} rows");
        }
        assert_eq!(largest_micro_batch(&c, &w, 3, 1 << 20), None);
    }

    #[test]
    fn memory_sizes_parse_with_units() {
        assert_eq!(parse_memory("80GB"), Ok(80 << 30));
        assert_eq!(parse_memory("24GiB"), Ok(24 << 30));
        assert_eq!(parse_memory("512MiB"), Ok(512 << 20));
        assert_eq!(parse_memory("1.5G"), Ok(3 << 29));
        assert_eq!(parse_memory("4096"), Ok(4096));
        assert!(parse_memory("80 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_memory("GB").is_err());
        assert!(parse_memory("0GB").is_err());
    }

    #[test]
    fn advice_lists_settings_that_fit() {
        let model = llama(32000, 512, 1376, 4, 8, 8);
        let cfg = TrainConfig {
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            max_length: 1024,
            ..TrainConfig::default()
        };
        let run = Run {
            sft: false,
            ref_table: false,
            sequences_per_row: 3,
            tokens: 1024,
            host: false,
            pool_page: None,
            checkpoint_dtype: DType::F32,
            half: HalfStorage::BOTH,
        };
        let full = plan(&model, &Workload::of(&cfg, &run)).peak;
        let memory = full * 3 / 4;
        let fixes = advice(&model, &cfg, &run, memory);
        assert!(!fixes.is_empty());
        for (flags, peak) in &fixes {
            assert!(*peak <= memory, "{flags}: {peak} > {memory}");
        }
        // Checkpointing fits here (activations dominate); a smaller micro-batch keeps the global
        // batch with more accumulation.
        assert!(
            fixes
                .iter()
                .any(|(f, _)| f == "--gradient-checkpointing true"),
            "{fixes:?}"
        );
        let smaller = fixes
            .iter()
            .find(|(f, _)| f.starts_with("--per-device-train-batch-size"))
            .expect("a smaller micro-batch");
        let nums: Vec<usize> = smaller
            .0
            .split(' ')
            .filter_map(|x| x.parse().ok())
            .collect();
        assert!(nums[0] < 8 && nums[0] * nums[1] >= 8, "{smaller:?}");
    }
}
