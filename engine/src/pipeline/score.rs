//! `wrpo-engine score`: reward-model scores of (prompt, response) pairs.
//!
//! The reward model is a Hugging Face `LlamaForSequenceClassification` folder with
//! `num_labels = 1` (see `wrpo_models::reward`: the `score` head on the last non-padding token,
//! transformers' rule). Input rows (JSON Lines):
//! - `{"prompt", "response", …}` → the row with `"score": s` added (source-response rows
//!   `{prompt_id, prompt, model, response}` become `build-dataset --sources` rows);
//! - `{"prompt", "responses": [...], …}` (the output of `sample`) → the row with
//!   `"scores": [...]` added (`build-dataset --targets` rows).
//!
//! Other fields are kept. A pair is encoded as the reward model's chat template of the prompt
//! messages (a string is a user message) followed by the response as an assistant message,
//! without a generation prompt (transformers' `apply_chat_template(tokenize=True)`); a tokenizer
//! without a template gets the plain text `prompt + response` with its special tokens. Sequences
//! are sorted by length and scored `batch_size` per forward (right-padded).
//!
//! Any other scorer (ArmoRM's multi-objective head, an API judge, a rule) plugs into the pipeline
//! by writing these `score` / `scores` fields itself: `build-dataset` reads only the numbers.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::{Map, Value};
use wrpo_models::reward::{load_reward_config, load_reward_hf, LlamaReward, RewardConfig};

use super::{parse_objects, to_jsonl};
use crate::data::{ferr, parse_prompt, parse_response, FieldError, RowError, Text};
use crate::tokenizer::TextTokenizer;

/// The responses of one input row.
#[derive(Debug, Clone, PartialEq)]
pub enum Responses {
    /// `response`: the output gets `score`.
    One(Text),
    /// `responses`: the output gets `scores`.
    Many(Vec<Text>),
}

/// One parsed input row.
#[derive(Debug, Clone)]
pub struct ScoreRow {
    /// 1-based line.
    pub line: usize,
    /// The row as read (written back with the scores added).
    pub obj: Map<String, Value>,
    /// The prompt.
    pub prompt: Text,
    /// The responses.
    pub responses: Responses,
}

/// Validate one row.
pub fn parse_score_row(line: usize, obj: Map<String, Value>) -> Result<ScoreRow, FieldError> {
    let prompt = parse_prompt(obj.get("prompt"))?;
    let responses = match (obj.get("responses"), obj.get("response")) {
        (Some(_), Some(_)) => {
            return Err(ferr(
                "responses",
                "a row has `response` or `responses`, not both",
            ))
        }
        (Some(Value::Array(a)), None) if !a.is_empty() => Responses::Many(
            a.iter()
                .enumerate()
                .map(|(i, r)| parse_response(r, &format!("responses[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        (Some(_), None) => return Err(ferr("responses", "must be a non-empty list of responses")),
        (None, Some(r)) => Responses::One(parse_response(r, "response")?),
        (None, None) => {
            return Err(ferr(
                "response",
                "missing (a row needs `response` or a `responses` list)",
            ))
        }
    };
    Ok(ScoreRow {
        line,
        obj,
        prompt,
        responses,
    })
}

/// Token ids of a (prompt, response) pair for the reward model.
pub fn encode_pair(
    tok: &TextTokenizer,
    prompt: &Text,
    response: &Text,
    field: &str,
) -> Result<Vec<u32>, FieldError> {
    let r = match (prompt, response) {
        (Text::Plain(p), Text::Plain(c)) if !tok.has_chat_template() => {
            tok.encode(&format!("{p}{c}"), true)
        }
        _ => {
            let mut msgs = prompt.messages("user");
            msgs.extend(response.messages("assistant"));
            tok.chat_ids(&msgs, false)
        }
    };
    r.map_err(|e| ferr(field, format!("{e:#}")))
}

/// Scores of `seqs` (input order), longest first in batches of `batch_size` sequences.
/// `progress(done, total)` after each batch.
pub fn score_sequences<B: wrpo_kernels::ModelBackend>(
    model: &LlamaReward<B>,
    cfg: &RewardConfig,
    seqs: &[Vec<u32>],
    batch_size: usize,
    device: &B::Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Vec<f64> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
    let mut out = vec![f64::NAN; seqs.len()];
    let mut done = 0;
    for chunk in order.chunks(batch_size.max(1)) {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| seqs[i].clone()).collect();
        let s: Vec<f32> = model
            .scores(cfg, &batch, device)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32 scores");
        for (k, &i) in chunk.iter().enumerate() {
            out[i] = s[k * cfg.num_labels] as f64;
        }
        done += chunk.len();
        progress(done, seqs.len());
    }
    out
}

/// Settings of the `score` command.
#[derive(Debug, Clone)]
pub struct ScoreJob {
    /// The reward model folder.
    pub model: PathBuf,
    /// Input rows.
    pub data: PathBuf,
    /// Sequences per forward.
    pub batch_size: usize,
    /// Skip bad rows (kept in the output with a `skipped` reason and no score).
    pub skip_bad_rows: bool,
}

/// What a `score` run produced.
#[derive(Debug, Clone)]
pub struct ScoreOutput {
    /// One output row per input row, in input order.
    pub rows: Vec<Value>,
    /// Rows skipped as bad.
    pub skipped: Vec<RowError>,
    /// Pairs scored.
    pub pairs: usize,
}

impl ScoreOutput {
    /// The output file's text.
    pub fn to_jsonl(&self) -> String {
        to_jsonl(&self.rows)
    }
}

/// Run `score`.
pub fn run_score<B: wrpo_kernels::ModelBackend>(
    job: &ScoreJob,
    device: &B::Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ScoreOutput> {
    anyhow::ensure!(job.batch_size > 0, "--batch-size must be at least 1");
    let cfg = load_reward_config(&job.model)?;
    anyhow::ensure!(
        cfg.num_labels == 1,
        "{}: num_labels is {}; a scalar reward needs a LlamaForSequenceClassification with num_labels 1 (write a `score` field with your own scorer for other heads)",
        job.model.display(),
        cfg.num_labels
    );
    anyhow::ensure!(
        job.model.join("tokenizer.json").is_file(),
        "{}: no tokenizer.json (the reward model's tokenizer encodes the pairs)",
        job.model.display()
    );
    let tok = TextTokenizer::load(&job.model)?;
    crate::model::require_file(&job.data, "--data")?;
    let path = &job.data;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    // Every row with its encoded pairs, or why it was skipped.
    type Encoded = (ScoreRow, Vec<Vec<u32>>);
    let mut rows: Vec<Result<Encoded, RowError>> = Vec::new();
    let mut skipped = Vec::new();
    for (line, obj) in parse_objects(path, &text) {
        let r = obj.and_then(|obj| {
            let row = parse_score_row(line, obj).map_err(|e| RowError::at(path, line, e))?;
            let texts: Vec<(String, &Text)> = match &row.responses {
                Responses::One(t) => vec![("response".to_string(), t)],
                Responses::Many(v) => v
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (format!("responses[{i}]"), t))
                    .collect(),
            };
            let seqs = texts
                .iter()
                .map(|(field, t)| {
                    let ids = encode_pair(&tok, &row.prompt, t, field)?;
                    if let Some(bad) = ids.iter().find(|&&id| id as usize >= cfg.llama.vocab_size) {
                        return Err(ferr(
                            field.as_str(),
                            format!(
                                "token id {bad} is outside the reward model's vocabulary ({})",
                                cfg.llama.vocab_size
                            ),
                        ));
                    }
                    Ok(ids)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| RowError::at(path, line, e))?;
            Ok((row, seqs))
        });
        match r {
            Err(e) if !job.skip_bad_rows => {
                return Err(anyhow::Error::new(e)
                    .context("bad row (pass --skip-bad-rows to skip such rows)"))
            }
            Err(e) => {
                skipped.push(e.clone());
                rows.push(Err(e));
            }
            Ok(x) => rows.push(Ok(x)),
        }
    }
    anyhow::ensure!(
        rows.iter().any(Result::is_ok),
        "{}: no usable rows",
        path.display()
    );
    let flat: Vec<Vec<u32>> = rows
        .iter()
        .flatten()
        .flat_map(|(_, seqs)| seqs.iter().cloned())
        .collect();
    let (model, cfg) = load_reward_hf::<B>(&job.model, device)?;
    let scores = score_sequences(&model, &cfg, &flat, job.batch_size, device, progress);
    let mut at = 0;
    let out = rows
        .into_iter()
        .map(|r| match r {
            Ok((row, seqs)) => {
                let mut obj = row.obj;
                let s = &scores[at..at + seqs.len()];
                at += seqs.len();
                match row.responses {
                    Responses::One(_) => obj.insert("score".into(), json_num(s[0])),
                    Responses::Many(_) => obj.insert(
                        "scores".into(),
                        Value::Array(s.iter().map(|&x| json_num(x)).collect()),
                    ),
                };
                Value::Object(obj)
            }
            Err(e) => serde_json::json!({"skipped": e.to_string()}),
        })
        .collect();
    Ok(ScoreOutput {
        rows: out,
        skipped,
        pairs: flat.len(),
    })
}

/// A score as JSON: the f32 value's shortest decimal (non-finite scores become null and are
/// rejected by `build-dataset`).
fn json_num(x: f64) -> Value {
    // Print the f32 value without f64 noise (0.1f32 as 0.1, not 0.10000000149011612).
    let short: f64 = (x as f32).to_string().parse().unwrap_or(x);
    serde_json::Number::from_f64(short).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> Result<ScoreRow, FieldError> {
        parse_score_row(1, v.as_object().unwrap().clone())
    }

    #[test]
    fn both_row_forms_and_their_errors() {
        let r =
            row(json!({"prompt": "p", "response": {"role": "assistant", "content": "a"}})).unwrap();
        assert!(matches!(r.responses, Responses::One(Text::Messages(_))));
        let r = row(json!({"prompt_id": "x", "prompt": "p", "responses": ["a", "b"]})).unwrap();
        assert!(matches!(r.responses, Responses::Many(ref v) if v.len() == 2));
        assert_eq!(row(json!({"prompt": "p"})).unwrap_err().0, "response");
        assert_eq!(
            row(json!({"prompt": "p", "responses": []})).unwrap_err().0,
            "responses"
        );
        assert_eq!(
            row(json!({"prompt": "p", "responses": ["a", ""]}))
                .unwrap_err()
                .0,
            "responses[1]"
        );
        assert_eq!(row(json!({"response": "a"})).unwrap_err().0, "prompt");
        assert_eq!(
            row(json!({"prompt": "p", "response": {"role": "user", "content": "a"}}))
                .unwrap_err()
                .0,
            "response.role"
        );
    }

    #[test]
    fn scores_print_as_f32() {
        assert_eq!(json_num(0.1f32 as f64).to_string(), "0.1");
        assert_eq!(json_num(f64::NAN), Value::Null);
    }
}
