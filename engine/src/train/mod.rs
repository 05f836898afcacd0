//! `wrpo-engine train`: the WRPO trainer (and its DPO / SimPO / IPO baselines).
//!
//! The recipe ([`run_train`]) reads top to bottom: setup (data, eval split, reference log-probs)
//! → loop {policy forward, reference log-probs, loss, backward (per micro-batch, accumulated),
//! global-norm clip, AdamW step, α/LR schedule, log, eval, checkpoint} → final model. The loop
//! and the finish are the [`driver`]'s, shared with [`sft`]; this recipe supplies its micro-batch
//! (`Wrpo`, a [`driver::Recipe`]: [`step::micro_step`] on rows, the α schedule, the preference
//! metrics, the eval). Building blocks live beside it: [`config`] (YAML + flags), [`schedule`]
//! (update counts, LR, data order), [`optim`] (flat parameters, clipping, AdamW as PyTorch
//! computes them), [`step`] (one micro-batch), [`metrics`], [`state`] (checkpoints),
//! [`refcache`] (precomputed reference log-probs), [`dist`] (data parallelism: sharding and the
//! one all-reduce per update, over [`collective`]).

pub mod collective;
pub mod config;
pub mod dist;
pub mod driver;
pub mod metrics;
pub mod optim;
pub mod recompute;
pub mod refcache;
pub mod schedule;
pub mod sft;
pub mod state;
pub mod step;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde_json::{Map, Value};
use wrpo_kernels::loss::{LossConfig, Objective};
use wrpo_kernels::KernelBackend;
use wrpo_models::LlamaConfig;

use crate::data::{Dataset, EncodeOptions, Encoded, RowError};
use crate::model::ModelSource;
use config::{LossType, RunPaths, TrainConfig};
use dist::{Peer, World};
use driver::{Micro, Recipe, Setup};
use metrics::{json_f64, Meter};
use optim::Flat;
use schedule::{epoch_order, Plan};
use step::{eval_step, micro_step, Layout, Reference};

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
    let setup = Setup::new(job)?;
    let (cfg, paths) = (&job.cfg, &job.paths);
    let (tok, opts) = (setup.tok.as_ref(), &setup.opts);
    let (mut train, k1, r) = load_split(paths.data.as_deref(), tok, opts, cfg, on)?;
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
            let (ds, ek1, er) = load_split(Some(p), tok, opts, cfg, on)?;
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
    let plan = setup.plan(rows.len(), peer)?;
    let longest = rows
        .iter()
        .chain(&eval)
        .map(|r| {
            r.prompt.len()
                + r.chosen
                    .iter()
                    .chain(&r.rejected)
                    .map(Vec::len)
                    .max()
                    .unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    let micro = cfg
        .per_device_train_batch_size
        .min(rows.len().max(eval.len()));
    setup.check_buffers::<B>(micro * (k1 + r), longest, device)?;
    on(Event::Note(format!(
        "model {} · {} training rows ({} chosen + {} rejected each){} · {} updates of {} rows",
        setup.source.label(),
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
    let (initial, _) = setup.source.load::<B>(device)?;
    let params = Flat::of_model(&initial);
    let (source, pad) = (&setup.source, setup.pad);
    let (ref_train, ref_eval) = build_reference::<B>(
        job, peer, source, initial, &rows, &all_lines, &eval, pad, device, on,
    )?;

    // ---- loop and finish: the shared driver, with WRPO's micro-batch, metrics and eval ---------
    let mut recipe = Wrpo {
        cfg,
        model_cfg: &setup.model_cfg,
        rows: &rows,
        eval: &eval,
        ref_train,
        ref_eval,
        layout: Layout {
            pad,
            packed: cfg.padding_free,
            head: cfg.head(),
            checkpoint: cfg.gradient_checkpointing,
        },
        device,
        alpha: 0.0,
        loss_cfg: loss_config(cfg, 0.0),
        step_loss: 0.0,
        step_meter: Meter::default(),
        interval_loss: 0.0,
        interval_steps: 0,
        meter: Meter::default(),
    };
    driver::run(&setup, &plan, peer, device, params, &mut recipe, on)
}

/// WRPO's part of an update ([`Recipe`]): the preference loss of rows of chosen and rejected
/// responses, the α schedule, the preference metrics and the eval split.
struct Wrpo<'a, B: KernelBackend> {
    cfg: &'a TrainConfig,
    model_cfg: &'a LlamaConfig,
    rows: &'a [Encoded],
    eval: &'a [Encoded],
    ref_train: Reference<B>,
    ref_eval: Reference<B>,
    /// Padding id and padding-free packing (`padding_free`), for policy and reference forwards.
    layout: Layout,
    device: &'a B::Device,
    /// This update's α and loss settings.
    alpha: f64,
    loss_cfg: LossConfig,
    /// This peer's sums over the update's micro-batches: Σ loss · scale, row metrics.
    step_loss: f64,
    step_meter: Meter,
    /// The logging interval: Σ update losses, updates, row metrics (of every peer).
    interval_loss: f64,
    interval_steps: usize,
    meter: Meter,
}

impl<B: KernelBackend> Recipe<B> for Wrpo<'_, B> {
    fn fingerprint(&self) -> String {
        driver::fingerprint(self.rows.iter().flat_map(|r| {
            std::iter::once(r.prompt.as_slice())
                .chain(r.chosen.iter().map(Vec::as_slice))
                .chain(r.rejected.iter().map(Vec::as_slice))
        }))
    }

    fn begin(&mut self, s: usize, total: usize, _ids: &[usize]) {
        self.alpha = self.cfg.alpha_at(s, total);
        self.loss_cfg = loss_config(self.cfg, self.alpha);
        (self.step_loss, self.step_meter) = (0.0, Meter::default());
    }

    fn micro(&mut self, params: &Flat<B>, ids: &[usize], scale: f64) -> Micro<B> {
        let batch: Vec<&Encoded> = ids.iter().map(|&i| &self.rows[i]).collect();
        let (cfg, loss_cfg, reference) = (self.model_cfg, &self.loss_cfg, &self.ref_train);
        let (layout, device) = (self.layout, self.device);
        let out = micro_step(
            cfg, params, reference, loss_cfg, &batch, ids, layout, scale, device,
        );
        self.step_loss += out.loss * scale;
        out.rows.iter().for_each(|row| self.step_meter.add(row));
        Micro {
            grads: out.grads,
            tokens: out.tokens,
        }
    }

    /// `[Σ loss · scale, Meter::packed (13)]`.
    fn stats(&mut self) -> Vec<f64> {
        let mut stats = vec![self.step_loss];
        stats.extend(self.step_meter.packed());
        stats
    }

    fn end(&mut self, summed: &[f64]) -> f64 {
        self.meter.add_packed(&summed[1..]);
        self.interval_loss += summed[0];
        self.interval_steps += 1;
        summed[0]
    }

    fn log(&mut self, rec: &mut Map<String, Value>) {
        let loss = self.interval_loss / self.interval_steps as f64;
        rec.insert("loss".into(), json_f64(loss));
        rec.insert("cur_alpha".into(), json_f64(self.alpha));
        self.meter.write_into("", rec);
        (self.meter, self.interval_loss, self.interval_steps) = (Meter::default(), 0.0, 0);
    }

    fn evaluate(&mut self, params: &Flat<B>, done: usize) -> Option<Map<String, Value>> {
        (!self.eval.is_empty()).then(|| {
            evaluate(
                self.cfg,
                self.model_cfg,
                params,
                &self.ref_eval,
                self.eval,
                done,
                self.alpha,
                self.layout,
                self.device,
            )
        })
    }
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
    model_cfg: &LlamaConfig,
    params: &Flat<B>,
    reference: &Reference<B>,
    eval: &[Encoded],
    step: usize,
    alpha: f64,
    layout: Layout,
    device: &B::Device,
) -> Map<String, Value> {
    let model = params.model(model_cfg);
    let loss_cfg = loss_config(cfg, alpha);
    let (mut meter, mut loss_sum) = (Meter::default(), 0.0);
    let idx: Vec<usize> = (0..eval.len()).collect();
    for chunk in idx.chunks(cfg.per_device_train_batch_size) {
        let batch: Vec<&Encoded> = chunk.iter().map(|&i| &eval[i]).collect();
        let (loss, rows) = eval_step(
            model_cfg, &model, reference, &loss_cfg, &batch, chunk, layout, device,
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
                &cfg.model_config(&ref_source)?,
                eval,
                pad,
                cfg.head(),
                device,
                cfg.per_device_train_batch_size,
            ))
        };
        return Ok((Reference::Table(table), eval_ref));
    }
    let model = load_ref(&ref_source, paths, initial, device)?;
    let model_cfg = cfg.model_config(&ref_source)?;
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
                cfg.head(),
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
                    cfg.head(),
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
