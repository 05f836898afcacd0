//! The trainer's run configuration: one YAML file whose keys are the WRPO authors' (HF
//! `TrainingArguments` + their WRPO config), every key also a kebab-case CLI flag that overrides
//! the file. Defaults are the authors' WRPO configuration (../shared/reference/WRPO.md,
//! "Hyperparameters"). Unknown keys are an error.
//!
//! One macro writes the three views of the key list, so they cannot drift: [`TrainConfig`] (the
//! resolved values, printed at start and saved in every checkpoint), [`TrainArgs`] (every key
//! optional: a YAML file or the command line) and the defaults.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Which objective `train` optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossType {
    /// WRPO: sigmoid loss on the α-blend of source and target rewards vs the rejected one.
    Wrpo,
    /// DPO on (target chosen, rejected): WRPO with α = 0.
    Dpo,
    /// SimPO on (target chosen, rejected): length-normalised, reference-free, margin γ.
    Simpo,
    /// IPO on (target chosen, rejected): squared loss on per-token log-ratios.
    Ipo,
    /// SimPO with WRPO's α-blend on the preferred side.
    WrpoSimpo,
    /// IPO with WRPO's α-blend on the preferred side.
    WrpoIpo,
}

impl LossType {
    /// Whether the objective blends source responses with α (else α = 0 and sources are unused).
    pub fn blends(self) -> bool {
        matches!(self, Self::Wrpo | Self::WrpoSimpo | Self::WrpoIpo)
    }
    /// Whether the objective reads reference log-probs.
    pub fn needs_reference(self) -> bool {
        !matches!(self, Self::Simpo | Self::WrpoSimpo)
    }
}

/// The kind of a setting's value, for a front end to parse and document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `true` or `false`.
    Bool,
    /// A non-negative integer.
    Unsigned,
    /// An integer that may be negative.
    Signed,
    /// A number.
    Float,
    /// One of named values: (name, documentation).
    Choice(&'static [(&'static str, &'static str)]),
    /// Text (a list in YAML may also be written comma-separated).
    Text,
}

/// One training setting (see [`SETTINGS`]).
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The key (snake_case, as in YAML files; flags are its kebab-case).
    pub name: &'static str,
    /// Its documentation, one line per source line.
    pub doc: &'static str,
    /// Its value's kind.
    pub kind: Kind,
    /// Another name for its flag.
    pub alias: Option<&'static str>,
}

/// The [`Kind`] of a setting's Rust type.
pub trait SettingValue {
    /// The kind.
    const KIND: Kind;
}

impl SettingValue for bool {
    const KIND: Kind = Kind::Bool;
}
impl SettingValue for usize {
    const KIND: Kind = Kind::Unsigned;
}
impl SettingValue for u64 {
    const KIND: Kind = Kind::Unsigned;
}
impl SettingValue for i64 {
    const KIND: Kind = Kind::Signed;
}
impl SettingValue for f64 {
    const KIND: Kind = Kind::Float;
}

/// An enum setting's values by name (its serde names), documented.
pub trait Choice: Sized + serde::de::DeserializeOwned + Serialize {
    /// (name, documentation) of every value.
    const VALUES: &'static [(&'static str, &'static str)];
    /// The value called `name`.
    fn from_name(name: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
    }
    /// This value's name.
    fn name(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

macro_rules! choice {
    ($ty:ty { $($name:literal : $doc:literal),* $(,)? }) => {
        impl Choice for $ty {
            const VALUES: &'static [(&'static str, &'static str)] = &[$(($name, $doc)),*];
        }
        impl SettingValue for $ty {
            const KIND: Kind = Kind::Choice(<$ty as Choice>::VALUES);
        }
    };
}

choice!(LossType {
    "wrpo": "WRPO: sigmoid loss on the α-blend of source and target rewards vs the rejected one",
    "dpo": "DPO on (target chosen, rejected): WRPO with α = 0",
    "simpo": "SimPO on (target chosen, rejected): length-normalised, reference-free, margin γ",
    "ipo": "IPO on (target chosen, rejected): squared loss on per-token log-ratios",
    "wrpo-simpo": "SimPO with WRPO's α-blend on the preferred side",
    "wrpo-ipo": "IPO with WRPO's α-blend on the preferred side",
});
choice!(LrSchedule {
    "constant": "Constant, no warm-up",
    "constant_with_warmup": "Linear warm-up, then constant",
    "linear": "Linear warm-up, then linear decay to 0",
    "cosine": "Linear warm-up, then half a cosine to 0",
});
choice!(crate::logps::HeadImpl {
    "fused": "Only scored positions go through the LM head, fused with the log-probs a block at a time; no [N, T, V] logits",
    "dense": "The full [N, T, V] logits, then the log-prob op: the tested reference",
});
choice!(crate::model::BaseDtype {
    "auto": "The checkpoint's dtype where the device stores it (bf16/f16: 2 bytes per parameter), else f32",
    "f32": "f32 whatever the checkpoint holds",
    "bf16": "bf16 (an f32 checkpoint rounded); not on wgpu",
    "f16": "f16 (an f32 checkpoint rounded); wgpu needs SHADER_F16",
});
choice!(crate::model::AttnImpl {
    "tiled": "A block of queries at a time, memory linear in T",
    "dense": "The full [B, NH, T, T] scores: the tested reference",
});

/// Learning-rate schedule (HF `lr_scheduler_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Constant, no warm-up.
    Constant,
    /// Linear warm-up, then constant.
    ConstantWithWarmup,
    /// Linear warm-up, then linear decay to 0.
    Linear,
    /// Linear warm-up, then half a cosine to 0.
    Cosine,
}

macro_rules! train_config {
    (@alias $alias:literal) => { Some($alias) };
    (@alias) => { None };
    ($( $(#[doc = $doc:literal])* $(#[alias = $alias:literal])? $name:ident : $ty:ty = $default:expr ;)*) => {
        /// The resolved training configuration (defaults ← YAML file ← command line). Keys
        /// missing from a saved one (a checkpoint of an older version) take their defaults.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct TrainConfig {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        impl Default for TrainConfig {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        /// Every configuration key, optional: the YAML file's content or the command line's
        /// flags (kebab-case, e.g. `--learning-rate`).
        #[derive(Debug, Clone, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct TrainArgs {
            $( $(#[doc = $doc])* pub $name: Option<$ty>, )*
        }

        /// Every setting described for a front end (the CLI builds its flags from this): name,
        /// documentation, value kind and an alias. A front end that collects values by name can
        /// turn them into [`TrainArgs`] with serde.
        pub const SETTINGS: &[Setting] = &[
            $( Setting {
                name: stringify!($name),
                doc: concat!($($doc, "\n",)* ""),
                kind: <$ty as SettingValue>::KIND,
                alias: train_config!(@alias $($alias)?),
            }, )*
        ];

        impl TrainArgs {
            /// Keys set here replace those of `base`.
            pub fn apply(&self, base: &mut TrainConfig) {
                $( if let Some(v) = &self.$name { base.$name = v.clone(); } )*
            }
            /// `self`'s keys where set, else `lower`'s.
            pub fn or(self, lower: TrainArgs) -> TrainArgs {
                TrainArgs { $( $name: self.$name.or(lower.$name), )* }
            }
        }
    };
}

train_config! {
    /// Peak learning rate (authors' WRPO: 3e-7).
    learning_rate: f64 = 3e-7;
    /// β, the reward scale (authors: 0.01).
    beta: f64 = 0.01;
    /// α: the final weight of the source responses (authors: 0.1). Ignored by dpo/simpo/ipo.
    alpha: f64 = 0.1;
    /// true: α grows linearly from 0 to `alpha` over the run (α(s) = alpha·s/T); false: α = alpha.
    is_dynamic: bool = true;
    /// The objective.
    #[alias = "loss"]
    loss_type: LossType = LossType::Wrpo;
    /// SimPO's target reward margin γ (simpo, wrpo-simpo).
    simpo_gamma: f64 = 0.5;
    /// Label smoothing ε (wrpo, dpo, simpo; the authors never set it).
    label_smoothing: f64 = 0.0;
    /// Rows per micro-batch (all their sequences go through one forward).
    per_device_train_batch_size: usize = 2;
    /// Micro-batches per optimizer update.
    gradient_accumulation_steps: usize = 8;
    /// Passes over the data (used when max_steps ≤ 0).
    num_train_epochs: usize = 1;
    /// Total optimizer updates; -1 = from num_train_epochs.
    max_steps: i64 = -1;
    /// Longest prompt + completion, in tokens (longer rows are truncated, TRL-style).
    max_length: usize = 2048;
    /// Prompt tokens kept when a row is too long.
    max_prompt_length: usize = 1800;
    /// Learning-rate schedule.
    lr_scheduler_type: LrSchedule = LrSchedule::Cosine;
    /// Warm-up as a fraction of the total updates (ceil), used when warmup_steps is 0.
    warmup_ratio: f64 = 0.1;
    /// Warm-up updates (overrides warmup_ratio when > 0).
    warmup_steps: usize = 0;
    /// Clip the global gradient norm to this (0 = no clipping).
    max_grad_norm: f64 = 1.0;
    /// AdamW decoupled weight decay (PyTorch/HF default 0).
    weight_decay: f64 = 0.0;
    /// AdamW β1.
    adam_beta1: f64 = 0.9;
    /// AdamW β2.
    adam_beta2: f64 = 0.999;
    /// AdamW ε.
    adam_epsilon: f64 = 1e-8;
    /// Seed of the data order (and of the embedded model).
    seed: u64 = 42;
    /// Shuffle the rows each epoch (seeded); false keeps file order.
    shuffle: bool = true;
    /// Write a metrics record every this many updates.
    logging_steps: usize = 1;
    /// Write a checkpoint every this many updates (0 = only the final model).
    save_steps: usize = 500;
    /// Keep only the newest this many checkpoints (0 = keep all).
    save_total_limit: usize = 0;
    /// Evaluate every this many updates when an eval split is given (0 = only at the end).
    eval_steps: usize = 0;
    /// Hold out this fraction of the rows (seeded) as the eval split when no --eval-data is given.
    eval_fraction: f64 = 0.0;
    /// Compute all reference log-probs once before training and cache them on disk.
    precompute_ref: bool = false;
    /// Skip (and count) bad rows instead of failing.
    skip_bad_rows: bool = false;
    /// sft: loss on completion tokens only (false: on every token, as the authors' packed SFT).
    completion_only: bool = true;
    /// sft: pack several examples into sequences of up to `max_length` tokens (each attends only
    /// to itself, positions restart per example); the batch size then counts packed sequences.
    packing: bool = false;
    /// train: padding-free batches (TRL's `padding_free`): the sequences of a micro-batch (every
    /// row's chosen and rejected responses) are packed into rows no longer than its longest
    /// sequence, each attending only to itself, for the policy and the reference model, instead
    /// of one row per sequence padded to the longest. Same log-probs up to f32 rounding.
    padding_free: bool = false;
    /// From the final hidden states to log-probs: `fused` (only completion positions go through
    /// the LM head, a block at a time, fused with the log-probs: the `[N, T, V]` logits are never
    /// built) or `dense` (the full logits, then the log-probs: the reference).
    lm_head_impl: crate::logps::HeadImpl = crate::logps::HeadImpl::Fused;
    /// Positions per block of the fused LM head (0 = automatic: about 16M logits per block, 130
    /// positions at a 128k vocabulary).
    lm_head_chunk: usize = 0;
    /// Attention in the training forward: `tiled` (a block of queries at a time with a
    /// recomputing backward: memory linear in the sequence length) or `dense` (the full
    /// `[B, heads, T, T]` scores: the reference).
    attn_implementation: crate::model::AttnImpl = crate::model::AttnImpl::Tiled;
    /// Queries per block of the tiled attention (memory per layer grows with block × T).
    attention_block: usize = 128;
    /// Layer (activation) checkpointing of the policy forward in `train` and `sft`: each decoder
    /// layer keeps only its input and recomputes its activations in the backward pass (one
    /// extra forward of the layers). The authors' configs use true; the default is false because
    /// it only costs time where memory is not short.
    gradient_checkpointing: bool = false;
    /// LoRA rank r (0 = full fine-tune). With r > 0 the model's weights are frozen and only
    /// adapters on `lora_target_modules` train (PEFT's LoRA); the reference is the model with the
    /// adapters off, and checkpoints are PEFT adapter folders.
    lora_r: usize = 0;
    /// LoRA α: adapters are scaled by α / r (α / √r with `use_rslora`). PEFT's default, 8.
    lora_alpha: f64 = 8.0;
    /// Dropout on the adapters' input during training (PEFT's `lora_dropout`).
    lora_dropout: f64 = 0.0;
    /// The linear layers that get adapters: PEFT module names separated by commas
    /// (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or `all-linear`. PEFT's
    /// default for LLaMA: q_proj,v_proj.
    lora_target_modules: LoraTargets = LoraTargets(vec![wrpo_models::Target::Q, wrpo_models::Target::V]);
    /// rsLoRA: scale adapters by α / √r instead of α / r.
    use_rslora: bool = false;
    /// How the frozen base stores its weights under LoRA: `auto` (the checkpoint's dtype where
    /// the device stores it: a bf16/f16 checkpoint takes 2 bytes per parameter; widened to f32 at
    /// the point of use, so the numbers are those of f32 storage), `f32`, or `bf16` / `f16`
    /// (rounded, to halve an f32 checkpoint's footprint).
    lora_base_dtype: crate::model::BaseDtype = crate::model::BaseDtype::Auto;
}

/// `lora_target_modules`: written as a list of PEFT module names, read from a list or from
/// comma-separated text (`all-linear` = every linear layer of a decoder layer).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTargets(pub Vec<wrpo_models::Target>);

impl SettingValue for LoraTargets {
    const KIND: Kind = Kind::Text;
}

impl Serialize for LoraTargets {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|t| t.name()))
    }
}

impl<'de> Deserialize<'de> for LoraTargets {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            List(Vec<String>),
        }
        let targets = match Form::deserialize(d)? {
            Form::Text(t) => wrpo_models::Target::parse_list(&t),
            Form::List(l) => {
                wrpo_models::Target::from_names(&l.iter().map(String::as_str).collect::<Vec<_>>())
            }
        };
        targets.map(LoraTargets).map_err(serde::de::Error::custom)
    }
}

impl TrainConfig {
    /// The model's configuration from `source` with these settings' attention applied.
    pub fn model_config(
        &self,
        source: &crate::model::ModelSource,
    ) -> Result<wrpo_models::LlamaConfig> {
        let mut cfg = source.config()?;
        cfg.attn_implementation = self.attn_implementation.with_block(self.attention_block);
        Ok(cfg)
    }

    /// The LoRA settings (`None`: a full fine-tune).
    pub fn lora(&self) -> Option<wrpo_models::LoraConfig> {
        (self.lora_r > 0).then(|| wrpo_models::LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets: self.lora_target_modules.0.clone(),
            rslora: self.use_rslora,
        })
    }

    /// These settings with the LoRA settings of the PEFT adapter in `dir` (`--adapter`): taken
    /// from its `adapter_config.json` when `lora_r` is 0, else checked against it (rank, α,
    /// targets and rsLoRA must agree; the dropout is this run's).
    pub fn with_adapter(&self, dir: &Path) -> Result<TrainConfig> {
        let path = dir.join(wrpo_models::lora::ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("--adapter: reading {}", path.display()))?;
        let file = wrpo_models::LoraConfig::from_peft_json(&text, &path)?;
        let mut cfg = self.clone();
        match self.lora() {
            None => {
                cfg.lora_r = file.r;
                cfg.lora_alpha = file.alpha;
                cfg.lora_dropout = file.dropout;
                cfg.lora_target_modules = LoraTargets(file.targets);
                cfg.use_rslora = file.rslora;
            }
            Some(ours) => {
                let names = |t: &[wrpo_models::Target]| {
                    t.iter().map(|t| t.name()).collect::<Vec<_>>().join(",")
                };
                let differ: Vec<String> = [
                    ("lora_r", ours.r.to_string(), file.r.to_string()),
                    ("lora_alpha", ours.alpha.to_string(), file.alpha.to_string()),
                    (
                        "lora_target_modules",
                        names(&ours.targets),
                        names(&file.targets),
                    ),
                    (
                        "use_rslora",
                        ours.rslora.to_string(),
                        file.rslora.to_string(),
                    ),
                ]
                .into_iter()
                .filter(|(_, a, b)| a != b)
                .map(|(k, a, b)| format!("{k} {a} (adapter: {b})"))
                .collect();
                if !differ.is_empty() {
                    bail!(
                        "--adapter {}: the settings differ from its adapter_config.json: {}; leave lora_r at 0 to take the adapter's",
                        dir.display(),
                        differ.join(", ")
                    );
                }
            }
        }
        Ok(cfg)
    }

    /// The LM-head path these settings choose.
    pub fn head(&self) -> crate::logps::Head {
        crate::logps::Head {
            imp: self.lm_head_impl,
            chunk: self.lm_head_chunk,
        }
    }
}

impl TrainConfig {
    /// Check value ranges; the error names the key.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("learning_rate", self.learning_rate),
            ("beta", self.beta),
            ("adam_epsilon", self.adam_epsilon),
        ];
        for (k, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                bail!("{k} must be a positive number, got {v}");
            }
        }
        let unit = [
            ("alpha", self.alpha),
            ("label_smoothing", self.label_smoothing),
            ("warmup_ratio", self.warmup_ratio),
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
            ("eval_fraction", self.eval_fraction),
        ];
        for (k, v) in unit {
            if !(0.0..=1.0).contains(&v) {
                bail!("{k} must be in [0, 1], got {v}");
            }
        }
        if self.label_smoothing >= 0.5 {
            bail!(
                "label_smoothing must be below 0.5, got {}",
                self.label_smoothing
            );
        }
        for (k, v) in [
            ("weight_decay", self.weight_decay),
            ("max_grad_norm", self.max_grad_norm),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{k} must be ≥ 0, got {v}");
            }
        }
        for (k, v) in [
            (
                "per_device_train_batch_size",
                self.per_device_train_batch_size,
            ),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
            ("max_length", self.max_length),
            ("logging_steps", self.logging_steps),
            ("attention_block", self.attention_block),
        ] {
            if v == 0 {
                bail!("{k} must be at least 1");
            }
        }
        if self.max_steps <= 0 && self.num_train_epochs == 0 {
            bail!("set num_train_epochs ≥ 1 or max_steps ≥ 1");
        }
        if let Some(lora) = self.lora() {
            lora.validate().map_err(|m| anyhow::anyhow!(m))?;
        } else if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!("lora_dropout must be in [0, 1), got {}", self.lora_dropout);
        }
        if self.max_prompt_length >= self.max_length {
            bail!(
                "max_prompt_length ({}) must be below max_length ({})",
                self.max_prompt_length,
                self.max_length
            );
        }
        Ok(())
    }

    /// The α weight in the loss at `completed` finished updates out of `total`.
    pub fn alpha_at(&self, completed: usize, total: usize) -> f64 {
        if !self.loss_type.blends() {
            0.0
        } else if self.is_dynamic {
            self.alpha * completed as f64 / total.max(1) as f64
        } else {
            self.alpha
        }
    }

    /// The configuration as YAML (printed at start, saved with checkpoints).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("config serialises")
    }
}

/// Read a YAML configuration file (every key optional, unknown keys rejected).
pub fn read_yaml(path: &Path) -> Result<TrainArgs> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_yaml(&text).with_context(|| format!("{}: bad training configuration", path.display()))
}

/// Parse YAML configuration text. An empty document is an empty configuration.
pub fn parse_yaml(text: &str) -> Result<TrainArgs> {
    if text.trim().is_empty() {
        return Ok(TrainArgs::default());
    }
    Ok(serde_yaml::from_str(text)?)
}

/// Resolve: `defaults`, then the file, then the command line.
pub fn resolve(defaults: TrainConfig, file: Option<&Path>, cli: &TrainArgs) -> Result<TrainConfig> {
    let mut cfg = defaults;
    if let Some(f) = file {
        read_yaml(f)?.apply(&mut cfg);
    }
    cli.apply(&mut cfg);
    cfg.validate()?;
    Ok(cfg)
}

/// The settings of the embedded default (`train` without `--model`): the built-in tiny model
/// learns its bundled arithmetic set within seconds on a CPU. Applied over the authors'
/// defaults and under any file or flag.
pub fn embedded_preset() -> TrainArgs {
    TrainArgs {
        learning_rate: Some(1e-3),
        beta: Some(0.1),
        alpha: Some(0.5),
        per_device_train_batch_size: Some(4),
        gradient_accumulation_steps: Some(1),
        num_train_epochs: Some(4),
        max_length: Some(256),
        max_prompt_length: Some(128),
        eval_fraction: Some(0.125),
        eval_steps: Some(14),
        save_steps: Some(0),
        ..Default::default()
    }
}

/// The authors' Target-SFT settings (lr 7e-6, cosine, warm-up 10 %, 1 epoch) over the defaults.
pub fn sft_preset() -> TrainArgs {
    TrainArgs {
        learning_rate: Some(7e-6),
        ..Default::default()
    }
}

/// The embedded default of `sft`: the tiny model learns the bundled responses quickly.
pub fn sft_embedded_preset() -> TrainArgs {
    TrainArgs {
        learning_rate: Some(1e-3),
        per_device_train_batch_size: Some(4),
        gradient_accumulation_steps: Some(1),
        num_train_epochs: Some(2),
        max_length: Some(256),
        max_prompt_length: Some(128),
        save_steps: Some(0),
        ..Default::default()
    }
}

/// Paths of a training run (command-line only).
#[derive(Debug, Clone, Default)]
pub struct RunPaths {
    /// Model folder; `None` = the embedded tiny model.
    pub model: Option<PathBuf>,
    /// Training rows; `None` = the bundled dataset.
    pub data: Option<PathBuf>,
    /// Eval rows.
    pub eval_data: Option<PathBuf>,
    /// Output folder.
    pub output: PathBuf,
    /// Reference model folder (default: the initial policy).
    pub ref_model: Option<PathBuf>,
    /// Reference log-probs (the `logps` command's output), one record per training row.
    pub ref_logps: Option<PathBuf>,
    /// A PEFT LoRA adapter folder loaded on top of `model` (to continue training it).
    pub adapter: Option<PathBuf>,
    /// Resume from a checkpoint folder, or `latest` (the newest in `output`).
    pub resume: Option<PathBuf>,
    /// Where precomputed reference log-probs are cached.
    pub cache_dir: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_authors_wrpo_config() {
        let c = TrainConfig::default();
        assert_eq!((c.learning_rate, c.beta, c.alpha), (3e-7, 0.01, 0.1));
        assert!(c.is_dynamic);
        assert_eq!(c.lr_scheduler_type, LrSchedule::Cosine);
        assert_eq!(
            (c.warmup_ratio, c.max_grad_norm, c.weight_decay),
            (0.1, 1.0, 0.0)
        );
        assert_eq!(
            (c.adam_beta1, c.adam_beta2, c.adam_epsilon),
            (0.9, 0.999, 1e-8)
        );
        assert_eq!((c.max_length, c.max_prompt_length), (2048, 1800));
    }

    #[test]
    fn yaml_then_cli_override_and_unknown_keys_fail() {
        let file = parse_yaml("learning_rate: 1.0e-6\nbeta: 0.05\nlr_scheduler_type: linear\nloss_type: wrpo-simpo\nshuffle: false\n").unwrap();
        let mut c = TrainConfig::default();
        file.apply(&mut c);
        let cli = TrainArgs {
            beta: Some(0.2),
            ..Default::default()
        };
        cli.apply(&mut c);
        assert_eq!(c.learning_rate, 1e-6);
        assert_eq!(c.beta, 0.2);
        assert_eq!(c.lr_scheduler_type, LrSchedule::Linear);
        assert_eq!(c.loss_type, LossType::WrpoSimpo);
        assert!(!c.shuffle);
        let err = parse_yaml("learning_rat: 1e-6\n").unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown field `learning_rat`"),
            "{err:#}"
        );
        // The printed config parses back to itself.
        let back: TrainConfig = serde_yaml::from_str(&c.to_yaml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn alpha_schedule() {
        let mut c = TrainConfig {
            alpha: 0.1,
            ..Default::default()
        };
        assert_eq!(c.alpha_at(0, 10), 0.0);
        assert!((c.alpha_at(5, 10) - 0.05).abs() < 1e-15);
        // The last update (9 completed of 10) uses α_end·(T−1)/T.
        assert!((c.alpha_at(9, 10) - 0.09).abs() < 1e-15);
        c.is_dynamic = false;
        assert_eq!(c.alpha_at(0, 10), 0.1);
        c.loss_type = LossType::Dpo;
        assert_eq!(c.alpha_at(3, 10), 0.0);
    }

    #[test]
    fn validation_names_the_key() {
        let c = TrainConfig {
            alpha: 1.5,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("alpha"));
        let c = TrainConfig {
            max_prompt_length: 4096,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_prompt_length"));
    }
}
