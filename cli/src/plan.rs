//! `wrpo-engine plan`: the memory plan of a `train` or `sft` run from the model's `config.json`
//! and the settings alone ([`wrpo_engine_core::memory::plan`]), and the largest micro-batch that
//! fits a memory size.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use wrpo_engine_core::backend::BackendChoice;
use wrpo_engine_core::dispatch;
use wrpo_engine_core::memory::plan::{
    advice, human, largest_micro_batch, parse_memory, plan, HalfStorage, MemoryPlan, Run, Workload,
};
use wrpo_engine_core::model::ModelSource;

use crate::train::{settings_of, Recipe};

#[derive(Args)]
pub struct PlanCmd {
    /// Hugging Face LLaMA folder: only its config.json is read. Default: the built-in tiny LLaMA
    /// (with `train`'s preset for it).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A PEFT LoRA adapter folder to continue from (as `train --adapter`): its rank, α and
    /// targets are planned (only its adapter_config.json is read).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The recipe: `train` (WRPO and its baselines) or `sft`.
    #[arg(long, default_value = "train", value_parser = ["train", "sft"])]
    recipe: String,
    /// Memory to fit in, e.g. 80GB, 24GiB, 512MiB (GB = GiB = 2^30). Default: the memory of the
    /// --backend's device where it reports one (CUDA: the GPU's; cpu: the host's available).
    #[arg(long)]
    memory: Option<String>,
    /// The device to plan for: cuda, wgpu, cpu. Without it, a GPU (no host runtime), and the
    /// memory only from --memory.
    #[arg(long)]
    backend: Option<BackendChoice>,
    /// Sequences each row brings to one forward: 3 for WRPO quadruples (source-best,
    /// target-best, target-worst), 2 without a source response; `sft`: 1.
    #[arg(long)]
    sequences_per_row: Option<usize>,
    /// YAML file of training settings (as for `train`); the flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The plan as one JSON record on standard output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    settings: crate::settings::Settings,
}

/// One `plan` answer.
#[derive(serde::Serialize)]
struct Record<'a> {
    model: String,
    recipe: &'a str,
    /// Padded length planned for (`max_length`).
    tokens: usize,
    rows_per_micro_batch: usize,
    sequences_per_row: usize,
    plan: &'a MemoryPlan,
    memory_bytes: Option<u64>,
    fits: Option<bool>,
    /// The largest rows per device whose plan fits `memory_bytes` (None: not one row).
    largest_micro_batch: Option<usize>,
    /// Settings that fit when the plan does not.
    advice: Vec<(String, u64)>,
}

pub fn plan_cmd(a: PlanCmd) -> Result<()> {
    let recipe = match a.recipe.as_str() {
        "sft" => Recipe::Sft,
        _ => Recipe::Train,
    };
    let sft = recipe == Recipe::Sft;
    let cfg = settings_of(recipe, a.model.is_none(), a.config.as_deref(), &a.settings)?;
    let cfg = match &a.adapter {
        Some(dir) => cfg.with_adapter(dir)?,
        None => cfg,
    };
    cfg.validate()?;
    let source = ModelSource::from_arg(a.model.as_deref());
    let model = cfg.model_config(&source)?;
    let sequences_per_row = match (sft, a.sequences_per_row) {
        (true, Some(n)) if n != 1 => {
            anyhow::bail!("--sequences-per-row: sft has 1 sequence per row")
        }
        (true, _) => 1,
        (false, Some(0)) => {
            anyhow::bail!("--sequences-per-row must be at least 2 (chosen + rejected)")
        }
        (false, Some(n)) => n,
        (false, None) => {
            if cfg.loss_type.blends() {
                3
            } else {
                2
            }
        }
    };
    let host = a.backend == Some(BackendChoice::Cpu);
    // The device's memory and pool, where --backend names one.
    // Without --backend: a device that stores bf16 and f16 (CUDA, the CPU).
    let (device_memory, pool_page, half) = match a.backend {
        Some(choice) => {
            let selected = crate::device(choice)?;
            dispatch!(selected, B, device => {
                (
                    <B as wrpo_kernels::device::MemoryProbe>::device_memory_bytes(&device),
                    wrpo_engine_core::train::driver::wgpu_pool_page::<B>(&device),
                    HalfStorage::of::<B>(&device),
                )
            })
        }
        None => (None, None, HalfStorage::BOTH),
    };
    let memory = match &a.memory {
        Some(m) => Some(parse_memory(m).map_err(|e| anyhow::anyhow!("--memory {e}"))?),
        None => device_memory,
    };
    let run = Run {
        sft,
        ref_table: false,
        sequences_per_row,
        tokens: cfg.max_length,
        host,
        pool_page,
        checkpoint_dtype: model.checkpoint_dtype(),
        half,
    };
    let w = Workload::of(&cfg, &run);
    let p = plan(&model, &w);
    let largest = memory.and_then(|m| largest_micro_batch(&model, &w, sequences_per_row, m));
    let fits = memory.map(|m| p.peak <= m);
    let fixes = match (memory, fits) {
        (Some(m), Some(false)) => advice(&model, &cfg, &run, m),
        _ => vec![],
    };
    let label = source.label();
    if a.json {
        let rec = Record {
            model: label,
            recipe: &a.recipe,
            tokens: cfg.max_length,
            rows_per_micro_batch: cfg.per_device_train_batch_size,
            sequences_per_row,
            plan: &p,
            memory_bytes: memory,
            fits,
            largest_micro_batch: largest,
            advice: fixes,
        };
        println!("{}", serde_json::to_string(&rec)?);
        return Ok(());
    }
    println!(
        "memory plan: {} `{}` of {label} ({} parameters), micro-batch {} rows × {} sequences × T {}, {} micro-batch(es) per update, {}:",
        if host { "cpu" } else { "a GPU" },
        a.recipe,
        wrpo_engine_core::memory::plan::count(p.parameters),
        cfg.per_device_train_batch_size,
        sequences_per_row,
        cfg.max_length,
        cfg.gradient_accumulation_steps,
        if sft { "no reference" } else { "reference as configured" },
    );
    print!("{}", p.render());
    match memory {
        None if a.backend.is_some() => {
            println!("(the device does not report its memory: pass --memory SIZE to compare)")
        }
        None => println!(
            "(no memory to compare with: pass --memory SIZE, or --backend for the device's own)"
        ),
        Some(m) => {
            println!(
                "{} in {}: {}",
                if p.peak <= m { "fits" } else { "does not fit" },
                human(m),
                match largest {
                    Some(b) => format!(
                        "the largest micro-batch that fits is {b} row{} (--per-device-train-batch-size)",
                        if b == 1 { "" } else { "s" }
                    ),
                    None => "not even a micro-batch of one row fits".into(),
                }
            );
            if !fixes.is_empty() {
                println!("settings that fit:");
                for (f, b) in &fixes {
                    println!("  {f}   (predicted peak {})", human(*b));
                }
            }
        }
    }
    Ok(())
}
