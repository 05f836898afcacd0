//! [`LossBackend`] for `Autodiff<B, C>`: the inner backend's forward, plus a custom backward node
//! whose parents are the two policy tensors and which calls `B::preference_loss_backward`.
//!
//! Pattern: Burn's `examples/custom-cubecl-kernel` (v0.21.0), `backward.rs` — a stateless
//! `Backward` type, `prepare([parents]).compute_bound().stateful()`, state read back in the
//! backward.
//!
//! State: the six inner input tensors themselves (`[B, K+1]`, `[B, R]`: a few hundred floats), not
//! checkpoint ids. Checkpointing the policy log-probs could make a checkpointing strategy recompute
//! them — a model forward — for a backward that only needs their values.
//!
//! Only the row loss is differentiable; the rewards are returned as constants (untracked), as
//! [`super::preference_loss`] detaches them. Reference log-probs and token counts get no gradient
//! even if they are tracked. `preference_loss_backward` on `Autodiff` is not itself
//! differentiable (no double backward).

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::{Tensor, TensorPrimitive};

use super::{LossBackend, LossConfig, PolicyGrads, PreferenceInputs, RowLoss};

/// Backward node of the row losses: gradients w.r.t. `policy_chosen` and `policy_rejected`.
#[derive(Debug)]
struct PreferenceLossBackward;

impl<B: LossBackend> Backward<B, 2> for PreferenceLossBackward {
    /// (the loss settings, the inner inputs).
    type State = (LossConfig, PreferenceInputs<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_chosen, node_rejected] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (cfg, x) = ops.state;
        if node_chosen.is_none() && node_rejected.is_none() {
            return;
        }
        let g = B::preference_loss_backward(
            &cfg,
            x,
            Tensor::from_primitive(TensorPrimitive::Float(grad)),
        );
        if let Some(node) = node_chosen {
            grads.register::<B>(node.id, g.policy_chosen.into_primitive().tensor());
        }
        if let Some(node) = node_rejected {
            grads.register::<B>(node.id, g.policy_rejected.into_primitive().tensor());
        }
    }
}

/// The inner backend's inputs of an `Autodiff` call.
fn inner<B: LossBackend, C: CheckpointStrategy>(
    x: PreferenceInputs<Autodiff<B, C>>,
) -> PreferenceInputs<B> {
    PreferenceInputs {
        policy_chosen: x.policy_chosen.inner(),
        policy_rejected: x.policy_rejected.inner(),
        reference_chosen: x.reference_chosen.inner(),
        reference_rejected: x.reference_rejected.inner(),
        chosen_tokens: x.chosen_tokens.inner(),
        rejected_tokens: x.rejected_tokens.inner(),
    }
}

impl<B: LossBackend, C: CheckpointStrategy> LossBackend for Autodiff<B, C> {
    fn preference_loss_forward(cfg: &LossConfig, x: PreferenceInputs<Self>) -> RowLoss<Self> {
        let chosen_node = x.policy_chosen.clone().into_primitive().tensor().node;
        let rejected_node = x.policy_rejected.clone().into_primitive().tensor().node;
        let x = inner(x);
        let (rows, loss) = match PreferenceLossBackward
            .prepare::<C>([chosen_node, rejected_node])
            // Compute bound: keep the (tiny) state instead of recomputing under checkpointing.
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let rows = B::preference_loss_forward(cfg, x.clone());
                let loss = prep.finish((*cfg, x), rows.loss.clone().into_primitive().tensor());
                (rows, loss)
            }
            OpsKind::UnTracked(prep) => {
                let rows = B::preference_loss_forward(cfg, x);
                let loss = prep.finish(rows.loss.clone().into_primitive().tensor());
                (rows, loss)
            }
        };
        RowLoss {
            loss: Tensor::from_primitive(TensorPrimitive::Float(loss)),
            chosen_rewards: Tensor::from_inner(rows.chosen_rewards),
            source_rewards: Tensor::from_inner(rows.source_rewards),
            target_rewards: Tensor::from_inner(rows.target_rewards),
            rejected_rewards: Tensor::from_inner(rows.rejected_rewards),
        }
    }

    fn preference_loss_backward(
        cfg: &LossConfig,
        x: PreferenceInputs<Self>,
        grad: Tensor<Self, 1>,
    ) -> PolicyGrads<Self> {
        let g = B::preference_loss_backward(cfg, inner(x), grad.inner());
        PolicyGrads {
            policy_chosen: Tensor::from_inner(g.policy_chosen),
            policy_rejected: Tensor::from_inner(g.policy_rejected),
        }
    }
}
