//! `wrpo-engine train`: the WRPO trainer (and its DPO / SimPO / IPO baselines).
//!
//! The recipe ([`run_train`]) reads top to bottom: setup → loop {policy forward, reference
//! log-probs, loss, backward (per micro-batch, accumulated), global-norm clip, AdamW step, α/LR
//! schedule, log, checkpoint} → final model. Building blocks live beside it: [`config`] (YAML +
//! flags), [`schedule`] (update counts, LR, data order), [`optim`] (flat parameters, clipping,
//! AdamW as PyTorch computes them), [`step`] (one micro-batch), [`metrics`], [`state`]
//! (checkpoints), [`refcache`] (precomputed reference log-probs), [`dist`] (data parallelism:
//! sharding and the one all-reduce per update, over [`collective`]).

pub mod collective;
pub mod config;
pub mod dist;
pub mod metrics;
pub mod optim;
pub mod refcache;
pub mod schedule;
pub mod sft;
pub mod state;
pub mod step;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use serde_json::{Map, Value};
use wrpo_kernels::loss::{LossConfig, Objective};
use wrpo_kernels::KernelBackend;

use crate::data::{Dataset, EncodeOptions, Encoded, RowError};
use crate::model::ModelSource;
use config::{LossType, RunPaths, TrainConfig};
use dist::{Peer, World};
use metrics::{json_f64, Meter, MetricsFile};
use optim::{clip_global_norm, AdamState, AdamW, Flat};
use schedule::{epoch_order, lr_factor, Plan};
use state::{TokenizerFiles, TrainerState};
use step::{eval_step, micro_step, Reference};

/// What the trainer reports while it runs (the CLI draws a progress bar from these).
#[derive(Debug)]
pub enum Event<'a> {
    /// Setup is done; training starts at update `start` of `plan.total`.
    Started {
        /// The run's layout.
        plan: &'a Plan,
        /// First update to run (> 0 when resuming).
        start: usize,
        /// The resolved configuration.
        config: &'a TrainConfig,
    },
    /// A line worth showing (setup facts, skipped rows, saved checkpoints).
    Note(String),
    /// An update finished; `record` is set on logging steps.
    Step {
        /// Updates done.
        step: usize,
        /// The update's loss.
        loss: f64,
        /// The metrics record written to metrics.jsonl, on logging steps.
        record: Option<&'a Map<String, Value>>,
    },
    /// An evaluation finished.
    Eval(&'a Map<String, Value>),
}

/// What a finished run leaves.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// `OUTPUT/final`.
    pub final_dir: PathBuf,
    /// Updates done.
    pub steps: usize,
    /// Every metrics record of the run.
    pub history: Vec<Value>,
    /// Whether this process wrote the outputs (global rank 0 of a data-parallel run).
    pub wrote_outputs: bool,
}

/// A training job: the resolved configuration and the paths.
#[derive(Debug, Clone)]
pub struct TrainJob {
    /// Hyperparameters.
    pub cfg: TrainConfig,
    /// Files.
    pub paths: RunPaths,
}

fn loss_config(cfg: &TrainConfig, alpha: f64) -> LossConfig {
    let objective = match cfg.loss_type {
        LossType::Wrpo | LossType::Dpo => Objective::Wrpo,
        LossType::Simpo | LossType::WrpoSimpo => Objective::SimpoBlend {
            gamma: cfg.simpo_gamma,
        },
        LossType::Ipo | LossType::WrpoIpo => Objective::IpoBlend,
    };
    LossConfig {
        objective,
        alpha,
        beta: cfg.beta,
        label_smoothing: cfg.label_smoothing,
    }
}

/// All rows must have as many chosen and rejected responses as the first (one batch layout);
/// others fail the load or, with `skip`, are skipped and counted.
fn check_row_shapes(ds: &mut Dataset, path: &Path, skip: bool) -> Result<(usize, usize)> {
    let first = &ds.rows[0];
    let (k1, r) = (first.chosen.len(), first.rejected.len());
    let mut kept = Vec::with_capacity(ds.rows.len());
    for row in std::mem::take(&mut ds.rows) {
        let bad = if row.chosen.len() != k1 {
            Some(("chosen", row.chosen.len(), k1))
        } else if row.rejected.len() != r {
            Some(("rejected", row.rejected.len(), r))
        } else {
            None
        };
        match bad {
            None => kept.push(row),
            Some((field, n, want)) => {
                let e = RowError {
                    path: path.to_path_buf(),
                    line: row.line,
                    field: field.into(),
                    msg: format!("has {n} responses but the rows before it have {want}: every row of a run needs the same count"),
                };
                if !skip {
                    return Err(anyhow::Error::new(e)
                        .context("bad row (pass --skip-bad-rows to skip such rows)"));
                }
                ds.skipped.push(e);
            }
        }
    }
    ds.rows = kept;
    Ok((k1, r))
}

/// Load and check one split.
fn load_split(
    path: Option<&Path>,
    tok: Option<&crate::tokenizer::TextTokenizer>,
    opts: &EncodeOptions,
    cfg: &TrainConfig,
    on: &mut dyn FnMut(Event),
) -> Result<(Dataset, usize, usize)> {
    let mut ds = crate::data::load_or_bundled(path, tok, opts, cfg.skip_bad_rows)?;
    let label = path.map_or_else(
        || Path::new(crate::embedded::LABEL).join("wrpo_tiny.jsonl"),
        Path::to_path_buf,
    );
    let (k1, r) = check_row_shapes(&mut ds, &label, cfg.skip_bad_rows)?;
    if !ds.skipped.is_empty() {
        on(Event::Note(format!(
            "{}: skipped {} bad rows (first: {})",
            label.display(),
            ds.skipped.len(),
            ds.skipped[0]
        )));
    }
    if cfg.loss_type.blends() && k1 < 2 {
        bail!(
            "{}: --loss-type {:?} needs at least 2 chosen responses per row (K ≥ 1 sources, then the target); these rows have {k1}. Use --loss-type dpo|simpo|ipo for pairwise data",
            label.display(),
            cfg.loss_type
        );
    }
    Ok((ds, k1, r))
}

/// Run `train` on one device. `B` is the inner backend; the policy trains on `Autodiff<B>`.
pub fn run_train<B: KernelBackend>(
    job: &TrainJob,
    device: &B::Device,
    on: &mut dyn FnMut(Event),
) -> Result<TrainSummary> {
    run_train_peer(job, &mut Peer::<B>::single(), device, on)
}

/// Run `train` data-parallel: one peer per device of `devices` in this process (threads), as
/// node `world.node_rank` of `world.nodes`. Events come from the process's first peer.
pub fn run_train_parallel<B: KernelBackend>(
    job: &TrainJob,
    world: &World,
    devices: &[B::Device],
    on: &mut dyn FnMut(Event),
) -> Result<TrainSummary> {
    dist::run_recipe(job, world, devices, on, run_train_peer::<B>)
}

/// Run `train` as one peer of a data-parallel run (or alone, with [`Peer::single`]).
pub fn run_train_peer<B: KernelBackend>(
    job: &TrainJob,
    peer: &mut Peer<B>,
    device: &B::Device,
    on: &mut dyn FnMut(Event),
) -> Result<TrainSummary> {
    // ---- setup ------------------------------------------------------------------------------
    let (cfg, paths) = (&job.cfg, &job.paths);
    cfg.validate()?;
    let (writes, world_size) = (peer.writes(), peer.world().size());
    let source = ModelSource::from_arg(paths.model.as_deref());
    let model_cfg = source.config()?;
    let tok = source.tokenizer(&model_cfg)?;
    let opts = EncodeOptions {
        max_length: Some(cfg.max_length),
        max_prompt_length: Some(cfg.max_prompt_length),
        vocab_size: model_cfg.vocab_size,
    };
    let (mut train, k1, r) = load_split(paths.data.as_deref(), tok.as_ref(), &opts, cfg, on)?;
    // Every row's line, kept or skipped, to match `--ref-logps` records to rows.
    let mut all_lines: Vec<usize> = train
        .rows
        .iter()
        .map(|r| r.line)
        .chain(train.skipped.iter().map(|e| e.line))
        .collect();
    all_lines.sort_unstable();
    let eval = match (&paths.eval_data, cfg.eval_fraction > 0.0) {
        (Some(p), _) => {
            let (ds, ek1, er) = load_split(Some(p), tok.as_ref(), &opts, cfg, on)?;
            if (ek1, er) != (k1, r) {
                bail!(
                    "{}: eval rows have {ek1} chosen / {er} rejected, training rows {k1} / {r}",
                    p.display()
                );
            }
            ds.rows
        }
        (None, true) => hold_out(&mut train.rows, cfg.eval_fraction, cfg.seed)?,
        (None, false) => vec![],
    };
    let rows = train.rows;
    let plan = Plan::new(cfg, rows.len(), peer.world().size());
    let pad = tok
        .as_ref()
        .and_then(|t| t.pad.as_ref().or(t.eos.as_ref()))
        .map_or(0, |(_, id)| *id);
    if writes {
        std::fs::create_dir_all(&paths.output)
            .with_context(|| format!("creating {}", paths.output.display()))?;
    }
    on(Event::Note(format!(
        "model {} · {} training rows ({} chosen + {} rejected each){} · {} updates of {} rows",
        source.label(),
        rows.len(),
        k1,
        r,
        if eval.is_empty() {
            String::new()
        } else {
            format!(" · {} eval rows", eval.len())
        },
        plan.total,
        plan.global_batch
    )));

    let (initial, _) = source.load::<B>(device)?;
    let mut params = Flat::of_model(&initial);
    let reference = build_reference::<B>(
        job, peer, &source, initial, &rows, &all_lines, &eval, pad, device, on,
    )?;
    let (ref_train, ref_eval) = reference;
    let adamw = AdamW {
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_epsilon,
        weight_decay: cfg.weight_decay,
    };
    let mut opt = AdamState::new(&params);
    let mut history: Vec<Value> = vec![];
    let mut start = 0usize;
    if let Some(dir) = resume_dir(paths)? {
        let restored = state::load_checkpoint(&dir, &params, device)?;
        check_resume(&restored.state, cfg, &source, &plan, peer.world().size())?;
        params = restored.params;
        opt = restored.opt;
        start = restored.state.global_step as usize;
        history = restored.state.log_history;
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
    let tokenizer_files = match &paths.model {
        Some(d) => TokenizerFiles::Dir(d.clone()),
        None => TokenizerFiles::Embedded,
    };
    let trainer_state = |step: usize, history: &[Value]| TrainerState {
        global_step: step as u64,
        total_steps: plan.total as u64,
        epoch: plan.epoch_after(step),
        model: source.label(),
        data: paths.data.as_ref().map_or_else(
            || "<embedded>/wrpo_tiny.jsonl".into(),
            |p| p.display().to_string(),
        ),
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
    let mut meter = Meter::default();
    let (mut interval_loss, mut interval_steps, mut interval_tokens) = (0.0, 0usize, 0usize);
    let mut interval_start = Instant::now();
    let mut order = (usize::MAX, vec![]);
    for s in start..plan.total {
        let (epoch, pos) = plan.locate(s);
        if order.0 != epoch {
            order = (epoch, epoch_order(rows.len(), epoch, cfg.shuffle, cfg.seed));
        }
        let ids = &order.1[(pos * plan.global_batch).min(rows.len())
            ..((pos + 1) * plan.global_batch).min(rows.len())];
        let alpha = cfg.alpha_at(s, plan.total);
        let lr = cfg.learning_rate * lr_factor(cfg.lr_scheduler_type, s, plan.warmup, plan.total);
        let loss_cfg = loss_config(cfg, alpha);
        let mut grads: Option<Vec<burn::tensor::Tensor<B, 1>>> = None;
        let (mut step_loss, mut step_meter, mut step_tokens) = (0.0, Meter::default(), 0usize);
        // This peer's rows of the global batch (all of them without data parallelism).
        for micro in peer
            .shard(ids, plan.per_peer)
            .chunks(cfg.per_device_train_batch_size)
        {
            let batch: Vec<&Encoded> = micro.iter().map(|&i| &rows[i]).collect();
            let scale = micro.len() as f64 / ids.len() as f64;
            let out = micro_step(
                &model_cfg, &params, &ref_train, &loss_cfg, &batch, micro, pad, scale, device,
            );
            step_loss += out.loss * scale;
            step_tokens += out.tokens;
            out.rows.iter().for_each(|row| step_meter.add(row));
            grads = Some(match grads {
                None => out.grads,
                Some(acc) => acc.into_iter().zip(out.grads).map(|(a, g)| a + g).collect(),
            });
        }
        // A peer past the end of a last, partial batch adds zeros.
        let grads = grads.unwrap_or_else(|| params.zeros_like().values);
        // Sum over peers: gradients, loss, metric sums, tokens (one all-reduce).
        let mut stats = vec![step_loss, step_tokens as f64];
        stats.extend(step_meter.packed());
        let (mut grads, stats) = peer.sum_update(&format!("update {}", s + 1), grads, stats)?;
        let step_loss = stats[0];
        interval_tokens += stats[1].round() as usize;
        meter.add_packed(&stats[2..]);
        let grad_norm = clip_global_norm(&mut grads, cfg.max_grad_norm);
        if !step_loss.is_finite() || !grad_norm.is_finite() {
            bail!(
                "update {}: non-finite {} (loss {step_loss}, grad_norm {grad_norm}); stopped before applying it{}. Lower the learning rate or check the data",
                s + 1,
                if step_loss.is_finite() { "gradient" } else { "loss" },
                state::latest_checkpoint(&paths.output)
                    .map_or(String::new(), |p| format!(" — the last good checkpoint is {}", p.display()))
            );
        }
        adamw.step(lr, &mut params, grads, &mut opt);
        let done = s + 1;
        interval_loss += step_loss;
        interval_steps += 1;

        let log_now = done % cfg.logging_steps == 0 || done == plan.total;
        let mut record = None;
        if log_now {
            let mut rec = Map::new();
            rec.insert("step".into(), done.into());
            rec.insert("epoch".into(), json_f64(plan.epoch_after(done)));
            rec.insert(
                "loss".into(),
                json_f64(interval_loss / interval_steps as f64),
            );
            rec.insert("learning_rate".into(), json_f64(lr));
            rec.insert("grad_norm".into(), json_f64(grad_norm as f64));
            rec.insert("cur_alpha".into(), json_f64(alpha));
            meter.write_into("", &mut rec);
            let secs = interval_start.elapsed().as_secs_f64();
            rec.insert(
                "tokens_per_second".into(),
                json_f64(interval_tokens as f64 / secs.max(1e-9)),
            );
            if let Some(f) = metrics_file.as_mut() {
                f.write(&rec)?;
            }
            history.push(Value::Object(rec.clone()));
            record = Some(rec);
            meter = Meter::default();
            (interval_loss, interval_steps, interval_tokens) = (0.0, 0, 0);
            interval_start = Instant::now();
        }
        on(Event::Step {
            step: done,
            loss: step_loss,
            record: record.as_ref(),
        });
        let eval_now = writes
            && !eval.is_empty()
            && ((cfg.eval_steps > 0 && done % cfg.eval_steps == 0) || done == plan.total);
        if eval_now {
            let rec = evaluate(
                cfg, &model_cfg, &params, &ref_eval, &eval, done, alpha, pad, device,
            );
            if let Some(f) = metrics_file.as_mut() {
                f.write(&rec)?;
            }
            history.push(Value::Object(rec.clone()));
            on(Event::Eval(&rec));
        }
        if writes && cfg.save_steps > 0 && done % cfg.save_steps == 0 && done < plan.total {
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
    finish(
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

/// The end of a run: the final model (written by the writing peer only) and the summary.
pub(crate) fn finish<B: Backend>(
    peer: &mut Peer<B>,
    final_dir: &Path,
    steps: usize,
    history: Vec<Value>,
    on: &mut dyn FnMut(Event),
    save: &mut dyn FnMut(&Path, &[Value]) -> Result<()>,
) -> Result<TrainSummary> {
    let writes = peer.writes();
    if writes {
        save(final_dir, &history)?;
        on(Event::Note(format!("saved {}", final_dir.display())));
    }
    let updates = peer.updates_synced();
    if updates > 0 {
        on(Event::Note(format!(
            "data parallel: rank {} of {} · all-reduce {:.1} ms per update (mean of {updates})",
            peer.rank(),
            peer.world().size(),
            peer.comm_time.as_secs_f64() * 1e3 / updates as f64
        )));
    }
    peer.close()?;
    Ok(TrainSummary {
        final_dir: final_dir.to_path_buf(),
        steps,
        history,
        wrote_outputs: writes,
    })
}

/// Move a seeded `fraction` of the rows (at least one) into an eval split.
fn hold_out(rows: &mut Vec<Encoded>, fraction: f64, seed: u64) -> Result<Vec<Encoded>> {
    let n = rows.len();
    let k = ((fraction * n as f64).ceil() as usize).max(1);
    if k >= n {
        bail!("eval_fraction {fraction} leaves no training rows out of {n}");
    }
    let order = epoch_order(n, usize::MAX, true, seed);
    let mut is_eval = vec![false; n];
    order[..k].iter().for_each(|&i| is_eval[i] = true);
    let (mut train, mut eval) = (vec![], vec![]);
    for (i, row) in std::mem::take(rows).into_iter().enumerate() {
        if is_eval[i] {
            eval.push(row)
        } else {
            train.push(row)
        }
    }
    *rows = train;
    Ok(eval)
}

#[allow(clippy::too_many_arguments)]
fn evaluate<B: KernelBackend>(
    cfg: &TrainConfig,
    model_cfg: &wrpo_models::LlamaConfig,
    params: &Flat<B>,
    reference: &Reference<B>,
    eval: &[Encoded],
    step: usize,
    alpha: f64,
    pad: u32,
    device: &B::Device,
) -> Map<String, Value> {
    let model = params.model(model_cfg);
    let loss_cfg = loss_config(cfg, alpha);
    let (mut meter, mut loss_sum) = (Meter::default(), 0.0);
    let idx: Vec<usize> = (0..eval.len()).collect();
    for chunk in idx.chunks(cfg.per_device_train_batch_size) {
        let batch: Vec<&Encoded> = chunk.iter().map(|&i| &eval[i]).collect();
        let (loss, rows) = eval_step(
            model_cfg, &model, reference, &loss_cfg, &batch, chunk, pad, device,
        );
        loss_sum += loss * chunk.len() as f64;
        rows.iter().for_each(|row| meter.add(row));
    }
    let mut rec = Map::new();
    rec.insert("step".into(), step.into());
    rec.insert("eval/loss".into(), json_f64(loss_sum / eval.len() as f64));
    meter.write_into("eval/", &mut rec);
    rec
}

pub(crate) fn resume_dir(paths: &RunPaths) -> Result<Option<PathBuf>> {
    let Some(r) = &paths.resume else {
        return Ok(None);
    };
    if r.as_os_str() == "latest" {
        return match state::latest_checkpoint(&paths.output) {
            Some(p) => Ok(Some(p)),
            None => bail!(
                "--resume latest: no checkpoint-STEP folder with a trainer_state.json in {}",
                paths.output.display()
            ),
        };
    }
    if !r.join("trainer_state.json").is_file() {
        bail!(
            "--resume {}: not a checkpoint folder (no trainer_state.json)",
            r.display()
        );
    }
    Ok(Some(r.clone()))
}

/// A resumed run must be the run that wrote the checkpoint (same model, data layout and
/// training-relevant settings), or it would not reach the same weights.
pub(crate) fn check_resume(
    st: &TrainerState,
    cfg: &TrainConfig,
    source: &ModelSource,
    plan: &Plan,
    world_size: usize,
) -> Result<()> {
    if st.world_size as usize != world_size {
        bail!(
            "--resume: the checkpoint was written by a run of {} peers (devices × nodes), this run has {world_size}: the global batch (per-device batch × accumulation × peers), and so every update, would differ. Resume with the same --nodes and --devices",
            st.world_size
        );
    }
    if st.model != source.label() {
        bail!(
            "--resume: the checkpoint was trained from {} but --model is {}",
            st.model,
            source.label()
        );
    }
    let free = [
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "eval_steps",
    ];
    let (a, b) = (
        serde_json::to_value(&st.config)?,
        serde_json::to_value(cfg)?,
    );
    let differ: Vec<String> = a
        .as_object()
        .expect("object")
        .iter()
        .filter(|(k, v)| !free.contains(&k.as_str()) && b.get(k.as_str()) != Some(v))
        .map(|(k, v)| format!("{k} (checkpoint {v}, now {})", b[k.as_str()]))
        .collect();
    if !differ.is_empty() {
        bail!(
            "--resume: settings differ from the checkpoint's: {}",
            differ.join(", ")
        );
    }
    if st.total_steps as usize != plan.total {
        bail!(
            "--resume: the checkpoint's run has {} updates, this one {} (different data?)",
            st.total_steps,
            plan.total
        );
    }
    Ok(())
}

/// The reference log-probs for the training and eval splits.
#[allow(clippy::too_many_arguments)]
fn build_reference<B: KernelBackend>(
    job: &TrainJob,
    peer: &mut Peer<B>,
    source: &ModelSource,
    initial: wrpo_models::Llama<B>,
    rows: &[Encoded],
    all_lines: &[usize],
    eval: &[Encoded],
    pad: u32,
    device: &B::Device,
    on: &mut dyn FnMut(Event),
) -> Result<(Reference<B>, Reference<B>)> {
    let (cfg, paths) = (&job.cfg, &job.paths);
    if !cfg.loss_type.needs_reference() {
        return Ok((Reference::None, Reference::None));
    }
    let ref_source = match &paths.ref_model {
        Some(d) => ModelSource::Dir(d.clone()),
        None => source.clone(),
    };
    if let Some(file) = &paths.ref_logps {
        let table = refcache::read_logps_file(file, rows, all_lines)?;
        on(Event::Note(format!(
            "reference log-probs from {}",
            file.display()
        )));
        let eval_ref = if eval.is_empty() {
            Reference::None
        } else {
            let model = load_ref(&ref_source, paths, initial, device)?;
            Reference::Table(refcache::compute(
                &model,
                &ref_source.config()?,
                eval,
                pad,
                device,
                cfg.per_device_train_batch_size,
            ))
        };
        return Ok((Reference::Table(table), eval_ref));
    }
    let model = load_ref(&ref_source, paths, initial, device)?;
    let model_cfg = ref_source.config()?;
    if !cfg.precompute_ref {
        let m2 = model.clone();
        return Ok((
            Reference::Model(Box::new(model), Box::new(model_cfg.clone())),
            Reference::Model(Box::new(m2), Box::new(model_cfg)),
        ));
    }
    let mut tables = vec![];
    for split in [rows, eval] {
        let key = refcache::key(&ref_source, split)?;
        let path = paths
            .cache_dir
            .join("ref-logps")
            .join(format!("{key}.json"));
        let cached = refcache::load(&path, split)?;
        if peer.world().size() > 1 {
            // Data-parallel: each peer scores its share, one all-reduce shares the table.
            let batch = cfg.per_device_train_batch_size;
            let t = refcache::compute_shared(
                peer,
                cached.as_deref(),
                &model,
                &model_cfg,
                split,
                pad,
                device,
                batch,
            )?;
            if cached.is_none() && peer.writes() {
                refcache::store(&path, &t)?;
            }
            on(Event::Note(format!(
                "reference log-probs: {} rows, {} by {} peers, cache {}",
                split.len(),
                if cached.is_some() { "read" } else { "computed" },
                peer.world().size(),
                path.display()
            )));
            tables.push(Reference::Table(t));
            continue;
        }
        let table = match cached {
            Some(t) => {
                on(Event::Note(format!(
                    "reference log-probs: cached {}",
                    path.display()
                )));
                t
            }
            None => {
                let t = refcache::compute(
                    &model,
                    &model_cfg,
                    split,
                    pad,
                    device,
                    cfg.per_device_train_batch_size,
                );
                refcache::store(&path, &t)?;
                on(Event::Note(format!(
                    "reference log-probs: computed for {} rows, cached {}",
                    split.len(),
                    path.display()
                )));
                t
            }
        };
        tables.push(Reference::Table(table));
    }
    drop(model); // the reference model is not needed again
    let eval_ref = tables.pop().expect("two");
    Ok((tables.pop().expect("two"), eval_ref))
}

fn load_ref<B: KernelBackend>(
    ref_source: &ModelSource,
    paths: &RunPaths,
    initial: wrpo_models::Llama<B>,
    device: &B::Device,
) -> Result<wrpo_models::Llama<B>> {
    if paths.ref_model.is_none() {
        return Ok(initial);
    }
    let (m, _) = ref_source.load::<B>(device)?;
    Ok(m)
}
