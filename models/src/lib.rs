//! # wrpo-models
//!
//! LLaMA as in transformers' `LlamaForCausalLM`, for Burn: the HF `config.json` type, the modules
//! (named as in checkpoints: `q_proj`, `gate_proj`, `input_layernorm`, …), RoPE variants, and
//! loading/saving Hugging Face checkpoint folders (safetensors, sharded or not, f32/f16/bf16), the
//! KV-cache forward for generation ([`generate`]) and `LlamaForSequenceClassification` reward
//! models ([`reward`]).
//!
//! ## Shapes (symbol glossary)
//! - `B`: batch (sequences), `T`: tokens, `H`: hidden size, `V`: vocabulary size
//! - `NH`: attention heads, `NKV`: key/value heads, `HD`: head dimension, `I`: MLP width
#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod generate;
pub mod llama;
pub mod lora;
pub mod reward;
pub mod rope;

pub use checkpoint::{load_hf, load_hf_with, save_hf, ModelError};
pub use config::{HfLlamaConfig, LlamaConfig, RopeKind};
pub use generate::KvCache;
pub use llama::{LayerInputs, Llama, ParamRef};
pub use lora::{LoraConfig, Target};
pub use reward::{load_reward_hf, LlamaReward, RewardConfig};
