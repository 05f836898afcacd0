//! Where the reference log-probs come from: none (SimPO), a `--ref-logps` file, the cache or a
//! precomputing pass over the data, or the reference model itself on the fly (the initial policy,
//! or `--ref-model`).

use anyhow::Result;
use wrpo_kernels::KernelBackend;

use super::config::RunPaths;
use super::dist::Peer;
use super::step::Reference;
use super::{refcache, Event, TrainJob};
use crate::data::Encoded;
use crate::model::ModelSource;

/// The reference log-probs for the training and eval splits.
#[allow(clippy::too_many_arguments)]
pub(super) fn build_reference<B: KernelBackend>(
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
