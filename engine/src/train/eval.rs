//! The eval pass: the loss and the reward / log-prob metrics of the eval split under the current
//! weights, as one `eval/…` record.

use serde_json::{Map, Value};
use wrpo_kernels::KernelBackend;
use wrpo_models::LlamaConfig;

use super::config::TrainConfig;
use super::loss_config;
use super::metrics::{json_f64, Meter};
use super::params::Params;
use super::step::{eval_step, Layout, Reference};
use crate::data::Encoded;

#[allow(clippy::too_many_arguments)]
pub(super) fn evaluate<B: KernelBackend>(
    cfg: &TrainConfig,
    model_cfg: &LlamaConfig,
    params: &Params<B>,
    reference: &Reference<B>,
    eval: &[Encoded],
    step: usize,
    alpha: f64,
    layout: Layout,
    device: &B::Device,
) -> Map<String, Value> {
    let model = params.model(model_cfg);
    let loss_cfg = loss_config(cfg, alpha);
    let (mut meter, mut loss_sum) = (Meter::default(), 0.0);
    let idx: Vec<usize> = (0..eval.len()).collect();
    for chunk in idx.chunks(cfg.per_device_train_batch_size) {
        let batch: Vec<&Encoded> = chunk.iter().map(|&i| &eval[i]).collect();
        let (loss, rows) = eval_step(
            model_cfg, &model, reference, &loss_cfg, &batch, chunk, layout, device,
        );
        loss_sum += loss * chunk.len() as f64;
        rows.iter().for_each(|row| meter.add(row));
    }
    let mut rec = Map::new();
    rec.insert("step".into(), step.into());
    rec.insert("eval/loss".into(), json_f64(loss_sum / eval.len() as f64));
    meter.write_into("eval/", &mut rec);
    rec
}
