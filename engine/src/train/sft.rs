//! `wrpo-engine sft`: supervised fine-tuning of the target on (prompt, response) pairs — stage one
//! of WRPO (Target-SFT on the sources' best responses). A second small recipe on the trainer's
//! building blocks (flat parameters, AdamW, clipping, schedules, checkpoints, metrics); the loop
//! and the finish are the [`super::driver`]'s, with this recipe's micro-batch (`Sft`, a
//! [`Recipe`]) and metrics.
//!
//! Loss: the mean token negative log-likelihood over the completion tokens of the global batch
//! (`completion_only`, the default) or over every token but the first (`completion_only: false`,
//! what the authors' packed SFT did). `mean_token_accuracy`: the fraction of those tokens whose
//! arg-max logit is the label.
//!
//! Packing (`packing: true`): examples are packed once, before training, into sequences of at most
//! `max_length` tokens (best-fit decreasing, examples never split; [`crate::logps::pack_bfd`]);
//! each example attends only to itself and its positions restart at 0
//! ([`wrpo_models::Llama::forward_packed`]), so a packed example's loss and gradient are those of
//! the same example alone. `per_device_train_batch_size` then counts packed sequences (as in
//! TRL), and the loss is still the mean over the scored tokens of the global batch.

use std::path::Path;

use anyhow::{Context, Result};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Tensor};
use serde_json::{Map, Value};
use wrpo_kernels::{logprobs::sequence_logprobs, KernelBackend};
use wrpo_models::{LayerInputs, Llama, LlamaConfig};

use super::config::TrainConfig;
use super::dist::{self, Peer, World};
use super::driver::{self, Micro, Recipe, Setup};
use super::metrics::json_f64;
use super::params::Params;
use super::recompute;
use super::{Event, TrainJob, TrainSummary};
use crate::data::{parse_rows_with, parse_sft_row, Dataset, EncodeOptions, Encoded};
use crate::logps::{make_batch, make_packed_batch, pack_bfd};

/// One example: prompt ids and completion ids.
#[derive(Debug, Clone)]
pub struct SftExample {
    /// Data file line.
    pub line: usize,
    /// Prompt ids (context; scored only with `completion_only: false`).
    pub prompt: Vec<u32>,
    /// Completion ids (always scored).
    pub completion: Vec<u32>,
}

fn load_examples(
    path: Option<&Path>,
    tok: Option<&crate::tokenizer::TextTokenizer>,
    opts: &EncodeOptions,
    skip: bool,
) -> Result<(Dataset, std::path::PathBuf)> {
    let (label, text) = match path {
        Some(p) => {
            crate::model::require_file(p, "--data")?;
            (
                p.to_path_buf(),
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
        }
        None => (
            Path::new(crate::embedded::LABEL).join("wrpo_tiny.jsonl"),
            crate::embedded::DATASET.to_string(),
        ),
    };
    let parsed = parse_rows_with(&label, &text, &parse_sft_row)?;
    Ok((Dataset::from_rows(&label, parsed, tok, opts, skip)?, label))
}

struct MicroOut<B: Backend> {
    grads: Vec<Tensor<B, 1>>,
    nll: f64,
    correct: f64,
    tokens: usize,
}

/// Forward + backward of one micro-batch of sequences (each one example, or several packed);
/// gradients of `Σ NLL / scored_in_global`.
#[allow(clippy::too_many_arguments)]
fn sft_micro<B: KernelBackend>(
    cfg: &LlamaConfig,
    params: &Params<B>,
    batch: &[Vec<&SftExample>],
    completion_only: bool,
    packed: bool,
    scored_in_global: usize,
    pad: u32,
    checkpoint: bool,
    device: &B::Device,
) -> MicroOut<B> {
    let model: Llama<Autodiff<B>> = params.leaf_model(cfg);
    let joined: Vec<Vec<Vec<u32>>> = batch
        .iter()
        .map(|seq| {
            seq.iter()
                .map(|e| [e.prompt.as_slice(), e.completion.as_slice()].concat())
                .collect()
        })
        .collect();
    // (context, scored) parts of every example, grouped by sequence.
    let parts: Vec<Vec<(&[u32], &[u32])>> = batch
        .iter()
        .zip(&joined)
        .map(|(seq, alls)| {
            seq.iter()
                .zip(alls)
                .map(|(e, all)| {
                    if completion_only {
                        (e.prompt.as_slice(), e.completion.as_slice())
                    } else {
                        (&all[..0], all.as_slice())
                    }
                })
                .collect()
        })
        .collect();
    let tokens = joined.iter().flatten().map(Vec::len).sum();
    let (input_ids, inputs, labels) = if packed {
        let b = make_packed_batch::<Autodiff<B>>(&parts, pad, device);
        let inputs =
            LayerInputs::packed(cfg, b.input_ids.dims(), &b.segments, &b.positions, device);
        (b.input_ids, inputs, b.labels)
    } else {
        let seqs: Vec<(&[u32], &[u32])> = parts
            .iter()
            .map(|p| {
                assert_eq!(p.len(), 1, "unpacked sequences hold one example");
                p[0]
            })
            .collect();
        let b = make_batch::<Autodiff<B>>(&seqs, pad, device);
        (b.input_ids, LayerInputs::padded(cfg, b.valid), b.labels)
    };
    let (grads, (nll, correct)) = recompute::backward(
        cfg,
        params,
        &model,
        input_ids,
        &inputs,
        checkpoint,
        |hidden| {
            let logits = model.head(hidden);
            let argmax = logits.clone().inner().argmax(2).squeeze_dim::<2>(2);
            let labels_inner = labels.clone().inner();
            let scored = labels_inner
                .clone()
                .not_equal_elem(wrpo_kernels::IGNORE_INDEX);
            let correct = argmax
                .equal(labels_inner)
                .bool_and(scored)
                .int()
                .sum()
                .into_scalar();
            let (sums, _) = sequence_logprobs(logits, labels);
            let nll = sums.sum().neg();
            (nll.clone() / scored_in_global as f64, (nll, correct))
        },
    );
    use burn::tensor::ElementConversion;
    MicroOut {
        grads,
        nll: nll.into_scalar().elem::<f64>(),
        correct: correct.elem::<f64>(),
        tokens,
    }
}

fn scored(e: &SftExample, completion_only: bool) -> usize {
    if completion_only {
        e.completion.len() - usize::from(e.prompt.is_empty())
    } else {
        e.prompt.len() + e.completion.len() - 1
    }
}

/// Run `sft`. Same settings, outputs, checkpoints and resume as `train` (WRPO-only keys are
/// ignored); `packing: true` packs examples (module docs).
pub fn run_sft<B: KernelBackend>(
    job: &TrainJob,
    device: &B::Device,
    on: &mut dyn FnMut(Event),
) -> Result<TrainSummary> {
    run_sft_peer(job, &mut Peer::<B>::single(), device, on)
}

/// Run `sft` data-parallel (see [`super::run_train_parallel`]).
pub fn run_sft_parallel<B: KernelBackend>(
    job: &TrainJob,
    world: &World,
    devices: &[B::Device],
    on: &mut dyn FnMut(Event),
) -> Result<TrainSummary> {
    dist::run_recipe(job, world, devices, on, run_sft_peer::<B>)
}

/// Run `sft` as one peer of a data-parallel run (or alone, with [`Peer::single`]).
pub fn run_sft_peer<B: KernelBackend>(
    job: &TrainJob,
    peer: &mut Peer<B>,
    device: &B::Device,
    on: &mut dyn FnMut(Event),
) -> Result<TrainSummary> {
    // ---- setup ------------------------------------------------------------------------------
    let job = &job.resolved()?;
    let setup = Setup::new(job)?;
    let (cfg, paths) = (&job.cfg, &job.paths);
    let (ds, label) = load_examples(
        paths.data.as_deref(),
        setup.tok.as_ref(),
        &setup.opts,
        cfg.skip_bad_rows,
    )?;
    if !ds.skipped.is_empty() {
        on(Event::Note(format!(
            "{}: skipped {} bad rows (first: {})",
            label.display(),
            ds.skipped.len(),
            ds.skipped[0]
        )));
    }
    let rows: Vec<SftExample> = ds
        .rows
        .into_iter()
        .map(|e: Encoded| SftExample {
            line: e.line,
            prompt: e.prompt,
            completion: e.chosen.into_iter().next().expect("one completion"),
        })
        .collect();
    // The units of the data order: one example each, or the packed sequences.
    let units: Vec<Vec<usize>> = if cfg.packing {
        let lengths: Vec<usize> = rows
            .iter()
            .map(|e| e.prompt.len() + e.completion.len())
            .collect();
        pack_bfd(&lengths, cfg.max_length)
    } else {
        (0..rows.len()).map(|i| vec![i]).collect()
    };
    let longest = if cfg.packing {
        cfg.max_length
    } else {
        rows.iter()
            .map(|e| e.prompt.len() + e.completion.len())
            .max()
            .unwrap_or(0)
    };
    setup.check_memory::<B>(true, units.len(), 1, longest, device, on)?;
    let plan = setup.plan(units.len(), peer)?;
    on(Event::Note(format!(
        "sft: model {} · {} examples{} · loss on {} · {} updates of {} {}",
        setup.source.label(),
        rows.len(),
        if cfg.packing {
            format!(
                " packed into {} sequences of ≤ {} tokens",
                units.len(),
                cfg.max_length
            )
        } else {
            String::new()
        },
        if cfg.completion_only {
            "completion tokens"
        } else {
            "all tokens"
        },
        plan.total,
        plan.global_batch,
        if cfg.packing { "sequences" } else { "rows" }
    )));
    // Under LoRA the base is frozen and kept in `lora_base_dtype` (its checkpoint's by default).
    let (initial, _) = match cfg.lora() {
        Some(_) => setup.source.load_frozen::<B>(cfg.lora_base_dtype, device)?,
        None => setup.source.load::<B>(device)?,
    };
    let params = Params::initial(
        cfg,
        job.paths.adapter.as_deref(),
        &initial,
        &setup.model_cfg,
        device,
    )?;
    if let Some(frozen) = params.frozen_storage() {
        on(Event::Note(format!("frozen base on the device: {frozen}")));
    }
    drop(initial);

    // ---- loop and finish: the shared driver, with SFT's micro-batch and metrics ----------------
    let mut recipe = Sft {
        cfg,
        model_cfg: &setup.model_cfg,
        rows: &rows,
        units: &units,
        pad: setup.pad,
        device,
        n_scored: 0,
        nll: 0.0,
        correct: 0.0,
        acc_nll: 0.0,
        acc_correct: 0.0,
        acc_scored: 0,
    };
    driver::run(&setup, &plan, peer, device, params, &mut recipe, on)
}

/// SFT's part of an update ([`Recipe`]): the token NLL of (packed) examples, normalised by the
/// scored tokens of the whole global batch; loss and `mean_token_accuracy` per interval.
struct Sft<'a, B: KernelBackend> {
    cfg: &'a TrainConfig,
    model_cfg: &'a LlamaConfig,
    rows: &'a [SftExample],
    /// The units of the data order: example indices of one sequence each.
    units: &'a [Vec<usize>],
    pad: u32,
    device: &'a B::Device,
    /// Scored tokens of this update's global batch (every peer's).
    n_scored: usize,
    /// This peer's sums over the update's micro-batches: NLL, correct arg-max tokens.
    nll: f64,
    correct: f64,
    /// The logging interval's sums (of every peer): NLL, correct and scored tokens.
    acc_nll: f64,
    acc_correct: f64,
    acc_scored: usize,
}

impl<B: KernelBackend> Recipe<B> for Sft<'_, B> {
    fn fingerprint(&self) -> String {
        super::driver::fingerprint(
            self.rows
                .iter()
                .flat_map(|r| [r.prompt.as_slice(), r.completion.as_slice()]),
        )
    }

    fn begin(&mut self, _s: usize, _total: usize, ids: &[usize]) {
        let (rows, completion_only) = (self.rows, self.cfg.completion_only);
        self.n_scored = ids
            .iter()
            .flat_map(|&u| &self.units[u])
            .map(|&i| scored(&rows[i], completion_only))
            .sum();
        (self.nll, self.correct) = (0.0, 0.0);
    }

    /// Ignores `scale`: the loss is a mean over the global batch's scored tokens, not its units.
    fn micro(&mut self, params: &Params<B>, ids: &[usize], _scale: f64) -> Micro<B> {
        let batch: Vec<Vec<&SftExample>> = ids
            .iter()
            .map(|&u| self.units[u].iter().map(|&i| &self.rows[i]).collect())
            .collect();
        let out = sft_micro(
            self.model_cfg,
            params,
            &batch,
            self.cfg.completion_only,
            self.cfg.packing,
            self.n_scored.max(1),
            self.pad,
            self.cfg.gradient_checkpointing,
            self.device,
        );
        (self.nll, self.correct) = (self.nll + out.nll, self.correct + out.correct);
        Micro {
            grads: out.grads,
            tokens: out.tokens,
        }
    }

    /// `[Σ NLL, Σ correct]`.
    fn stats(&mut self) -> Vec<f64> {
        vec![self.nll, self.correct]
    }

    fn end(&mut self, summed: &[f64]) -> f64 {
        let (nll, correct) = (summed[0], summed[1]);
        (self.acc_nll, self.acc_correct, self.acc_scored) = (
            self.acc_nll + nll,
            self.acc_correct + correct,
            self.acc_scored + self.n_scored,
        );
        nll / self.n_scored.max(1) as f64
    }

    fn log(&mut self, rec: &mut Map<String, Value>) {
        let scored = self.acc_scored.max(1) as f64;
        rec.insert("loss".into(), json_f64(self.acc_nll / scored));
        rec.insert(
            "mean_token_accuracy".into(),
            json_f64(self.acc_correct / scored),
        );
        (self.acc_nll, self.acc_correct, self.acc_scored) = (0.0, 0.0, 0);
    }
}
