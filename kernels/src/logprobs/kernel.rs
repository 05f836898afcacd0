//! Fused CubeCL kernels for token log-probs, one source for every CubeCL runtime (CUDA, WGPU).
//!
//! Forward, one cube per row `(n, t)`, [`CUBE_SIZE`] units striding over `V` (coalesced reads):
//! - each unit keeps an online `(m, s)` with `s = Σ exp(z − m)` over its columns
//!   (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"): one read of each
//!   logit, one `exp` per logit;
//! - the units' pairs are merged by a plain shared-memory tree
//!   (`m = max(m₁, m₂)`, `s = s₁·exp(m₁ − m) + s₂·exp(m₂ − m)`) — no plane/subgroup operations,
//!   so it runs on devices without them (Mesa lavapipe);
//! - unit 0 writes `lse = m + ln s` and `logp = z[y] − lse`.
//!
//! Backward, one cube per row, units striding over `V`: `dz = g·(1[v = y] − exp(z − lse))`, reading
//! each logit once and writing each gradient once; no softmax tensor is materialised.
//!
//! Dtypes: logits, `logp`, `lse`, the upstream gradient and `dlogits` are in the logits' float
//! dtype `F` (f32 on our backends); every load is converted to f32 and all arithmetic (max, `exp`,
//! sums, `ln`, products) is f32; results are converted back to `F` on store. Labels are read in
//! their int dtype and converted to i32 (token ids and −100 fit).
//!
//! Indexing: positions are `usize` in the kernels; each launch picks the address type from the
//! largest buffer ([`address_type_for_len`]): u32 while every buffer has at most `u32::MAX`
//! elements, u64 beyond. There is no signed 32-bit arithmetic on offsets, so the production size
//! 8 × 2048 × 151936 ≈ 2.5e9 (> 2^31) is addressed exactly in u32 and larger tensors in u64. The
//! offset formula is one function, [`fn@logit_offset`], unit-tested on large values.
//!
//! Labels outside `0..V` (other than the ignore index) give `logp = +inf`, an impossible value
//! for a log-probability, so a bad label poisons the loss instead of silently reading column 0.

use burn::tensor::{DType, Shape};
use burn_cubecl::{
    element::BoolElement, kernel::into_contiguous, tensor::CubeTensor, CubeBackend, CubeRuntime,
    FloatElement, IntElement,
};
use cubecl::prelude::*;

use super::LogProbBackend;
use crate::IGNORE_INDEX;

/// Units per cube (workgroup). 256 is within every target's limit (lavapipe: 1024) and enough
/// in-flight loads per row for bandwidth on GPUs.
/// The shared-memory tree merge halves the active units each step, so this must be a power of two.
pub(crate) const CUBE_SIZE: u32 = 256;
const _: () = assert!(CUBE_SIZE.is_power_of_two());

/// Cubes per grid dimension; WebGPU/Vulkan guarantee 65535. Rows beyond it use a second dimension.
const MAX_CUBES_PER_DIM: usize = 65_535;

/// Smallest finite f32 used as the running max of a unit that has read nothing: WGSL cannot spell
/// `-inf` as a literal, and `exp(SENTINEL − x)` underflows to 0 for any finite `x`.
const NEG_SENTINEL: f32 = -3.0e38;

/// Flat offset of logit `(n, t, v)` in a `[N, T, V]` buffer with strides `(stride_n, stride_t, 1)`.
///
/// All terms are unsigned and of the kernel's address width (u32 up to `u32::MAX` elements, u64
/// beyond), so no intermediate is truncated to 31 bits.
#[cube]
pub(crate) fn logit_offset(
    n: usize,
    t: usize,
    v: usize,
    stride_n: usize,
    stride_t: usize,
) -> usize {
    n * stride_n + t * stride_t + v
}

/// Address width for a launch whose largest buffer has `len` elements: u32 indices cover
/// `0..=u32::MAX`, wider buffers need u64.
pub(crate) fn address_type_for_len(len: usize) -> AddressType {
    AddressType::from_len(len)
}

/// Forward: `logp[n,t] = z[n,t,y] − lse[n,t]`, `lse[n,t] = log Σ_v exp(z[n,t,v])`; both 0 where
/// `y == ignore_index`. f32 accumulation (see the module docs).
///
/// # Shapes
/// - `logits`: `[N, T, V]` with unit stride along `V`
/// - `labels`: `[N, T]`
/// - `logp`, `lse`: `[N, T]` (outputs)
/// - one cube per row `n·T + t` ([`row_cube_count`]), `cube_size` units
#[cube(launch, address_type = "dynamic")]
fn token_logprobs_forward_kernel<F: Float, I: Numeric>(
    logits: &Tensor<F>,
    labels: &Tensor<I>,
    logp: &mut Tensor<F>,
    lse: &mut Tensor<F>,
    ignore_index: i32,
    #[comptime] cube_size: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let seq_len = logits.shape(1);
    let vocab = logits.shape(2);
    let rows = logits.shape(0) * seq_len;
    let row = CUBE_POS;
    let unit = UNIT_POS as usize;
    let in_range = row < rows;
    let n = row / seq_len;
    let t = row % seq_len;

    let mut label = ignore_index;
    if in_range {
        label = i32::cast_from(labels[n * labels.stride(0) + t * labels.stride(1)]);
    }
    let scored = label != ignore_index;

    // Per-unit online max / sum of exponentials over columns unit, unit + CUBE_DIM, ...
    let mut m = f32::new(NEG_SENTINEL);
    let mut s = f32::new(0.0);
    if scored {
        let (stride_n, stride_t) = (logits.stride(0), logits.stride(1));
        let mut col = unit;
        while col < vocab {
            let x = f32::cast_from(logits[logit_offset(n, t, col, stride_n, stride_t)]);
            if x > m {
                s = s * (m - x).exp() + f32::new(1.0);
                m = x;
            } else {
                s += (x - m).exp();
            }
            col += CUBE_DIM as usize;
        }
    }

    // Tree merge in shared memory. Every unit reaches every barrier (no early exit), which WGSL's
    // uniformity rules require.
    let mut sm_max = SharedMemory::<f32>::new(cube_size);
    let mut sm_sum = SharedMemory::<f32>::new(cube_size);
    sm_max[unit] = m;
    sm_sum[unit] = s;
    sync_cube();
    let mut half = CUBE_DIM as usize / 2;
    while half > 0 {
        if unit < half {
            let (m1, s1) = (sm_max[unit], sm_sum[unit]);
            let (m2, s2) = (sm_max[unit + half], sm_sum[unit + half]);
            let mx = f32::max(m1, m2);
            sm_sum[unit] = s1 * (m1 - mx).exp() + s2 * (m2 - mx).exp();
            sm_max[unit] = mx;
        }
        sync_cube();
        half /= 2;
    }

    if unit == 0 && in_range {
        let out = n * logp.stride(0) + t * logp.stride(1);
        let out_lse = n * lse.stride(0) + t * lse.stride(1);
        if scored {
            let total = sm_max[0] + sm_sum[0].ln();
            // +inf (exp overflow from a runtime value: WGSL has no inf literal) for a bad label.
            let mut value = (f32::cast_from(vocab) + f32::new(100.0)).exp() * f32::new(1.0e30);
            if label >= 0 && label < i32::cast_from(vocab) {
                let y = usize::cast_from(label);
                let z = logits[logit_offset(n, t, y, logits.stride(0), logits.stride(1))];
                value = f32::cast_from(z) - total;
            }
            logp[out] = F::cast_from(value);
            lse[out_lse] = F::cast_from(total);
        } else {
            logp[out] = F::new(0.0);
            lse[out_lse] = F::new(0.0);
        }
    }
}

/// Backward: `dlogits[n,t,v] = g[n,t]·(1[v = y] − exp(z[n,t,v] − lse[n,t]))`, 0 on ignored rows.
/// Reads each logit once, writes each gradient once. f32 arithmetic (see the module docs).
///
/// # Shapes
/// - `logits`: `[N, T, V]` with unit stride along `V`
/// - `labels`, `lse`, `grad`: `[N, T]` (any strides, e.g. a broadcast upstream gradient)
/// - `dlogits`: `[N, T, V]` with unit stride along `V` (output)
/// - one cube per row `n·T + t` ([`row_cube_count`]), units striding over `V`
#[cube(launch, address_type = "dynamic")]
fn token_logprobs_backward_kernel<F: Float, I: Numeric>(
    logits: &Tensor<F>,
    labels: &Tensor<I>,
    lse: &Tensor<F>,
    grad: &Tensor<F>,
    dlogits: &mut Tensor<F>,
    ignore_index: i32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let seq_len = logits.shape(1);
    let vocab = logits.shape(2);
    let rows = logits.shape(0) * seq_len;
    let row = CUBE_POS;
    if row < rows {
        let n = row / seq_len;
        let t = row % seq_len;
        let label = i32::cast_from(labels[n * labels.stride(0) + t * labels.stride(1)]);
        let scored = label != ignore_index;
        let mut g = f32::new(0.0);
        let mut l = f32::new(0.0);
        if scored {
            g = f32::cast_from(grad[n * grad.stride(0) + t * grad.stride(1)]);
            l = f32::cast_from(lse[n * lse.stride(0) + t * lse.stride(1)]);
        }
        let (in_n, in_t) = (logits.stride(0), logits.stride(1));
        let (out_n, out_t) = (dlogits.stride(0), dlogits.stride(1));
        let mut col = UNIT_POS as usize;
        while col < vocab {
            let mut d = f32::new(0.0);
            if scored {
                let p = (f32::cast_from(logits[logit_offset(n, t, col, in_n, in_t)]) - l).exp();
                let mut hot = f32::new(0.0);
                if i32::cast_from(col) == label {
                    hot = f32::new(1.0);
                }
                d = g * (hot - p);
            }
            dlogits[logit_offset(n, t, col, out_n, out_t)] = F::cast_from(d);
            col += CUBE_DIM as usize;
        }
    }
}

/// One cube per row; rows beyond 65535 spill into the second grid dimension (the kernels read
/// the linear `CUBE_POS` and skip positions `≥ rows`).
pub(crate) fn row_cube_count(rows: usize) -> CubeCount {
    let x = rows.clamp(1, MAX_CUBES_PER_DIM);
    let y = rows.div_ceil(x).max(1);
    assert!(
        y <= MAX_CUBES_PER_DIM,
        "token log-probs: {rows} rows exceed the launch grid"
    );
    CubeCount::Static(x as u32, y as u32, 1)
}

/// Make the vocabulary the unit-stride dimension (a no-op for ordinary row-major logits, and for
/// slices along `N`/`T`, which keep unit stride along `V`).
fn unit_vocab_stride<R: CubeRuntime>(logits: CubeTensor<R>) -> CubeTensor<R> {
    if logits.meta.strides()[2] == 1 {
        logits
    } else {
        into_contiguous(logits)
    }
}

/// Output buffer. In this crate's tests it is filled with NaN first, so an element the kernel
/// fails to write is caught by the parity checks ("poisoned outputs").
pub(crate) fn output<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape) -> CubeTensor<R> {
    let (client, device, dtype) = (like.client.clone(), like.device.clone(), like.dtype);
    if cfg!(test) {
        burn_cubecl::ops::numeric::full_device_dtype(
            client,
            shape,
            device,
            InputScalar::new(f32::NAN, dtype),
            dtype,
        )
    } else {
        burn_cubecl::ops::numeric::empty_device_dtype(client, device, shape, dtype)
    }
}

/// The address type that covers every buffer of a launch.
pub(crate) fn largest(tensors: &[&CubeTensor<impl CubeRuntime>]) -> AddressType {
    tensors
        .iter()
        .map(|t| address_type_for_len(t.handle.size() as usize / t.dtype.size()))
        .max()
        .unwrap_or_default()
}

fn dims3<R: CubeRuntime>(logits: &CubeTensor<R>, labels: &CubeTensor<R>) -> [usize; 3] {
    let shape = logits.meta.shape();
    assert_eq!(shape.num_dims(), 3, "logits must be [N, T, V]");
    let [n, t, v] = [shape[0], shape[1], shape[2]];
    assert_eq!(
        labels.meta.shape().iter().copied().collect::<Vec<_>>(),
        vec![n, t],
        "labels must be [N, T] matching logits [N, T, V]"
    );
    assert!(v > 0, "token log-probs need a non-empty vocabulary");
    assert!(
        v <= i32::MAX as usize,
        "vocabulary {v} exceeds the i32 label range"
    );
    [n, t, v]
}

/// Launch the forward kernel. Returns (`logp [N, T]`, `lse [N, T]`).
pub(crate) fn forward<R: CubeRuntime>(
    logits: CubeTensor<R>,
    labels: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [n, t, _v] = dims3(&logits, &labels);
    logits.assert_is_on_same_device(&labels);
    let logits = unit_vocab_stride(logits);
    let logp = output(&logits, Shape::new([n, t]));
    let lse = output(&logits, Shape::new([n, t]));
    if n * t == 0 {
        return (logp, lse);
    }
    let address = largest(&[&logits, &labels, &logp, &lse]);
    let dtypes = [logits.dtype.into(), labels.dtype.into()];
    token_logprobs_forward_kernel::launch::<R>(
        &logits.client.clone(),
        row_cube_count(n * t),
        CubeDim::new_1d(CUBE_SIZE),
        address,
        logits.into_tensor_arg(),
        labels.into_tensor_arg(),
        logp.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        IGNORE_INDEX as i32,
        CUBE_SIZE as usize,
        dtypes,
    );
    (logp, lse)
}

/// Launch the backward kernel. Returns `dlogits [N, T, V]`.
pub(crate) fn backward<R: CubeRuntime>(
    logits: CubeTensor<R>,
    labels: CubeTensor<R>,
    lse: CubeTensor<R>,
    grad: CubeTensor<R>,
) -> CubeTensor<R> {
    let [n, t, v] = dims3(&logits, &labels);
    logits.assert_is_on_same_device(&grad);
    let logits = unit_vocab_stride(logits);
    // The upstream gradient and lse must share the logits' dtype (one `F` in the kernel).
    let grad = cast_like(grad, logits.dtype);
    let lse = cast_like(lse, logits.dtype);
    let dlogits = output(&logits, Shape::new([n, t, v]));
    debug_assert_eq!(dlogits.meta.strides()[2], 1);
    if n * t == 0 {
        return dlogits;
    }
    let address = largest(&[&logits, &labels, &lse, &grad, &dlogits]);
    let dtypes = [logits.dtype.into(), labels.dtype.into()];
    token_logprobs_backward_kernel::launch::<R>(
        &logits.client.clone(),
        row_cube_count(n * t),
        CubeDim::new_1d(CUBE_SIZE),
        address,
        logits.into_tensor_arg(),
        labels.into_tensor_arg(),
        lse.into_tensor_arg(),
        grad.into_tensor_arg(),
        dlogits.clone().into_tensor_arg(),
        IGNORE_INDEX as i32,
        dtypes,
    );
    dlogits
}

pub(crate) fn cast_like<R: CubeRuntime>(tensor: CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
    if tensor.dtype == dtype {
        tensor
    } else {
        burn_cubecl::kernel::cast(tensor, dtype)
    }
}

/// The fused kernels on any CubeCL runtime: `CubeBackend<CudaRuntime, …>` (= `burn::backend::Cuda`
/// without fusion) and `CubeBackend<WgpuRuntime, …>` (= `burn::backend::Wgpu` without fusion).
impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> LogProbBackend
    for CubeBackend<R, F, I, BT>
{
    fn token_logprobs_forward(
        logits: CubeTensor<R>,
        labels: CubeTensor<R>,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        forward(logits, labels)
    }

    fn token_logprobs_backward(
        logits: CubeTensor<R>,
        labels: CubeTensor<R>,
        lse: CubeTensor<R>,
        grad: CubeTensor<R>,
    ) -> CubeTensor<R> {
        backward(logits, labels, lse, grad)
    }
}
