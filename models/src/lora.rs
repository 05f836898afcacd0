//! LoRA adapters as PEFT defines them for LLaMA (`peft.LoraConfig` / `LoraModel`): each targeted
//! linear layer `y = x Wᵀ` becomes `y = x Wᵀ + s · (dropout(x) Aᵀ) Bᵀ` with `A: [r, in]`,
//! `B: [out, r]` and `s = α / r` (`α / √r` with rsLoRA). PEFT initialises `A` Kaiming-uniform
//! (`a = √5`, i.e. `U(±1/√in)`) and `B` to zeros, so a fresh adapter leaves the model unchanged.
//!
//! Files are PEFT's: `adapter_config.json` and `adapter_model.safetensors` with keys
//! `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`. In memory the tensors are
//! named without the `base_model.model.` prefix ([`LoraConfig::specs`]).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::checkpoint::{invalid, io, load_checked_in, ModelError};
use crate::config::LlamaConfig;

/// The prefix PEFT puts before the model's own module names in adapter files.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// The adapter weights' file name.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The adapter configuration's file name.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// A linear layer of a decoder layer that LoRA can adapt (PEFT's module names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.o_proj`.
    O,
    /// `mlp.gate_proj`.
    Gate,
    /// `mlp.up_proj`.
    Up,
    /// `mlp.down_proj`.
    Down,
}

impl Target {
    /// Every target, in the module order of a decoder layer (`all-linear`).
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// PEFT's name (`q_proj`, …).
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The module's path in layer `l`: `model.layers.L.self_attn.q_proj`.
    pub fn path(self, l: usize) -> String {
        let block = match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        };
        format!("model.layers.{l}.{block}.{}", self.name())
    }

    /// `(out, in)` of the adapted weight.
    pub fn dims(self, cfg: &LlamaConfig) -> (usize, usize) {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        match self {
            Target::Q => (q, h),
            Target::K | Target::V => (kv, h),
            Target::O => (h, q),
            Target::Gate | Target::Up => (i, h),
            Target::Down => (h, i),
        }
    }

    /// Parse PEFT's `target_modules`: `all-linear`, or module names separated by commas.
    pub fn parse_list(text: &str) -> Result<Vec<Target>, String> {
        let text = text.trim();
        if text == "all-linear" {
            return Ok(Target::ALL.to_vec());
        }
        let names: Vec<&str> = text.split(',').map(str::trim).collect();
        Self::from_names(&names)
    }

    /// Targets from module names (each once, in [`Target::ALL`] order).
    pub fn from_names(names: &[&str]) -> Result<Vec<Target>, String> {
        let mut out = Vec::new();
        for n in names {
            let t = Target::ALL.into_iter().find(|t| t.name() == *n).ok_or_else(|| {
                if *n == "lm_head" || *n == "embed_tokens" {
                    format!("LoRA on {n} is not supported (PEFT's all-linear leaves it out too); targets: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear")
                } else {
                    format!("unknown LoRA target module {n:?}: use q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or all-linear")
                }
            })?;
            if !out.contains(&t) {
                out.push(t);
            }
        }
        if out.is_empty() {
            return Err("no LoRA target modules".into());
        }
        out.sort();
        Ok(out)
    }
}

/// PEFT's LoRA settings that wrpo-engine supports.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` (≥ 1).
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// `lora_dropout`: dropout on the adapter's input during training.
    pub dropout: f64,
    /// The adapted modules of every decoder layer.
    pub targets: Vec<Target>,
    /// rsLoRA: scale `α / √r` instead of `α / r`.
    pub rslora: bool,
}

impl LoraConfig {
    /// The adapter's output scale `s`.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// In-memory names and shapes of every adapter tensor, per layer and target in
    /// [`Target::ALL`] order, `lora_A` (`[r, in]`) then `lora_B` (`[out, r]`).
    pub fn specs(&self, cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
        let mut v = Vec::new();
        for l in 0..cfg.num_layers {
            for &t in &self.targets {
                let (out, inn) = t.dims(cfg);
                v.push((format!("{}.lora_A.weight", t.path(l)), vec![self.r, inn]));
                v.push((format!("{}.lora_B.weight", t.path(l)), vec![out, self.r]));
            }
        }
        v
    }

    /// Adapter parameters for `cfg`.
    pub fn count(&self, cfg: &LlamaConfig) -> usize {
        self.specs(cfg)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Check the values; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.r == 0 {
            return Err("lora_r must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!("lora_alpha must be positive, got {}", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.dropout
            ));
        }
        if self.targets.is_empty() {
            return Err("lora_target_modules is empty".into());
        }
        Ok(())
    }

    /// PEFT's initialisation, seeded: `lora_A` ~ `U(±1/√in)` (`kaiming_uniform_(a=√5)`),
    /// `lora_B` = 0. Returns `(name, shape, values)` in [`Self::specs`] order.
    pub fn init(&self, cfg: &LlamaConfig, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(seed);
        self.specs(cfg)
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let v = if name.ends_with("lora_A.weight") {
                    let bound = 1.0 / (shape[1] as f64).sqrt();
                    (0..n)
                        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
                        .collect()
                } else {
                    vec![0.0; n]
                };
                (name, shape, v)
            })
            .collect()
    }

    /// `adapter_config.json` as PEFT writes it for these settings.
    pub fn to_peft_json(&self, base_model: &str) -> Value {
        let targets: Vec<&str> = self.targets.iter().map(|t| t.name()).collect();
        json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": base_model,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "loftq_config": {},
            "lora_alpha": self.alpha,
            "lora_bias": false,
            "lora_dropout": self.dropout,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": self.rslora
        })
    }

    /// Read PEFT's `adapter_config.json`; features wrpo-engine does not implement (DoRA, biases,
    /// per-layer ranks, `modules_to_save`, …) are refused by name.
    pub fn from_peft_json(text: &str, path: &Path) -> Result<Self, ModelError> {
        let v: Value = serde_json::from_str(text).map_err(|e| invalid(path, e.to_string()))?;
        let bad = |m: String| invalid(path, m);
        let field = |k: &str| v.get(k).filter(|x| !x.is_null());
        match field("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => {
                return Err(bad(format!(
                    "peft_type is {other:?}; only LORA adapters are supported"
                )))
            }
        }
        let r = field("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("field `r` is missing or not a positive integer".into()))?
            as usize;
        let alpha = field("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("field `lora_alpha` is missing or not a number".into()))?;
        let dropout = field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
        let rslora = field("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let targets = match field("target_modules") {
            Some(Value::String(s)) => Target::parse_list(s),
            Some(Value::Array(a)) => {
                let names: Option<Vec<&str>> = a.iter().map(Value::as_str).collect();
                let names =
                    names.ok_or_else(|| bad("`target_modules` holds a non-string".into()))?;
                Target::from_names(&names)
            }
            _ => Err("field `target_modules` is missing".into()),
        }
        .map_err(|m| bad(format!("target_modules: {m}")))?;
        for (k, unsupported) in [
            (
                "use_dora",
                field("use_dora").and_then(Value::as_bool) == Some(true),
            ),
            (
                "fan_in_fan_out",
                field("fan_in_fan_out").and_then(Value::as_bool) == Some(true),
            ),
            (
                "lora_bias",
                field("lora_bias").and_then(Value::as_bool) == Some(true),
            ),
            (
                "bias",
                field("bias")
                    .and_then(Value::as_str)
                    .is_some_and(|b| b != "none"),
            ),
            (
                "rank_pattern",
                field("rank_pattern")
                    .and_then(Value::as_object)
                    .is_some_and(|o| !o.is_empty()),
            ),
            (
                "alpha_pattern",
                field("alpha_pattern")
                    .and_then(Value::as_object)
                    .is_some_and(|o| !o.is_empty()),
            ),
            ("modules_to_save", field("modules_to_save").is_some()),
            (
                "layers_to_transform",
                field("layers_to_transform").is_some(),
            ),
            ("layer_replication", field("layer_replication").is_some()),
            ("exclude_modules", field("exclude_modules").is_some()),
            (
                "trainable_token_indices",
                field("trainable_token_indices").is_some(),
            ),
            ("target_parameters", field("target_parameters").is_some()),
            (
                "use_qalora",
                field("use_qalora").and_then(Value::as_bool) == Some(true),
            ),
            (
                "alora_invocation_tokens",
                field("alora_invocation_tokens").is_some(),
            ),
        ] {
            if unsupported {
                return Err(bad(format!(
                    "`{k}` is set; wrpo-engine supports plain LoRA on whole layers only"
                )));
            }
        }
        let cfg = LoraConfig {
            r,
            alpha,
            dropout,
            targets,
            rslora,
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }
}

/// Adapter tensors by in-memory name: shape and f32 values.
pub type AdapterTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Read a PEFT adapter folder for a model of configuration `cfg`: its settings and every tensor,
/// checked (names, shapes, dtypes) against what the settings imply; every problem reported at once.
pub fn load_adapter(
    dir: &Path,
    cfg: &LlamaConfig,
) -> Result<(LoraConfig, AdapterTensors), ModelError> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let lora = LoraConfig::from_peft_json(&text, &path)?;
    let specs: Vec<(String, Vec<usize>)> = lora
        .specs(cfg)
        .into_iter()
        .map(|(n, s)| (format!("{PEFT_PREFIX}{n}"), s))
        .collect();
    let tensors = load_checked_in(
        dir,
        &[dir.join(ADAPTER_WEIGHTS)],
        &specs,
        &|_| false,
        |get| {
            specs
                .iter()
                .map(|(n, s)| {
                    let name = n.strip_prefix(PEFT_PREFIX).expect("prefixed").to_string();
                    (name, (s.clone(), get(n)))
                })
                .collect::<AdapterTensors>()
        },
    )?;
    Ok((lora, tensors))
}

/// Write a PEFT adapter folder's two files into `dir` (each through a temporary file and a
/// rename): `adapter_config.json` and `adapter_model.safetensors` (f32, PEFT's key names).
pub fn save_adapter(
    dir: &Path,
    lora: &LoraConfig,
    base_model: &str,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let named: Vec<(String, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, v)| (format!("{PEFT_PREFIX}{n}"), s.clone(), v.as_slice()))
        .collect();
    crate::checkpoint::write_f32_safetensors(&dir.join(ADAPTER_WEIGHTS), &named)?;
    let text = serde_json::to_string_pretty(&lora.to_peft_json(base_model))
        .expect("JSON value serialises");
    crate::checkpoint::write_atomic(&dir.join(ADAPTER_CONFIG), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LlamaConfig {
        LlamaConfig::tiny(32, 16, 24, 2, 4, 2, true)
    }

    #[test]
    fn targets_parse_like_peft() {
        assert_eq!(
            Target::parse_list("all-linear").unwrap(),
            Target::ALL.to_vec()
        );
        assert_eq!(
            Target::parse_list("v_proj, q_proj,v_proj").unwrap(),
            vec![Target::Q, Target::V]
        );
        let e = Target::parse_list("q_proj,lm_head").unwrap_err();
        assert!(e.contains("lm_head"), "{e}");
        assert!(Target::parse_list("qproj")
            .unwrap_err()
            .contains("\"qproj\""));
    }

    #[test]
    fn specs_shapes_and_scale() {
        let c = cfg();
        let l = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec![Target::K, Target::Down],
            rslora: false,
        };
        let s = l.specs(&c);
        assert_eq!(s.len(), 2 * 2 * c.num_layers);
        assert_eq!(s[0].0, "model.layers.0.self_attn.k_proj.lora_A.weight");
        assert_eq!(s[0].1, vec![4, c.hidden_size]);
        assert_eq!(s[1].1, vec![c.num_kv_heads * c.head_dim, 4]);
        assert_eq!(s[3].1, vec![c.hidden_size, 4]);
        assert_eq!(l.scale(), 2.0);
        assert_eq!(
            LoraConfig {
                rslora: true,
                ..l.clone()
            }
            .scale(),
            4.0
        );
        let init = l.init(&c, 7);
        let bound = 1.0 / (c.hidden_size as f32).sqrt();
        assert!(init[0].2.iter().all(|x| x.abs() <= bound) && init[0].2.iter().any(|&x| x != 0.0));
        assert!(init[1].2.iter().all(|&x| x == 0.0));
        assert_eq!(l.init(&c, 7), init);
    }

    #[test]
    fn peft_json_round_trips_and_refuses_unsupported() {
        let l = LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: Target::ALL.to_vec(),
            rslora: true,
        };
        let p = Path::new("adapter_config.json");
        let text = l.to_peft_json("base").to_string();
        assert_eq!(LoraConfig::from_peft_json(&text, p).unwrap(), l);
        let mut v = l.to_peft_json("base");
        v["use_dora"] = true.into();
        let e = LoraConfig::from_peft_json(&v.to_string(), p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("use_dora") && e.contains("adapter_config.json"),
            "{e}"
        );
        let mut v = l.to_peft_json("base");
        v["target_modules"] = "all-linear".into();
        assert_eq!(
            LoraConfig::from_peft_json(&v.to_string(), p)
                .unwrap()
                .targets,
            Target::ALL.to_vec()
        );
    }
}
