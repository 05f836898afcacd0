//! LLaMA forward and per-sequence log-probs vs transformers (fixtures written by
//! `tests/reference/make_fixtures.py`), on the cpu backend and on wgpu.
//!
//! The wgpu tests need a Vulkan/Metal/DX12 adapter; on a machine without a GPU that is Mesa's
//! lavapipe (`apt-get install mesa-vulkan-drivers libvulkan1`), which CI installs. They fail —
//! not skip — when no adapter exists.

use std::path::Path;

use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};
use safetensors::SafeTensors;
use serde_json::Value;
use wrpo_engine_core::backend::{CpuBackend, CudaBackend, WgpuBackend};
use wrpo_engine_core::data::{Dataset, EncodeOptions};
use wrpo_engine_core::logps::{rows_logps, Head, HeadImpl};
use wrpo_engine_core::tokenizer::TextTokenizer;
use wrpo_models::load_hf;
use wrpo_tests::{assert_close, cuda_device, fixtures, tol, wgpu_device};

const MODELS: [&str; 3] = ["llama-tied", "llama-linear", "llama-gqa"];

/// Folders that wrpo-engine's `train` and `sft` wrote, with transformers' logits of each
/// (`tests/reference/make_saved_fixture.py`, which also checks that they load with no missing or
/// unexpected weights); `cli/tests/features.rs` checks that the engine still writes them.
const SAVED: [&str; 2] = ["saved/train-tied", "saved/sft-gqa-bf16"];

fn tensor_f64(st: &SafeTensors, name: &str) -> (Vec<f64>, Vec<usize>) {
    let v = st.tensor(name).unwrap();
    let data = match v.dtype() {
        safetensors::Dtype::F32 => v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::I64 => v
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        d => panic!("{name}: unexpected dtype {d:?}"),
    };
    (data, v.shape().to_vec())
}

/// A model's `expected_logits.safetensors` (transformers' logits of right-padded sequences).
struct LogitsFixture {
    ids: Vec<f64>,
    mask: Vec<f64>,
    logits: Vec<f64>,
    /// `[N, T]` of `ids`.
    shape: Vec<usize>,
}

fn logits_fixture<B: Backend>(
    name: &str,
    device: &B::Device,
) -> (
    wrpo_models::Llama<B>,
    wrpo_models::LlamaConfig,
    LogitsFixture,
) {
    let dir = fixtures().join(name);
    let (model, cfg) = load_hf::<B>(&dir, device).unwrap();
    (
        model,
        cfg,
        read_logits(&dir.join("expected_logits.safetensors")),
    )
}

/// `input_ids`, `attention_mask` and `logits` of a logits fixture file.
fn read_logits(path: &Path) -> LogitsFixture {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (ids, shape) = tensor_f64(&st, "input_ids");
    let (mask, _) = tensor_f64(&st, "attention_mask");
    let (logits, _) = tensor_f64(&st, "logits");
    LogitsFixture {
        ids,
        mask,
        logits,
        shape,
    }
}

fn logits_parity<B: wrpo_kernels::KernelBackend>(device: &B::Device, label: &str) {
    logits_parity_of::<B>(&MODELS, device, label);
}

fn logits_parity_of<B: wrpo_kernels::KernelBackend>(
    names: &[&str],
    device: &B::Device,
    label: &str,
) {
    for &name in names {
        let (model, cfg, fx) = logits_fixture::<B>(name, device);
        compare_logits(&format!("{label} {name}"), &model, &cfg, &fx, device);
    }
}

/// `model`'s logits of the fixture's rows against the fixture's, at real positions.
fn compare_logits<B: wrpo_kernels::KernelBackend>(
    what: &str,
    model: &wrpo_models::Llama<B>,
    cfg: &wrpo_models::LlamaConfig,
    fx: &LogitsFixture,
    device: &B::Device,
) {
    let (ids, mask, want) = (&fx.ids, &fx.mask, &fx.logits);
    let (n, t, v) = (fx.shape[0], fx.shape[1], cfg.vocab_size);
    let ids_t = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids.iter().map(|&x| x as i64).collect(), [n, t]),
        device,
    );
    let valid = Tensor::<B, 2, Bool>::from_data(
        TensorData::new(mask.iter().map(|&x| x != 0.0).collect(), [n, t]),
        device,
    );
    let got: Vec<f32> = model
        .forward(cfg, ids_t, valid)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap();
    // Compare real positions only (padding positions are masked everywhere downstream).
    let (mut g, mut w) = (Vec::new(), Vec::new());
    for pos in 0..n * t {
        if mask[pos] != 0.0 {
            g.extend(got[pos * v..(pos + 1) * v].iter().map(|&x| x as f64));
            w.extend_from_slice(&want[pos * v..(pos + 1) * v]);
        }
    }
    let r = assert_close(&format!("{what} logits"), &g, &w, tol::LOGITS_F32);
    println!(
        "{what}: logits max abs err {:.3e}, max rel err {:.3e} over {} values",
        r.max_abs,
        r.max_rel,
        g.len()
    );
}

/// A PEFT adapter (trained by peft, `tests/fixtures/lora/lora_wrpo_k1r1/final_adapter`) on its
/// base gives PEFT's logits (`tests/fixtures/lora/adapter_logits.safetensors`), attached
/// (`--adapter`) and merged into the weights (`wrpo-engine merge`, then loaded as a plain model).
fn adapter_logits_parity<B: wrpo_kernels::KernelBackend>(device: &B::Device, label: &str) {
    let base = fixtures().join("llama-tied");
    let adapter = fixtures().join("lora/lora_wrpo_k1r1/final_adapter");
    let fx = read_logits(&fixtures().join("lora/adapter_logits.safetensors"));
    let (model, cfg) = wrpo_engine_core::model::ModelSource::Dir(base.clone())
        .load_adapted::<B>(Some(&adapter), device)
        .unwrap();
    compare_logits(
        &format!("{label} base + adapter"),
        &model,
        &cfg,
        &fx,
        device,
    );
    let out = std::env::temp_dir().join(format!("wrpo-merge-{label}-{}", std::process::id()));
    wrpo_engine_core::model::merge_adapter(&base, &adapter, &out).unwrap();
    let (merged, cfg) = load_hf::<B>(&out, device).unwrap();
    compare_logits(&format!("{label} merged"), &merged, &cfg, &fx, device);
    assert!(
        out.join("tokenizer.json").is_file(),
        "merge copies the tokenizer"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn cpu_peft_adapter_gives_peft_logits() {
    adapter_logits_parity::<CpuBackend>(&Default::default(), "cpu");
}

/// Packed rows (`Llama::forward_packed`, what `sft --packing` runs): the fixture's sequences are
/// packed back to back — even-numbered ones in row 0, odd ones in row 1 — and each sequence's
/// logits must equal transformers' logits of that sequence alone (block-diagonal mask, positions
/// restarting at 0).
fn packed_logits_parity<B: wrpo_kernels::KernelBackend>(device: &B::Device, label: &str) {
    for name in MODELS {
        let (model, cfg, fx) = logits_fixture::<B>(name, device);
        let (ids, mask, want) = (fx.ids, fx.mask, fx.logits);
        let (n, t, v) = (fx.shape[0], fx.shape[1], cfg.vocab_size);
        assert!(n >= 2, "{name}: the fixture needs two sequences to pack");
        // Real positions (flat indices into the fixture) of each packed row, in packing order.
        let mut rows: Vec<Vec<usize>> = vec![vec![], vec![]];
        let (mut segs, mut poss): (Vec<Vec<u32>>, Vec<Vec<usize>>) =
            (vec![vec![], vec![]], vec![vec![], vec![]]);
        for s in 0..n {
            let real: Vec<usize> = (0..t)
                .map(|j| s * t + j)
                .filter(|&p| mask[p] != 0.0)
                .collect();
            poss[s % 2].extend(0..real.len());
            segs[s % 2].extend(std::iter::repeat_n(s as u32 + 1, real.len()));
            rows[s % 2].extend(real);
        }
        let width = rows.iter().map(Vec::len).max().unwrap();
        let (mut flat_ids, mut flat_seg, mut flat_pos) = (vec![], vec![], vec![]);
        for r in 0..2 {
            let pad = width - rows[r].len();
            flat_ids.extend(
                rows[r]
                    .iter()
                    .map(|&p| ids[p] as i64)
                    .chain(std::iter::repeat_n(0, pad)),
            );
            flat_seg.extend(segs[r].iter().copied().chain(std::iter::repeat_n(0, pad)));
            flat_pos.extend(poss[r].iter().copied().chain(std::iter::repeat_n(0, pad)));
        }
        let ids_t = Tensor::<B, 2, Int>::from_data(TensorData::new(flat_ids, [2, width]), device);
        let got: Vec<f32> = model
            .forward_packed(&cfg, ids_t, &flat_seg, &flat_pos)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap();
        let (mut g, mut w) = (Vec::new(), Vec::new());
        for (r, row) in rows.iter().enumerate() {
            for (j, &p) in row.iter().enumerate() {
                let at = (r * width + j) * v;
                g.extend(got[at..at + v].iter().map(|&x| x as f64));
                w.extend_from_slice(&want[p * v..(p + 1) * v]);
            }
        }
        let r = assert_close(
            &format!("{label} {name} packed logits"),
            &g,
            &w,
            tol::LOGITS_F32,
        );
        println!(
            "{label} {name}: packed logits max abs err {:.3e}, max rel err {:.3e} over {} values",
            r.max_abs,
            r.max_rel,
            g.len()
        );
    }
}

fn logps_parity<B: wrpo_kernels::KernelBackend>(device: &B::Device, label: &str) {
    for name in MODELS {
        let dir = fixtures().join(name);
        let (model, cfg) = load_hf::<B>(&dir, device).unwrap();
        let tok = TextTokenizer::load(&dir).unwrap();
        let expected: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("expected_logps.json")).unwrap(),
        )
        .unwrap();
        for case in expected["cases"].as_array().unwrap() {
            let data = case["data"].as_str().unwrap();
            let opts = EncodeOptions {
                max_length: case["max_length"].as_u64().map(|x| x as usize),
                max_prompt_length: case["max_prompt_length"].as_u64().map(|x| x as usize),
                vocab_size: cfg.vocab_size,
            };
            let what = format!(
                "{label} {name} {data} L={:?} P={:?}",
                opts.max_length, opts.max_prompt_length
            );
            let ds = Dataset::load(&fixtures().join(data), Some(&tok), &opts, false).unwrap();
            let rows = case["rows"].as_array().unwrap();
            assert_eq!(ds.rows.len(), rows.len(), "{what}: row count");
            let ids = |v: &Value| -> Vec<u32> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            };
            let lists =
                |v: &Value| -> Vec<Vec<u32>> { v.as_array().unwrap().iter().map(ids).collect() };
            for (i, (got, want)) in ds.rows.iter().zip(rows).enumerate() {
                assert_eq!(
                    got.prompt,
                    ids(&want["prompt_ids"]),
                    "{what}: row {i} prompt ids"
                );
                assert_eq!(
                    got.chosen,
                    lists(&want["chosen_ids"]),
                    "{what}: row {i} chosen ids"
                );
                assert_eq!(
                    got.rejected,
                    lists(&want["rejected_ids"]),
                    "{what}: row {i} rejected ids"
                );
            }
            // Two rows per forward: batching and padding differ from the reference's. Both LM-head
            // paths: the fused head (the default; 3-position blocks so that sequences straddle
            // blocks) and the dense logits.
            for head in [
                Head {
                    imp: HeadImpl::Fused,
                    chunk: 3,
                },
                Head::DENSE,
            ] {
                let what = format!("{what} head {:?}", head.imp);
                let got: Vec<_> = ds
                    .rows
                    .chunks(2)
                    .flat_map(|c| rows_logps(&model, &cfg, c, 0, head, device))
                    .collect();

                let f = |v: &Value| -> Vec<f64> {
                    v.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap())
                        .collect()
                };
                let (mut g, mut w) = (Vec::new(), Vec::new());
                for (got, want) in got.iter().zip(rows) {
                    g.extend(got.chosen.iter().chain(&got.rejected));
                    w.extend(f(&want["chosen"]).into_iter().chain(f(&want["rejected"])));
                    let counts = |v: &Value| -> Vec<usize> {
                        v.as_array()
                            .unwrap()
                            .iter()
                            .map(|x| x.as_u64().unwrap() as usize)
                            .collect()
                    };
                    assert_eq!(
                        got.chosen_tokens,
                        counts(&want["chosen_tokens"]),
                        "{what}: token counts"
                    );
                    assert_eq!(
                        got.rejected_tokens,
                        counts(&want["rejected_tokens"]),
                        "{what}: token counts"
                    );
                }
                let r = assert_close(&format!("{what} logps"), &g, &w, tol::LOGPS_F32);
                println!(
                    "{what}: {} sequences, log-prob max abs err {:.3e}, max rel err {:.3e}",
                    g.len(),
                    r.max_abs,
                    r.max_rel
                );
            }
        }
    }
}

#[test]
fn cpu_logits_match_transformers() {
    logits_parity::<CpuBackend>(&Default::default(), "cpu");
}

/// transformers loads what `train` and `sft` saved (checked when the fixture was made) and its
/// logits are the engine's.
#[test]
fn cpu_saved_folders_give_transformers_the_engines_logits() {
    logits_parity_of::<CpuBackend>(&SAVED, &Default::default(), "cpu");
}

#[test]
fn cpu_packed_logits_match_transformers() {
    packed_logits_parity::<CpuBackend>(&Default::default(), "cpu");
}

#[test]
fn wgpu_packed_logits_match_transformers() {
    packed_logits_parity::<WgpuBackend>(&wgpu_device(), "wgpu");
}

#[test]
fn cpu_logps_and_tokenisation_match_transformers() {
    logps_parity::<CpuBackend>(&Default::default(), "cpu");
}

#[test]
fn wgpu_logits_match_transformers() {
    logits_parity::<WgpuBackend>(&wgpu_device(), "wgpu");
}

#[test]
fn wgpu_logps_match_transformers() {
    logps_parity::<WgpuBackend>(&wgpu_device(), "wgpu");
}

#[test]
#[ignore = "needs CUDA (run with --ignored on a GPU machine)"]
fn cuda_logits_match_transformers() {
    logits_parity::<CudaBackend>(&cuda_device(), "cuda");
}

#[test]
#[ignore = "needs CUDA (run with --ignored on a GPU machine)"]
fn cuda_logps_match_transformers() {
    logps_parity::<CudaBackend>(&cuda_device(), "cuda");
}
