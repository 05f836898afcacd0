//! The embedded default: a built-in tiny LLaMA (random init, seeded) with a small byte-level BPE
//! tokenizer and the Llama-3 chat template, plus a bundled WRPO dataset (arithmetic questions,
//! written by `tests/reference/make_tiny_dataset.py`). Lets a newcomer run every command with no
//! download.

use std::path::Path;

use anyhow::Result;
use burn::tensor::backend::Backend;
use wrpo_models::{Llama, LlamaConfig};

use crate::tokenizer::TextTokenizer;

/// `tokenizer.json` of the embedded tokenizer (486 tokens, Llama-3 special tokens).
pub const TOKENIZER_JSON: &str = include_str!("../assets/tiny/tokenizer.json");
/// Its `tokenizer_config.json` (bos/eos, Llama-3 chat template).
pub const TOKENIZER_CONFIG: &str = include_str!("../assets/tiny/tokenizer_config.json");
/// The bundled WRPO rows (JSON Lines).
pub const DATASET: &str = include_str!("../assets/tiny/wrpo_tiny.jsonl");
/// Seed of the embedded model's initialisation.
pub const SEED: u64 = 42;

/// Name shown for embedded sources in messages.
pub const LABEL: &str = "<embedded>";

/// The embedded model's configuration: V = 512, H = 64, 2 layers, 4 heads, 2 kv heads.
pub fn config() -> LlamaConfig {
    LlamaConfig::tiny(512, 64, 128, 2, 4, 2, false)
}

/// The embedded model, initialised with [`SEED`] (std 0.2, so that it is not near-uniform).
pub fn model<B: Backend>(device: &B::Device) -> (Llama<B>, LlamaConfig) {
    let cfg = config();
    (Llama::random(&cfg, SEED, 0.2, device), cfg)
}

/// The embedded tokenizer.
pub fn tokenizer() -> Result<TextTokenizer> {
    TextTokenizer::from_parts(
        Path::new(LABEL),
        TOKENIZER_JSON,
        Some(TOKENIZER_CONFIG),
        None,
    )
}
