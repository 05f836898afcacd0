//! Where a model comes from (a Hugging Face folder or the embedded default) and loading it with its
//! tokenizer, checked against each other.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use wrpo_kernels::attention::AttentionImpl;
use wrpo_models::{checkpoint::load_config, load_hf, Llama, LlamaConfig};

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

    /// Load the weights onto `device`.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<(Llama<B>, LlamaConfig)> {
        Ok(match self {
            Self::Embedded => embedded::model(device),
            Self::Dir(d) => load_hf(d, device)?,
        })
    }
}

/// Check that `path` exists before long work starts.
pub fn require_file(path: &Path, what: &str) -> Result<()> {
    if !path.is_file() {
        bail!("{what} {}: no such file", path.display());
    }
    Ok(())
}
