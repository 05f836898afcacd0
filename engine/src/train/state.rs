//! Checkpoints: `OUTPUT/checkpoint-STEP/` = a Hugging Face model folder (config.json,
//! model.safetensors, tokenizer files) + `optimizer.safetensors` (AdamW moments, named
//! `exp_avg.<param>` / `exp_avg_sq.<param>`) + `trainer_state.json` (step, config, history) +
//! `training_config.yaml`. Written into a temporary folder and renamed, so a crash never leaves a
//! half-written checkpoint, and an existing one is replaced only once the new one is complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use wrpo_models::LlamaConfig;

use super::config::TrainConfig;
use super::optim::AdamState;
use super::params::Params;

/// `trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer updates done.
    pub global_step: u64,
    /// Total updates of the run.
    pub total_steps: u64,
    /// Epochs done (fraction).
    pub epoch: f64,
    /// The model the run started from (the reference when no --ref-model is given).
    pub model: String,
    /// The training data.
    pub data: String,
    /// The resolved configuration.
    pub config: TrainConfig,
    /// Metrics records so far.
    pub log_history: Vec<serde_json::Value>,
    /// Peers (devices × nodes) of the run that wrote it; a resume needs the same (the global
    /// batch, hence every update, depends on it). Absent in older checkpoints: 1.
    #[serde(default = "one")]
    pub world_size: u64,
    /// SHA-256 of the training units' token ids (`driver::fingerprint`); `--resume` refuses
    /// other data. Absent in older checkpoints (not checked then).
    #[serde(default)]
    pub data_fingerprint: Option<String>,
}

fn one() -> u64 {
    1
}

/// Files copied from the model folder into every checkpoint, when present.
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
];

fn write_safetensors(path: &Path, tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Tensors by name: shape and f32 data.
pub type HostTensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Read every f32 tensor of a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<HostTensors> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            bail!(
                "{}: tensor {name} is {:?}, expected F32",
                path.display(),
                view.dtype()
            );
        }
        let v = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, (view.shape().to_vec(), v));
    }
    Ok(out)
}

/// Write a model folder (weights, config, tokenizer files) into `dir`, not atomically (callers
/// write into a temporary folder). Under LoRA the weights are a PEFT adapter
/// (`adapter_config.json` naming `base` + `adapter_model.safetensors`), not the model.
pub fn write_model_dir<B: Backend>(
    dir: &Path,
    params: &Params<B>,
    cfg: &LlamaConfig,
    tokenizer_from: &TokenizerFiles,
    base: &str,
) -> Result<()> {
    match &params.lora {
        None => wrpo_models::save_hf(&params.model(cfg), cfg, dir)?,
        Some(lora) => {
            wrpo_models::lora::save_adapter(dir, lora, base, &params.trainable.to_host())?
        }
    }
    match tokenizer_from {
        TokenizerFiles::Dir(src) => copy_tokenizer_files(src, dir)?,
        TokenizerFiles::Embedded => {
            for (name, text) in [
                ("tokenizer.json", crate::embedded::TOKENIZER_JSON),
                ("tokenizer_config.json", crate::embedded::TOKENIZER_CONFIG),
            ] {
                let path = dir.join(name);
                std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// Copy the tokenizer files (tokenizer, its config, chat template, generation config) that `src`
/// has into `dir`.
pub fn copy_tokenizer_files(src: &Path, dir: &Path) -> Result<()> {
    for f in TOKENIZER_FILES {
        let from = src.join(f);
        if from.is_file() {
            std::fs::copy(&from, dir.join(f))
                .with_context(|| format!("copying {} into {}", from.display(), dir.display()))?;
        }
    }
    Ok(())
}

/// Where a checkpoint's tokenizer files come from.
#[derive(Debug, Clone)]
pub enum TokenizerFiles {
    /// Copied from the model folder.
    Dir(PathBuf),
    /// The embedded tokenizer.
    Embedded,
}

/// Write `final_dir` (or `checkpoint-STEP`) atomically: build `.<name>.tmp` next to it, then
/// swap it in.
pub fn write_dir_atomic(final_dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = final_dir.parent().unwrap_or(Path::new("."));
    let name = final_dir
        .file_name()
        .context("checkpoint path has no name")?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.tmp{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let written = std::fs::create_dir_all(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))
        .and_then(|()| fill(&tmp));
    if let Err(e) = written {
        // A full disk or an unwritable folder: drop the partial copy (it would hold the space
        // the next attempt needs); whatever `final_dir` held before stays as it was.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "writing {} (nothing there was changed)",
            final_dir.display()
        )));
    }
    if final_dir.exists() {
        let old = parent.join(format!(".{name}.old{}", std::process::id()));
        std::fs::rename(final_dir, &old)
            .with_context(|| format!("renaming {} to {}", final_dir.display(), old.display()))?;
        std::fs::rename(&tmp, final_dir)
            .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        std::fs::rename(&tmp, final_dir)
            .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
    }
    Ok(())
}

/// Save a full checkpoint into `dir`.
pub fn save_checkpoint<B: Backend>(
    dir: &Path,
    params: &Params<B>,
    opt: &AdamState<B>,
    cfg: &LlamaConfig,
    tokenizer_from: &TokenizerFiles,
    state: &TrainerState,
) -> Result<()> {
    write_dir_atomic(dir, |tmp| {
        write_model_dir(tmp, params, cfg, tokenizer_from, &state.model)?;
        let mut t = Vec::new();
        for (prefix, f) in [("exp_avg", &opt.exp_avg), ("exp_avg_sq", &opt.exp_avg_sq)] {
            for (n, s, v) in f.to_host() {
                t.push((format!("{prefix}.{n}"), s, v));
            }
        }
        write_safetensors(&tmp.join("optimizer.safetensors"), t)?;
        let path = tmp.join("trainer_state.json");
        std::fs::write(&path, serde_json::to_string_pretty(state)?)
            .with_context(|| format!("writing {}", path.display()))?;
        let path = tmp.join("training_config.yaml");
        std::fs::write(&path, state.config.to_yaml())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    })
}

/// The newest `checkpoint-STEP` folder in `output` that has a `trainer_state.json`.
pub fn latest_checkpoint(output: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(output).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join("trainer_state.json")
                .is_file()
                .then_some((step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
        .map(|(_, p)| p)
}

/// A checkpoint read back.
pub struct Restored<B: Backend> {
    /// Policy parameters (the trainable group read back, the frozen one shared with `like`).
    pub params: Params<B>,
    /// AdamW state.
    pub opt: AdamState<B>,
    /// Trainer state.
    pub state: TrainerState,
}

/// Read `dir` into tensors laid out like `like` (the initial parameters): the trainable group
/// from `model.safetensors` (or, under LoRA, `adapter_model.safetensors`) and its AdamW moments.
pub fn load_checkpoint<B: Backend>(
    dir: &Path,
    like: &Params<B>,
    device: &B::Device,
) -> Result<Restored<B>> {
    let state_path = dir.join("trainer_state.json");
    let state: TrainerState = serde_json::from_str(
        &std::fs::read_to_string(&state_path)
            .with_context(|| format!("reading {}", state_path.display()))?,
    )
    .with_context(|| format!("{}: bad trainer state", state_path.display()))?;
    let (weights, prefix) = match like.lora {
        None => ("model.safetensors", ""),
        Some(_) => (
            wrpo_models::lora::ADAPTER_WEIGHTS,
            wrpo_models::lora::PEFT_PREFIX,
        ),
    };
    let mut tensors = read_safetensors(&dir.join(weights))?;
    let mut opt = read_safetensors(&dir.join("optimizer.safetensors"))?;
    let take =
        |map: &mut HostTensors, key: String, shape: &[usize], file: &str| -> Result<Vec<f32>> {
            let (s, v) = map
                .remove(&key)
                .with_context(|| format!("{}: {file} has no tensor {key}", dir.display()))?;
            if s != shape {
                bail!(
                    "{}: {file}: {key} has shape {s:?}, expected {shape:?}",
                    dir.display()
                );
            }
            Ok(v)
        };
    let trainable = &like.trainable;
    let params = like.with_trainable(trainable.from_host_like(device, &mut |n, s| {
        take(&mut tensors, format!("{prefix}{n}"), s, weights)
    })?);
    let exp_avg = trainable.from_host_like(device, &mut |n, s| {
        take(&mut opt, format!("exp_avg.{n}"), s, "optimizer.safetensors")
    })?;
    let exp_avg_sq = trainable.from_host_like(device, &mut |n, s| {
        take(
            &mut opt,
            format!("exp_avg_sq.{n}"),
            s,
            "optimizer.safetensors",
        )
    })?;
    Ok(Restored {
        params,
        opt: AdamState {
            exp_avg,
            exp_avg_sq,
            step: state.global_step,
        },
        state,
    })
}

/// Remove the oldest checkpoints beyond `keep` (0 = keep all).
pub fn rotate_checkpoints(output: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(output)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            Some((name.strip_prefix("checkpoint-")?.parse().ok()?, e.path()))
        })
        .collect();
    found.sort();
    let n = found.len();
    for (_, p) in found.into_iter().take(n.saturating_sub(keep)) {
        std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}
