//! The pipeline's model paths vs transformers (fixtures written by
//! `tests/reference/make_generate_fixture.py`), on the cpu backend and on wgpu:
//! - greedy decoding with the KV cache reproduces `generate` token for token (left-padded batch
//!   of five prompts of different lengths, two stop sets, other batch sizes, n > 1);
//! - the KV-cache logits equal the full forward's at every step (teacher forcing), also across
//!   the cache's row edits (one prompt expanded into several samples, finished rows dropped);
//! - reward-model scores of a tiny `LlamaForSequenceClassification`.

use burn::tensor::{Bool, Int, Tensor, TensorData};
use serde_json::Value;
use wrpo_engine_core::backend::{CpuBackend, CudaBackend, WgpuBackend};
use wrpo_engine_core::data::parse_prompt;
use wrpo_engine_core::pipeline::sample::{encode_prompt, generate, stop_ids, GenerateOptions};
use wrpo_engine_core::pipeline::sampler::SamplerConfig;
use wrpo_engine_core::pipeline::score::{encode_pair, score_sequences};
use wrpo_engine_core::tokenizer::TextTokenizer;
use wrpo_models::reward::load_reward_hf;
use wrpo_models::{load_hf, KvCache};
use wrpo_tests::{assert_close, cuda_device, fixtures, tol, wgpu_device};

const MODELS: [&str; 2] = ["llama-tied", "llama-gqa"];

fn read(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

const GREEDY: SamplerConfig = SamplerConfig {
    temperature: 0.0,
    top_p: 1.0,
    top_k: 0,
};

fn greedy_parity<B: wrpo_kernels::linear::FrozenLinearBackend>(device: &B::Device, label: &str) {
    for name in MODELS {
        let dir = fixtures().join(name);
        let fx = read(&fixtures().join("generate").join(format!("{name}.json")));
        let (model, cfg) = load_hf::<B>(&dir, device).unwrap();
        let tok = TextTokenizer::load(&dir).unwrap();
        let prompt_ids: Vec<Vec<u32>> = fx["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        for (i, p) in fx["prompts"].as_array().unwrap().iter().enumerate() {
            let text = parse_prompt(Some(p)).unwrap();
            assert_eq!(
                encode_prompt(&tok, &text).unwrap(),
                prompt_ids[i],
                "{name}: prompt {i} ids"
            );
        }
        let max_new = fx["max_new_tokens"].as_u64().unwrap() as usize;
        let pad_id = fx["pad_id"].as_u64().unwrap() as u32;
        for case in fx["cases"].as_array().unwrap() {
            let stops = ids(&case["stop_ids"]);
            if case["name"] == "default-stops" {
                assert_eq!(
                    stop_ids(&tok, Some(&dir)).unwrap(),
                    stops,
                    "{name}: stop set"
                );
            }
            let want: Vec<Vec<u32>> = case["outputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(ids)
                .collect();
            // All five prompts in one batch, then batches of two with n = 2 (other padding, the
            // cache expanded per prompt).
            for (batch, n) in [(5, 1), (2, 2)] {
                let opts = GenerateOptions {
                    n,
                    max_new_tokens: max_new,
                    sampler: GREEDY,
                    stop_ids: stops.clone(),
                    pad_id,
                    seed: 0,
                };
                let mut got = Vec::new();
                for (c, chunk) in prompt_ids.chunks(batch).enumerate() {
                    got.extend(generate(
                        &model,
                        &cfg,
                        chunk,
                        c * batch,
                        &opts,
                        device,
                        &mut |_| {},
                    ));
                }
                let mut tokens = 0;
                for (i, (samples, w)) in got.iter().zip(&want).enumerate() {
                    for g in samples {
                        let mut seq = g.tokens.clone();
                        seq.extend(g.stop);
                        assert_eq!(
                            &seq, w,
                            "{label} {name} {}: prompt {i} (batch {batch}, n {n})",
                            case["name"]
                        );
                        tokens += seq.len();
                    }
                }
                println!(
                    "{label} {name} {} batch {batch} n {n}: {tokens} greedy tokens equal transformers' generate",
                    case["name"]
                );
            }
        }
    }
}

/// Teacher-forced decoding of prompt + transformers' greedy output through the cache, against
/// the full forward of the whole right-padded sequences.
fn cache_vs_full<B: wrpo_kernels::KernelBackend>(device: &B::Device, label: &str) {
    for name in MODELS {
        let dir = fixtures().join(name);
        let fx = read(&fixtures().join("generate").join(format!("{name}.json")));
        let (model, cfg) = load_hf::<B>(&dir, device).unwrap();
        let v = cfg.vocab_size;
        let prompts: Vec<Vec<u32>> = fx["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        let outs: Vec<Vec<u32>> = fx["cases"][0]["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        let steps = outs.iter().map(Vec::len).min().unwrap();
        let b = prompts.len();
        // Full forward, right-padded.
        let seqs: Vec<Vec<u32>> = prompts
            .iter()
            .zip(&outs)
            .map(|(p, o)| [p.as_slice(), &o[..steps]].concat())
            .collect();
        let t = seqs.iter().map(Vec::len).max().unwrap();
        let (mut flat, mut valid) = (vec![0i64; b * t], vec![false; b * t]);
        for (r, s) in seqs.iter().enumerate() {
            for (j, &x) in s.iter().enumerate() {
                flat[r * t + j] = x as i64;
                valid[r * t + j] = true;
            }
        }
        let full: Vec<f32> = model
            .forward(
                &cfg,
                Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [b, t]), device),
                Tensor::<B, 2, Bool>::from_data(TensorData::new(valid, [b, t]), device),
            )
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap();
        // Cached: left-padded prefill, then one forced token per step.
        let tp = prompts.iter().map(Vec::len).max().unwrap();
        let (mut flat, mut valid) = (Vec::new(), Vec::new());
        for p in &prompts {
            flat.extend(std::iter::repeat_n(0i64, tp - p.len()).chain(p.iter().map(|&x| x as i64)));
            valid.extend((0..tp).map(|j| j >= tp - p.len()));
        }
        let mut cache = KvCache::<B>::new(&cfg, b);
        let mut logits = model.forward_cached_last(
            &cfg,
            Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [b, tp]), device),
            &valid,
            &mut cache,
        );
        let (mut g, mut w) = (Vec::new(), Vec::new());
        for step in 0..steps {
            let got: Vec<f32> = logits.into_data().convert::<f32>().to_vec().unwrap();
            for r in 0..b {
                let pos = prompts[r].len() - 1 + step; // predicts token pos + 1
                g.extend(got[r * v..(r + 1) * v].iter().map(|&x| x as f64));
                w.extend(
                    full[(r * t + pos) * v..(r * t + pos + 1) * v]
                        .iter()
                        .map(|&x| x as f64),
                );
            }
            let next: Vec<i64> = outs.iter().map(|o| o[step] as i64).collect();
            logits = model.forward_cached_last(
                &cfg,
                Tensor::<B, 2, Int>::from_data(TensorData::new(next, [b, 1]), device),
                &vec![true; b],
                &mut cache,
            );
        }
        // The same f32 computation with other padding and summation lengths: the logits'
        // tolerance of the transformers parity tests.
        let rep = assert_close(
            &format!("{label} {name} cached vs full logits"),
            &g,
            &w,
            tol::LOGITS_F32,
        );
        println!(
            "{label} {name}: KV-cache vs full forward over {steps} steps × {b} rows: max abs logit error {:.3e}",
            rep.max_abs
        );
    }
}

fn reward_parity<B: wrpo_kernels::KernelBackend>(device: &B::Device, label: &str) {
    let dir = fixtures().join("reward-llama");
    let fx = read(&dir.join("expected_scores.json"));
    let (model, cfg) = load_reward_hf::<B>(&dir, device).unwrap();
    assert_eq!(
        (cfg.num_labels, cfg.pad_token_id),
        (1, Some(fx["pad_token_id"].as_u64().unwrap() as u32))
    );
    let tok = TextTokenizer::load(&dir).unwrap();
    let (mut seqs, mut want) = (Vec::new(), Vec::new());
    for p in fx["pairs"].as_array().unwrap() {
        let prompt = parse_prompt(Some(&p["prompt"])).unwrap();
        let resp = wrpo_engine_core::data::parse_response(&p["response"], "response").unwrap();
        let e = encode_pair(&tok, &prompt, &resp, "response").unwrap();
        assert_eq!(e, ids(&p["ids"]), "pair ids");
        seqs.push(e);
        want.push(p["score"].as_f64().unwrap());
    }
    for s in fx["id_sequences"].as_array().unwrap() {
        seqs.push(ids(&s["ids"]));
        want.push(s["score"].as_f64().unwrap());
    }
    // Batches of three, longest first: other padding than the reference's one batch.
    let got = score_sequences(&model, &cfg, &seqs, 3, device, &mut |_, _| {});
    // A linear head on the final hidden state: the logits' tolerance.
    let rep = assert_close(
        &format!("{label} reward scores"),
        &got,
        &want,
        tol::LOGITS_F32,
    );
    println!(
        "{label} reward-llama: {} scores, max abs error {:.3e}, max rel error {:.3e}",
        got.len(),
        rep.max_abs,
        rep.max_rel
    );
}

#[test]
fn cpu_greedy_decoding_matches_transformers_generate() {
    greedy_parity::<CpuBackend>(&Default::default(), "cpu");
}

#[test]
fn wgpu_greedy_decoding_matches_transformers_generate() {
    greedy_parity::<WgpuBackend>(&wgpu_device(), "wgpu");
}

#[test]
fn cpu_kv_cache_logits_equal_the_full_forward() {
    cache_vs_full::<CpuBackend>(&Default::default(), "cpu");
}

#[test]
fn wgpu_kv_cache_logits_equal_the_full_forward() {
    cache_vs_full::<WgpuBackend>(&wgpu_device(), "wgpu");
}

#[test]
fn cpu_reward_scores_match_transformers() {
    reward_parity::<CpuBackend>(&Default::default(), "cpu");
}

#[test]
fn wgpu_reward_scores_match_transformers() {
    reward_parity::<WgpuBackend>(&wgpu_device(), "wgpu");
}

#[test]
#[ignore = "needs CUDA (run with --ignored on a GPU machine)"]
fn cuda_greedy_decoding_matches_transformers_generate() {
    greedy_parity::<CudaBackend>(&cuda_device(), "cuda");
}

#[test]
#[ignore = "needs CUDA (run with --ignored on a GPU machine)"]
fn cuda_kv_cache_logits_equal_the_full_forward() {
    cache_vs_full::<CudaBackend>(&cuda_device(), "cuda");
}

#[test]
#[ignore = "needs CUDA (run with --ignored on a GPU machine)"]
fn cuda_reward_scores_match_transformers() {
    reward_parity::<CudaBackend>(&cuda_device(), "cuda");
}

/// The KV cache's row edits (`select`: expand one prompt into several samples, drop finished
/// rows) on a random GQA model with llama3 RoPE: every step's logits equal the full forward's.
mod cache_edits {
    use super::*;
    use wrpo_models::{Llama, LlamaConfig};
    type B = CpuBackend;

    fn ids(v: Vec<i64>, b: usize, s: usize) -> Tensor<B, 2, Int> {
        Tensor::from_data(TensorData::new(v, [b, s]), &Default::default())
    }

    /// Logits of one unpadded sequence by the full forward: `[T][V]`.
    fn full(model: &Llama<B>, cfg: &LlamaConfig, seq: &[i64]) -> Vec<Vec<f32>> {
        let t = seq.len();
        let valid = Tensor::<B, 2, Bool>::from_data(
            TensorData::new(vec![true; t], [1, t]),
            &Default::default(),
        );
        let logits: Vec<f32> = model
            .forward(cfg, ids(seq.to_vec(), 1, t), valid)
            .into_data()
            .to_vec()
            .unwrap();
        logits.chunks(cfg.vocab_size).map(<[f32]>::to_vec).collect()
    }

    /// Left-padded prefill of prompts of different lengths, then forced tokens one step at a
    /// time, with a cache expansion (one prompt → two rows) and a compaction on the way: every
    /// step's logits equal the full forward of the unpadded sequence.
    #[test]
    fn cached_logits_equal_the_full_forward_at_every_step() {
        // GQA (4 heads, 2 kv heads) and llama3 RoPE scaling, so positions matter.
        let cfg = LlamaConfig::from_json(
            r#"{"vocab_size":97,"hidden_size":32,"intermediate_size":48,"num_hidden_layers":2,
                "num_attention_heads":4,"num_key_value_heads":2,"rope_theta":500000.0,
                "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
                "high_freq_factor":4.0,"original_max_position_embeddings":8}}"#,
        )
        .unwrap();
        let model = Llama::<B>::random(&cfg, 7, 0.3, &Default::default());
        let prompts: Vec<Vec<i64>> = vec![
            vec![5, 17, 42, 3, 9],
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9],
            vec![60, 61],
        ];
        let t = prompts.iter().map(Vec::len).max().unwrap();
        let (mut flat, mut valid) = (Vec::new(), Vec::new());
        for p in &prompts {
            flat.extend(std::iter::repeat_n(0, t - p.len()).chain(p.iter().copied()));
            valid.extend((0..t).map(|j| j >= t - p.len()));
        }
        let mut cache = KvCache::<B>::new(&cfg, prompts.len());
        let logits = model.forward_cached_last(&cfg, ids(flat, 3, t), &valid, &mut cache);
        let (mut got_all, mut want_all) = (Vec::new(), Vec::new());
        let mut check = |seqs: &[Vec<i64>], logits: Tensor<B, 2>| {
            let got: Vec<f32> = logits.into_data().to_vec().unwrap();
            for (row, seq) in seqs.iter().enumerate() {
                let want = full(&model, &cfg, seq);
                let g = &got[row * cfg.vocab_size..(row + 1) * cfg.vocab_size];
                got_all.extend(g.iter().map(|&x| x as f64));
                want_all.extend(want.last().unwrap().iter().map(|&x| x as f64));
            }
        };
        let mut seqs = prompts.clone();
        check(&seqs, logits);
        assert_eq!(cache.positions(), &[5, 9, 2]);
        // Row 2 becomes two rows (as `sample` expands a prompt into N samples); row 1 is dropped
        // (as a finished row is).
        cache.select(&[0, 2, 2]);
        seqs = vec![seqs[0].clone(), seqs[2].clone(), seqs[2].clone()];
        for step in 0..6i64 {
            let next: Vec<i64> = (0..3).map(|r| (step * 13 + r * 29 + 11) % 97).collect();
            for (s, &n) in seqs.iter_mut().zip(&next) {
                s.push(n);
            }
            let logits = model.forward_cached_last(&cfg, ids(next, 3, 1), &[true; 3], &mut cache);
            check(&seqs, logits);
            if step == 2 {
                cache.select(&[0, 2]);
                seqs.remove(1);
                let next: Vec<i64> = vec![4, 5];
                for (s, &n) in seqs.iter_mut().zip(&next) {
                    s.push(n);
                }
                let logits =
                    model.forward_cached_last(&cfg, ids(next, 2, 1), &[true; 2], &mut cache);
                check(&seqs, logits);
                // Keep three rows for the remaining steps.
                cache.select(&[0, 1, 1]);
                seqs.push(seqs[1].clone());
            }
        }
        // The same f32 computation with other padding and summation lengths: the logits'
        // tolerance of the transformers parity tests (measured 4.1e-6).
        let rep = assert_close(
            "cpu cache edits: cached vs full logits",
            &got_all,
            &want_all,
            tol::LOGITS_F32,
        );
        println!(
            "KV cache with row edits vs full forward: max abs logit error {:.3e}",
            rep.max_abs
        );
    }
}
