//! [`AttentionBackend`] for `Autodiff<B, C>`: the inner backend's tiled forward, plus a custom
//! backward node over `q`, `k` and `v` that calls `B::attention_backward` with the saved output
//! and log-sum-exp (the pattern of [`crate::head`]'s node).
//!
//! What the node keeps until the backward: `q`, `k`, `v` (checkpointed), the output
//! `[B, NH, T, HD]`, `lse [B, NH, T]` and the segment ids — never a score block.

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

use super::AttentionBackend;

/// Backward node of the tiled attention.
#[derive(Debug)]
struct AttentionBackward;

/// (checkpointed q, k, v, q_seg, k_seg, out, lse, block).
type State<B> = (
    NodeId,
    NodeId,
    NodeId,
    IntTensor<B>,
    IntTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    usize,
);

impl<B: AttentionBackend> Backward<B, 3> for AttentionBackward {
    type State = State<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_q, node_k, node_v] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let (q_id, k_id, v_id, q_seg, k_seg, out, lse, block) = ops.state;
        let q: FloatTensor<B> = checkpointer.retrieve_node_output(q_id);
        let k: FloatTensor<B> = checkpointer.retrieve_node_output(k_id);
        let v: FloatTensor<B> = checkpointer.retrieve_node_output(v_id);
        let (dq, dk, dv) = B::attention_backward(q, k, v, q_seg, k_seg, out, lse, dout, block);
        for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        q_seg: IntTensor<Self>,
        k_seg: IntTensor<Self>,
        block: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match AttentionBackward
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            // Compute bound: keep the state; the backward recomputes the blocks itself.
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let q_id = prep.checkpoint(&q);
                let k_id = prep.checkpoint(&k);
                let v_id = prep.checkpoint(&v);
                let (out, lse) = B::attention_forward(
                    q.primitive,
                    k.primitive,
                    v.primitive,
                    q_seg.clone(),
                    k_seg.clone(),
                    block,
                );
                let state = (
                    q_id,
                    k_id,
                    v_id,
                    q_seg,
                    k_seg,
                    out.clone(),
                    lse.clone(),
                    block,
                );
                (prep.finish(state, out), Self::from_inner(lse))
            }
            OpsKind::UnTracked(prep) => {
                let (out, lse) = B::attention_forward(
                    q.primitive,
                    k.primitive,
                    v.primitive,
                    q_seg,
                    k_seg,
                    block,
                );
                (prep.finish(out), Self::from_inner(lse))
            }
        }
    }

    fn attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        q_seg: IntTensor<Self>,
        k_seg: IntTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        block: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dq, dk, dv) = B::attention_backward(
            Self::inner(q),
            Self::inner(k),
            Self::inner(v),
            q_seg,
            k_seg,
            Self::inner(out),
            Self::inner(lse),
            Self::inner(dout),
            block,
        );
        (
            Self::from_inner(dq),
            Self::from_inner(dk),
            Self::from_inner(dv),
        )
    }
}
