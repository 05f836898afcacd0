//! The update driver both recipes (`train`, `sft`) share: the skeleton of a run — resume,
//! checkpoint state, the epoch / global-batch iteration, sharding by [`Peer::shard`], gradient
//! accumulation over micro-batches, the one all-reduce per update ([`Peer::sum_update`]), global
//! clipping, the AdamW step with the LR schedule, the metrics records (written by the writing peer
//! only), intermediate and final checkpoints, progress [`Event`]s and the summary.
//!
//! A recipe supplies only what differs, as a [`Recipe`]: how a micro-batch of its units becomes
//! gradients and statistics, how the summed statistics give the update's loss, which metrics it
//! logs, and (optionally) an evaluation. Its setup (data, reference model, packing) stays in the
//! recipe, on the shared [`Setup`] (policy source, config, tokenizer, encoding, pad id).
//!
//! # Shapes
//! Gradients are flat `[numel]` tensors on the inner backend `B`, one per parameter, in
//! [`Flat`]'s (checkpoint-name) order; statistics are host `f64` vectors of a length fixed by
//! the recipe.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::{backend::Backend, Tensor};
use serde_json::{Map, Value};
use wrpo_models::LlamaConfig;

use super::config::{RunPaths, TrainConfig};
use super::dist::Peer;
use super::metrics::{json_f64, MetricsFile};
use super::optim::{clip_global_norm, AdamState, AdamW};
use super::params::Params;
use super::schedule::{epoch_order, lr_factor, Plan};
use super::state::{self, TokenizerFiles, TrainerState};
use super::{Event, TrainJob, TrainSummary};
use crate::data::EncodeOptions;
use crate::model::ModelSource;
use crate::tokenizer::TextTokenizer;

/// What one micro-batch hands back to the driver.
pub struct Micro<B: Backend> {
    /// Gradients of the micro-batch's share of the update's loss, flat `[numel]` each, in the
    /// parameters' order (added over micro-batches, then summed over peers).
    pub grads: Vec<Tensor<B, 1>>,
    /// Real (non-padding) tokens through the forward (for `tokens_per_second`).
    pub tokens: usize,
}

/// A recipe's part of a run: what the driver cannot know.
///
/// For update `s` (0-based) of `total`, the driver calls, in this order:
/// 1. [`begin`](Recipe::begin) with the units of the whole global batch (every peer's), once;
/// 2. [`micro`](Recipe::micro) for each micro-batch (`per_device_train_batch_size` units) of this
///    peer's shard, in order — none for a peer past the end of a last, partial batch (it then
///    adds zero gradients);
/// 3. [`stats`](Recipe::stats): this peer's statistics of the update, summed over its
///    micro-batches; the driver sums them element-wise over peers with the gradients (one
///    all-reduce; sent as `f32` when data-parallel, untouched alone);
/// 4. [`end`](Recipe::end) with the summed statistics: the update's loss; the recipe adds the
///    update to its logging interval.
///
/// Then the driver clips, stops on a non-finite loss or gradient norm, and steps AdamW; on a
/// logging step it calls [`log`](Recipe::log), and on an eval step of the writing peer
/// [`evaluate`](Recipe::evaluate).
pub trait Recipe<B: Backend> {
    /// Update `s` of `total` starts; `ids` index the recipe's units (rows, or packed sequences).
    fn begin(&mut self, s: usize, total: usize, ids: &[usize]);

    /// Forward + backward of the units `ids` with the policy `params`. `scale` = units in this
    /// micro-batch / units in the global batch (the weight of a micro-batch mean in the
    /// global-batch mean); a recipe whose loss is not a mean over units may ignore it.
    fn micro(&mut self, params: &Params<B>, ids: &[usize], scale: f64) -> Micro<B>;

    /// This peer's statistics of the update (sums, so that peers add up), in a fixed layout.
    fn stats(&mut self) -> Vec<f64>;

    /// The statistics summed over peers (the layout of [`stats`](Recipe::stats)): returns the
    /// update's loss, and adds the update to the logging interval.
    fn end(&mut self, summed: &[f64]) -> f64;

    /// Write the interval's `loss` and the recipe's metrics into a logging record, and start a
    /// new interval. The driver writes `step`, `epoch`, `learning_rate`, `grad_norm` and
    /// `tokens_per_second`.
    fn log(&mut self, rec: &mut Map<String, Value>);

    /// An evaluation record after `done` updates, or `None` when the recipe does not evaluate.
    fn evaluate(&mut self, _params: &Params<B>, _done: usize) -> Option<Map<String, Value>> {
        None
    }

    /// A fingerprint of the training units' token ids (see [`fingerprint`]), saved in every
    /// checkpoint: `--resume` refuses data that differs from the checkpoint's.
    fn fingerprint(&self) -> String;
}

/// Take the output folder's lock file (`OUTPUT/.wrpo-engine.lock`), or fail if another run
/// holds it.
fn lock_output(output: &Path) -> Result<std::fs::File> {
    let path = output.join(".wrpo-engine.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating the lock file {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "--output {}: another run is writing there (it holds {}); wait for it to finish or choose another --output",
            output.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// A fresh run (no `--resume`) into a folder that holds an earlier run's `checkpoint-STEP`
/// folders, `final` model or `metrics.jsonl`: move them into `OUTPUT/earlier-run-N/` (the first
/// unused N) and return that folder; nothing is deleted.
fn set_aside_earlier_run(output: &Path) -> Result<Option<PathBuf>> {
    let earlier: Vec<PathBuf> = std::fs::read_dir(output)
        .with_context(|| format!("listing {}", output.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name == "final"
                || name == "metrics.jsonl"
                || name
                    .strip_prefix("checkpoint-")
                    .is_some_and(|n| n.parse::<u64>().is_ok())
        })
        .map(|e| e.path())
        .collect();
    if earlier.is_empty() {
        return Ok(None);
    }
    let aside = (1..)
        .map(|n| output.join(format!("earlier-run-{n}")))
        .find(|p| !p.exists())
        .expect("an unused name");
    std::fs::create_dir(&aside).with_context(|| format!("creating {}", aside.display()))?;
    for p in earlier {
        let to = aside.join(p.file_name().expect("a named entry"));
        std::fs::rename(&p, &to)
            .with_context(|| format!("moving {} to {}", p.display(), to.display()))?;
    }
    Ok(Some(aside))
}

/// SHA-256 (hex) of token-id sequences, each prefixed by its length, in order.
pub fn fingerprint<'s>(seqs: impl IntoIterator<Item = &'s [u32]>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for ids in seqs {
        h.update((ids.len() as u64).to_le_bytes());
        ids.iter().for_each(|x| h.update(x.to_le_bytes()));
    }
    format!("{:x}", h.finalize())
}

/// The setup both recipes share: the job, the policy's source, config and tokenizer, the encoding
/// options and the pad id.
pub struct Setup<'a> {
    /// The job.
    pub job: &'a TrainJob,
    /// Where the policy comes from.
    pub source: ModelSource,
    /// The policy's config.
    pub model_cfg: LlamaConfig,
    /// The tokenizer (none for the embedded model's token-id data).
    pub tok: Option<TextTokenizer>,
    /// How rows are encoded.
    pub opts: EncodeOptions,
    /// The padding id (the tokenizer's pad, else its EOS, else 0).
    pub pad: u32,
}

/// The largest page of the device's memory pool where the plan models its rounding: CubeCL
/// backends that do not report their memory (wgpu); not CUDA, whose pages are a quarter of the GPU.
pub fn wgpu_pool_page<B: wrpo_kernels::KernelBackend>(device: &B::Device) -> Option<u64> {
    (B::reserved_bytes(device).is_some() && B::device_memory_bytes(device).is_none())
        .then(|| B::max_buffer_bytes(device))
        .flatten()
}

/// An environment variable that caps the device memory `train` and `sft` check their memory plan
/// against (e.g. `WRPO_MEMORY_LIMIT=20GiB` to leave room for other processes).
pub const MEMORY_LIMIT_ENV: &str = "WRPO_MEMORY_LIMIT";

impl<'a> Setup<'a> {
    /// Validate the configuration; resolve the model, its config and tokenizer.
    pub fn new(job: &'a TrainJob) -> Result<Self> {
        let (cfg, paths) = (&job.cfg, &job.paths);
        cfg.validate()?;
        let source = ModelSource::from_arg(paths.model.as_deref());
        let model_cfg = cfg.model_config(&source)?;
        let tok = source.tokenizer(&model_cfg)?;
        let opts = EncodeOptions {
            max_length: Some(cfg.max_length),
            max_prompt_length: Some(cfg.max_prompt_length),
            vocab_size: model_cfg.vocab_size,
        };
        let pad = tok
            .as_ref()
            .and_then(|t| t.pad.as_ref().or(t.eos.as_ref()))
            .map_or(0, |(_, id)| *id);
        Ok(Setup {
            job,
            source,
            model_cfg,
            tok,
            opts,
            pad,
        })
    }

    /// Before any weight is loaded or anything written: refuse a step whose largest buffers
    /// (forwards of `rows` rows of `sequences_per_row` sequences of up to `t` tokens) the device
    /// cannot allocate ([`crate::memory`]); print the memory plan ([`crate::memory::plan`]) and
    /// stop, naming settings that fit, when it exceeds the device's memory.
    pub fn check_memory<B: wrpo_kernels::KernelBackend>(
        &self,
        sft: bool,
        units: usize,
        sequences_per_row: usize,
        t: usize,
        device: &B::Device,
        on: &mut dyn FnMut(Event),
    ) -> Result<()> {
        use crate::memory::plan;
        let cfg = &self.job.cfg;
        if cfg.lora().is_some() {
            // An explicit base dtype the device does not store: refuse before anything is read.
            let _store = cfg
                .lora_base_dtype
                .resolve(|d| B::supports_dtype(device, d))
                .with_context(|| format!("the device ({})", B::name(device)))?;
        }
        let rows = cfg.per_device_train_batch_size.min(units.max(1));
        let buffers = crate::memory::step_buffers(
            &self.model_cfg,
            rows * sequences_per_row,
            t,
            cfg.head(),
            self.model_cfg.attn_implementation,
        );
        let name = format!("the device ({})", B::name(device));
        crate::memory::check_buffers(B::max_buffer_bytes(device), &name, &buffers)?;
        let run = plan::Run {
            sft,
            ref_table: self.job.paths.ref_logps.is_some(),
            sequences_per_row,
            tokens: t,
            host: B::reserved_bytes(device).is_none(),
            pool_page: wgpu_pool_page::<B>(device),
            checkpoint_dtype: self.model_cfg.checkpoint_dtype(),
            half: plan::HalfStorage::of::<B>(device),
        };
        let mut w = plan::Workload::of(cfg, &run);
        w.sequences = rows * sequences_per_row;
        // Micro-batches of this peer's share of an update (fewer when the data is short).
        let per_update = (cfg.per_device_train_batch_size)
            .saturating_mul(cfg.gradient_accumulation_steps)
            .min(units.max(1));
        w.micro_batches = per_update.div_ceil(rows);
        let p = plan::plan(&self.model_cfg, &w);
        let memory = match std::env::var(MEMORY_LIMIT_ENV) {
            Ok(v) => {
                let cap = plan::parse_memory(&v)
                    .map_err(|e| anyhow::anyhow!("{MEMORY_LIMIT_ENV}: {e}"))?;
                Some(B::device_memory_bytes(device).map_or(cap, |m| m.min(cap)))
            }
            Err(_) => B::device_memory_bytes(device),
        };
        on(Event::Note(format!(
            "memory plan ({}; {}):\n{}",
            B::name(device),
            memory.map_or("the device does not report its memory".into(), |m| {
                format!("{} available", plan::human(m))
            }),
            p.render().trim_end()
        )));
        plan::check_fits(&p, memory, &name, |m| {
            plan::advice(&self.model_cfg, cfg, &run, m)
        })
    }

    /// The plan over `units` (rows or packed sequences); the writing peer creates the output
    /// folder.
    pub fn plan<B: Backend>(&self, units: usize, peer: &Peer<B>) -> Result<Plan> {
        let plan = Plan::new(&self.job.cfg, units, peer.world().size())?;
        let output = &self.job.paths.output;
        if peer.writes() {
            std::fs::create_dir_all(output)
                .with_context(|| format!("creating {}", output.display()))?;
        }
        Ok(plan)
    }
}

/// The seed of LoRA dropout's masks in update `s`'s micro-batch of the units `micro` (a function of
/// the run's seed and the units, so a resumed run and every peer draw what an uninterrupted run
/// would, and no two micro-batches share masks).
fn dropout_seed(seed: u64, s: usize, micro: &[usize]) -> u64 {
    let first = micro.first().copied().unwrap_or(0) as u64;
    let mut h = seed ^ 0x5851_F42D_4C95_7F2D;
    for x in [s as u64, first] {
        h = (h ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
    h
}

/// Run `recipe` from the policy `params` (or the checkpoint `--resume` names) to the final
/// model: the loop of the module docs, then the final checkpoint and the summary.
pub fn run<B: Backend, R: Recipe<B>>(
    setup: &Setup,
    plan: &Plan,
    peer: &mut Peer<B>,
    device: &B::Device,
    mut params: Params<B>,
    recipe: &mut R,
    on: &mut dyn FnMut(Event),
) -> Result<TrainSummary> {
    // ---- setup: optimizer, resume, outputs ----------------------------------------------------
    let (cfg, paths) = (&setup.job.cfg, &setup.job.paths);
    let (writes, world_size) = (peer.writes(), peer.world().size());
    // One run per output folder: an advisory lock, held until this function returns and released
    // by the OS if the process dies (so a killed run can still be resumed).
    let _lock = match writes {
        true => Some(lock_output(&paths.output)?),
        false => None,
    };
    if writes && paths.resume.is_none() {
        if let Some(aside) = set_aside_earlier_run(&paths.output)? {
            on(Event::Note(format!(
                "{} held an earlier run (checkpoints, final model or metrics), moved to {} so that it cannot mix with this one under --resume latest or checkpoint rotation",
                paths.output.display(),
                aside.display()
            )));
        }
    }
    let adamw = AdamW {
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_epsilon,
        weight_decay: cfg.weight_decay,
    };
    let mut opt = AdamState::new(&params.trainable);
    let (mut start, mut history) = (0usize, Vec::<Value>::new());
    let data_fingerprint = recipe.fingerprint();
    if let Some(dir) = resume_dir(paths)? {
        let r = state::load_checkpoint(&dir, &params, device)?;
        check_resume(&r.state, cfg, &setup.source, plan, world_size)?;
        if let Some(f) = &r.state.data_fingerprint {
            if *f != data_fingerprint {
                bail!(
                    "--resume: the training data differs from the checkpoint's ({} holds a run on {}: other rows, tokenizer, template or truncation give other token ids); resume with the same data, or start a fresh run into another --output",
                    dir.display(),
                    r.state.data
                );
            }
        }
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
    let data = paths.data.as_ref().map_or_else(
        || Path::new(crate::embedded::LABEL).join("wrpo_tiny.jsonl"),
        PathBuf::clone,
    );
    let trainer_state = |step: usize, history: &[Value]| TrainerState {
        global_step: step as u64,
        total_steps: plan.total as u64,
        epoch: plan.epoch_after(step),
        model: setup.source.label(),
        data: data.display().to_string(),
        config: cfg.clone(),
        log_history: history.to_vec(),
        world_size: world_size as u64,
        data_fingerprint: Some(data_fingerprint.clone()),
    };
    on(Event::Started {
        plan,
        start,
        config: cfg,
    });

    // ---- loop ---------------------------------------------------------------------------------
    let mut interval_tokens = 0usize;
    let mut interval_start = Instant::now();
    let mut order = (usize::MAX, vec![]);
    for s in start..plan.total {
        let (epoch, pos) = plan.locate(s);
        if order.0 != epoch {
            order = (epoch, epoch_order(plan.rows, epoch, cfg.shuffle, cfg.seed));
        }
        let ids = &order.1[(pos * plan.global_batch).min(plan.rows)
            ..((pos + 1) * plan.global_batch).min(plan.rows)];
        let lr = cfg.learning_rate * lr_factor(cfg.lr_scheduler_type, s, plan.warmup, plan.total);
        recipe.begin(s, plan.total, ids);
        let mut grads: Option<Vec<Tensor<B, 1>>> = None;
        let mut tokens = 0usize;
        // This peer's units of the global batch (all of them without data parallelism).
        for micro in peer
            .shard(ids, plan.per_peer)
            .chunks(cfg.per_device_train_batch_size)
        {
            params.dropout_seed = dropout_seed(cfg.seed, s, micro);
            let out = recipe.micro(&params, micro, micro.len() as f64 / ids.len() as f64);
            tokens += out.tokens;
            grads = Some(match grads {
                None => out.grads,
                Some(acc) => acc.into_iter().zip(out.grads).map(|(a, g)| a + g).collect(),
            });
        }
        // A peer past the end of a last, partial batch adds zeros.
        let grads = grads.unwrap_or_else(|| params.trainable.zeros_like().values);
        // Sum over peers: gradients, the recipe's statistics, tokens (one all-reduce).
        let mut stats = recipe.stats();
        stats.push(tokens as f64);
        let (mut grads, mut stats) = peer.sum_update(&format!("update {}", s + 1), grads, stats)?;
        interval_tokens += stats.pop().expect("tokens").round() as usize;
        let loss = recipe.end(&stats);
        let grad_norm = clip_global_norm(&mut grads, cfg.max_grad_norm);
        if !loss.is_finite() || !grad_norm.is_finite() {
            bail!(
                "update {}: non-finite {} (loss {loss}, grad_norm {grad_norm}); stopped before applying it{}. Lower the learning rate or check the data",
                s + 1,
                if loss.is_finite() { "gradient" } else { "loss" },
                state::latest_checkpoint(&paths.output)
                    .map_or(String::new(), |p| format!(" — the last good checkpoint is {}", p.display()))
            );
        }
        adamw.step(lr, &mut params.trainable, grads, &mut opt);
        let done = s + 1;

        let mut record = None;
        if done.is_multiple_of(cfg.logging_steps) || done == plan.total {
            let mut rec = Map::new();
            rec.insert("step".into(), done.into());
            rec.insert("epoch".into(), json_f64(plan.epoch_after(done)));
            rec.insert("learning_rate".into(), json_f64(lr));
            rec.insert("grad_norm".into(), json_f64(grad_norm as f64));
            recipe.log(&mut rec);
            let secs = interval_start.elapsed().as_secs_f64().max(1e-9);
            rec.insert(
                "tokens_per_second".into(),
                json_f64(interval_tokens as f64 / secs),
            );
            if let Some(f) = metrics_file.as_mut() {
                f.write(&rec)?;
            }
            history.push(Value::Object(rec.clone()));
            record = Some(rec);
            interval_tokens = 0;
            interval_start = Instant::now();
        }
        on(Event::Step {
            step: done,
            loss,
            record: record.as_ref(),
        });
        let eval_now = writes
            && ((cfg.eval_steps > 0 && done.is_multiple_of(cfg.eval_steps)) || done == plan.total);
        if let Some(rec) = eval_now.then(|| recipe.evaluate(&params, done)).flatten() {
            if let Some(f) = metrics_file.as_mut() {
                f.write(&rec)?;
            }
            history.push(Value::Object(rec.clone()));
            on(Event::Eval(&rec));
        }
        if writes && cfg.save_steps > 0 && done.is_multiple_of(cfg.save_steps) && done < plan.total
        {
            let dir = paths.output.join(format!("checkpoint-{done}"));
            state::save_checkpoint(
                &dir,
                &params,
                &opt,
                &setup.model_cfg,
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
            state::save_checkpoint(dir, &params, &opt, &setup.model_cfg, &tokenizer_files, &st)
        },
    )
}

/// The end of a run: the final model (written by the writing peer only) and the summary.
fn finish<B: Backend>(
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

/// The checkpoint folder `--resume` names (`latest`: the newest in the output folder).
fn resume_dir(paths: &RunPaths) -> Result<Option<PathBuf>> {
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
fn check_resume(
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
