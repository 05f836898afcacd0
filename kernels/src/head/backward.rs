//! [`HeadLogProbBackend`] for `Autodiff<B, C>`: the inner backend's chunked forward, plus a custom
//! backward node over the hidden states and the head weight that calls
//! `B::head_logprobs_backward` with the saved log-sum-exp (pattern: Burn's
//! `examples/custom-cubecl-kernel`, v0.21.0, and [`crate::logprobs`]'s node).
//!
//! What the node keeps until the backward: the hidden states `[M, H]` and the weight `[V, H]`
//! (both checkpointed; the weight is a parameter and alive anyway), the labels `[M]` and
//! `lse [M]` — never a logits block. Only `logp` is differentiable; `lse` is returned untracked.

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

use super::HeadLogProbBackend;

/// Backward node of the fused head: `dhidden = dz·W`, `dW = dzᵀ·hidden`, block by block.
#[derive(Debug)]
struct HeadLogProbsBackward;

impl<B: HeadLogProbBackend> Backward<B, 2> for HeadLogProbsBackward {
    /// (checkpointed hidden `[M, H]`, checkpointed weight `[V, H]`, labels `[M]`, lse `[M]`,
    /// chunk).
    type State = (NodeId, NodeId, IntTensor<B>, FloatTensor<B>, usize);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_hidden, node_weight] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (hidden_id, weight_id, labels, lse, chunk) = ops.state;
        let hidden: FloatTensor<B> = checkpointer.retrieve_node_output(hidden_id);
        let weight: FloatTensor<B> = checkpointer.retrieve_node_output(weight_id);
        let (dh, dw) = B::head_logprobs_backward(
            hidden,
            weight,
            labels,
            lse,
            grad,
            chunk,
            node_hidden.is_some(),
            node_weight.is_some(),
        );
        if let (Some(node), Some(dh)) = (node_hidden, dh) {
            grads.register::<B>(node.id, dh);
        }
        if let (Some(node), Some(dw)) = (node_weight, dw) {
            grads.register::<B>(node.id, dw);
        }
    }
}

impl<B: HeadLogProbBackend, C: CheckpointStrategy> HeadLogProbBackend for Autodiff<B, C> {
    fn head_logprobs_forward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        labels: IntTensor<Self>,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match HeadLogProbsBackward
            .prepare::<C>([hidden.node.clone(), weight.node.clone()])
            // Compute bound: keep the state; the backward recomputes the blocks itself.
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let hidden_id = prep.checkpoint(&hidden);
                let weight_id = prep.checkpoint(&weight);
                let (logp, lse) = B::head_logprobs_forward(
                    hidden.primitive,
                    weight.primitive,
                    labels.clone(),
                    chunk,
                );
                let logp = prep.finish((hidden_id, weight_id, labels, lse.clone(), chunk), logp);
                (logp, Self::from_inner(lse))
            }
            OpsKind::UnTracked(prep) => {
                let (logp, lse) =
                    B::head_logprobs_forward(hidden.primitive, weight.primitive, labels, chunk);
                (prep.finish(logp), Self::from_inner(lse))
            }
        }
    }

    fn head_logprobs_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        labels: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        chunk: usize,
        want_hidden: bool,
        want_weight: bool,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        let (dh, dw) = B::head_logprobs_backward(
            Self::inner(hidden),
            Self::inner(weight),
            labels,
            Self::inner(lse),
            Self::inner(grad),
            chunk,
            want_hidden,
            want_weight,
        );
        (dh.map(Self::from_inner), dw.map(Self::from_inner))
    }
}
