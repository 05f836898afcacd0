//! `wrpo-engine sample`: N responses per prompt from a LLaMA, with a KV cache.
//!
//! - Prompts: JSON Lines rows with `prompt` (a string, a message or a list of messages, as in
//!   WRPO rows) and an optional `prompt_id` (default: the line number); other fields are
//!   ignored, so WRPO rows and `sample` output rows work as prompt files.
//! - Encoding: the chat template with the generation prompt (a string is one user message); a
//!   tokenizer without a chat template encodes string prompts as plain text with its special
//!   tokens (BOS).
//! - Batching: `batch_size` prompts are left-padded and prefilled in one forward; the cache is
//!   then expanded to `n` rows per prompt, and each step decodes one token for every unfinished
//!   row (finished rows are dropped from the cache). See `wrpo_models::generate`.
//! - Stopping: at `max_new_tokens` or at a stop token: the tokenizer's eos, `<|eot_id|>` and
//!   `<|im_end|>` when the vocabulary has them, and `eos_token_id` of the folder's
//!   `generation_config.json` (else `config.json`), which is what transformers stops at. The
//!   stop token is not part of the response.
//! - Sampling: [`super::sampler`] on the host; greedy when the temperature is 0. Every
//!   (prompt, sample) pair has its own random stream, seeded from (`seed`, prompt index, sample
//!   index), so the draws do not depend on the batch size.
//! - Output text: decoded without special tokens.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use rand::{rngs::StdRng, SeedableRng};
use serde_json::Value;
use wrpo_models::{KvCache, Llama, LlamaConfig};

use super::parse_objects;
use super::sampler::{pick, SamplerConfig};
use crate::data::{ferr, parse_prompt, parse_prompt_id, FieldError, RowError, Text};
use crate::model::ModelSource;
use crate::tokenizer::TextTokenizer;

/// One prompt to sample.
#[derive(Debug, Clone)]
pub struct PromptRow {
    /// 1-based line in the prompts file.
    pub line: usize,
    /// `prompt_id`, or the line number.
    pub prompt_id: String,
    /// The `prompt` value as read (written back unchanged).
    pub prompt: Value,
    /// The parsed prompt.
    pub text: Text,
}

/// Read prompt rows; each bad row is an `Err` of its own.
pub fn parse_prompts(path: &Path, text: &str) -> Vec<Result<PromptRow, RowError>> {
    parse_objects(path, text)
        .into_iter()
        .map(|(line, obj)| {
            let obj = obj?;
            let parsed = (|| -> Result<PromptRow, FieldError> {
                let text = parse_prompt(obj.get("prompt"))?;
                let prompt_id =
                    parse_prompt_id(obj.get("prompt_id"))?.unwrap_or_else(|| line.to_string());
                Ok(PromptRow {
                    line,
                    prompt_id,
                    prompt: obj["prompt"].clone(),
                    text,
                })
            })();
            parsed.map_err(|e| RowError::at(path, line, e))
        })
        .collect()
}

/// Prompt token ids: the chat template with the generation prompt; without a template, string
/// prompts as plain text with special tokens.
pub fn encode_prompt(tok: &TextTokenizer, text: &Text) -> Result<Vec<u32>, FieldError> {
    let r = match text {
        Text::Plain(s) if !tok.has_chat_template() => tok.encode(s, true),
        _ => tok.chat_ids(&text.messages("user"), true),
    };
    r.map_err(|e| ferr("prompt", format!("{e:#}")))
}

/// The stop tokens of a model (see the module docs), sorted.
pub fn stop_ids(tok: &TextTokenizer, model_dir: Option<&Path>) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = tok.eos.iter().map(|(_, id)| *id).collect();
    ids.extend(
        ["<|eot_id|>", "<|im_end|>"]
            .iter()
            .filter_map(|t| tok.token_id(t)),
    );
    if let Some(dir) = model_dir {
        let gen = dir.join("generation_config.json");
        let path = if gen.is_file() {
            gen
        } else {
            dir.join("config.json")
        };
        if path.is_file() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", path.display()))?;
            match v.get("eos_token_id") {
                Some(Value::Number(n)) => ids.extend(n.as_u64().map(|x| x as u32)),
                Some(Value::Array(a)) => {
                    ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                }
                _ => {}
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Generation settings for [`generate`].
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Responses per prompt.
    pub n: usize,
    /// Most tokens generated per response (the stop token included, as in transformers).
    pub max_new_tokens: usize,
    /// Temperature, top-p, top-k.
    pub sampler: SamplerConfig,
    /// Tokens that end a response.
    pub stop_ids: Vec<u32>,
    /// Id written into left-padding columns (never attended to).
    pub pad_id: u32,
    /// Base seed of the random streams.
    pub seed: u64,
}

/// One generated response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Generated {
    /// Generated ids, without the stop token.
    pub tokens: Vec<u32>,
    /// The stop token that ended it; `None` when it ran to `max_new_tokens`.
    pub stop: Option<u32>,
}

/// The random stream of sample `j` of prompt `i` (SplitMix64 finaliser over the three values).
pub fn stream_seed(seed: u64, prompt_index: usize, sample_index: usize) -> u64 {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    mix(mix(mix(seed) ^ prompt_index as u64) ^ sample_index as u64)
}

fn host_rows<B: Backend>(logits: Tensor<B, 2>) -> Vec<f32> {
    logits
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 logits")
}

/// Generate `opts.n` responses for each prompt, all prompts in one batch. `first_index` is the
/// index of `prompts[0]` in the whole prompt list (for the random streams); `on_tokens(k)` is
/// called after each step with the tokens it produced.
///
/// # Shapes
/// - prefill `[P, Tmax]` (left-padded), then steps of `[R, 1]`, `R ≤ P·n` unfinished rows
pub fn generate<B: wrpo_kernels::linear::FrozenLinearBackend>(
    model: &Llama<B>,
    cfg: &LlamaConfig,
    prompts: &[Vec<u32>],
    first_index: usize,
    opts: &GenerateOptions,
    device: &B::Device,
    on_tokens: &mut dyn FnMut(usize),
) -> Vec<Vec<Generated>> {
    let (p, n) = (prompts.len(), opts.n);
    let mut out = vec![vec![Generated::default(); n]; p];
    if p == 0 || n == 0 || opts.max_new_tokens == 0 {
        return out;
    }
    let t = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let (mut ids, mut valid) = (Vec::with_capacity(p * t), Vec::with_capacity(p * t));
    for prompt in prompts {
        let pad = t - prompt.len();
        ids.extend(std::iter::repeat_n(opts.pad_id as i64, pad));
        ids.extend(prompt.iter().map(|&x| x as i64));
        valid.extend((0..t).map(|j| j >= pad));
    }
    let mut cache = KvCache::<B>::new(cfg, p);
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [p, t]), device);
    let logits = model.forward_cached_last(cfg, ids, &valid, &mut cache);
    // Expand every prompt to its n samples: row r = (r / n, r % n).
    let mut rows: Vec<(usize, usize)> = (0..p).flat_map(|i| (0..n).map(move |j| (i, j))).collect();
    let mut rngs: Vec<StdRng> = rows
        .iter()
        .map(|&(i, j)| StdRng::seed_from_u64(stream_seed(opts.seed, first_index + i, j)))
        .collect();
    let mut logits = host_rows(logits);
    let v = cfg.vocab_size;
    if n > 1 {
        let expand: Vec<usize> = rows.iter().map(|&(i, _)| i).collect();
        cache.select(&expand);
        logits = expand
            .iter()
            .flat_map(|&i| logits[i * v..(i + 1) * v].to_vec())
            .collect();
    }
    for step in 0..opts.max_new_tokens {
        let mut next = Vec::with_capacity(rows.len());
        let mut keep = Vec::with_capacity(rows.len());
        for (r, &(i, j)) in rows.iter().enumerate() {
            let tok = pick(&opts.sampler, &logits[r * v..(r + 1) * v], &mut rngs[r]);
            let g = &mut out[i][j];
            if opts.stop_ids.contains(&tok) {
                g.stop = Some(tok);
            } else {
                g.tokens.push(tok);
                next.push(tok as i64);
                keep.push(r);
            }
        }
        on_tokens(rows.len());
        if keep.is_empty() || step + 1 == opts.max_new_tokens {
            break;
        }
        if keep.len() < rows.len() {
            cache.select(&keep);
            rows = keep.iter().map(|&r| rows[r]).collect();
            let mut kept_rngs = Vec::with_capacity(keep.len());
            let mut old: Vec<Option<StdRng>> = rngs.into_iter().map(Some).collect();
            for &r in &keep {
                kept_rngs.push(old[r].take().expect("each row once"));
            }
            rngs = kept_rngs;
        }
        let k = rows.len();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(next, [k, 1]), device);
        logits = host_rows(model.forward_cached_last(cfg, ids, &vec![true; k], &mut cache));
    }
    out
}

/// Settings of the `sample` command.
#[derive(Debug, Clone)]
pub struct SampleJob {
    /// The model.
    pub model: ModelSource,
    /// Prompts file; `None` = the bundled dataset's prompts (embedded model only).
    pub prompts: Option<PathBuf>,
    /// Responses per prompt.
    pub n: usize,
    /// Most new tokens per response.
    pub max_new_tokens: usize,
    /// Sampling settings.
    pub sampler: SamplerConfig,
    /// Base seed.
    pub seed: u64,
    /// Prompts per batch (each decoded as `n` rows).
    pub batch_size: usize,
    /// Skip bad prompt rows instead of failing.
    pub skip_bad_rows: bool,
    /// A PEFT LoRA adapter on the model (`--adapter`).
    pub adapter: Option<PathBuf>,
}

/// Progress of a `sample` run.
#[derive(Debug, Clone, Copy)]
pub struct SampleProgress {
    /// Prompts finished.
    pub prompts_done: usize,
    /// Prompts in total.
    pub prompts_total: usize,
    /// Tokens generated so far.
    pub tokens: usize,
    /// Seconds since the first batch started (model loading excluded).
    pub seconds: f64,
}

/// One output row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SampleRow {
    /// `prompt_id` of the input row (or its line number).
    pub prompt_id: String,
    /// The prompt as read.
    pub prompt: Value,
    /// `n` decoded responses.
    pub responses: Vec<String>,
}

/// What a `sample` run produced.
#[derive(Debug, Clone)]
pub struct SampleOutput {
    /// One row per usable prompt, in input order.
    pub rows: Vec<SampleRow>,
    /// Prompt rows skipped as bad.
    pub skipped: Vec<RowError>,
    /// Tokens generated (stop tokens included).
    pub tokens: usize,
    /// Responses that ran to `max_new_tokens` without a stop token.
    pub truncated: usize,
    /// Decode time in seconds (prefill included, model loading excluded).
    pub seconds: f64,
    /// The stop tokens used.
    pub stop_ids: Vec<u32>,
}

/// Run `sample`: read prompts, load the model, generate, decode.
pub fn run_sample<B: wrpo_kernels::linear::FrozenLinearBackend>(
    job: &SampleJob,
    device: &B::Device,
    progress: &mut dyn FnMut(SampleProgress),
) -> Result<SampleOutput> {
    anyhow::ensure!(job.batch_size > 0, "--batch-size must be at least 1");
    anyhow::ensure!(job.n > 0, "--n must be at least 1");
    job.sampler.validate()?;
    let cfg = job.model.config()?;
    let tok = job.model.tokenizer(&cfg)?.with_context(|| {
        format!(
            "{}: sampling needs tokenizer.json to encode prompts and decode responses",
            job.model.label()
        )
    })?;
    let path = match &job.prompts {
        Some(path) => {
            crate::model::require_file(path, "--prompts")?;
            path.clone()
        }
        None => Path::new(crate::embedded::LABEL).join("wrpo_tiny.jsonl"),
    };
    let parsed = match &job.prompts {
        Some(_) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            parse_prompts(&path, &text)
        }
        None => parse_prompts(&path, crate::embedded::DATASET),
    };
    let mut prompts = Vec::new();
    let mut skipped = Vec::new();
    for row in parsed {
        let encoded = row.and_then(|r| match encode_prompt(&tok, &r.text) {
            Ok(ids) if ids.is_empty() => Err(RowError::at(
                &path,
                r.line,
                ferr("prompt", "encodes to no tokens"),
            )),
            Ok(ids) => match ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                Some(bad) => Err(RowError::at(
                    &path,
                    r.line,
                    ferr(
                        "prompt",
                        format!(
                            "token id {bad} is outside the model's vocabulary ({})",
                            cfg.vocab_size
                        ),
                    ),
                )),
                None => Ok((r, ids)),
            },
            Err(e) => Err(RowError::at(&path, r.line, e)),
        });
        match encoded {
            Ok(x) => prompts.push(x),
            Err(e) if job.skip_bad_rows => skipped.push(e),
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context("bad prompt row (pass --skip-bad-rows to skip such rows)"))
            }
        }
    }
    anyhow::ensure!(!prompts.is_empty(), "no usable prompts");
    let dir = match &job.model {
        ModelSource::Dir(d) => Some(d.as_path()),
        ModelSource::Embedded => None,
    };
    let stops = stop_ids(&tok, dir)?;
    let pad_id = tok
        .pad
        .as_ref()
        .or(tok.eos.as_ref())
        .map_or(0, |(_, id)| *id);
    let opts = GenerateOptions {
        n: job.n,
        max_new_tokens: job.max_new_tokens,
        sampler: job.sampler,
        stop_ids: stops.clone(),
        pad_id,
        seed: job.seed,
    };
    let (model, cfg) = job
        .model
        .load_adapted::<B>(job.adapter.as_deref(), device)?;
    let start = Instant::now();
    let total = prompts.len();
    let (mut tokens, mut truncated) = (0usize, 0usize);
    let mut rows = Vec::with_capacity(total);
    for (b, chunk) in prompts.chunks(job.batch_size).enumerate() {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|(_, ids)| ids.clone()).collect();
        let done = rows.len();
        let mut on_tokens = |k: usize| {
            tokens += k;
            progress(SampleProgress {
                prompts_done: done,
                prompts_total: total,
                tokens,
                seconds: start.elapsed().as_secs_f64(),
            });
        };
        let out = generate(
            &model,
            &cfg,
            &ids,
            b * job.batch_size,
            &opts,
            device,
            &mut on_tokens,
        );
        for ((row, _), gens) in chunk.iter().zip(out) {
            let responses = gens
                .iter()
                .map(|g| {
                    truncated += usize::from(g.stop.is_none());
                    tok.decode_text(&g.tokens)
                })
                .collect::<Result<Vec<_>>>()?;
            rows.push(SampleRow {
                prompt_id: row.prompt_id.clone(),
                prompt: row.prompt.clone(),
                responses,
            });
        }
        progress(SampleProgress {
            prompts_done: rows.len(),
            prompts_total: total,
            tokens,
            seconds: start.elapsed().as_secs_f64(),
        });
    }
    Ok(SampleOutput {
        rows,
        skipped,
        tokens,
        truncated,
        seconds: start.elapsed().as_secs_f64(),
        stop_ids: stops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_rows_default_ids_and_errors() {
        let p = Path::new("prompts.jsonl");
        let rows = parse_prompts(
            p,
            "{\"prompt\": \"hi\"}\n\n{\"prompt_id\": 7, \"prompt\": [{\"role\": \"user\", \"content\": \"x\"}], \"chosen\": []}\n{\"prompt_id\": \"a\"}\n[1]\n",
        );
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].as_ref().unwrap().prompt_id, "1");
        assert_eq!(rows[1].as_ref().unwrap().prompt_id, "7");
        let e = rows[2].as_ref().unwrap_err();
        assert_eq!(e.to_string(), "prompts.jsonl:4: field `prompt`: missing");
        assert!(rows[3]
            .as_ref()
            .unwrap_err()
            .to_string()
            .starts_with("prompts.jsonl:5: "));
    }

    #[test]
    fn streams_differ_per_prompt_and_sample() {
        let s = [
            stream_seed(1, 0, 0),
            stream_seed(1, 0, 1),
            stream_seed(1, 1, 0),
            stream_seed(2, 0, 0),
        ];
        for i in 0..s.len() {
            for j in i + 1..s.len() {
                assert_ne!(s[i], s[j]);
            }
        }
    }
}
