//! `wrpo-engine sft`: supervised fine-tuning of the target on (prompt, response) pairs — stage one
//! of WRPO (Target-SFT on the sources' best responses). A second small recipe on the trainer's
//! building blocks (flat parameters, AdamW, clipping, schedules, checkpoints, metrics).
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
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Tensor};
use serde_json::{Map, Value};
use wrpo_kernels::{logprobs::sequence_logprobs, KernelBackend};
use wrpo_models::{Llama, LlamaConfig};

use super::dist::{self, Peer, World};
use super::metrics::{json_f64, MetricsFile};
use super::optim::{clip_global_norm, AdamState, AdamW, Flat};
use super::schedule::{epoch_order, lr_factor, Plan};
use super::state::{self, TokenizerFiles, TrainerState};
use super::{resume_dir, Event, TrainJob, TrainSummary};
use crate::data::{parse_rows_with, parse_sft_row, Dataset, EncodeOptions, Encoded};
use crate::logps::{make_batch, make_packed_batch, pack_bfd};
use crate::model::ModelSource;

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
    params: &Flat<B>,
    batch: &[Vec<&SftExample>],
    completion_only: bool,
    packed: bool,
    scored_in_global: usize,
    pad: u32,
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
    let (logits, labels) = if packed {
        let b = make_packed_batch::<Autodiff<B>>(&parts, pad, device);
        let logits = model.forward_packed(cfg, b.input_ids, &b.segments, &b.positions);
        (logits, b.labels)
    } else {
        let seqs: Vec<(&[u32], &[u32])> = parts
            .iter()
            .map(|p| {
                assert_eq!(p.len(), 1, "unpacked sequences hold one example");
                p[0]
            })
            .collect();
        let b = make_batch::<Autodiff<B>>(&seqs, pad, device);
        (model.forward(cfg, b.input_ids, b.valid), b.labels)
    };
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
    let grads_all = (nll.clone() / scored_in_global as f64).backward();
    let grads = params.grads_of(&model, &grads_all);
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
    let (cfg, paths) = (&job.cfg, &job.paths);
    let (writes, world_size) = (peer.writes(), peer.world().size());
    cfg.validate()?;
    let source = ModelSource::from_arg(paths.model.as_deref());
    let model_cfg = source.config()?;
    let tok = source.tokenizer(&model_cfg)?;
    let opts = EncodeOptions {
        max_length: Some(cfg.max_length),
        max_prompt_length: Some(cfg.max_prompt_length),
        vocab_size: model_cfg.vocab_size,
    };
    let (ds, label) = load_examples(
        paths.data.as_deref(),
        tok.as_ref(),
        &opts,
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
    let plan = Plan::new(cfg, units.len(), peer.world().size());
    let pad = tok
        .as_ref()
        .and_then(|t| t.pad.as_ref().or(t.eos.as_ref()))
        .map_or(0, |(_, id)| *id);
    if writes {
        std::fs::create_dir_all(&paths.output)
            .with_context(|| format!("creating {}", paths.output.display()))?;
    }
    on(Event::Note(format!(
        "sft: model {} · {} examples{} · loss on {} · {} updates of {} {}",
        source.label(),
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
    let (initial, _) = source.load::<B>(device)?;
    let mut params = Flat::of_model(&initial);
    drop(initial);
    let adamw = AdamW {
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_epsilon,
        weight_decay: cfg.weight_decay,
    };
    let mut opt = AdamState::new(&params);
    let (mut start, mut history) = (0usize, Vec::<Value>::new());
    if let Some(dir) = resume_dir(paths)? {
        let r = state::load_checkpoint(&dir, &params, device)?;
        super::check_resume(&r.state, cfg, &source, &plan, peer.world().size())?;
        (params, opt, start, history) = (
            r.params,
            r.opt,
            r.state.global_step as usize,
            r.state.log_history,
        );
        on(Event::Note(format!(
            "resumed from {} (update {start})",
            dir.display()
        )));
    }
    let mut metrics_file = match writes {
        true => Some(MetricsFile::open(
            &paths.output.join("metrics.jsonl"),
            (start > 0).then_some(start as u64),
        )?),
        false => None,
    };
    let tokenizer_files = paths
        .model
        .clone()
        .map_or(TokenizerFiles::Embedded, TokenizerFiles::Dir);
    let trainer_state = |step: usize, history: &[Value]| TrainerState {
        global_step: step as u64,
        total_steps: plan.total as u64,
        epoch: plan.epoch_after(step),
        model: source.label(),
        data: label.display().to_string(),
        config: cfg.clone(),
        log_history: history.to_vec(),
        world_size: world_size as u64,
    };
    on(Event::Started {
        plan: &plan,
        start,
        config: cfg,
    });

    // ---- loop ---------------------------------------------------------------------------------
    let (mut acc_nll, mut acc_correct, mut acc_scored, mut acc_tokens) = (0.0, 0.0, 0usize, 0usize);
    let mut interval_start = Instant::now();
    let mut order = (usize::MAX, vec![]);
    for s in start..plan.total {
        let (epoch, pos) = plan.locate(s);
        if order.0 != epoch {
            order = (
                epoch,
                epoch_order(units.len(), epoch, cfg.shuffle, cfg.seed),
            );
        }
        let ids = &order.1[(pos * plan.global_batch).min(units.len())
            ..((pos + 1) * plan.global_batch).min(units.len())];
        let lr = cfg.learning_rate * lr_factor(cfg.lr_scheduler_type, s, plan.warmup, plan.total);
        let n_scored: usize = ids
            .iter()
            .flat_map(|&u| &units[u])
            .map(|&i| scored(&rows[i], cfg.completion_only))
            .sum();
        let mut grads: Option<Vec<Tensor<B, 1>>> = None;
        let (mut nll, mut correct, mut tokens) = (0.0, 0.0, 0usize);
        for micro in peer
            .shard(ids, plan.per_peer)
            .chunks(cfg.per_device_train_batch_size)
        {
            let batch: Vec<Vec<&SftExample>> = micro
                .iter()
                .map(|&u| units[u].iter().map(|&i| &rows[i]).collect())
                .collect();
            let out = sft_micro(
                &model_cfg,
                &params,
                &batch,
                cfg.completion_only,
                cfg.packing,
                n_scored.max(1),
                pad,
                device,
            );
            (nll, correct) = (nll + out.nll, correct + out.correct);
            tokens += out.tokens;
            grads = Some(match grads {
                None => out.grads,
                Some(acc) => acc.into_iter().zip(out.grads).map(|(a, g)| a + g).collect(),
            });
        }
        // A peer past the end of a last, partial batch adds zeros; then the sum over peers.
        let grads = grads.unwrap_or_else(|| params.zeros_like().values);
        let (mut grads, stats) = peer.sum_update(
            &format!("update {}", s + 1),
            grads,
            vec![nll, correct, tokens as f64],
        )?;
        let (nll, correct) = (stats[0], stats[1]);
        acc_tokens += stats[2].round() as usize;
        let grad_norm = clip_global_norm(&mut grads, cfg.max_grad_norm);
        let loss = nll / n_scored.max(1) as f64;
        if !loss.is_finite() || !grad_norm.is_finite() {
            bail!("update {}: non-finite loss or gradient (loss {loss}, grad_norm {grad_norm}); stopped before applying it", s + 1);
        }
        adamw.step(lr, &mut params, grads, &mut opt);
        let done = s + 1;
        (acc_nll, acc_correct, acc_scored) =
            (acc_nll + nll, acc_correct + correct, acc_scored + n_scored);
        let mut record = None;
        if done.is_multiple_of(cfg.logging_steps) || done == plan.total {
            let mut rec = Map::new();
            rec.insert("step".into(), done.into());
            rec.insert("epoch".into(), json_f64(plan.epoch_after(done)));
            rec.insert("loss".into(), json_f64(acc_nll / acc_scored.max(1) as f64));
            rec.insert("learning_rate".into(), json_f64(lr));
            rec.insert("grad_norm".into(), json_f64(grad_norm as f64));
            rec.insert(
                "mean_token_accuracy".into(),
                json_f64(acc_correct / acc_scored.max(1) as f64),
            );
            let secs = interval_start.elapsed().as_secs_f64().max(1e-9);
            rec.insert(
                "tokens_per_second".into(),
                json_f64(acc_tokens as f64 / secs),
            );
            if let Some(f) = metrics_file.as_mut() {
                f.write(&rec)?;
            }
            history.push(Value::Object(rec.clone()));
            record = Some(rec);
            (acc_nll, acc_correct, acc_scored, acc_tokens) = (0.0, 0.0, 0, 0);
            interval_start = Instant::now();
        }
        on(Event::Step {
            step: done,
            loss,
            record: record.as_ref(),
        });
        if writes && cfg.save_steps > 0 && done.is_multiple_of(cfg.save_steps) && done < plan.total
        {
            let dir = paths.output.join(format!("checkpoint-{done}"));
            state::save_checkpoint(
                &dir,
                &params,
                &opt,
                &model_cfg,
                &tokenizer_files,
                &trainer_state(done, &history),
            )?;
            state::rotate_checkpoints(&paths.output, cfg.save_total_limit)?;
            on(Event::Note(format!("saved {}", dir.display())));
        }
    }

    // ---- finish -------------------------------------------------------------------------------
    super::finish(
        peer,
        &paths.output.join("final"),
        plan.total,
        history,
        on,
        &mut |dir, history| {
            let st = trainer_state(plan.total, history);
            state::save_checkpoint(dir, &params, &opt, &model_cfg, &tokenizer_files, &st)
        },
    )
}
