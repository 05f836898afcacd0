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
//! one all-reduce per update, over [`collective`]); and three pieces of this recipe in their own
//! files: `split` (loading the rows, one batch layout, the seeded hold-out), `reference` (where
//! the reference log-probs come from) and `eval` (the eval record).

pub mod collective;
pub mod config;
pub mod dist;
pub mod driver;
mod eval;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod recompute;
pub mod refcache;
mod reference;
pub mod schedule;
pub mod sft;
mod split;
pub mod state;
pub mod step;

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::{Map, Value};
use wrpo_kernels::loss::{LossConfig, Objective};
use wrpo_kernels::KernelBackend;
use wrpo_models::LlamaConfig;

use crate::data::Encoded;
use config::{LossType, RunPaths, TrainConfig};
use dist::{Peer, World};
use driver::{Micro, Recipe, Setup};
use eval::evaluate;
use metrics::{json_f64, Meter};
use params::Params;
use reference::build_reference;
use schedule::Plan;
use split::{hold_out, load_split};
use step::{micro_step, Layout, Reference};

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

impl TrainJob {
    /// The job with `--adapter`'s LoRA settings in its configuration
    /// ([`TrainConfig::with_adapter`]), so that plans, checkpoints and `--resume` see them.
    pub fn resolved(&self) -> Result<TrainJob> {
        let mut job = self.clone();
        if let Some(dir) = &self.paths.adapter {
            job.cfg = self.cfg.with_adapter(dir)?;
        }
        Ok(job)
    }
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
    let job = &job.resolved()?;
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
    setup.check_memory::<B>(
        false,
        rows.len().max(eval.len()),
        k1 + r,
        longest,
        device,
        on,
    )?;
    let plan = setup.plan(rows.len(), peer)?;
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
    // Under LoRA the base is frozen and kept in `lora_base_dtype` (its checkpoint's by default).
    let (initial, _) = match cfg.lora() {
        Some(_) => setup.source.load_frozen::<B>(cfg.lora_base_dtype, device)?,
        None => setup.source.load::<B>(device)?,
    };
    let params = Params::initial(
        cfg,
        paths.adapter.as_deref(),
        &initial,
        &setup.model_cfg,
        device,
    )?;
    if let Some(frozen) = params.frozen_storage() {
        on(Event::Note(format!("frozen base on the device: {frozen}")));
    }
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

    fn micro(&mut self, params: &Params<B>, ids: &[usize], scale: f64) -> Micro<B> {
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

    fn evaluate(&mut self, params: &Params<B>, done: usize) -> Option<Map<String, Value>> {
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
