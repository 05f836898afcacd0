//! Where a model comes from (a Hugging Face folder or the embedded default) and loading it with its
//! tokenizer, checked against each other.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use wrpo_kernels::attention::AttentionImpl;
use wrpo_models::{checkpoint::load_config, load_hf, load_hf_with, Llama, LlamaConfig};

use crate::embedded;
use crate::tokenizer::TextTokenizer;

/// Which attention the training forward runs (`attn_implementation`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttnImpl {
    /// A block of queries at a time ([`wrpo_kernels::attention`]), memory linear in `T`.
    #[default]
    Tiled,
    /// The full `[B, NH, T, T]` scores: the tested reference.
    Dense,
}

impl AttnImpl {
    /// The kernels' setting, with `block` queries per tile for [`AttnImpl::Tiled`].
    pub fn with_block(self, block: usize) -> AttentionImpl {
        match self {
            AttnImpl::Tiled => AttentionImpl::Tiled {
                block: block.max(1),
            },
            AttnImpl::Dense => AttentionImpl::Dense,
        }
    }
}

/// How a frozen base model (LoRA) stores its weights on the device (`lora_base_dtype`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BaseDtype {
    /// The checkpoint's own dtype (bf16/f16 stay 2 bytes per parameter) where the device stores
    /// it, else f32.
    #[default]
    Auto,
    /// f32 whatever the checkpoint holds.
    F32,
    /// bf16 (rounded to nearest even from an f32 checkpoint).
    Bf16,
    /// f16 (rounded to nearest even from an f32 checkpoint).
    F16,
}

impl BaseDtype {
    /// The storage dtype of a weight held as `stored` in its file, on a device for which
    /// `supports(dtype)` says whether it stores `dtype`; an error when an explicit half dtype is
    /// not stored there.
    pub fn resolve(
        self,
        supports: impl Fn(DType) -> bool,
    ) -> Result<impl Fn(DType) -> DType + Clone> {
        let explicit = match self {
            BaseDtype::Auto => None,
            BaseDtype::F32 => Some(DType::F32),
            BaseDtype::Bf16 => Some(DType::BF16),
            BaseDtype::F16 => Some(DType::F16),
        };
        if let Some(d) = explicit {
            if !supports(d) {
                bail!(
                    "--lora-base-dtype {}: this device does not store {d:?} (wgpu has no bf16, and f16 needs an adapter with SHADER_F16); use auto, f32{}",
                    serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
                    if supports(DType::F16) { " or f16" } else { "" }
                );
            }
        }
        let (half_f16, half_bf16) = (supports(DType::F16), supports(DType::BF16));
        Ok(move |stored: DType| match explicit {
            Some(d) => d,
            None => match stored {
                DType::F16 if half_f16 => DType::F16,
                DType::BF16 if half_bf16 => DType::BF16,
                _ => DType::F32,
            },
        })
    }
}

/// A model folder or the embedded default.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A Hugging Face LLaMA folder.
    Dir(PathBuf),
    /// The built-in tiny model ([`crate::embedded`]).
    Embedded,
}

impl ModelSource {
    /// `Some(dir)` → folder, `None` → embedded.
    pub fn from_arg(dir: Option<&Path>) -> Self {
        dir.map_or(Self::Embedded, |d| Self::Dir(d.to_path_buf()))
    }

    /// Name for messages.
    pub fn label(&self) -> String {
        match self {
            Self::Dir(d) => d.display().to_string(),
            Self::Embedded => format!("{} tiny LLaMA (seed {})", embedded::LABEL, embedded::SEED),
        }
    }

    /// The model's configuration (`config.json`, or the embedded one); reads no weights.
    pub fn config(&self) -> Result<LlamaConfig> {
        Ok(match self {
            Self::Embedded => embedded::config(),
            Self::Dir(d) if is_adapter_dir(d) => bail!(
                "{}: a PEFT LoRA adapter folder (adapter_config.json, no config.json), not a model: pass its base as --model and this folder as --adapter, or fold it into a model with `wrpo-engine merge --model BASE --adapter {} --out DIR`",
                d.display(),
                d.display()
            ),
            Self::Dir(d) => load_config(d)?,
        })
    }

    /// The tokenizer (`None` for a folder without `tokenizer.json`: only pre-tokenized rows then),
    /// checked against the model's vocabulary (`cfg`, from [`Self::config`]) before any weight is
    /// read.
    pub fn tokenizer(&self, cfg: &LlamaConfig) -> Result<Option<TextTokenizer>> {
        let tok = match self {
            Self::Embedded => embedded::tokenizer()?,
            Self::Dir(d) if !d.join("tokenizer.json").is_file() => return Ok(None),
            Self::Dir(d) => TextTokenizer::load(d)?,
        };
        if tok.vocab_size() > cfg.vocab_size {
            bail!(
                "{}: the tokenizer has {} tokens but the model's vocab_size is {}: ids {}..{} would have no embedding",
                self.label(),
                tok.vocab_size(),
                cfg.vocab_size,
                cfg.vocab_size,
                tok.vocab_size() - 1
            );
        }
        Ok(Some(tok))
    }

    /// Load the weights onto `device`, as f32.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<(Llama<B>, LlamaConfig)> {
        Ok(match self {
            Self::Embedded => embedded::model(device),
            Self::Dir(d) => load_hf(d, device)?,
        })
    }

    /// Load the weights onto `device` to be frozen, each stored as `dtype` says
    /// ([`BaseDtype::resolve`]; the embedded model's file dtype is f32).
    pub fn load_frozen<B: Backend>(
        &self,
        dtype: BaseDtype,
        device: &B::Device,
    ) -> Result<(Llama<B>, LlamaConfig)> {
        let store = dtype.resolve(|d| B::supports_dtype(device, d))?;
        Ok(match self {
            Self::Embedded => {
                let (model, cfg) = embedded::model::<B>(device);
                let target = store(DType::F32);
                if target == DType::F32 {
                    (model, cfg)
                } else {
                    let flat = crate::train::optim::Flat::of_model(&model);
                    let index = flat.index();
                    let model = Llama::build_from(&cfg, &mut |name, _| {
                        let i = index(name).expect("the model's own parameter");
                        flat.values[i].clone().cast(target)
                    });
                    (model, cfg)
                }
            }
            Self::Dir(d) => load_hf_with(d, device, &store)?,
        })
    }
}

impl ModelSource {
    /// Load the weights, with the PEFT LoRA adapter in `adapter` attached (`--adapter`; no
    /// dropout): what PEFT's `PeftModel.from_pretrained(base, adapter)` computes.
    pub fn load_adapted<B: Backend>(
        &self,
        adapter: Option<&Path>,
        device: &B::Device,
    ) -> Result<(Llama<B>, LlamaConfig)> {
        let (model, cfg) = self.load::<B>(device)?;
        let Some(dir) = adapter else {
            return Ok((model, cfg));
        };
        let (lora, tensors) = wrpo_models::lora::load_adapter(dir, &cfg)
            .with_context(|| format!("--adapter {} on {}", dir.display(), self.label()))?;
        let model = model.attach_lora(&cfg, &lora, None, &mut |name, _| {
            let (_, v) = &tensors[name];
            Tensor::from_data(TensorData::new(v.clone(), [v.len()]), device)
        });
        Ok((model, cfg))
    }
}

/// `wrpo-engine merge`: the model in `base` with the PEFT LoRA adapter in `adapter` folded into
/// its weights (`W + s·B·A`, PEFT's `merge_and_unload`), written to `out` as a Hugging Face
/// folder (f32 weights, config.json, the base's tokenizer files) that transformers loads. `out`
/// is written into a temporary folder and renamed into place.
pub fn merge_adapter(base: &Path, adapter: &Path, out: &Path) -> Result<()> {
    type B = crate::backend::CpuBackend;
    let device = Default::default();
    let source = ModelSource::Dir(base.to_path_buf());
    let (model, cfg) = source.load_adapted::<B>(Some(adapter), &device)?;
    let merged = model.merge_lora();
    crate::train::state::write_dir_atomic(out, |tmp| {
        wrpo_models::save_hf(&merged, &cfg, tmp)?;
        crate::train::state::copy_tokenizer_files(base, tmp)
    })
}

/// A PEFT adapter folder (what `train --lora-r` writes) rather than a model folder.
fn is_adapter_dir(d: &Path) -> bool {
    !d.join("config.json").is_file() && d.join(wrpo_models::lora::ADAPTER_CONFIG).is_file()
}

/// Check that `path` exists before long work starts.
pub fn require_file(path: &Path, what: &str) -> Result<()> {
    if !path.is_file() {
        bail!("{what} {}: no such file", path.display());
    }
    Ok(())
}
