//! The Hugging Face `config.json` of a LLaMA checkpoint ([`HfLlamaConfig`], kept as read so it can
//! be written back) and the resolved internal configuration ([`LlamaConfig`]).

use serde::Deserialize;
use serde_json::Value;
use wrpo_kernels::attention::AttentionImpl;

/// Fields of a transformers `LlamaConfig` that the forward needs. Unknown keys are kept in the raw
/// JSON (see [`LlamaConfig::raw`]) and written back on save.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct HfLlamaConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// transformers' default is 1e-6.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// transformers ≥ 5 folds `rope_theta` and `rope_scaling` into `rope_parameters`.
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

/// RoPE frequency variants of transformers' `ROPE_INIT_FUNCTIONS` that we implement.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeKind {
    /// `inv_freq = 1 / θ^(2i/HD)`.
    Default,
    /// `rope_type: linear`: inv_freq / factor.
    Linear {
        /// Position interpolation factor.
        factor: f64,
    },
    /// `rope_type: llama3` (Llama-3.1): wavelength-dependent scaling.
    Llama3 {
        /// Scaling factor for low frequencies.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: f64,
    },
}

/// Resolved LLaMA configuration (all defaults applied, validated).
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// `V`.
    pub vocab_size: usize,
    /// `H`.
    pub hidden_size: usize,
    /// `I`.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// `NH`.
    pub num_heads: usize,
    /// `NKV` (divides `NH`).
    pub num_kv_heads: usize,
    /// `HD`.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// RoPE frequency variant.
    pub rope: RopeKind,
    /// Maximum positions the checkpoint was trained for (informational).
    pub max_position_embeddings: usize,
    /// `lm_head` shares `embed_tokens.weight`.
    pub tie_word_embeddings: bool,
    /// The `config.json` as read (or as built), written back on save.
    pub raw: Value,
    /// Which attention the full-sequence forward runs (a run setting, not part of
    /// `config.json`; like transformers' `config._attn_implementation`). Default: tiled.
    pub attn_implementation: AttentionImpl,
}

impl LlamaConfig {
    /// The dtype `config.json` says the checkpoint is saved in (`torch_dtype`, or transformers
    /// 5's `dtype`): bf16, f16, else f32 (f32 when absent).
    pub fn checkpoint_dtype(&self) -> burn::tensor::DType {
        use burn::tensor::DType;
        let field = |k: &str| self.raw.get(k).and_then(|v| v.as_str());
        match field("torch_dtype").or_else(|| field("dtype")) {
            Some("bfloat16") => DType::BF16,
            Some("float16") | Some("half") => DType::F16,
            _ => DType::F32,
        }
    }

    /// Parse and validate a `config.json` text. Errors are plain messages; the caller adds the path.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let hf: HfLlamaConfig = serde_path_to_error::deserialize(raw.clone())
            .map_err(|e| format!("not a LLaMA config: field `{}`: {}", e.path(), e.inner()))?;
        Self::resolve(hf, raw)
    }

    fn resolve(hf: HfLlamaConfig, raw: Value) -> Result<Self, String> {
        if let Some(t) = &hf.model_type {
            if t != "llama" {
                return Err(format!(
                    "model_type {t:?} is not supported (only \"llama\", transformers' LlamaForCausalLM)"
                ));
            }
        }
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                return Err(format!(
                    "hidden_act {act:?} is not supported (only \"silu\")"
                ));
            }
        }
        if hf.attention_bias || hf.mlp_bias {
            return Err("attention_bias / mlp_bias = true are not supported".into());
        }
        for (field, v) in [
            ("vocab_size", hf.vocab_size),
            ("hidden_size", hf.hidden_size),
            ("intermediate_size", hf.intermediate_size),
            ("num_hidden_layers", hf.num_hidden_layers),
            ("num_attention_heads", hf.num_attention_heads),
            ("max_position_embeddings", hf.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(format!("{field} must be at least 1 (got 0)"));
            }
        }
        if !(hf.rms_norm_eps.is_finite() && hf.rms_norm_eps >= 0.0) {
            return Err(format!(
                "rms_norm_eps must be a finite number ≥ 0 (got {})",
                hf.rms_norm_eps
            ));
        }
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        if num_kv_heads == 0 || !hf.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({num_kv_heads})",
                hf.num_attention_heads
            ));
        }
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads);
        if head_dim == 0 {
            return Err(format!(
                "head_dim is 0 (hidden_size {} / num_attention_heads {}); set head_dim or fewer heads",
                hf.hidden_size, hf.num_attention_heads
            ));
        }
        if !head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {head_dim} must be even for RoPE"));
        }
        let params = hf.rope_parameters.as_ref();
        let rope_theta = hf
            .rope_theta
            .or_else(|| {
                params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10000.0);
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(format!(
                "rope_theta must be a positive number (got {rope_theta})"
            ));
        }
        let scaling = hf.rope_scaling.as_ref().filter(|v| !v.is_null()).or(params);
        let rope = match scaling {
            None => RopeKind::Default,
            Some(s) => parse_rope(s)?,
        };
        Ok(Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            rope,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            raw,
            attn_implementation: AttentionImpl::default(),
        })
    }

    /// A small configuration for tests and the embedded default model; `raw` is filled in so the
    /// model can be saved as a HF folder.
    #[allow(clippy::too_many_arguments)]
    pub fn tiny(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_layers: usize,
        num_heads: usize,
        num_kv_heads: usize,
        tie_word_embeddings: bool,
    ) -> Self {
        let raw = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        Self::from_json(&raw.to_string()).expect("tiny config is valid")
    }
}

fn parse_rope(s: &Value) -> Result<RopeKind, String> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64, String> {
        s.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope_scaling.{k} is missing or not a number"))
    };
    match kind {
        "default" => Ok(RopeKind::Default),
        "linear" => Ok(RopeKind::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeKind::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(format!(
            "rope_scaling type {other:?} is not supported (supported: none, linear, llama3)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = LlamaConfig::from_json(
            r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
                "num_attention_heads":2}"#,
        )
        .unwrap();
        assert_eq!((c.num_kv_heads, c.head_dim, c.rope_theta), (2, 4, 10000.0));
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert!(!c.tie_word_embeddings);
        let e = LlamaConfig::from_json(
            r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
                "num_attention_heads":2,"rope_scaling":{"rope_type":"yarn","factor":2}}"#,
        )
        .unwrap_err();
        assert!(e.contains("yarn"), "{e}");
        let c = LlamaConfig::from_json(
            r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
                "num_attention_heads":2,"rope_parameters":{"rope_type":"linear","factor":2.0,"rope_theta":500.0}}"#,
        )
        .unwrap();
        assert_eq!(c.rope, RopeKind::Linear { factor: 2.0 });
        assert_eq!(c.rope_theta, 500.0);
    }

    #[test]
    fn zero_and_bad_dimensions_name_the_field() {
        let base = serde_json::json!({"vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2});
        for (field, value, want) in [
            ("vocab_size", serde_json::json!(0), "vocab_size"),
            ("hidden_size", serde_json::json!(0), "hidden_size"),
            (
                "intermediate_size",
                serde_json::json!(0),
                "intermediate_size",
            ),
            (
                "num_hidden_layers",
                serde_json::json!(0),
                "num_hidden_layers",
            ),
            (
                "num_attention_heads",
                serde_json::json!(0),
                "num_attention_heads",
            ),
            ("num_attention_heads", serde_json::json!(16), "head_dim"),
            (
                "num_key_value_heads",
                serde_json::json!(0),
                "num_key_value_heads",
            ),
            (
                "num_key_value_heads",
                serde_json::json!(3),
                "num_key_value_heads",
            ),
            ("head_dim", serde_json::json!(0), "head_dim"),
            ("head_dim", serde_json::json!(3), "head_dim"),
            (
                "max_position_embeddings",
                serde_json::json!(0),
                "max_position_embeddings",
            ),
            ("rms_norm_eps", serde_json::json!(-1.0), "rms_norm_eps"),
            ("rope_theta", serde_json::json!(0.0), "rope_theta"),
            ("vocab_size", serde_json::json!(-3), "vocab_size"),
        ] {
            let mut v = base.clone();
            v[field] = value.clone();
            let e = LlamaConfig::from_json(&v.to_string()).unwrap_err();
            assert!(e.contains(want), "{field} = {value}: {e}");
        }
    }
}
