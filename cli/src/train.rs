//! `wrpo-engine train`: argument parsing and progress output around
//! [`wrpo_engine_core::train::run_train`].

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use wrpo_engine_core::backend::{BackendChoice, NthDevice};
use wrpo_engine_core::dispatch;
use wrpo_engine_core::train::config::{
    embedded_preset, resolve, sft_embedded_preset, sft_preset, RunPaths, TrainConfig,
};
use wrpo_engine_core::train::dist::World;
use wrpo_engine_core::train::sft::{run_sft, run_sft_parallel};
use wrpo_engine_core::train::{run_train, run_train_parallel, Event, TrainJob};

use crate::BackendArg;

#[derive(Args)]
pub struct TrainCmd {
    /// Hugging Face LLaMA folder to train (config.json, safetensors, tokenizer). Default: the
    /// built-in tiny LLaMA with the bundled dataset and a preset that trains it in seconds.
    #[arg(long)]
    model: Option<PathBuf>,
    /// WRPO rows (JSON Lines or a JSON array): prompt, chosen = [K source responses…, target
    /// response], rejected = [R responses]. Required with --model.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Eval rows (same format); `eval/` metrics every --eval-steps and at the end.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Output folder: metrics.jsonl, checkpoint-STEP/, final/.
    #[arg(long, visible_alias = "output-dir", default_value = "wrpo-output")]
    output: PathBuf,
    /// YAML file of training settings (the keys of the flags below, snake_case); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Reference model folder (default: the frozen initial policy).
    #[arg(long)]
    ref_model: Option<PathBuf>,
    /// Reference log-probs from `wrpo-engine logps` on the same data and model (no reference
    /// forward during training).
    #[arg(long)]
    ref_logps: Option<PathBuf>,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) on top of
    /// --model: training continues from it (its rank, α and targets unless --lora-r is set,
    /// which must then agree).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Continue from a checkpoint folder, or from the newest in --output when given no value.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "DIR|latest")]
    resume: Option<PathBuf>,
    /// Cache of precomputed reference log-probs (default: ~/.cache/wrpo-engine).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArg,
    #[command(flatten)]
    dist: DistArgs,
    #[command(flatten)]
    settings: crate::settings::Settings,
}

/// Data parallelism (see the README's "Data parallelism").
#[derive(Args)]
pub struct DistArgs {
    /// One data-parallel peer per device in this process, e.g. `cuda:0,cuda:1` or `wgpu:0,wgpu:1`
    /// (sets the backend). `cpu,cpu`: peers that share the CPU (for tests).
    #[arg(long, value_delimiter = ',', value_name = "KIND:INDEX,...")]
    devices: Option<Vec<String>>,
    /// Processes (machines) in the run; each runs this command with its own --node-rank.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// This process's rank in 0..nodes (rank 0 writes metrics and checkpoints).
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// The orchestrator every node registers with (`wrpo-engine orchestrator --port PORT`).
    #[arg(long, value_name = "HOST:PORT")]
    orchestrator: Option<String>,
    /// Address at which the other nodes reach this one (default: this machine's address on the
    /// route to the orchestrator).
    #[arg(long)]
    node_host: Option<String>,
    /// Port of this node's tensor data service (default: orchestrator port + 2 + node rank).
    #[arg(long)]
    data_port: Option<u16>,
    /// Bound on every collective call (register, all-reduce, finish); past it the node stops
    /// with an error naming what did not answer.
    #[arg(long, default_value_t = 120.0, value_name = "SECONDS")]
    collective_timeout: f64,
}

impl DistArgs {
    /// The world and the device indices (with the backend they imply), if data-parallel.
    fn world(&self, backend: BackendChoice) -> Result<(World, BackendChoice, Vec<usize>)> {
        let mut choice = backend;
        let mut idx = vec![0];
        if let Some(list) = &self.devices {
            idx.clear();
            for d in list {
                let (kind, i) = d.split_once(':').unwrap_or((d.as_str(), "0"));
                let k: BackendChoice = kind
                    .parse()
                    .map_err(|e: String| anyhow::anyhow!("--devices {d}: {e}"))?;
                let i: usize = i
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--devices {d}: bad device index {i:?}"))?;
                if k == BackendChoice::Auto {
                    anyhow::bail!("--devices {d}: name the backend (cuda:0, wgpu:0, cpu)");
                }
                if choice != BackendChoice::Auto && choice != k {
                    anyhow::bail!(
                        "--devices {d}: every device must be of one backend, and match --backend"
                    );
                }
                choice = k;
                idx.push(i);
            }
        }
        // Bounded so that deadlines (now + timeout) cannot overflow the clock.
        const MAX_TIMEOUT_S: f64 = 30.0 * 24.0 * 3600.0;
        anyhow::ensure!(
            self.collective_timeout.is_finite()
                && self.collective_timeout > 0.0
                && self.collective_timeout <= MAX_TIMEOUT_S,
            "--collective-timeout {}: must be a number of seconds in (0, {MAX_TIMEOUT_S}] (30 days)",
            self.collective_timeout
        );
        let world = World {
            nodes: self.nodes,
            node_rank: self.node_rank,
            devices: idx.len(),
            orchestrator: self.orchestrator.clone(),
            node_host: self.node_host.clone(),
            data_port: self.data_port,
            timeout: std::time::Duration::from_secs_f64(self.collective_timeout),
        };
        world.validate()?;
        Ok((world, choice, idx))
    }
}

fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("wrpo-engine")
}

/// Which recipe.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Recipe {
    /// WRPO and its baselines.
    Train,
    /// Supervised fine-tuning.
    Sft,
}

/// The run's settings: the recipe's defaults (and the built-in model's preset without
/// `--model`), then the YAML file, then the flags.
pub fn settings_of(
    recipe: Recipe,
    embedded: bool,
    config: Option<&std::path::Path>,
    flags: &crate::settings::Settings,
) -> Result<TrainConfig> {
    let mut defaults = TrainConfig::default();
    match recipe {
        Recipe::Train if embedded => embedded_preset().apply(&mut defaults),
        Recipe::Train => {}
        Recipe::Sft => {
            sft_preset().apply(&mut defaults);
            if embedded {
                sft_embedded_preset().apply(&mut defaults);
            }
        }
    }
    resolve(defaults, config, &flags.0)
}

pub fn train(a: TrainCmd, recipe: Recipe) -> Result<()> {
    if a.model.is_some() && a.data.is_none() {
        anyhow::bail!(
            "--data is required with --model (the bundled dataset goes with the built-in model)"
        );
    }
    let train_only = a.ref_model.is_some() || a.ref_logps.is_some() || a.eval_data.is_some();
    if recipe == Recipe::Sft && train_only {
        anyhow::bail!("--ref-model, --ref-logps and --eval-data are `train` options; `sft` has no reference model or eval split");
    }
    let cfg = settings_of(recipe, a.model.is_none(), a.config.as_deref(), &a.settings)?;
    eprintln!("training configuration:\n{}", indent(&cfg.to_yaml()));
    let job = TrainJob {
        cfg,
        paths: RunPaths {
            model: a.model,
            data: a.data,
            eval_data: a.eval_data,
            output: a.output,
            ref_model: a.ref_model,
            ref_logps: a.ref_logps,
            adapter: a.adapter,
            resume: a.resume,
            cache_dir: a.cache_dir.unwrap_or_else(default_cache_dir),
        },
    };
    let (world, choice, idx) = a.dist.world(a.backend.backend)?;
    let selected = crate::device(choice)?;
    let mut view = Progress::new();
    let summary = if world.size() == 1 {
        match recipe {
            Recipe::Train => {
                dispatch!(selected, B, device => run_train::<B>(&job, &device, &mut |e| view.event(e)))?
            }
            Recipe::Sft => {
                dispatch!(selected, B, device => run_sft::<B>(&job, &device, &mut |e| view.event(e)))?
            }
        }
    } else {
        eprintln!(
            "data parallel: node {} of {} · {} device peer(s) here · {} peers in all",
            world.node_rank,
            world.nodes,
            world.devices,
            world.size()
        );
        let on: &mut dyn FnMut(Event) = &mut |e| view.event(e);
        dispatch!(selected, B, device => {
            let devices = idx
                .iter()
                .map(|&i| device.nth(i))
                .collect::<anyhow::Result<Vec<_>>>()?;
            match recipe {
                Recipe::Train => run_train_parallel::<B>(&job, &world, &devices, on),
                Recipe::Sft => run_sft_parallel::<B>(&job, &world, &devices, on),
            }
        })?
    };
    view.finish();
    if !summary.wrote_outputs {
        eprintln!(
            "done: {} updates · node rank {} (global rank 0 writes metrics and models)",
            summary.steps, world.node_rank
        );
        return Ok(());
    }
    let png = summary.final_dir.join("training_curves.png");
    match crate::plot::plot_history(&summary.history, &png) {
        Ok(()) => eprintln!("plot: {}", png.display()),
        Err(e) => eprintln!("warning: could not draw {}: {e:#}", png.display()),
    }
    let last = summary
        .history
        .iter()
        .rev()
        .find(|r| r.get("loss").is_some());
    if let Some(last) = last {
        let g = |k: &str| last.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        match recipe {
            Recipe::Sft => eprintln!(
                "done: {} updates · last loss {:.4} · mean token accuracy {:.3}",
                summary.steps,
                g("loss"),
                g("mean_token_accuracy")
            ),
            Recipe::Train => eprintln!(
                "done: {} updates · last loss {:.4} · reward accuracy {:.2} · margin {:.4}",
                summary.steps,
                g("loss"),
                g("rewards/accuracies"),
                g("rewards/margins")
            ),
        }
    }
    eprintln!(
        "final model: {} · metrics: {}",
        summary.final_dir.display(),
        job.paths.output.join("metrics.jsonl").display()
    );
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

/// A progress bar with loss and ETA on a terminal; plain log lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    tty: bool,
}

fn num(r: &serde_json::Map<String, serde_json::Value>, k: &str) -> f64 {
    r.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN)
}

impl Progress {
    fn new() -> Self {
        Progress {
            bar: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn say(&self, line: String) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::Note(s) => self.say(s),
            Event::Started { plan, start, .. } => {
                if self.tty {
                    let b = ProgressBar::new(plan.total as u64);
                    b.set_style(
                        ProgressStyle::with_template(
                            "train [{bar:30}] {pos}/{len} updates · {msg} · ETA {eta}",
                        )
                        .expect("valid template")
                        .progress_chars("=> "),
                    );
                    b.set_position(start as u64);
                    self.bar = Some(b);
                }
            }
            Event::Step { step, loss, record } => {
                if let Some(b) = &self.bar {
                    b.set_position(step as u64);
                    let acc = record.map_or(String::new(), |r| {
                        format!(" · acc {:.2}", num(r, "rewards/accuracies"))
                    });
                    b.set_message(format!("loss {loss:.4}{acc}"));
                }
                if let (Some(r), None, true) = (
                    record,
                    &self.bar,
                    record.is_some_and(|r| r.contains_key("mean_token_accuracy")),
                ) {
                    eprintln!(
                        "step {step}: loss {:.4} · token accuracy {:.3} · grad_norm {:.3} · lr {:.3e} · {:.0} tok/s",
                        num(r, "loss"),
                        num(r, "mean_token_accuracy"),
                        num(r, "grad_norm"),
                        num(r, "learning_rate"),
                        num(r, "tokens_per_second")
                    );
                } else if let (Some(r), None) = (record, &self.bar) {
                    eprintln!(
                        "step {step}: loss {:.4} · margins {:.4} · acc {:.2} · grad_norm {:.3} · lr {:.3e} · α {:.3} · {:.0} tok/s",
                        num(r, "loss"),
                        num(r, "rewards/margins"),
                        num(r, "rewards/accuracies"),
                        num(r, "grad_norm"),
                        num(r, "learning_rate"),
                        num(r, "cur_alpha"),
                        num(r, "tokens_per_second")
                    );
                }
            }
            Event::Eval(r) => self.say(format!(
                "eval at step {}: loss {:.4} · margins {:.4} · acc {:.2}",
                r.get("step").and_then(|v| v.as_u64()).unwrap_or(0),
                num(r, "eval/loss"),
                num(r, "eval/rewards/margins"),
                num(r, "eval/rewards/accuracies")
            )),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
