//! Hugging Face folders: load → save → load round trip, and the errors for folders that do not
//! match their config.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use wrpo_engine_core::backend::CpuBackend as B;
use wrpo_engine_core::model::ModelSource;
use wrpo_models::{load_hf, save_hf, ModelError};
use wrpo_tests::fixtures;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wrpo-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn round_trip_is_bit_exact_for_every_fixture() {
    for name in ["llama-gqa", "llama-tied", "llama-linear"] {
        let dev = Default::default();
        let (model, cfg) = load_hf::<B>(&fixtures().join(name), &dev).unwrap();
        let out = tmp(&format!("rt-{name}"));
        save_hf(&model, &cfg, &out).unwrap();
        let (again, cfg2) = load_hf::<B>(&out, &dev).unwrap();
        let (a, b) = (model.named_tensors(), again.named_tensors());
        assert_eq!(a.len(), b.len(), "{name}");
        for ((na, da), (nb, db)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert_eq!(da.shape, db.shape, "{name} {na}");
            let (va, vb): (Vec<f32>, Vec<f32>) = (da.to_vec().unwrap(), db.to_vec().unwrap());
            assert!(
                va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name} {na} differs after round trip"
            );
        }
        assert_eq!(cfg.rope, cfg2.rope);
        assert_eq!(
            (cfg.head_dim, cfg.num_kv_heads, cfg.tie_word_embeddings),
            (cfg2.head_dim, cfg2.num_kv_heads, cfg2.tie_word_embeddings)
        );
        // Tied checkpoints are saved without lm_head.weight, as transformers does.
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(
            st.names().contains(&"lm_head.weight"),
            !cfg.tie_word_embeddings,
            "{name}"
        );
    }
}

#[test]
fn mismatched_checkpoint_lists_every_offending_tensor() {
    let dir = tmp("mismatch");
    copy_dir(&fixtures().join("llama-tied"), &dir);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        if name == "model.layers.1.mlp.up_proj.weight" {
            continue; // missing
        }
        if name == "model.norm.weight" {
            owned.push((name, Dtype::F32, vec![32], vec![0u8; 128])); // wrong shape
            continue;
        }
        owned.push((
            name,
            view.dtype(),
            view.shape().to_vec(),
            view.data().to_vec(),
        ));
    }
    owned.push((
        "model.layers.9.extra.weight".into(),
        Dtype::F32,
        vec![2],
        vec![0u8; 8],
    )); // unexpected
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let err = load_hf::<B>(&dir, &Default::default()).unwrap_err();
    assert!(matches!(err, ModelError::Mismatch { .. }));
    let msg = err.to_string();
    for needle in [
        "missing tensors (1): model.layers.1.mlp.up_proj.weight",
        "unexpected tensors (1): model.layers.9.extra.weight",
        "model.norm.weight: expected [64], found [32]",
    ] {
        assert!(msg.contains(needle), "{needle:?} not in:\n{msg}");
    }
}

#[test]
fn tokenizer_larger_than_the_model_vocabulary_is_refused() {
    let dir = tmp("vocab");
    copy_dir(&fixtures().join("llama-tied"), &dir);
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["vocab_size"] = 400.into();
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    let source = ModelSource::Dir(dir.clone());
    let err = match source.tokenizer(&source.config().unwrap()) {
        Ok(_) => panic!("a 483-token tokenizer was accepted for a 400-token model"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("the tokenizer has 483 tokens but the model's vocab_size is 400"),
        "{err}"
    );
}

#[test]
fn folder_without_weights_says_what_is_missing() {
    let dir = tmp("noweights");
    std::fs::copy(
        fixtures().join("llama-tied/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let err = load_hf::<B>(&dir, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no model.safetensors or model.safetensors.index.json"),
        "{err}"
    );
}
