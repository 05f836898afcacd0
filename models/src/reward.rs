//! Reward models as transformers' `LlamaForSequenceClassification`: the LLaMA decoder stack
//! (`model.*`, no LM head) and a bias-free `score` head `[num_labels, H]` applied to the final
//! hidden state of one token per sequence.
//!
//! Pooling follows transformers (`GenericForSequenceClassification.forward`): the pooled token is
//! the **rightmost token whose id is not `pad_token_id`** — by id, not by attention mask, so a
//! sequence that ends in the pad token is scored at the token before it; with no
//! `pad_token_id`, the last token.

use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use serde_json::Value;

use crate::checkpoint::{invalid, io, load_checked, ModelError};
use crate::config::LlamaConfig;
use crate::llama::{body_param_specs, HfLinear, LlamaModel};

/// The configuration of a `LlamaForSequenceClassification` folder.
#[derive(Debug, Clone)]
pub struct RewardConfig {
    /// The decoder's configuration (`tie_word_embeddings` and the LM head are not used).
    pub llama: LlamaConfig,
    /// `num_labels` (or the size of `id2label`; transformers' default is 2).
    pub num_labels: usize,
    /// `pad_token_id`, which decides the pooled token.
    pub pad_token_id: Option<u32>,
}

impl RewardConfig {
    /// Parse a `config.json` text. Errors are plain messages; the caller adds the path.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let llama = LlamaConfig::from_json(text)?;
        let raw = &llama.raw;
        if let Some(archs) = raw.get("architectures").and_then(Value::as_array) {
            let names: Vec<&str> = archs.iter().filter_map(Value::as_str).collect();
            if !names.is_empty() && !names.contains(&"LlamaForSequenceClassification") {
                return Err(format!(
                    "architectures {names:?}: a reward model must be a LlamaForSequenceClassification (the `score` head on the last token)"
                ));
            }
        }
        let num_labels = match (raw.get("num_labels"), raw.get("id2label")) {
            (Some(n), _) => {
                n.as_u64()
                    .filter(|&n| n > 0)
                    .ok_or("num_labels must be a positive integer")? as usize
            }
            (None, Some(Value::Object(m))) if !m.is_empty() => m.len(),
            _ => 2,
        };
        let pad_token_id = match raw.get("pad_token_id") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or("pad_token_id must be a token id or null")?,
            ),
        };
        Ok(Self {
            llama,
            num_labels,
            pad_token_id,
        })
    }
}

/// `LlamaForSequenceClassification`.
#[derive(Module, Debug)]
pub struct LlamaReward<B: Backend> {
    /// The decoder.
    pub model: LlamaModel<B>,
    /// `[num_labels, H]`.
    pub score: HfLinear<B>,
}

/// transformers' pooled position: the rightmost index whose id is not `pad` (0 when every id is
/// `pad`, as `argmax` of zeros); the last index without a pad id.
pub fn pooled_index(ids: &[u32], pad: Option<u32>) -> usize {
    match pad {
        None => ids.len().saturating_sub(1),
        Some(p) => ids.iter().rposition(|&x| x != p).unwrap_or(0),
    }
}

impl<B: wrpo_kernels::ModelBackend> LlamaReward<B> {
    /// Scores of a batch of sequences (`cfg.num_labels` per sequence), one right-padded forward.
    ///
    /// # Shapes
    /// - `seqs`: `B` id lists; returns `[B, num_labels]`
    pub fn scores(
        &self,
        cfg: &RewardConfig,
        seqs: &[Vec<u32>],
        device: &B::Device,
    ) -> Tensor<B, 2> {
        let n = seqs.len();
        let t = seqs.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let pad = cfg.pad_token_id.unwrap_or(0) as i64;
        let mut ids = vec![pad; n * t];
        let mut valid = vec![false; n * t];
        for (row, s) in seqs.iter().enumerate() {
            for (j, &tok) in s.iter().enumerate() {
                ids[row * t + j] = tok as i64;
                valid[row * t + j] = true;
            }
        }
        let hidden = self.model.forward(
            &cfg.llama,
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, t]), device),
            Tensor::<B, 2, Bool>::from_data(TensorData::new(valid, [n, t]), device),
        ); // [B,T,H]
        let h = cfg.llama.hidden_size;
        let at: Vec<i64> = seqs
            .iter()
            .enumerate()
            .map(|(row, s)| (row * t + pooled_index(s, cfg.pad_token_id)) as i64)
            .collect();
        let at = Tensor::<B, 1, Int>::from_data(TensorData::new(at, [n]), device);
        let pooled = hidden.reshape([n * t, h]).select(0, at); // [B,H]
        self.score.forward(pooled)
    }
}

/// Read and validate `DIR/config.json` of a reward model.
pub fn load_reward_config(dir: &Path) -> Result<RewardConfig, ModelError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    RewardConfig::from_json(&text).map_err(|m| invalid(&path, m))
}

/// Load a Hugging Face `LlamaForSequenceClassification` folder onto `device`.
pub fn load_reward_hf<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(LlamaReward<B>, RewardConfig), ModelError> {
    let cfg = load_reward_config(dir)?;
    let mut specs = body_param_specs(&cfg.llama);
    let (labels, h) = (cfg.num_labels, cfg.llama.hidden_size);
    specs.push(("score.weight".to_string(), vec![labels, h]));
    let model = load_checked(
        dir,
        &specs,
        &|name| name.ends_with("rotary_emb.inv_freq"),
        |get| {
            let mut source = |name: &str, shape: &[usize]| -> Tensor<B, 1> {
                let n: usize = shape.iter().product();
                Tensor::from_data(TensorData::new(get(name), [n]), device)
            };
            let model = LlamaModel::build_from(&cfg.llama, &mut source);
            let score = source("score.weight", &[labels, h]).reshape([labels, h]);
            LlamaReward {
                model,
                score: HfLinear::new(burn::module::Param::from_tensor(score)),
            }
        },
    )?;
    Ok((model, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_follows_transformers() {
        assert_eq!(pooled_index(&[5, 6, 7], Some(0)), 2);
        // A trailing pad id is skipped, an inner one is not.
        assert_eq!(pooled_index(&[5, 6, 0], Some(0)), 1);
        assert_eq!(pooled_index(&[5, 0, 7], Some(0)), 2);
        assert_eq!(pooled_index(&[0, 0], Some(0)), 0);
        assert_eq!(pooled_index(&[5, 0], None), 1);
    }

    #[test]
    fn config_labels_and_pad() {
        let base = r#""vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2"#;
        let c = RewardConfig::from_json(&format!(
            r#"{{{base},"id2label":{{"0":"LABEL_0"}},"pad_token_id":3}}"#
        ))
        .unwrap();
        assert_eq!((c.num_labels, c.pad_token_id), (1, Some(3)));
        let c = RewardConfig::from_json(&format!("{{{base}}}")).unwrap();
        assert_eq!((c.num_labels, c.pad_token_id), (2, None));
        let e = RewardConfig::from_json(&format!(
            r#"{{{base},"architectures":["LlamaForCausalLM"]}}"#
        ))
        .unwrap_err();
        assert!(e.contains("LlamaForSequenceClassification"), "{e}");
    }
}
