//! The policy's parameter store: named flat tensors in two groups.
//!
//! - **trainable**: what the optimizer moves, clips, all-reduces and checkpoints with its AdamW
//!   moments — every weight of a full fine-tune, or only the LoRA adapters;
//! - **frozen**: weights that never move and have no gradient or optimizer state — the base model
//!   under LoRA (empty in a full fine-tune). Frozen weights are shared with the reference model
//!   (the base with the adapters off), so LoRA holds no second copy of the model.
//!
//! Storage dtypes: the trainable group is f32 (the optimizer's master weights); the frozen group
//! keeps what the base was loaded as (`lora_base_dtype`: a bf16/f16 checkpoint stays 2 bytes per
//! parameter where the device stores it), and the model widens such a weight to f32 where it is
//! used ([`wrpo_kernels::linear`]). The module is rebuilt around the stored tensors for each
//! micro-batch at no copy cost ([`Params::model`], [`Params::leaf_model`]).

use std::path::Path;

use anyhow::Result;
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use wrpo_models::{Llama, LlamaConfig, LoraConfig};

use super::config::TrainConfig;
use super::optim::Flat;

/// The policy's parameters (see the module docs).
#[derive(Debug, Clone)]
pub struct Params<B: Backend> {
    /// The optimizer's parameters, in [`wrpo_models::llama::param_specs`] order (full
    /// fine-tune) or [`LoraConfig::specs`] order (LoRA).
    pub trainable: Flat<B>,
    /// Weights without gradients (the LoRA base; empty in a full fine-tune).
    pub frozen: Flat<B>,
    /// The adapters' settings when `trainable` holds LoRA adapters.
    pub lora: Option<LoraConfig>,
    /// The seed of the current micro-batch's LoRA dropout masks (set by the driver before each
    /// micro-batch, so that a resumed run draws the masks an uninterrupted one would).
    pub dropout_seed: u64,
}

impl<B: Backend> Params<B> {
    /// A full fine-tune: every weight of `model` trainable.
    pub fn full(model: &Llama<B>) -> Self {
        Params {
            trainable: Flat::of_model(model),
            frozen: Flat::empty(),
            lora: None,
            dropout_seed: 0,
        }
    }

    /// LoRA: `base`'s weights frozen, `adapters` (named and shaped as [`LoraConfig::specs`])
    /// trainable.
    pub fn lora(
        base: &Llama<B>,
        lora: LoraConfig,
        adapters: Vec<(String, Vec<usize>, Vec<f32>)>,
        device: &B::Device,
    ) -> Self {
        Params {
            trainable: Flat::from_host(device, adapters),
            frozen: Flat::of_model(base),
            lora: Some(lora),
            dropout_seed: 0,
        }
    }

    /// A run's initial parameters: a full fine-tune of `model`, or (`lora_r` > 0) LoRA adapters
    /// on it — the PEFT adapter in `adapter` (`--adapter`), or fresh ones initialised as PEFT
    /// does from `cfg.seed`.
    pub fn initial(
        cfg: &TrainConfig,
        adapter: Option<&Path>,
        model: &Llama<B>,
        model_cfg: &LlamaConfig,
        device: &B::Device,
    ) -> Result<Self> {
        let Some(lora) = cfg.lora() else {
            return Ok(Params::full(model));
        };
        let tensors = match adapter {
            Some(dir) => {
                let (_, t) = wrpo_models::lora::load_adapter(dir, model_cfg)?;
                t.into_iter().map(|(n, (s, v))| (n, s, v)).collect()
            }
            None => lora.init(model_cfg, cfg.seed),
        };
        Ok(Params::lora(model, lora, tensors, device))
    }

    /// What the frozen group holds on the device, e.g. `1.2M parameters in bf16 (2.3 MiB)`
    /// (`None` when empty: a full fine-tune).
    pub fn frozen_storage(&self) -> Option<String> {
        let mut by_dtype: Vec<(burn::tensor::DType, u64)> = vec![];
        for t in &self.frozen.values {
            let n = t.dims()[0] as u64;
            match by_dtype.iter_mut().find(|(d, _)| *d == t.dtype()) {
                Some((_, c)) => *c += n,
                None => by_dtype.push((t.dtype(), n)),
            }
        }
        let bytes: u64 = by_dtype.iter().map(|(d, n)| d.size() as u64 * n).sum();
        (!by_dtype.is_empty()).then(|| {
            let parts: Vec<String> = by_dtype
                .iter()
                .map(|(d, n)| {
                    format!(
                        "{} parameters in {}",
                        crate::memory::plan::count(*n),
                        format!("{d:?}").to_lowercase()
                    )
                })
                .collect();
            format!(
                "{} ({})",
                parts.join(" + "),
                crate::memory::plan::human(bytes)
            )
        })
    }

    /// The same store with other trainable tensors (a checkpoint's).
    pub fn with_trainable(&self, trainable: Flat<B>) -> Self {
        Params {
            trainable,
            ..self.clone()
        }
    }

    /// `name` → (its tensor, whether it is trainable); one map per group, built once per module.
    fn lookup(&self) -> impl Fn(&str) -> (Tensor<B, 1>, bool) + '_ {
        let (t, f) = (self.trainable.index(), self.frozen.index());
        move |name| match t(name) {
            Some(i) => (self.trainable.values[i].clone(), true),
            None => {
                let i = f(name).unwrap_or_else(|| panic!("parameter {name} is in neither group"));
                (self.frozen.values[i].clone(), false)
            }
        }
    }

    /// The policy on backend `C` from the stored tensors (`wrap` turns each into `C`'s, told
    /// whether it is trainable), adapters attached with this micro-batch's dropout masks when
    /// `dropout`.
    fn build<C: Backend>(
        &self,
        cfg: &LlamaConfig,
        dropout: bool,
        wrap: impl Fn(Tensor<B, 1>, bool) -> Tensor<C, 1>,
    ) -> Llama<C> {
        let lookup = self.lookup();
        let mut source = |name: &str, _: &[usize]| {
            let (t, trainable) = lookup(name);
            wrap(t, trainable)
        };
        let model = Llama::build_from(cfg, &mut source);
        match &self.lora {
            None => model,
            Some(lora) => {
                let seed = (dropout && lora.dropout > 0.0).then_some(self.dropout_seed);
                model.attach_lora(cfg, lora, seed, &mut source)
            }
        }
    }

    /// The policy for inference (adapters attached, no dropout).
    pub fn model(&self, cfg: &LlamaConfig) -> Llama<B> {
        self.build(cfg, false, |t, _| t)
    }

    /// The policy on the inner backend with this micro-batch's dropout masks: the graph-free
    /// forward of layer checkpointing, whose layers are then recomputed under autodiff by
    /// [`Params::leaf_model`] with the same masks.
    pub fn train_model(&self, cfg: &LlamaConfig) -> Llama<B> {
        self.build(cfg, true, |t, _| t)
    }

    /// The policy for one forward + backward: an autodiff module whose trainable tensors are
    /// leaves requiring a gradient and whose frozen ones are constants; LoRA dropout (when set)
    /// draws its masks from [`Params::dropout_seed`].
    pub fn leaf_model(&self, cfg: &LlamaConfig) -> Llama<Autodiff<B>> {
        self.build(cfg, true, |t, trainable| {
            let t = Tensor::from_inner(t);
            if trainable {
                t.require_grad()
            } else {
                t
            }
        })
    }

    /// The gradient of every trainable tensor in `grads` (one backward through `model`, a
    /// [`Params::leaf_model`]), in the trainable group's order; zeros where the loss does not
    /// reach.
    pub fn grads_of(
        &self,
        model: &Llama<Autodiff<B>>,
        grads: &<Autodiff<B> as AutodiffBackend>::Gradients,
    ) -> Vec<Tensor<B, 1>> {
        let mut acc = vec![None; self.trainable.values.len()];
        self.trainable.add_grads(&mut acc, model, grads);
        self.trainable.finish_grads(acc)
    }
}
