//! A linear layer over a **frozen weight stored in another dtype** (a bf16/f16 base model under
//! LoRA): `y = x · cast(W)ᵀ`, the weight upcast to the activations' dtype at compute time.
//!
//! Formula: `y[m, n] = Σ_k x[m, k]·W[n, k]` with `W` widened exactly (every bf16/f16 value is an
//! f32 value), so the result equals the f32 matmul over a weight loaded as f32. Backward, for an
//! upstream gradient `dy [M, N]`: `dx = dy · cast(W)` (`[M, K]`); the weight gets none.
//!
//! Why an op: under Burn's autodiff, `x.matmul(w.cast(F32).transpose())` keeps the **f32 cast**
//! of the weight alive until the backward (the matmul's saved right operand). Over a whole model
//! that is a second, f32 copy of every frozen weight — 6 bytes per parameter instead of 2. The
//! node here keeps the stored (half) weight, a handle to a tensor that lives anyway, and widens it
//! again inside the backward: the f32 copy exists for one matmul at a time.
//!
//! # Tiers
//! - [`frozen_linear_reference`]: the composite (cast, then matmul), differentiated by Burn's
//!   autodiff: the oracle, and what every inner backend runs.
//! - `backward`: [`FrozenLinearBackend`] for `Autodiff<B>`: the composite forward on the inner
//!   backend plus a node over `x` only, whose state is the stored weight. A weight that does
//!   require a gradient falls back to the composite under Burn's autodiff (correct, just without
//!   the memory saving).
//!
//! # Shapes
//! `x: [M, K]` (compute dtype), `weight: [N, K]` (any float dtype the backend stores), returns
//! `[M, N]` in `x`'s dtype.

use burn::tensor::{backend::Backend, ops::FloatTensor, DType, FloatDType, Tensor};

use crate::{float, prim};

mod backward;
#[cfg(test)]
mod tests;

/// Backend extension: a linear layer over a weight stored in another float dtype.
///
/// The default methods are the composite ([`frozen_linear_reference`] and its transpose), which
/// every inner backend uses; `Autodiff` overrides the forward to register a node that keeps the
/// stored weight instead of its upcast copy.
pub trait FrozenLinearBackend: Backend {
    /// `x · cast(weight)ᵀ`.
    ///
    /// # Shapes
    /// `x: [M, K]`, `weight: [N, K]`; returns `[M, N]` in `x`'s dtype.
    fn frozen_linear_forward(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        prim(frozen_linear_reference::<Self>(float(x), float(weight)))
    }

    /// `weight` widened to `dtype` (a copy; the same tensor when it is already in `dtype`).
    /// Default: the backend's cast.
    fn widen(weight: FloatTensor<Self>, dtype: FloatDType) -> FloatTensor<Self> {
        Self::float_cast(weight, dtype)
    }

    /// `dx = dy · cast(weight)`.
    ///
    /// # Shapes
    /// `dy: [M, N]`, `weight: [N, K]`; returns `[M, K]` in `dy`'s dtype.
    fn frozen_linear_backward(
        dy: FloatTensor<Self>,
        weight: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let dy: Tensor<Self, 2> = float(dy);
        let w = widen_like(float(weight), &dy);
        prim(dy.matmul(w))
    }
}

/// burn-flex (the `cpu` backend): the composite, widening bf16/f16 to f32 in one pass (burn-flex's
/// own cast goes through an f64 copy: 12 bytes per element at once instead of 4).
impl FrozenLinearBackend for burn::backend::Flex {
    fn widen(weight: FloatTensor<Self>, dtype: FloatDType) -> FloatTensor<Self> {
        use burn::backend::flex::FlexTensor;
        use burn::tensor::ops::FloatTensorOps;
        use burn::tensor::{bf16, f16, TensorData, TensorMetadata};
        if DType::from(dtype) != DType::F32 || weight.dtype() == DType::F32 {
            return Self::float_cast(weight, dtype);
        }
        let w = weight.to_contiguous();
        let values: Vec<f32> = match w.dtype() {
            DType::BF16 => w.storage::<bf16>().iter().map(|x| x.to_f32()).collect(),
            DType::F16 => w.storage::<f16>().iter().map(|x| x.to_f32()).collect(),
            _ => return Self::float_cast(w, dtype),
        };
        FlexTensor::from_data(TensorData::new(values, w.shape()))
    }
}

/// CubeCL backends (CUDA, WGPU): the composite (a cast kernel, then Burn's matmul).
impl<R, F, I, BT> FrozenLinearBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::element::BoolElement,
{
}

/// `w` in `like`'s dtype through [`FrozenLinearBackend::widen`] (no op when they agree): a weight
/// stored in half precision widened to the compute dtype at the point of use.
pub fn widen_like<B: FrozenLinearBackend, const D: usize, const E: usize>(
    w: Tensor<B, D>,
    like: &Tensor<B, E>,
) -> Tensor<B, D> {
    widen_to(w, like.dtype())
}

/// `w` in `dtype` through [`FrozenLinearBackend::widen`] (no op when it already is).
pub fn widen_to<B: FrozenLinearBackend, const D: usize>(
    w: Tensor<B, D>,
    dtype: DType,
) -> Tensor<B, D> {
    if w.dtype() == dtype {
        return w;
    }
    let dtype: FloatDType = dtype.into();
    float(B::widen(prim(w), dtype))
}

/// The composite: `x · cast(weight)ᵀ`. Shapes as in the module docs.
pub fn frozen_linear_reference<B: FrozenLinearBackend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let w = widen_like(weight, &x);
    x.matmul(w.transpose())
}

/// `x · cast(weight)ᵀ` through [`FrozenLinearBackend`] (under `Autodiff`, the node that keeps the
/// stored weight). Shapes as in the module docs.
pub fn frozen_linear<B: FrozenLinearBackend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
) -> Tensor<B, 2> {
    float(B::frozen_linear_forward(prim(x), prim(weight)))
}
