//! [`LogProbBackend`] for `Autodiff<B, C>`: the inner backend's forward, plus a custom backward
//! node that calls `B::token_logprobs_backward` with the saved log-sum-exp.
//!
//! Pattern: Burn's `examples/custom-cubecl-kernel` (v0.21.0), `backward.rs` — a stateless
//! `Backward` type, `prepare([parents]).compute_bound().stateful()`, state checkpointed in the
//! forward and read back in the backward.
//!
//! What the node keeps alive until the backward: the logits (checkpointed; the composite's
//! autodiff graph keeps them and several `[N, T, V]` intermediates), the labels and `lse [N, T]`.
//! Only `logp` is differentiable; the returned `lse` is a constant (untracked) tensor, and
//! `token_logprobs_backward` on `Autodiff` is not itself differentiable (no double backward).

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff, NodeId,
};
use burn::tensor::{
    backend::AutodiffBackend,
    ops::{FloatTensor, IntTensor},
};

use super::LogProbBackend;

/// Backward node of the token log-probs: `dz = g·(1[v = y] − exp(z − lse))`.
#[derive(Debug)]
struct TokenLogProbsBackward;

impl<B: LogProbBackend> Backward<B, 1> for TokenLogProbsBackward {
    /// (checkpointed logits `[N, T, V]`, labels `[N, T]`, lse `[N, T]`).
    type State = (NodeId, IntTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_logits] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (logits_id, labels, lse) = ops.state;
        let logits: FloatTensor<B> = checkpointer.retrieve_node_output(logits_id);
        if let Some(node) = node_logits {
            let dlogits = B::token_logprobs_backward(logits, labels, lse, grad);
            grads.register::<B>(node.id, dlogits);
        }
    }
}

impl<B: LogProbBackend, C: CheckpointStrategy> LogProbBackend for Autodiff<B, C> {
    fn token_logprobs_forward(
        logits: FloatTensor<Self>,
        labels: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match TokenLogProbsBackward
            .prepare::<C>([logits.node.clone()])
            // Compute bound: keep the state instead of recomputing the op under checkpointing.
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let logits_id = prep.checkpoint(&logits);
                let (logp, lse) = B::token_logprobs_forward(logits.primitive, labels.clone());
                let logp = prep.finish((logits_id, labels, lse.clone()), logp);
                (logp, Self::from_inner(lse))
            }
            OpsKind::UnTracked(prep) => {
                let (logp, lse) = B::token_logprobs_forward(logits.primitive, labels);
                (prep.finish(logp), Self::from_inner(lse))
            }
        }
    }

    fn token_logprobs_backward(
        logits: FloatTensor<Self>,
        labels: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::token_logprobs_backward(
            Self::inner(logits),
            labels,
            Self::inner(lse),
            Self::inner(grad),
        ))
    }
}
