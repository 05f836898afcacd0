//! Backward through the decoder, with or without activation (layer) checkpointing
//! (`gradient_checkpointing`).
//!
//! Without checkpointing, the policy forward runs under autodiff and one `.backward()` of the
//! loss gives every gradient; every layer's activations live until then.
//!
//! With checkpointing, each decoder layer keeps only its input (`[B, T, H]`), and its activations
//! are recomputed during the backward pass. Burn 0.21 has no layer-level checkpoint API, and a
//! `.backward()` inside a backward op deadlocks on the graph mutex, so the step drives the
//! recompute itself (the second design of the long-sequences issue):
//! 1. the embeddings and every layer run on the inner backend (no graph), keeping each layer's
//!    input `x_l`;
//! 2. from a fresh leaf `x_L`, the final norm, the head and the loss run under autodiff and one
//!    backward gives the norm's and the head's gradients and `g_L = ∂loss/∂x_L`;
//! 3. from the last layer back: a fresh leaf `x_l`, the layer recomputed under autodiff, then
//!    `(layer(x_l) · g_{l+1}).sum().backward()` gives the layer's gradients and `g_l`;
//! 4. `(embed(ids) · g_0).sum().backward()` gives the embeddings' gradient (added to the head's
//!    when tied).
//!
//! Peak activation memory is then the `L + 1` layer inputs plus one layer's activations, for one
//! extra forward of the layers. Gradients are the same up to f32 rounding.

use burn::backend::Autodiff;
use burn::tensor::{Int, Tensor};
use wrpo_kernels::KernelBackend;
use wrpo_models::{LayerInputs, Llama, LlamaConfig};

use super::params::Params;

type A<B> = Autodiff<B>;

/// Run the policy decoder over `input_ids` with `inputs`, hand the final hidden states
/// (`[B, T, H]`, after the last norm) to `top`, which returns the scalar to differentiate (shape
/// `[1]`) and anything else it computed; return the flat gradients of that scalar w.r.t. `params`
/// (in the trainable group's order, zeros where it does not reach) and `top`'s extra output.
///
/// `policy` is `params.leaf_model(cfg)`; `checkpoint` turns on layer checkpointing.
pub fn backward<B: KernelBackend, T>(
    cfg: &LlamaConfig,
    params: &Params<B>,
    policy: &Llama<A<B>>,
    input_ids: Tensor<A<B>, 2, Int>,
    inputs: &LayerInputs<A<B>>,
    checkpoint: bool,
    top: impl FnOnce(Tensor<A<B>, 3>) -> (Tensor<A<B>, 1>, T),
) -> (Vec<Tensor<B, 1>>, T) {
    if !checkpoint {
        let hidden = policy.model.forward_inputs(input_ids, inputs);
        let (loss, extra) = top(hidden);
        return (params.grads_of(policy, &loss.backward()), extra);
    }
    // 1. Forward without a graph, keeping each layer's input.
    let inner = params.train_model(cfg);
    let inner_inputs = LayerInputs::<B> {
        cos: inputs.cos.clone().inner(),
        sin: inputs.sin.clone().inner(),
        q_seg: inputs.q_seg.clone().inner(),
        k_seg: inputs.k_seg.clone().inner(),
        attn: inputs.attn,
    };
    let mut xs = vec![inner.model.embed(input_ids.clone().inner())];
    for layer in &inner.model.layers {
        let x = layer.forward(xs[xs.len() - 1].clone(), &inner_inputs);
        xs.push(x);
    }
    drop(inner);
    let mut acc = vec![None; params.trainable.values.len()];
    // 2. Norm, head and loss from a fresh leaf.
    let x_top =
        Tensor::<A<B>, 3>::from_inner(xs.pop().expect("the last layer's output")).require_grad();
    let (loss, extra) = top(policy.model.norm.forward(x_top.clone()));
    let grads = loss.backward();
    params.trainable.add_grads(&mut acc, policy, &grads);
    let mut g = x_top
        .grad(&grads)
        .unwrap_or_else(|| x_top.clone().inner().zeros_like());
    drop(grads);
    // 3. Each layer, last first.
    for layer in policy.model.layers.iter().rev() {
        let x = Tensor::<A<B>, 3>::from_inner(xs.pop().expect("a layer input")).require_grad();
        let out = layer.forward(x.clone(), inputs);
        let grads = (out * Tensor::from_inner(g)).sum().backward();
        params.trainable.add_grads(&mut acc, policy, &grads);
        g = x
            .grad(&grads)
            .unwrap_or_else(|| x.clone().inner().zeros_like());
    }
    // 4. The embeddings.
    let grads = (policy.model.embed(input_ids) * Tensor::from_inner(g))
        .sum()
        .backward();
    params.trainable.add_grads(&mut acc, policy, &grads);
    (params.trainable.finish_grads(acc), extra)
}
