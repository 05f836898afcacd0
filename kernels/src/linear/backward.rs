//! [`FrozenLinearBackend`] for `Autodiff<B, C>`: the inner backend's composite forward plus a node
//! over `x` alone, whose state is the stored weight (see the module docs of [`super`]).

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::{backend::AutodiffBackend, ops::FloatTensor};

use super::FrozenLinearBackend;
use crate::{float, prim};

/// Backward node: `dx = dy · cast(W)`.
#[derive(Debug)]
struct FrozenLinearBackward;

impl<B: FrozenLinearBackend> Backward<B, 1> for FrozenLinearBackward {
    /// The stored weight `[N, K]` (a handle: no copy).
    type State = FloatTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_x] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::frozen_linear_backward(dy, ops.state));
        }
    }
}

impl<B: FrozenLinearBackend, C: CheckpointStrategy> FrozenLinearBackend for Autodiff<B, C> {
    fn frozen_linear_forward(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        if !weight.node.requirement.is_none() {
            // A weight that wants a gradient: Burn's own autodiff through the composite.
            return prim(super::frozen_linear_reference::<Self>(
                float(x),
                float(weight),
            ));
        }
        let w = weight.primitive;
        match FrozenLinearBackward
            .prepare::<C>([x.node.clone()])
            // Compute bound: keep the state (the weight) instead of recomputing.
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::frozen_linear_forward(x.primitive, w.clone());
                prep.finish(w, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::frozen_linear_forward(x.primitive, w)),
        }
    }

    fn frozen_linear_backward(
        dy: FloatTensor<Self>,
        weight: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::frozen_linear_backward(
            Self::inner(dy),
            Self::inner(weight),
        ))
    }
}
