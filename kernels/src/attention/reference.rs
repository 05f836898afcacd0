//! The query-block-tiled attention in Burn tensor ops over any backend: forward, hand-written
//! backward, and the device-built mask of a block (formulas in [`super`]).
//!
//! A block holds queries `q0..q1` (`tq = q1 − q0`) and, by causality, only keys `0..q1`. Its
//! query heads are viewed as `[B, NKV, n_rep·tq, HD]` (head `h = g·n_rep + r` uses key/value head
//! `g`), so one batched matmul against `k[:, :, 0..q1]` covers GQA/MQA without repeating `k` or
//! `v`. Transient memory is a few `[B, NH, tq, q1]` score blocks; nothing `[T, T]` is kept.

use std::ops::Range;

use burn::tensor::{backend::Backend, Bool, Int, Tensor};

/// `true` where query `i ∈ rows` must not see key `j < kend`: `j > i` or
/// `k_seg[b, j] ≠ q_seg[b, i]`. Built on the device from the `[B, T]` segment ids.
///
/// # Shapes
/// `q_seg`, `k_seg`: `[B, T]`; returns `[B, 1, 1, tq, kend]` (broadcast over heads).
pub fn mask<B: Backend>(
    q_seg: &Tensor<B, 2, Int>,
    k_seg: &Tensor<B, 2, Int>,
    rows: Range<usize>,
    kend: usize,
) -> Tensor<B, 5, Bool> {
    let [b, _] = q_seg.dims();
    let (q0, q1) = (rows.start, rows.end);
    let tq = q1 - q0;
    let device = q_seg.device();
    let shape = [b, 1, 1, tq, kend];
    let qpos = Tensor::<B, 1, Int>::arange(q0 as i64..q1 as i64, &device)
        .reshape([1, 1, 1, tq, 1])
        .expand(shape);
    let kpos = Tensor::<B, 1, Int>::arange(0..kend as i64, &device)
        .reshape([1, 1, 1, 1, kend])
        .expand(shape);
    let qs = q_seg
        .clone()
        .slice([0..b, q0..q1])
        .reshape([b, 1, 1, tq, 1])
        .expand(shape);
    let ks = k_seg
        .clone()
        .slice([0..b, 0..kend])
        .reshape([b, 1, 1, 1, kend])
        .expand(shape);
    kpos.greater(qpos).bool_or(qs.not_equal(ks))
}

/// One block's inputs, sliced and viewed for GQA.
struct Block<B: Backend> {
    /// `[B, NKV, n_rep·tq, HD]`.
    q: Tensor<B, 4>,
    /// `[B, NKV, q1, HD]`.
    k: Tensor<B, 4>,
    /// `[B, NKV, q1, HD]`.
    v: Tensor<B, 4>,
    /// Masked scaled scores, `[B, NKV, n_rep·tq, q1]`.
    s: Tensor<B, 4>,
}

#[allow(clippy::too_many_arguments)]
fn block<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    q_seg: &Tensor<B, 2, Int>,
    k_seg: &Tensor<B, 2, Int>,
    q0: usize,
    q1: usize,
) -> Block<B> {
    let [b, nh, _, hd] = q.dims();
    let nkv = k.dims()[1];
    let (n_rep, tq) = (nh / nkv, q1 - q0);
    let qb = q
        .clone()
        .slice([0..b, 0..nh, q0..q1, 0..hd])
        .reshape([b, nkv, n_rep * tq, hd]);
    let kb = k.clone().slice([0..b, 0..nkv, 0..q1, 0..hd]);
    let vb = v.clone().slice([0..b, 0..nkv, 0..q1, 0..hd]);
    let s = (qb.clone().matmul(kb.clone().swap_dims(2, 3)) * (hd as f64).powf(-0.5))
        .reshape([b, nkv, n_rep, tq, q1])
        // The most negative f32, as the dense path: exp(MIN − lse) is exactly 0.
        .mask_fill(mask::<B>(q_seg, k_seg, q0..q1, q1), f32::MIN)
        .reshape([b, nkv, n_rep * tq, q1]);
    Block {
        q: qb,
        k: kb,
        v: vb,
        s,
    }
}

/// Blocks of `block` queries over `0..t`.
fn blocks(t: usize, block: usize) -> impl Iterator<Item = (usize, usize)> {
    let block = block.max(1);
    (0..t)
        .step_by(block)
        .map(move |q0| (q0, (q0 + block).min(t)))
}

/// Output and log-sum-exp, block by block.
///
/// # Shapes
/// `q: [B, NH, T, HD]`, `k`, `v: [B, NKV, T, HD]`, `q_seg`, `k_seg: [B, T]`; returns
/// (`out [B, NH, T, HD]`, `lse [B, NH, T]`).
pub fn forward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    q_seg: Tensor<B, 2, Int>,
    k_seg: Tensor<B, 2, Int>,
    block: usize,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let [b, nh, t, hd] = q.dims();
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for (q0, q1) in blocks(t, block) {
        let blk = self::block(&q, &k, &v, &q_seg, &k_seg, q0, q1);
        let m = blk.s.clone().max_dim(3); // [B,NKV,r,1]
        let e = (blk.s - m.clone()).exp();
        let sum = e.clone().sum_dim(3);
        outs.push((e.matmul(blk.v) / sum.clone()).reshape([b, nh, q1 - q0, hd]));
        lses.push((m + sum.log()).reshape([b, nh, q1 - q0]));
    }
    (Tensor::cat(outs, 2), Tensor::cat(lses, 2))
}

/// Gradients of `Σ dout∘out`, recomputing each block's probabilities from the saved `lse`.
///
/// # Shapes
/// as [`forward`], plus `out`, `dout: [B, NH, T, HD]`, `lse: [B, NH, T]`; returns
/// (`dq [B, NH, T, HD]`, `dk`, `dv [B, NKV, T, HD]`).
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    q_seg: Tensor<B, 2, Int>,
    k_seg: Tensor<B, 2, Int>,
    out: Tensor<B, 4>,
    lse: Tensor<B, 3>,
    dout: Tensor<B, 4>,
    block: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [b, nh, t, hd] = q.dims();
    let nkv = k.dims()[1];
    let n_rep = nh / nkv;
    let scale = (hd as f64).powf(-0.5);
    // [B,NH,T,1]
    let delta = (dout.clone() * out).sum_dim(3);
    // `lse` as `[B, NH, T, 1]` before slicing: on CubeCL (Burn 0.21), reshaping a `[B, NH, 1]`
    // slice of a 3-d tensor to `[B, NKV, n_rep, 1]` reads the wrong elements (a last dimension of
    // size 1 after the slice); the 4-d slice with a trailing 1 is read correctly. Caught by the
    // one-query-per-block case on wgpu.
    let lse = lse.unsqueeze_dim::<4>(3);
    let device = q.device();
    let mut dk = Tensor::<B, 4>::zeros([b, nkv, t, hd], &device);
    let mut dv = Tensor::<B, 4>::zeros([b, nkv, t, hd], &device);
    let mut dqs = Vec::new();
    for (q0, q1) in blocks(t, block) {
        let r = n_rep * (q1 - q0);
        let blk = self::block(&q, &k, &v, &q_seg, &k_seg, q0, q1);
        let rows = |x: &Tensor<B, 4>, w: usize| {
            x.clone()
                .slice([0..b, 0..nh, q0..q1, 0..w])
                .reshape([b, nkv, r, w])
        };
        let dob = rows(&dout, hd);
        let db = rows(&delta, 1);
        let lb = rows(&lse, 1);
        let p = (blk.s - lb).exp(); // [B,NKV,r,q1]
        let keys = [0..b, 0..nkv, 0..q1, 0..hd];
        let dv_b = p.clone().swap_dims(2, 3).matmul(dob.clone()); // [B,NKV,q1,HD]
        dv = dv
            .clone()
            .slice_assign(keys.clone(), dv.slice(keys.clone()) + dv_b);
        let ds = p * (dob.matmul(blk.v.swap_dims(2, 3)) - db); // [B,NKV,r,q1]
        dqs.push((ds.clone().matmul(blk.k) * scale).reshape([b, nh, q1 - q0, hd]));
        let dk_b = ds.swap_dims(2, 3).matmul(blk.q) * scale; // [B,NKV,q1,HD]
        dk = dk.clone().slice_assign(keys.clone(), dk.slice(keys) + dk_b);
    }
    (Tensor::cat(dqs, 2), dk, dv)
}
