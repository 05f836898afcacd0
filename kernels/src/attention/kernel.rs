//! FlashAttention-2 kernels for training (Dao 2023, Algorithms 1 and 2), one CubeCL source for
//! every CubeCL runtime (CUDA, WGPU). Formulas, masks and shapes are those of [`super`].
//!
//! Three launches, none of which builds anything `[T, T]` or uses plane (subgroup) operations, so
//! they run on Mesa lavapipe:
//! - **forward**, one cube per `(b, h, block of `[`BLOCK_Q`]` queries)`, one unit per query: the
//!   query row and its output accumulator live in the unit's registers; the cube walks the keys
//!   `0..min(T, q0 + BLOCK_Q)` (causality) in shared-memory tiles of `block_k` keys and values
//!   loaded once per cube; per tile, the unit computes its visible scores, the tile maximum, and
//!   rescales `(m, l, acc)` once (online softmax). It writes `out = acc / l` and
//!   `lse = m + ln l`.
//! - **dQ** (grid as the forward): recomputes each visible `P[i, j] = exp(S[i, j] − lse[i])`,
//!   `dP[i, j] = ⟨dO[i], v[j]⟩`, `dS = P·(dP − δ[i])` and accumulates `dQ[i] += s·dS·k[j]`; it
//!   first computes `δ[i] = ⟨dO[i], out[i]⟩` and writes it for the next launch.
//! - **dK/dV**, one cube per `(b, g, block of `[`BLOCK_KV`]` keys)`, one unit per key: for each
//!   of the `n_rep` query heads of key/value head `g` it walks the queries `k0..T` in tiles of
//!   `block_q` (queries, `dO`, `lse`, `δ` and segment ids in shared memory) and accumulates
//!   `dV[j] += P·dO[i]` and `dK[j] += s·dS·q[i]`. GQA/MQA are summed here, in registers, so no
//!   key/value head is ever repeated and no atomics are needed (FlashAttention-2 accumulates
//!   `dQ` with atomics instead; splitting `dQ` into its own launch costs one more recompute of
//!   the scores and keeps the kernels portable).
//!
//! Dtypes: inputs and outputs in the tensors' float dtype `F`; every load is converted to f32 and
//! all arithmetic (dot products, max, `exp`, `ln`, accumulators) is f32. Segment ids are read in
//! their int dtype and compared as i32.
//!
//! Tiles: the shared memory of a cube is two tiles of `block_k · HD` floats (keys and values, or
//! queries and `dO`), sized to half the device's shared memory and at most 32 rows
//! ([`tile_rows`]): on a 16 KiB device 32 rows at `HD ≤ 32`, 16 at 64, 8 at 128 (24 at 128 with
//! CUDA's 48 KiB). The head dimension
//! is a compile-time constant of each kernel (one compilation per `HD`). The `block` argument of
//! [`super::AttentionBackend`] sizes the composite's blocks and is not used here.
//!
//! Loops: a tile costs each unit a few runtime loops over the head dimension, `step` elements
//! (4, 2 or 1, comptime) per iteration with the tile's rows unrolled inside (scores and
//! probabilities of a tile live in registers); `HD` bounds the loops at run time, because
//! LLVM-based shader compilers fully unroll loops with constant trip counts and then take minutes
//! (Mesa lavapipe: 80 s for one kernel). Launches are split so that no unit runs more than about
//! 32768 loop iterations ([`tiles_per_launch`]): Mesa lavapipe ends a shader invocation after
//! 65535 loop iterations in all (gallivm's loop limiter) and leaves the rest of its outputs
//! unwritten — an unsplit forward at HD 64 lost its last outputs at T 480. The forward then
//! carries `(m, l, acc)` from one launch to the next through `lse`, a `[B, NH, T]` buffer and
//! `out`; dQ and dK/dV add each launch's sums to the previous ones. On GPUs this splits only very
//! long sequences (past about 240 tiles: T ≈ 5700 at HD 128 with 24-row tiles), at the cost of
//! one more read and write of the outputs per launch.
//!
//! A query that sees no key gets `out = 0` and `lse = 0` and contributes no gradient (the module
//! docs leave its value unspecified; such positions are never scored).

use burn::tensor::Shape;
use burn_cubecl::{
    element::BoolElement, tensor::CubeTensor, CubeBackend, CubeRuntime, FloatElement, IntElement,
};
use cubecl::prelude::*;

use super::AttentionBackend;
use crate::logprobs::kernel::{cast_like, largest, output};

/// Queries per cube of the forward and dQ launches (one unit each).
pub(crate) const BLOCK_Q: usize = 32;
/// Keys per cube of the dK/dV launch (one unit each).
pub(crate) const BLOCK_KV: usize = 32;
/// Most rows of a shared-memory tile. Each tile row is loaded by one unit, so a tile has at most
/// as many rows as the cubes have units.
const MAX_TILE_ROWS: usize = 32;
const _: () = assert!(MAX_TILE_ROWS <= BLOCK_Q && MAX_TILE_ROWS <= BLOCK_KV);
/// Cubes per grid dimension; WebGPU/Vulkan guarantee 65535.
const MAX_CUBES_PER_DIM: usize = 65_535;

/// Smallest finite f32, the running max of a unit that has seen no key: WGSL cannot spell `-inf`
/// as a literal, and `exp(SENTINEL − x)` underflows to 0 for any finite `x`.
const NEG_SENTINEL: f32 = -3.0e38;

/// Rows of a shared-memory tile for head dimension `hd` on a device with `shared_bytes` of shared
/// memory per cube: two tiles of `rows · hd` f32 use at most half of it (the rest is left for the
/// segment ids and the compiler), between 1 and [`MAX_TILE_ROWS`].
pub(crate) fn tile_rows(hd: usize, shared_bytes: usize) -> usize {
    (shared_bytes / 2 / (2 * hd * 4)).clamp(1, MAX_TILE_ROWS)
}

/// Load row `row` of a `[rows, HD]` shared tile from `x` at `base` (`stride_d` apart), zeros when
/// `!in_t`; `HD / step` runtime iterations of `step` unrolled elements.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_row<F: Float>(
    x: &Tensor<F>,
    base: usize,
    stride_d: usize,
    in_t: bool,
    tile: &mut SharedMemory<f32>,
    row: usize,
    hd_rt: usize,
    #[comptime] hd: usize,
    #[comptime] step: usize,
) {
    let mut d0 = 0usize;
    while d0 < hd_rt {
        #[unroll]
        for u in 0..step {
            let d = d0 + u;
            let mut value = f32::new(0.0);
            if in_t {
                value = f32::cast_from(x[base + d * stride_d]);
            }
            tile[row * hd + d] = value;
        }
        d0 += step;
    }
}

/// Forward: `out[b,h,i] = Σ_j P[i,j]·v[b,g,j]`, `lse[b,h,i] = log Σ_j exp S[i,j]` over the visible
/// keys `j` (see [`super`]). f32 arithmetic.
///
/// # Shapes
/// - `q`: `[B, NH, T, HD]`, `k`, `v`: `[B, NKV, T, HD]` (any strides), `q_seg`, `k_seg`: `[B, T]`
/// - `out`: `[B, NH, T, HD]`, `lse`: `[B, NH, T]` (outputs)
/// - grid `(⌈T / block_q⌉, B·NH)`, `block_q` units; `block_k ≤ block_q`; `step` divides `HD`
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
fn attention_forward_kernel<F: Float, I: Numeric>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    q_seg: &Tensor<I>,
    k_seg: &Tensor<I>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<F>,
    lsum: &mut Tensor<F>,
    scale: f32,
    k_lo: u32,
    k_hi: u32,
    first: u32,
    last: u32,
    #[comptime] hd: usize,
    #[comptime] block_q: usize,
    #[comptime] block_k: usize,
    #[comptime] step: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let t = q.shape(2);
    // The head dimension as a runtime value bounds the loops over it (see the module docs).
    let hd_rt = q.shape(3);
    let nh = q.shape(1);
    let n_rep = nh / k.shape(1);
    let bh = CUBE_POS_Y as usize;
    let b = bh / nh;
    let h = bh % nh;
    let g = h / n_rep;
    let q0 = CUBE_POS_X as usize * block_q;
    let unit = UNIT_POS as usize;
    let i = q0 + unit;
    let valid = i < t;

    // The query row, pre-scaled, and the output accumulator.
    let mut qr = Array::<f32>::new(hd);
    let mut acc = Array::<f32>::new(hd);
    let q_base = b * q.stride(0) + h * q.stride(1) + i * q.stride(2);
    let mut d0 = 0usize;
    while d0 < hd_rt {
        #[unroll]
        for u in 0..step {
            let d = d0 + u;
            let mut x = f32::new(0.0);
            if valid {
                x = f32::cast_from(q[q_base + d * q.stride(3)]) * scale;
            }
            qr[d] = x;
            acc[d] = f32::new(0.0);
        }
        d0 += step;
    }
    let mut qs = 0i32;
    if valid {
        qs = i32::cast_from(q_seg[b * q_seg.stride(0) + i * q_seg.stride(1)]);
    }
    let mut m = f32::new(NEG_SENTINEL);
    let mut l = f32::new(0.0);
    let o_base = b * out.stride(0) + h * out.stride(1) + i * out.stride(2);
    let row = b * lse.stride(0) + h * lse.stride(1) + i * lse.stride(2);
    let row_l = b * lsum.stride(0) + h * lsum.stride(1) + i * lsum.stride(2);
    if first == 0 && valid {
        // Continue the previous launch's keys: unnormalised `acc` in `out`, `m` in `lse`, `l` in
        // `lsum`.
        m = f32::cast_from(lse[row]);
        l = f32::cast_from(lsum[row_l]);
        let mut d0 = 0usize;
        while d0 < hd_rt {
            #[unroll]
            for u in 0..step {
                let d = d0 + u;
                acc[d] = f32::cast_from(out[o_base + d * out.stride(3)]);
            }
            d0 += step;
        }
    }

    let mut sk = SharedMemory::<f32>::new(block_k * hd);
    let mut sv = SharedMemory::<f32>::new(block_k * hd);
    let mut sseg = SharedMemory::<i32>::new(block_k);
    // Scores, then probabilities, of the tile's keys (constant indices: registers).
    let mut s = Array::<f32>::new(block_k);
    let k_base = b * k.stride(0) + g * k.stride(1);
    let v_base = b * v.stride(0) + g * v.stride(1);

    // This launch's keys `k_lo..k_hi`, up to the cube's last query (causality). Every unit runs
    // every iteration and reaches every barrier (uniform control flow).
    let kend = t.min(q0 + block_q).min(usize::cast_from(k_hi));
    let mut k0 = usize::cast_from(k_lo);
    while k0 < kend {
        // Unit `u < block_k` loads key row `k0 + u`.
        if unit < block_k {
            let j = k0 + unit;
            let in_t = j < t;
            let ks = k.stride(3);
            let vs = v.stride(3);
            load_row::<F>(
                k,
                k_base + j * k.stride(2),
                ks,
                in_t,
                &mut sk,
                unit,
                hd_rt,
                hd,
                step,
            );
            load_row::<F>(
                v,
                v_base + j * v.stride(2),
                vs,
                in_t,
                &mut sv,
                unit,
                hd_rt,
                hd,
                step,
            );
            let mut sg = 0i32;
            if in_t {
                sg = i32::cast_from(k_seg[b * k_seg.stride(0) + j * k_seg.stride(1)]);
            }
            sseg[unit] = sg;
        }
        sync_cube();

        if valid {
            #[unroll]
            for jj in 0..block_k {
                s[jj] = f32::new(0.0);
            }
            let mut d0 = 0usize;
            while d0 < hd_rt {
                #[unroll]
                for u in 0..step {
                    let d = d0 + u;
                    let qd = qr[d];
                    #[unroll]
                    for jj in 0..block_k {
                        s[jj] += qd * sk[jj * hd + d];
                    }
                }
                d0 += step;
            }
            // Mask (keys after `i`, beyond `T` or of another segment), tile max, one rescale.
            let mut mt = m;
            #[unroll]
            for jj in 0..block_k {
                let j = k0 + jj;
                if j <= i && sseg[jj] == qs {
                    mt = f32::max(mt, s[jj]);
                }
            }
            #[unroll]
            for jj in 0..block_k {
                let j = k0 + jj;
                let mut p = f32::new(0.0);
                if j <= i && sseg[jj] == qs {
                    p = (s[jj] - mt).exp();
                }
                s[jj] = p;
            }
            let corr = (m - mt).exp();
            let mut lt = f32::new(0.0);
            #[unroll]
            for jj in 0..block_k {
                lt += s[jj];
            }
            l = l * corr + lt;
            let mut d0 = 0usize;
            while d0 < hd_rt {
                #[unroll]
                for u in 0..step {
                    let d = d0 + u;
                    let mut a = acc[d] * corr;
                    #[unroll]
                    for jj in 0..block_k {
                        a += s[jj] * sv[jj * hd + d];
                    }
                    acc[d] = a;
                }
                d0 += step;
            }
            m = mt;
        }
        sync_cube();
        k0 += block_k;
    }

    if valid {
        let mut inv = f32::new(1.0);
        let mut total = m;
        if last == 1 {
            inv = f32::new(0.0);
            total = f32::new(0.0);
            if l > f32::new(0.0) {
                inv = f32::new(1.0) / l;
                total = m + l.ln();
            }
        } else {
            lsum[row_l] = F::cast_from(l);
        }
        let mut d0 = 0usize;
        while d0 < hd_rt {
            #[unroll]
            for u in 0..step {
                let d = d0 + u;
                out[o_base + d * out.stride(3)] = F::cast_from(acc[d] * inv);
            }
            d0 += step;
        }
        lse[row] = F::cast_from(total);
    }
}

/// dQ: `δ[i] = ⟨dO[i], out[i]⟩` (written to `delta`) and
/// `dQ[i] = s·Σ_j P[i,j]·(⟨dO[i], v[j]⟩ − δ[i])·k[j]` over the visible keys. f32 arithmetic.
///
/// # Shapes
/// as the forward, plus `out`, `dout`: `[B, NH, T, HD]`, `lse`: `[B, NH, T]`;
/// `dq`: `[B, NH, T, HD]` and `delta`: `[B, NH, T]` (outputs); grid as the forward
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
fn attention_dq_kernel<F: Float, I: Numeric>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    q_seg: &Tensor<I>,
    k_seg: &Tensor<I>,
    out: &Tensor<F>,
    lse: &Tensor<F>,
    dout: &Tensor<F>,
    dq: &mut Tensor<F>,
    delta: &mut Tensor<F>,
    scale: f32,
    k_lo: u32,
    k_hi: u32,
    first: u32,
    #[comptime] hd: usize,
    #[comptime] block_q: usize,
    #[comptime] block_k: usize,
    #[comptime] step: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let t = q.shape(2);
    let hd_rt = q.shape(3);
    let nh = q.shape(1);
    let n_rep = nh / k.shape(1);
    let bh = CUBE_POS_Y as usize;
    let b = bh / nh;
    let h = bh % nh;
    let g = h / n_rep;
    let q0 = CUBE_POS_X as usize * block_q;
    let unit = UNIT_POS as usize;
    let i = q0 + unit;
    let valid = i < t;

    let mut qr = Array::<f32>::new(hd);
    let mut dor = Array::<f32>::new(hd);
    let mut acc = Array::<f32>::new(hd);
    let mut di = f32::new(0.0);
    let q_base = b * q.stride(0) + h * q.stride(1) + i * q.stride(2);
    let do_base = b * dout.stride(0) + h * dout.stride(1) + i * dout.stride(2);
    let o_base = b * out.stride(0) + h * out.stride(1) + i * out.stride(2);
    let mut d0 = 0usize;
    while d0 < hd_rt {
        #[unroll]
        for u in 0..step {
            let d = d0 + u;
            let mut x = f32::new(0.0);
            let mut gx = f32::new(0.0);
            if valid {
                x = f32::cast_from(q[q_base + d * q.stride(3)]) * scale;
                gx = f32::cast_from(dout[do_base + d * dout.stride(3)]);
                di += gx * f32::cast_from(out[o_base + d * out.stride(3)]);
            }
            qr[d] = x;
            dor[d] = gx;
            acc[d] = f32::new(0.0);
        }
        d0 += step;
    }
    let mut qs = 0i32;
    let mut li = f32::new(0.0);
    if valid {
        qs = i32::cast_from(q_seg[b * q_seg.stride(0) + i * q_seg.stride(1)]);
        li = f32::cast_from(lse[b * lse.stride(0) + h * lse.stride(1) + i * lse.stride(2)]);
    }

    let mut sk = SharedMemory::<f32>::new(block_k * hd);
    let mut sv = SharedMemory::<f32>::new(block_k * hd);
    let mut sseg = SharedMemory::<i32>::new(block_k);
    // Scores then `dS`, and `dP`, of the tile's keys (registers).
    let mut s = Array::<f32>::new(block_k);
    let mut dp = Array::<f32>::new(block_k);
    let k_base = b * k.stride(0) + g * k.stride(1);
    let v_base = b * v.stride(0) + g * v.stride(1);

    let kend = t.min(q0 + block_q).min(usize::cast_from(k_hi));
    let mut k0 = usize::cast_from(k_lo);
    while k0 < kend {
        if unit < block_k {
            let j = k0 + unit;
            let in_t = j < t;
            let ks = k.stride(3);
            let vs = v.stride(3);
            load_row::<F>(
                k,
                k_base + j * k.stride(2),
                ks,
                in_t,
                &mut sk,
                unit,
                hd_rt,
                hd,
                step,
            );
            load_row::<F>(
                v,
                v_base + j * v.stride(2),
                vs,
                in_t,
                &mut sv,
                unit,
                hd_rt,
                hd,
                step,
            );
            let mut sg = 0i32;
            if in_t {
                sg = i32::cast_from(k_seg[b * k_seg.stride(0) + j * k_seg.stride(1)]);
            }
            sseg[unit] = sg;
        }
        sync_cube();

        if valid {
            #[unroll]
            for jj in 0..block_k {
                s[jj] = f32::new(0.0);
                dp[jj] = f32::new(0.0);
            }
            let mut d0 = 0usize;
            while d0 < hd_rt {
                #[unroll]
                for u in 0..step {
                    let d = d0 + u;
                    let qd = qr[d];
                    let gd = dor[d];
                    #[unroll]
                    for jj in 0..block_k {
                        s[jj] += qd * sk[jj * hd + d];
                        dp[jj] += gd * sv[jj * hd + d];
                    }
                }
                d0 += step;
            }
            #[unroll]
            for jj in 0..block_k {
                let j = k0 + jj;
                let mut ds = f32::new(0.0);
                if j <= i && sseg[jj] == qs {
                    ds = (s[jj] - li).exp() * (dp[jj] - di);
                }
                s[jj] = ds;
            }
            let mut d0 = 0usize;
            while d0 < hd_rt {
                #[unroll]
                for u in 0..step {
                    let d = d0 + u;
                    let mut a = acc[d];
                    #[unroll]
                    for jj in 0..block_k {
                        a += s[jj] * sk[jj * hd + d];
                    }
                    acc[d] = a;
                }
                d0 += step;
            }
        }
        sync_cube();
        k0 += block_k;
    }

    if valid {
        // Add to the previous launches' keys (dQ is a sum over keys).
        let dq_base = b * dq.stride(0) + h * dq.stride(1) + i * dq.stride(2);
        let mut d0 = 0usize;
        while d0 < hd_rt {
            #[unroll]
            for u in 0..step {
                let d = d0 + u;
                let at = dq_base + d * dq.stride(3);
                let mut prev = f32::new(0.0);
                if first == 0 {
                    prev = f32::cast_from(dq[at]);
                }
                dq[at] = F::cast_from(prev + acc[d] * scale);
            }
            d0 += step;
        }
        if first == 1 {
            delta[b * delta.stride(0) + h * delta.stride(1) + i * delta.stride(2)] =
                F::cast_from(di);
        }
    }
}

/// dK/dV: for key `j` of key/value head `g`, over the `n_rep` query heads `h` of `g` and the
/// visible queries `i ≥ j`: `dV[j] = Σ P[i,j]·dO[i]`, `dK[j] = s·Σ P[i,j]·(⟨dO[i], v[j]⟩ − δ[i])·q[i]`.
/// f32 arithmetic.
///
/// # Shapes
/// as the dQ kernel, with `delta`: `[B, NH, T]` (from it) as an input; `dk`, `dv`:
/// `[B, NKV, T, HD]` (outputs); grid `(⌈T / block_kv⌉, B·NKV)`, `block_kv` units;
/// `block_q ≤ block_kv`
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
fn attention_dkdv_kernel<F: Float, I: Numeric>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    q_seg: &Tensor<I>,
    k_seg: &Tensor<I>,
    lse: &Tensor<F>,
    delta: &Tensor<F>,
    dout: &Tensor<F>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    scale: f32,
    it_lo: u32,
    it_hi: u32,
    first: u32,
    #[comptime] hd: usize,
    #[comptime] block_kv: usize,
    #[comptime] block_q: usize,
    #[comptime] step: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let t = q.shape(2);
    let hd_rt = q.shape(3);
    let nkv = k.shape(1);
    let n_rep = q.shape(1) / nkv;
    let bg = CUBE_POS_Y as usize;
    let b = bg / nkv;
    let g = bg % nkv;
    let k0 = CUBE_POS_X as usize * block_kv;
    let unit = UNIT_POS as usize;
    let j = k0 + unit;
    let valid = j < t;

    let mut kr = Array::<f32>::new(hd);
    let mut vr = Array::<f32>::new(hd);
    let mut dka = Array::<f32>::new(hd);
    let mut dva = Array::<f32>::new(hd);
    let k_base = b * k.stride(0) + g * k.stride(1) + j * k.stride(2);
    let v_base = b * v.stride(0) + g * v.stride(1) + j * v.stride(2);
    let mut d0 = 0usize;
    while d0 < hd_rt {
        #[unroll]
        for u in 0..step {
            let d = d0 + u;
            let mut kx = f32::new(0.0);
            let mut vx = f32::new(0.0);
            if valid {
                kx = f32::cast_from(k[k_base + d * k.stride(3)]) * scale;
                vx = f32::cast_from(v[v_base + d * v.stride(3)]);
            }
            kr[d] = kx;
            vr[d] = vx;
            dka[d] = f32::new(0.0);
            dva[d] = f32::new(0.0);
        }
        d0 += step;
    }
    let mut ks = 0i32;
    if valid {
        ks = i32::cast_from(k_seg[b * k_seg.stride(0) + j * k_seg.stride(1)]);
    }

    let mut sq = SharedMemory::<f32>::new(block_q * hd);
    let mut sdo = SharedMemory::<f32>::new(block_q * hd);
    let mut sseg = SharedMemory::<i32>::new(block_q);
    let mut slse = SharedMemory::<f32>::new(block_q);
    let mut sdelta = SharedMemory::<f32>::new(block_q);
    // Scores then `P`, and `dP` then `dS`, of the tile's queries (registers).
    let mut s = Array::<f32>::new(block_q);
    let mut dp = Array::<f32>::new(block_q);

    // One flat loop over (query head r of g, query tile from k0), this launch's part
    // `it_lo..it_hi` of it: queries before the block's first key see none of its keys
    // (causality).
    let tiles = (t - k0).div_ceil(block_q);
    let it_end = (n_rep * tiles).min(usize::cast_from(it_hi));
    let mut it = usize::cast_from(it_lo);
    while it < it_end {
        let h = g * n_rep + it / tiles;
        let i0 = k0 + (it % tiles) * block_q;
        // Unit `u < block_q` loads query row `i0 + u`.
        if unit < block_q {
            let i = i0 + unit;
            let in_t = i < t;
            let qb = b * q.stride(0) + h * q.stride(1) + i * q.stride(2);
            let gb = b * dout.stride(0) + h * dout.stride(1) + i * dout.stride(2);
            let qst = q.stride(3);
            let gst = dout.stride(3);
            load_row::<F>(q, qb, qst, in_t, &mut sq, unit, hd_rt, hd, step);
            load_row::<F>(dout, gb, gst, in_t, &mut sdo, unit, hd_rt, hd, step);
            let mut sg = 0i32;
            let mut lx = f32::new(0.0);
            let mut dx = f32::new(0.0);
            if in_t {
                sg = i32::cast_from(q_seg[b * q_seg.stride(0) + i * q_seg.stride(1)]);
                lx = f32::cast_from(lse[b * lse.stride(0) + h * lse.stride(1) + i * lse.stride(2)]);
                dx = f32::cast_from(
                    delta[b * delta.stride(0) + h * delta.stride(1) + i * delta.stride(2)],
                );
            }
            sseg[unit] = sg;
            slse[unit] = lx;
            sdelta[unit] = dx;
        }
        sync_cube();

        if valid {
            #[unroll]
            for ii in 0..block_q {
                s[ii] = f32::new(0.0);
                dp[ii] = f32::new(0.0);
            }
            let mut d0 = 0usize;
            while d0 < hd_rt {
                #[unroll]
                for u in 0..step {
                    let d = d0 + u;
                    let kd = kr[d];
                    let vd = vr[d];
                    #[unroll]
                    for ii in 0..block_q {
                        s[ii] += sq[ii * hd + d] * kd;
                        dp[ii] += sdo[ii * hd + d] * vd;
                    }
                }
                d0 += step;
            }
            #[unroll]
            for ii in 0..block_q {
                let i = i0 + ii;
                let mut p = f32::new(0.0);
                let mut ds = f32::new(0.0);
                if i < t && j <= i && sseg[ii] == ks {
                    p = (s[ii] - slse[ii]).exp();
                    ds = p * (dp[ii] - sdelta[ii]);
                }
                s[ii] = p;
                dp[ii] = ds;
            }
            let mut d0 = 0usize;
            while d0 < hd_rt {
                #[unroll]
                for u in 0..step {
                    let d = d0 + u;
                    let mut av = dva[d];
                    let mut ak = dka[d];
                    #[unroll]
                    for ii in 0..block_q {
                        av += s[ii] * sdo[ii * hd + d];
                        ak += dp[ii] * sq[ii * hd + d];
                    }
                    dva[d] = av;
                    dka[d] = ak;
                }
                d0 += step;
            }
        }
        sync_cube();
        it += 1;
    }

    if valid {
        let dk_base = b * dk.stride(0) + g * dk.stride(1) + j * dk.stride(2);
        let dv_base = b * dv.stride(0) + g * dv.stride(1) + j * dv.stride(2);
        let mut d0 = 0usize;
        while d0 < hd_rt {
            #[unroll]
            for u in 0..step {
                let d = d0 + u;
                // Add to the previous launches' queries.
                let at_k = dk_base + d * dk.stride(3);
                let at_v = dv_base + d * dv.stride(3);
                let mut pk = f32::new(0.0);
                let mut pv = f32::new(0.0);
                if first == 0 {
                    pk = f32::cast_from(dk[at_k]);
                    pv = f32::cast_from(dv[at_v]);
                }
                dk[at_k] = F::cast_from(pk + dka[d] * scale);
                dv[at_v] = F::cast_from(pv + dva[d]);
            }
            d0 += step;
        }
    }
}

/// Head-dim elements per unrolled step: the largest of 4, 2, 1 that divides `hd` (8 halves the
/// loop iterations again but takes lavapipe several times longer to compile).
pub(crate) fn step_for(hd: usize) -> usize {
    [4, 2, 1]
        .into_iter()
        .find(|s| hd.is_multiple_of(*s))
        .unwrap_or(1)
}

/// Loop iterations one launch may spend per unit (Mesa lavapipe stops an invocation after 65535;
/// half of that leaves room for the loops' bookkeeping).
const ITERATION_BUDGET: usize = 32_768;

/// Tiles one launch may walk per cube: a tile costs each unit about `4·HD/step` iterations (two
/// row loads, two passes over the head dimension) plus a few.
pub(crate) fn tiles_per_launch(hd: usize) -> usize {
    #[cfg(test)]
    if let Some(n) = TEST_TILES_PER_LAUNCH.with(|c| c.get()) {
        return n;
    }
    (ITERATION_BUDGET / (4 * hd.div_ceil(step_for(hd)) + 8)).max(1)
}

#[cfg(test)]
thread_local! {
    /// Tests: tiles per launch on this thread instead of the budget's, so small shapes exercise
    /// the multi-launch paths.
    pub(crate) static TEST_TILES_PER_LAUNCH: std::cell::Cell<Option<usize>> =
        const { std::cell::Cell::new(None) };
}

/// `(B, NH, NKV, T, HD)` of `q [B, NH, T, HD]` and `k`/`v [B, NKV, T, HD]`, checked.
fn dims<R: CubeRuntime>(
    q: &CubeTensor<R>,
    k: &CubeTensor<R>,
    v: &CubeTensor<R>,
    q_seg: &CubeTensor<R>,
    k_seg: &CubeTensor<R>,
) -> [usize; 5] {
    let qs = q.meta.shape();
    let ks = k.meta.shape();
    assert_eq!(qs.num_dims(), 4, "attention: q must be [B, NH, T, HD]");
    let [b, nh, t, hd] = [qs[0], qs[1], qs[2], qs[3]];
    let nkv = ks[1];
    let kv = [b, nkv, t, hd];
    for (name, x) in [("k", k), ("v", v)] {
        let s = x.meta.shape();
        assert_eq!(
            s.iter().copied().collect::<Vec<_>>(),
            kv,
            "attention: {name} must be [B, NKV, T, HD] with q [B, NH, T, HD] = {:?}",
            [b, nh, t, hd]
        );
    }
    for (name, x) in [("q_seg", q_seg), ("k_seg", k_seg)] {
        let s = x.meta.shape();
        assert_eq!(
            s.iter().copied().collect::<Vec<_>>(),
            vec![b, t],
            "attention: {name} must be [B, T]"
        );
    }
    assert!(
        nkv > 0 && nh % nkv == 0,
        "attention: NKV = {nkv} must divide NH = {nh}"
    );
    assert!(hd > 0, "attention: empty head dimension");
    [b, nh, nkv, t, hd]
}

/// Grid `(⌈t / block⌉, rows)`, each dimension within the portable limit.
fn grid(t: usize, block: usize, rows: usize) -> CubeCount {
    let x = t.div_ceil(block).max(1);
    assert!(
        x <= MAX_CUBES_PER_DIM && rows <= MAX_CUBES_PER_DIM,
        "attention: {x} blocks × {rows} heads exceed the launch grid"
    );
    CubeCount::Static(x as u32, rows as u32, 1)
}

/// Key ranges `(k_lo, k_hi)` of the successive forward / dQ launches: [`tiles_per_launch`] tiles
/// of `block_k` keys each (one launch up to `T ≈ 15000` at HD 128 on a 32 KiB device).
fn key_chunks(t: usize, block_k: usize, hd: usize) -> Vec<(u32, u32)> {
    let keys = tiles_per_launch(hd) * block_k;
    (0..t.div_ceil(keys).max(1))
        .map(|c| (u32_of(c * keys), u32_of(((c + 1) * keys).min(t))))
        .collect()
}

fn u32_of(x: usize) -> u32 {
    u32::try_from(x).expect("attention: sequence positions must fit in u32")
}

fn shared_bytes<R: CubeRuntime>(x: &CubeTensor<R>) -> usize {
    x.client.properties().hardware.max_shared_memory_size
}

/// Launch the forward. Returns (`out [B, NH, T, HD]`, `lse [B, NH, T]`).
pub(crate) fn forward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    q_seg: CubeTensor<R>,
    k_seg: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [b, nh, _nkv, t, hd] = dims(&q, &k, &v, &q_seg, &k_seg);
    let (k, v) = (cast_like(k, q.dtype), cast_like(v, q.dtype));
    let out = output(&q, Shape::new([b, nh, t, hd]));
    let lse = output(&q, Shape::new([b, nh, t]));
    if b * nh * t == 0 {
        return (out, lse);
    }
    let block_k = tile_rows(hd, shared_bytes(&q));
    let chunks = key_chunks(t, block_k, hd);
    // `l` between launches (only written when there is more than one).
    let lsum = if chunks.len() > 1 {
        output(&q, Shape::new([b, nh, t]))
    } else {
        lse.clone()
    };
    let address = largest(&[&q, &k, &v, &q_seg, &k_seg, &out, &lse]);
    let dtypes = [q.dtype.into(), q_seg.dtype.into()];
    let n = chunks.len();
    for (c, (k_lo, k_hi)) in chunks.into_iter().enumerate() {
        attention_forward_kernel::launch::<R>(
            &q.client.clone(),
            grid(t, BLOCK_Q, b * nh),
            CubeDim::new_1d(BLOCK_Q as u32),
            address,
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            q_seg.clone().into_tensor_arg(),
            k_seg.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            lsum.clone().into_tensor_arg(),
            (hd as f32).powf(-0.5),
            k_lo,
            k_hi,
            u32::from(c == 0),
            u32::from(c + 1 == n),
            hd,
            BLOCK_Q,
            block_k,
            step_for(hd),
            dtypes,
        );
    }
    (out, lse)
}

/// Launch the backward (dQ, then dK/dV). Returns (`dq [B, NH, T, HD]`, `dk`, `dv [B, NKV, T, HD]`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    q_seg: CubeTensor<R>,
    k_seg: CubeTensor<R>,
    out: CubeTensor<R>,
    lse: CubeTensor<R>,
    dout: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let [b, nh, nkv, t, hd] = dims(&q, &k, &v, &q_seg, &k_seg);
    let dtype = q.dtype;
    let (k, v) = (cast_like(k, dtype), cast_like(v, dtype));
    let (out, lse, dout) = (
        cast_like(out, dtype),
        cast_like(lse, dtype),
        cast_like(dout, dtype),
    );
    let dq = output(&q, Shape::new([b, nh, t, hd]));
    let delta = output(&q, Shape::new([b, nh, t]));
    let dk = output(&q, Shape::new([b, nkv, t, hd]));
    let dv = output(&q, Shape::new([b, nkv, t, hd]));
    if b * nh * t == 0 {
        return (dq, dk, dv);
    }
    let block = tile_rows(hd, shared_bytes(&q));
    let scale = (hd as f32).powf(-0.5);
    let client = q.client.clone();
    let dtypes = [dtype.into(), q_seg.dtype.into()];
    let address = largest(&[&q, &k, &v, &out, &dout, &dq, &dk, &dv]);
    for (c, (k_lo, k_hi)) in key_chunks(t, block, hd).into_iter().enumerate() {
        attention_dq_kernel::launch::<R>(
            &client,
            grid(t, BLOCK_Q, b * nh),
            CubeDim::new_1d(BLOCK_Q as u32),
            address,
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            q_seg.clone().into_tensor_arg(),
            k_seg.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            dout.clone().into_tensor_arg(),
            dq.clone().into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            scale,
            k_lo,
            k_hi,
            u32::from(c == 0),
            hd,
            BLOCK_Q,
            block,
            step_for(hd),
            dtypes,
        );
    }
    // The first cube walks the most (head, query tile) pairs: n_rep · ⌈T / block⌉.
    let per_launch = tiles_per_launch(hd);
    let total = (nh / nkv) * t.div_ceil(block);
    for c in 0..total.div_ceil(per_launch) {
        let it_lo = c * per_launch;
        attention_dkdv_kernel::launch::<R>(
            &client,
            grid(t, BLOCK_KV, b * nkv),
            CubeDim::new_1d(BLOCK_KV as u32),
            address,
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            q_seg.clone().into_tensor_arg(),
            k_seg.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            dout.clone().into_tensor_arg(),
            dk.clone().into_tensor_arg(),
            dv.clone().into_tensor_arg(),
            scale,
            u32_of(it_lo),
            u32_of((it_lo + per_launch).min(total)),
            u32::from(c == 0),
            hd,
            BLOCK_KV,
            block,
            step_for(hd),
            dtypes,
        );
    }
    (dq, dk, dv)
}

/// The FlashAttention-2 kernels on any CubeCL runtime (`CubeBackend<CudaRuntime, …>`,
/// `CubeBackend<WgpuRuntime, …>`).
impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> AttentionBackend
    for CubeBackend<R, F, I, BT>
{
    fn attention_forward(
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        q_seg: CubeTensor<R>,
        k_seg: CubeTensor<R>,
        _block: usize,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        forward(q, k, v, q_seg, k_seg)
    }

    fn attention_backward(
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        q_seg: CubeTensor<R>,
        k_seg: CubeTensor<R>,
        out: CubeTensor<R>,
        lse: CubeTensor<R>,
        dout: CubeTensor<R>,
        _block: usize,
    ) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
        backward(q, k, v, q_seg, k_seg, out, lse, dout)
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn launches_split_the_keys_and_queries_within_the_budget() {
        // HD 128, step 4: 32768 / (4·32 + 8) = 240 tiles per launch.
        assert_eq!(tiles_per_launch(128), 240);
        // HD 6 (step 2): 32768 / (4·3 + 8).
        assert_eq!(tiles_per_launch(6), 1638);
        assert_eq!(key_chunks(100, 16, 128), vec![(0, 100)]);
        assert_eq!(key_chunks(0, 16, 128), vec![(0, 0)]);
        let chunks = key_chunks(10_000, 16, 128);
        assert_eq!(chunks, vec![(0, 3840), (3840, 7680), (7680, 10_000)]);
    }

    #[test]
    fn tiles_fit_half_the_shared_memory() {
        // 16 KiB (the WebGPU minimum): HD 128 → 8 rows (2 · 8 · 128 · 4 = 8 KiB); HD ≤ 32 → cap.
        assert_eq!(tile_rows(128, 16384), 8);
        assert_eq!(tile_rows(64, 16384), 16);
        assert_eq!(tile_rows(32, 16384), 32);
        assert_eq!(tile_rows(4, 16384), 32);
        // 48 KiB (CUDA's default): HD 128 → 24 rows.
        assert_eq!(tile_rows(128, 49152), 24);
        assert_eq!(tile_rows(100_000, 1024), 1);
        for hd in 1..=256 {
            let rows = tile_rows(hd, 16384);
            assert!(2 * rows * hd * 4 <= 8192 || rows == 1, "hd {hd}");
        }
    }
}
