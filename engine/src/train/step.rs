//! One micro-batch of WRPO: policy forward (autodiff) over every sequence of its rows in one
//! batch, reference log-probs, the preference loss, backward, and the per-row numbers the metrics
//! need. The loss is a pure function of per-sequence log-probs ([`wrpo_kernels::loss`]); this
//! module never touches logits beyond the log-prob op.

use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use wrpo_kernels::logprobs::{sequence_logprobs, token_logprobs};
use wrpo_kernels::loss::{preference_loss_fused, LossConfig, PreferenceInputs};
use wrpo_kernels::KernelBackend;
use wrpo_models::{LayerInputs, Llama, LlamaConfig};

use super::metrics::RowStats;
use super::params::Params;
use crate::data::Encoded;
use crate::logps::{
    fused_sums, make_batch, make_packed_batch, pack_bfd, Head, HeadImpl, RowLogps, Scored,
};

/// Where reference log-probs come from.
pub enum Reference<B: Backend> {
    /// A frozen model (with its configuration), run without autodiff on each micro-batch.
    Model(Box<Llama<B>>, Box<LlamaConfig>),
    /// Precomputed per row (by position in the training split).
    Table(Vec<RowLogps>),
    /// The objective reads none (SimPO).
    None,
}

/// Sequences of `rows` in the batch layout `[chosen row-major [B, K+1]; rejected [B, R]]`.
fn sequences<'a>(rows: &[&'a Encoded]) -> Vec<(&'a [u32], &'a [u32])> {
    let chosen = rows
        .iter()
        .flat_map(|r| r.chosen.iter().map(|c| (r.prompt.as_slice(), c.as_slice())));
    let rejected = rows.iter().flat_map(|r| {
        r.rejected
            .iter()
            .map(|c| (r.prompt.as_slice(), c.as_slice()))
    });
    chosen.chain(rejected).collect()
}

/// How the sequences of a micro-batch go through a model.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// The padding id.
    pub pad: u32,
    /// false: one right-padded row per sequence. true: padding-free — sequences packed
    /// best-fit-decreasing into rows no longer than the micro-batch's longest sequence, each
    /// attending only to itself with positions from 0 ([`Llama::forward_packed`]). Rows are
    /// never longer and never more than the padded batch's; short sequences share rows.
    pub packed: bool,
    /// From hidden states to log-probs: the fused head (default) or the dense logits.
    pub head: Head,
    /// Layer checkpointing of the policy forward ([`super::recompute`]).
    pub checkpoint: bool,
}

/// The sequences of a micro-batch laid out for the decoder (padded or packed), and how their
/// summed log-probs follow from the final hidden states.
pub struct SeqBatch<B: Backend> {
    /// `[R, T]` token ids.
    pub input_ids: Tensor<B, 2, Int>,
    /// RoPE tables and segment ids shared by the layers.
    pub inputs: LayerInputs<B>,
    /// `[R, T]` shifted labels ([`crate::logps::Batch::labels`]).
    labels: Tensor<B, 2, Int>,
    /// Scored positions, owners = sequence index in `seqs` order.
    scored: Scored,
    /// Packed rows: host segment ids and the sequences of each row (for the dense path's sums).
    packed: Option<(Vec<u32>, Vec<Vec<usize>>)>,
    /// Sequences.
    n: usize,
    head: Head,
}

impl<B: KernelBackend> SeqBatch<B> {
    /// Lay out `seqs` (prompt, completion) as `layout` says.
    pub fn new(
        cfg: &LlamaConfig,
        seqs: &[(&[u32], &[u32])],
        layout: Layout,
        device: &B::Device,
    ) -> Self {
        let n = seqs.len();
        if !layout.packed {
            let batch = make_batch::<B>(seqs, layout.pad, device);
            return SeqBatch {
                inputs: LayerInputs::padded(cfg, batch.valid),
                input_ids: batch.input_ids,
                labels: batch.labels,
                scored: batch.scored,
                packed: None,
                n,
                head: layout.head,
            };
        }
        let lens: Vec<usize> = seqs.iter().map(|(p, c)| p.len() + c.len()).collect();
        let bins = pack_bfd(&lens, lens.iter().copied().max().unwrap_or(1));
        let rows: Vec<Vec<(&[u32], &[u32])>> = bins
            .iter()
            .map(|b| b.iter().map(|&i| seqs[i]).collect())
            .collect();
        let mut packed = make_packed_batch::<B>(&rows, layout.pad, device);
        // The packed batch names sequences by their ordinal in packing order (`bins.concat()`).
        let order = bins.concat();
        let owner = std::mem::take(&mut packed.scored.owner);
        packed.scored.owner = owner.iter().map(|&o| order[o as usize] as i64).collect();
        let inputs = LayerInputs::packed(
            cfg,
            packed.input_ids.dims(),
            &packed.segments,
            &packed.positions,
            device,
        );
        SeqBatch {
            input_ids: packed.input_ids,
            inputs,
            labels: packed.labels,
            scored: packed.scored,
            packed: Some((packed.segments, bins)),
            n,
            head: layout.head,
        }
    }

    /// Summed completion log-probs of each sequence from the final hidden states `[R, T, H]` of
    /// [`Self::input_ids`] under `model`. Returns `[N]`, in `seqs` order.
    pub fn sums(&self, model: &Llama<B>, hidden: Tensor<B, 3>) -> Tensor<B, 1> {
        let n = self.n;
        if self.head.imp == HeadImpl::Fused {
            if let Some(sums) = fused_sums(model, hidden.clone(), &self.scored, n, self.head) {
                return sums;
            }
        }
        let Some((segments, bins)) = &self.packed else {
            return sequence_logprobs(model.head(hidden), self.labels.clone()).0;
        };
        let [r, t] = self.labels.dims();
        let tokens = token_logprobs(model.head(hidden), self.labels.clone()); // [R, T]
                                                                              // Segment sums as one matmul with a 0/1 [R·T, N] matrix: token (row, t) of segment s
                                                                              // belongs to sequence bins[row][s − 1]; padding (segment 0) to none.
        let mut onehot = vec![0f32; r * t * n];
        for (i, &seg) in segments.iter().enumerate() {
            if seg > 0 {
                onehot[i * n + bins[i / t][seg as usize - 1]] = 1.0;
            }
        }
        let owner =
            Tensor::<B, 2>::from_data(TensorData::new(onehot, [r * t, n]), &self.labels.device());
        tokens.reshape([1, r * t]).matmul(owner).reshape([n])
    }
}

/// Summed completion log-probs of each of `seqs` under `model`, in either layout (no
/// checkpointing: for models without autodiff, or one plain autodiff forward).
///
/// # Shapes
/// - returns `[N]`, N = `seqs.len()`
pub fn sequence_logps<B: KernelBackend>(
    model: &Llama<B>,
    cfg: &LlamaConfig,
    seqs: &[(&[u32], &[u32])],
    layout: Layout,
    device: &B::Device,
) -> Tensor<B, 1> {
    let batch = SeqBatch::<B>::new(cfg, seqs, layout, device);
    let hidden = model
        .model
        .forward_inputs(batch.input_ids.clone(), &batch.inputs);
    batch.sums(model, hidden)
}

fn to_2d<B: Backend>(v: Vec<f32>, shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn host(x: Tensor<impl Backend, 2>) -> Vec<f32> {
    x.into_data().convert::<f32>().to_vec().expect("f32")
}

/// Policy and reference log-probs of a group of rows, `([B, K+1], [B, R])` each.
struct Logps<B: Backend> {
    chosen: Tensor<B, 2>,
    rejected: Tensor<B, 2>,
}

fn split<B: Backend>(sums: Tensor<B, 1>, b: usize, k1: usize, r: usize) -> Logps<B> {
    Logps {
        chosen: sums.clone().narrow(0, 0, b * k1).reshape([b, k1]),
        rejected: sums.narrow(0, b * k1, b * r).reshape([b, r]),
    }
}

fn reference_logps<B: KernelBackend>(
    reference: &Reference<B>,
    rows: &[&Encoded],
    idx: &[usize],
    layout: Layout,
    device: &B::Device,
) -> Logps<B> {
    let (b, k1, r) = (rows.len(), rows[0].chosen.len(), rows[0].rejected.len());
    match reference {
        Reference::Model(m, ref_cfg) => {
            let sums = sequence_logps(m, ref_cfg, &sequences(rows), layout, device);
            split(sums, b, k1, r)
        }
        Reference::Table(t) => {
            let c = idx
                .iter()
                .flat_map(|&i| t[i].chosen.iter().map(|&x| x as f32));
            let rj = idx
                .iter()
                .flat_map(|&i| t[i].rejected.iter().map(|&x| x as f32));
            Logps {
                chosen: to_2d(c.collect(), [b, k1], device),
                rejected: to_2d(rj.collect(), [b, r], device),
            }
        }
        Reference::None => Logps {
            chosen: Tensor::zeros([b, k1], device),
            rejected: Tensor::zeros([b, r], device),
        },
    }
}

fn token_counts<B: Backend>(rows: &[&Encoded], device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let (b, k1, r) = (rows.len(), rows[0].chosen.len(), rows[0].rejected.len());
    let c = rows
        .iter()
        .flat_map(|x| x.chosen.iter().map(|c| c.len() as f32));
    let rj = rows
        .iter()
        .flat_map(|x| x.rejected.iter().map(|c| c.len() as f32));
    (
        to_2d(c.collect(), [b, k1], device),
        to_2d(rj.collect(), [b, r], device),
    )
}

/// Per-row statistics from the loss output and the policy log-probs.
#[allow(clippy::too_many_arguments)]
fn row_stats<B: Backend>(
    alpha: f64,
    b: usize,
    k1: usize,
    r: usize,
    policy: &Logps<B>,
    out: &wrpo_kernels::loss::LossOutput<B>,
) -> Vec<RowStats> {
    let pc = host(policy.chosen.clone());
    let pr = host(policy.rejected.clone());
    let flat = |t: &Tensor<B, 1>| -> Vec<f32> {
        t.clone()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32")
    };
    let (cw, cs, ct) = (
        flat(&out.chosen_rewards),
        flat(&out.source_rewards),
        flat(&out.target_rewards),
    );
    let rr = host(out.rejected_rewards.clone());
    (0..b)
        .map(|i| RowStats {
            alpha,
            policy_chosen: pc[i * k1..(i + 1) * k1].iter().map(|&x| x as f64).collect(),
            policy_rejected: pr[i * r..(i + 1) * r].iter().map(|&x| x as f64).collect(),
            reward_chosen: cw[i] as f64,
            reward_source: cs[i] as f64,
            reward_target: ct[i] as f64,
            reward_rejected: rr[i * r..(i + 1) * r].iter().map(|&x| x as f64).collect(),
        })
        .collect()
}

/// What one micro-batch produced.
pub struct MicroOut<B: Backend> {
    /// `d(loss · scale)/dθ`, flat, in the parameters' order.
    pub grads: Vec<Tensor<B, 1>>,
    /// Mean loss of the micro-batch.
    pub loss: f64,
    /// Per-row statistics.
    pub rows: Vec<RowStats>,
    /// Real (non-padding) tokens through the policy forward.
    pub tokens: usize,
}

/// Forward + backward of one micro-batch with the policy `params`. `idx` are the rows' positions
/// in the split (for a reference table); `layout` says how sequences are batched (policy and
/// reference model alike); `scale` multiplies the loss before backward (rows in this micro-batch
/// / rows in the global batch, so that gradients add up to the global-batch mean).
#[allow(clippy::too_many_arguments)]
pub fn micro_step<B: KernelBackend>(
    cfg: &LlamaConfig,
    params: &Params<B>,
    reference: &Reference<B>,
    loss_cfg: &LossConfig,
    rows: &[&Encoded],
    idx: &[usize],
    layout: Layout,
    scale: f64,
    device: &B::Device,
) -> MicroOut<B> {
    type A<B> = Autodiff<B>;
    let (b, k1, r) = (rows.len(), rows[0].chosen.len(), rows[0].rejected.len());
    let policy_model: Llama<A<B>> = params.leaf_model(cfg);
    let seqs = sequences(rows);
    let tokens = seqs.iter().map(|(p, c)| p.len() + c.len()).sum();
    let refs = reference_logps(reference, rows, idx, layout, device);
    let (ct, rt) = token_counts::<B>(rows, device);
    let batch = SeqBatch::<A<B>>::new(cfg, &seqs, layout, device);
    let (grads, (policy, out)) = super::recompute::backward(
        cfg,
        params,
        &policy_model,
        batch.input_ids.clone(),
        &batch.inputs,
        layout.checkpoint,
        |hidden| {
            let policy = split(batch.sums(&policy_model, hidden), b, k1, r);
            let out = preference_loss_fused(
                loss_cfg,
                PreferenceInputs {
                    policy_chosen: policy.chosen.clone(),
                    policy_rejected: policy.rejected.clone(),
                    reference_chosen: Tensor::from_inner(refs.chosen),
                    reference_rejected: Tensor::from_inner(refs.rejected),
                    chosen_tokens: Tensor::from_inner(ct),
                    rejected_tokens: Tensor::from_inner(rt),
                },
            );
            (out.loss.clone() * scale, (policy, out))
        },
    );
    let loss: f32 = burn::tensor::ElementConversion::elem(out.loss.clone().into_scalar());
    let inner = |l: &Logps<A<B>>| Logps {
        chosen: l.chosen.clone().inner(),
        rejected: l.rejected.clone().inner(),
    };
    let out_inner = wrpo_kernels::loss::LossOutput {
        loss: out.loss.inner(),
        chosen_rewards: out.chosen_rewards.inner(),
        source_rewards: out.source_rewards.inner(),
        target_rewards: out.target_rewards.inner(),
        rejected_rewards: out.rejected_rewards.inner(),
    };
    MicroOut {
        grads,
        loss: loss as f64,
        rows: row_stats(loss_cfg.alpha, b, k1, r, &inner(&policy), &out_inner),
        tokens,
    }
}

/// Loss and statistics of a group of rows without gradients (evaluation).
#[allow(clippy::too_many_arguments)]
pub fn eval_step<B: KernelBackend>(
    cfg: &LlamaConfig,
    policy_model: &Llama<B>,
    reference: &Reference<B>,
    loss_cfg: &LossConfig,
    rows: &[&Encoded],
    idx: &[usize],
    layout: Layout,
    device: &B::Device,
) -> (f64, Vec<RowStats>) {
    let (b, k1, r) = (rows.len(), rows[0].chosen.len(), rows[0].rejected.len());
    let sums = sequence_logps(policy_model, cfg, &sequences(rows), layout, device);
    let policy = split(sums, b, k1, r);
    let refs = reference_logps(reference, rows, idx, layout, device);
    let (ct, rt) = token_counts::<B>(rows, device);
    let out = preference_loss_fused(
        loss_cfg,
        PreferenceInputs {
            policy_chosen: policy.chosen.clone(),
            policy_rejected: policy.rejected.clone(),
            reference_chosen: refs.chosen,
            reference_rejected: refs.rejected,
            chosen_tokens: ct,
            rejected_tokens: rt,
        },
    );
    let loss: f32 = burn::tensor::ElementConversion::elem(out.loss.clone().into_scalar());
    let stats = row_stats(loss_cfg.alpha, b, k1, r, &policy, &out);
    (loss as f64, stats)
}
