//! # wrpo-models
//!
//! LLaMA as in transformers' `LlamaForCausalLM`, for Burn: the HF `config.json` type, the modules
//! (named as in checkpoints: `q_proj`, `gate_proj`, `input_layernorm`, …), RoPE variants, and
//! loading/saving Hugging Face checkpoint folders (safetensors, sharded or not, f32/f16/bf16).
//!
//! ## Shapes (symbol glossary)
//! - `B`: batch (sequences), `T`: tokens, `H`: hidden size, `V`: vocabulary size
//! - `NH`: attention heads, `NKV`: key/value heads, `HD`: head dimension, `I`: MLP width
#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod llama;
pub mod rope;

pub use checkpoint::{load_hf, save_hf, ModelError};
pub use config::{HfLlamaConfig, LlamaConfig, RopeKind};
pub use llama::{Llama, ParamRef};
