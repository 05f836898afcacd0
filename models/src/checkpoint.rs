//! Hugging Face checkpoint folders: `config.json` + `model.safetensors` or a sharded
//! `model.safetensors.index.json`. Weights in f32/f16/bf16/f64 are cast to f32 (the compute dtype;
//! [`load_hf`]) or kept in the file's half-precision dtype ([`load_hf_with`], a frozen LoRA base).
//! Saving writes `config.json` + one `model.safetensors` (f32) with the same names and layouts,
//! each file through a temporary file and a rename so a crash never leaves a half-written file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::LlamaConfig;
use crate::llama::{param_specs, Llama};

/// Errors from reading or writing a checkpoint folder. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause (in the message, so not also a `source`: an error chain would print it twice).
        cause: std::io::Error,
    },
    /// A file's content is invalid.
    #[error("{path}: {msg}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The tensors do not match the configuration.
    #[error("{dir}: checkpoint does not match config.json:{}", list_problems(.missing, .unexpected, .wrong))]
    Mismatch {
        /// The folder.
        dir: PathBuf,
        /// Expected names absent from the files.
        missing: Vec<String>,
        /// Names in the files the model does not use.
        unexpected: Vec<String>,
        /// `name: expected [..], found [..]` (or an unsupported dtype).
        wrong: Vec<String>,
    },
}

fn list_problems(missing: &[String], unexpected: &[String], wrong: &[String]) -> String {
    let mut s = String::new();
    for (label, v) in [
        ("missing tensors", missing),
        ("unexpected tensors", unexpected),
        ("wrong shape or dtype", wrong),
    ] {
        if !v.is_empty() {
            s += &format!("\n  {label} ({}): {}", v.len(), v.join(", "));
        }
    }
    s
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |cause| ModelError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

pub(crate) fn invalid(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Read and validate `DIR/config.json`.
pub fn load_config(dir: &Path) -> Result<LlamaConfig, ModelError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    LlamaConfig::from_json(&text).map_err(|m| invalid(&path, m))
}

/// The safetensors files of a folder, in a stable order.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(invalid(
            dir,
            "no model.safetensors or model.safetensors.index.json (PyTorch .bin checkpoints are not supported; convert them with transformers' save_pretrained(safe_serialization=True))",
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(io(&index))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(&index, e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| invalid(&index, "field `weight_map` is missing or not an object"))?;
    let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Map a file read-only into memory.
#[allow(unsafe_code)]
fn map(path: &Path) -> Result<Mmap, ModelError> {
    let file = File::open(path).map_err(io(path))?;
    // SAFETY: the mapping is read-only and lives only while the checkpoint is being loaded; a
    // checkpoint file modified by another process during a load is outside what we support.
    unsafe { Mmap::map(&file) }.map_err(io(path))
}

/// Tensors that transformers itself ignores when loading.
fn ignorable(name: &str, cfg: &LlamaConfig) -> bool {
    name.ends_with("rotary_emb.inv_freq") || (cfg.tie_word_embeddings && name == "lm_head.weight")
}

/// f32 / f64 file bytes as f32 values (half precision stays as it is: see [`load_checked_data`]).
fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        _ => return None,
    })
}

/// Load a Hugging Face LLaMA folder onto `device`, every weight as f32.
pub fn load_hf<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(Llama<B>, LlamaConfig), ModelError> {
    let cfg = load_config(dir)?;
    let model = load_checked(
        dir,
        &param_specs(&cfg),
        &|name| ignorable(name, &cfg),
        |get| Llama::build(&cfg, device, &mut |name, _shape| get(name)),
    )?;
    Ok((model, cfg))
}

/// Load a Hugging Face LLaMA folder onto `device`, each weight stored in `store(its dtype in the
/// file)` (f64 files count as f32): a frozen base kept in its checkpoint's bf16/f16 takes 2 bytes
/// per parameter. The model widens half-precision weights at the point of use
/// ([`wrpo_kernels::linear`]), so its outputs are those of [`load_hf`] on the same file.
pub fn load_hf_with<B: Backend>(
    dir: &Path,
    device: &B::Device,
    store: &dyn Fn(burn::tensor::DType) -> burn::tensor::DType,
) -> Result<(Llama<B>, LlamaConfig), ModelError> {
    let cfg = load_config(dir)?;
    let model = load_checked_data(
        dir,
        &weight_files(dir)?,
        &param_specs(&cfg),
        &|name| ignorable(name, &cfg),
        |get| {
            Llama::build_from(&cfg, &mut |name, _shape| {
                let data = get(name);
                let dtype = store(data.dtype);
                burn::tensor::Tensor::from_data(data, (device, dtype))
            })
        },
    )?;
    Ok((model, cfg))
}

/// Open the safetensors files of `dir`, check that they hold exactly `specs` (names, shapes,
/// float dtypes; names for which `ignore` holds may be present too), then call `build` with a
/// getter of any listed tensor as f32. Every problem is reported at once.
pub fn load_checked<R>(
    dir: &Path,
    specs: &[(String, Vec<usize>)],
    ignore: &dyn Fn(&str) -> bool,
    build: impl FnOnce(&mut dyn FnMut(&str) -> Vec<f32>) -> R,
) -> Result<R, ModelError> {
    load_checked_in(dir, &weight_files(dir)?, specs, ignore, build)
}

/// [`load_checked`] over the given safetensors `files` of `dir` (a PEFT adapter's
/// `adapter_model.safetensors`, say).
pub fn load_checked_in<R>(
    dir: &Path,
    files: &[PathBuf],
    specs: &[(String, Vec<usize>)],
    ignore: &dyn Fn(&str) -> bool,
    build: impl FnOnce(&mut dyn FnMut(&str) -> Vec<f32>) -> R,
) -> Result<R, ModelError> {
    load_checked_data(dir, files, specs, ignore, |get| {
        build(&mut |name| {
            get(name)
                .convert::<f32>()
                .into_vec()
                .expect("f32 after conversion")
        })
    })
}

/// [`load_checked_in`] with a getter of each tensor as flat (`[n]`) data in its file's dtype
/// (f32, f16 or bf16; f64 as f32).
pub fn load_checked_data<R>(
    dir: &Path,
    files: &[PathBuf],
    specs: &[(String, Vec<usize>)],
    ignore: &dyn Fn(&str) -> bool,
    build: impl FnOnce(&mut dyn FnMut(&str) -> burn::tensor::TensorData) -> R,
) -> Result<R, ModelError> {
    use burn::tensor::{DType, TensorData};
    let maps = files
        .iter()
        .map(|f| map(f))
        .collect::<Result<Vec<_>, _>>()?;
    let tables = maps
        .iter()
        .zip(files)
        .map(|(m, f)| {
            SafeTensors::deserialize(m)
                .map_err(|e| invalid(f, format!("not a safetensors file: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // name → index of the file holding it
    let mut where_: BTreeMap<String, usize> = BTreeMap::new();
    for (i, t) in tables.iter().enumerate() {
        for name in t.names() {
            where_.insert(name.to_string(), i);
        }
    }
    let (mut missing, mut wrong) = (Vec::new(), Vec::new());
    for (name, shape) in specs {
        match where_.get(name) {
            None => missing.push(name.clone()),
            Some(&i) => {
                let view = tables[i].tensor(name).expect("listed name");
                if view.shape() != shape.as_slice() {
                    wrong.push(format!(
                        "{name}: expected {shape:?}, found {:?}",
                        view.shape()
                    ));
                } else if !matches!(
                    view.dtype(),
                    Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64
                ) {
                    wrong.push(format!("{name}: unsupported dtype {:?}", view.dtype()));
                }
            }
        }
    }
    let expected: BTreeSet<&str> = specs.iter().map(|(n, _)| n.as_str()).collect();
    let unexpected: Vec<String> = where_
        .keys()
        .filter(|n| !expected.contains(n.as_str()) && !ignore(n))
        .cloned()
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() || !wrong.is_empty() {
        return Err(ModelError::Mismatch {
            dir: dir.to_path_buf(),
            missing,
            unexpected,
            wrong,
        });
    }
    Ok(build(&mut |name| {
        let view = tables[where_[name]].tensor(name).expect("validated");
        let n = view.shape().iter().product::<usize>();
        let half = |dtype| TensorData::from_bytes_vec(view.data().to_vec(), [n], dtype);
        match view.dtype() {
            Dtype::F16 => half(DType::F16),
            Dtype::BF16 => half(DType::BF16),
            d => TensorData::new(to_f32(d, view.data()).expect("validated dtype"), [n]),
        }
    }))
}

/// Write `bytes` to `path` through `path.tmp` + rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let tmp = tmp_path(path);
    if let Err(e) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp); // a partial file on a full disk
        return Err(io(&tmp)(e));
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// Save a model as a Hugging Face folder (`config.json` + `model.safetensors`, f32) that
/// transformers' `LlamaForCausalLM.from_pretrained` loads.
pub fn save_hf<B: Backend>(
    model: &Llama<B>,
    cfg: &LlamaConfig,
    dir: &Path,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = model
        .named_tensors()
        .into_iter()
        .map(|(name, data)| {
            let shape = data.shape.to_vec();
            (name, shape, data.to_vec().expect("f32 data"))
        })
        .collect();
    let named: Vec<(String, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
        .collect();
    write_f32_safetensors(&dir.join("model.safetensors"), &named)?;
    let mut raw = cfg.raw.clone();
    if let Some(obj) = raw.as_object_mut() {
        obj.insert("torch_dtype".into(), "float32".into());
        if obj.contains_key("dtype") {
            obj.insert("dtype".into(), "float32".into());
        }
    }
    let text = serde_json::to_string_pretty(&raw).expect("JSON value serialises");
    write_atomic(&dir.join("config.json"), text.as_bytes())
}

/// Write f32 tensors `(name, shape, values)` as one safetensors file (metadata `format: pt`, as
/// PyTorch writes it) through a temporary file and a rename.
pub fn write_f32_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
) -> Result<(), ModelError> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map_err(|e| invalid(path, format!("{n}: {e}")))?;
            Ok((n.clone(), view))
        })
        .collect::<Result<Vec<_>, ModelError>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = tmp_path(path);
    if let Err(e) = safetensors::serialize_to_file(views, Some(meta), &tmp) {
        let _ = std::fs::remove_file(&tmp); // a partial file on a full disk
        return Err(invalid(&tmp, format!("writing failed: {e}")));
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}
