//! # wrpo-kernels
//!
//! The hot numeric pieces of a WRPO step, each as a composite reference written with plain Burn
//! tensor ops (the specification and test oracle). Fused CubeCL versions of the same ops live
//! beside their references and are reached only through backend-extension traits whose default is
//! the composite.
//!
//! ## Shapes (symbol glossary)
//! - `N`: sequences in a batch (rows × completions, stacked)
//! - `T`: sequence length (tokens, right-padded)
//! - `V`: vocabulary size
//! - `M`: scored positions of a batch, gathered (the fused head's rows)
//! - `H`: hidden size
//! - `NH`, `NKV`, `HD`: attention heads, key/value heads, head dimension
#![warn(missing_docs)]

pub mod attention;
pub mod device;
pub mod head;
pub mod linear;
pub mod logprobs;
pub mod loss;
#[cfg(test)]
mod test_util;

/// Label value that marks a position as not scored (prompt or padding), as in PyTorch's
/// `CrossEntropyLoss(ignore_index=-100)` and TRL's `label_pad_token_id`.
pub const IGNORE_INDEX: i64 = -100;

/// What the model's forward needs from a backend: the training attention
/// ([`attention::AttentionBackend`]) and linear layers over frozen half-precision weights
/// ([`linear::FrozenLinearBackend`]).
pub trait ModelBackend: attention::AttentionBackend + linear::FrozenLinearBackend {}

impl<B> ModelBackend for B where B: attention::AttentionBackend + linear::FrozenLinearBackend {}

/// Every op the trainer runs through a backend extension: the model's ([`ModelBackend`]), the
/// token log-probs ([`logprobs::LogProbBackend`]), the LM head fused with them
/// ([`head::HeadLogProbBackend`]) and the preference loss ([`loss::LossBackend`]), plus what the
/// device says about its memory ([`device::MemoryProbe`]). Implemented for every backend that has
/// them all (fused CubeCL kernels on CUDA/WGPU, composites on burn-flex, and `Autodiff` of either).
pub trait KernelBackend:
    ModelBackend
    + logprobs::LogProbBackend
    + head::HeadLogProbBackend
    + loss::LossBackend
    + device::MemoryProbe
{
}

impl<B> KernelBackend for B where
    B: ModelBackend
        + logprobs::LogProbBackend
        + head::HeadLogProbBackend
        + loss::LossBackend
        + device::MemoryProbe
{
}

/// A float primitive as a tensor (for the backend-extension traits' default methods).
fn float<B: burn::tensor::backend::Backend, const D: usize>(
    x: burn::tensor::ops::FloatTensor<B>,
) -> burn::tensor::Tensor<B, D> {
    burn::tensor::Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(x))
}

/// A float tensor's primitive.
fn prim<B: burn::tensor::backend::Backend, const D: usize>(
    x: burn::tensor::Tensor<B, D>,
) -> burn::tensor::ops::FloatTensor<B> {
    x.into_primitive().tensor()
}
