//! Causal self-attention as one op: `softmax(scale · Q Kᵀ + mask) V` with rotary embeddings
//! applied to Q and K, grouped-query heads, an optional sliding window, and a hand-written
//! backward.
//!
//! The op takes the projections as they come out of the linear layers, `[b, t, heads·hd]`,
//! and returns `[b, t, heads·hd]` for the output projection. The composed form (split the
//! heads with a reshape and a transpose, rotate Q and K, two batched products around
//! [`crate::ops::causal_softmax`], a transpose and a copy back) leaves about a dozen tensors
//! per layer in the autograd graph, each gradient zero-filled and accumulated by candle, and
//! the `[groups·t, t]` scores and probabilities of every head. On the CPU this op works one
//! (sequence, key/value head) unit at a time: it gathers and rotates the unit's queries and
//! keys into scratch, computes its scores block by block while they are hot in cache, and
//! writes the output rows straight into `[b, t, heads·hd]`. Units run in parallel, each with
//! single-threaded products.
//!
//! The backward recomputes the probabilities from Q and K (one product per unit, as
//! FlashAttention does) instead of keeping them: `[groups·t, t]` per unit per layer would be
//! the largest activation of a training step. With `P = softmax(S)`, `dO` the output gradient:
//!
//! - `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ⊙ (dP − rowsum(dP ⊙ P))`,
//! - `dQ = scale · dS K`, `dK = scale · dSᵀ Q`,
//!
//! and the rotation, being orthogonal, is undone on `dQ` and `dK` by rotating them back.
//!
//! Off the CPU and in other dtypes the composed form is used; with a KV cache or soft-capped
//! scores the model composes the attention itself.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu_gemm::{gemm, serial};
use crate::ops::{contiguous_slice, guard_slice};

type CResult<T> = candle_core::Result<T>;

/// Rotary-embedding tables for positions `0..t`: `cos`, `sin` of shape `[t, hd/2]` (the two
/// halves of the head dimension rotate together, as in HF transformers).
#[derive(Clone, Copy)]
pub struct Rotary<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
}

/// Causal self-attention for `q: [b, t, heads·hd]` (or `[b, t, heads, hd]`), `k, v: [b, t,
/// kv_heads·hd]` (or `[b, t, kv_heads, hd]`), returned as `[b, t, heads·hd]`. Query head `h`
/// reads kv head `h / (heads / kv_heads)`; `rope` rotates q and k by position first.
/// `window`: key `j` is visible from query `p` when `p - window < j <= p`.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    rope: Option<Rotary>,
    scale: f64,
    window: Option<usize>,
) -> CResult<Tensor> {
    let (b, t) = (q.dim(0)?, q.dim(1)?);
    let per_token = |x: &Tensor| x.elem_count() / (b * t).max(1);
    let hd = per_token(q).checked_div(heads).unwrap_or(0);
    let ok = heads > 0
        && kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && hd > 0
        && hd.is_multiple_of(2)
        && per_token(q) == heads * hd
        && [k, v]
            .iter()
            .all(|x| x.dims()[..2] == [b, t] && per_token(x) == kv_heads * hd);
    if !ok {
        candle_core::bail!(
            "causal_attention: q {:?}, k {:?}, v {:?} for {heads} heads and {kv_heads} kv heads",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if let Some(r) = rope {
        if r.cos.dims() != [t, hd / 2] || r.sin.dims() != [t, hd / 2] {
            candle_core::bail!(
                "causal_attention: rope tables {:?} and {:?} for {t} positions of {hd}",
                r.cos.dims(),
                r.sin.dims()
            );
        }
    }
    if q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::F64) {
        let f = |x: &Tensor| x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
        let tables = match rope {
            Some(r) => Some(RopeTables::new(f(r.cos)?, f(r.sin)?)),
            None => None,
        };
        let op = CausalAttention {
            scale,
            window,
            heads,
            kv_heads,
            rope: tables,
        };
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    causal_attention_composed(q, k, v, heads, kv_heads, rope, scale, window)
}

/// [`causal_attention`] as candle ops with autograd (other devices and dtypes, and the tests'
/// reference).
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    rope: Option<Rotary>,
    scale: f64,
    window: Option<usize>,
) -> CResult<Tensor> {
    let (b, t) = (q.dim(0)?, q.dim(1)?);
    let hd = q.elem_count() / (b * t * heads);
    // [b, t, h·hd] -> [b, h, t, hd]
    let split = |x: &Tensor, h: usize| x.reshape((b, t, h, hd))?.transpose(1, 2);
    let (mut q, mut k) = (split(q, heads)?, split(k, kv_heads)?);
    if let Some(r) = rope {
        let (cos, sin) = (r.cos.to_dtype(q.dtype())?, r.sin.to_dtype(q.dtype())?);
        q = crate::ops::rope_composed(&q, &cos, &sin)?;
        k = crate::ops::rope_composed(&k, &cos, &sin)?;
    }
    attend_heads(&q, &k, &split(v, kv_heads)?, 0, scale, None, window)
}

/// Attention over heads already split and rotated, as composed candle ops with autograd:
/// `q: [b, heads, t, hd]` for the last `t` of `past + t` positions, `k` and `v` of shape
/// `[b, kv_heads, past + t, hd]`, returned as `[b, t, heads·hd]`. With `softcap`, the scaled
/// scores become `cap · tanh(s / cap)` before the mask. The model's path with a KV cache or
/// soft-capping, and the op's fallback and reference.
pub fn attend_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    past: usize,
    scale: f64,
    softcap: Option<f64>,
    window: Option<usize>,
) -> CResult<Tensor> {
    let (b, heads, t, hd) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    // grouped-query attention without repeating k/v: q as [b, kv, groups·t, hd]
    let qg = q
        .contiguous()?
        .reshape((b, kv_heads, heads / kv_heads * t, hd))?;
    let scores = qg.matmul(&k.contiguous()?.t()?)?; // [b, kv, groups·t, past + t]
    let probs = match softcap {
        // soft-capping comes between the scale and the mask
        Some(cap) => {
            let capped = ((scores * (scale / cap))?.tanh()? * cap)?;
            crate::ops::causal_softmax(&capped, 1.0, t, past, window)?
        }
        None => crate::ops::causal_softmax(&scores, scale, t, past, window)?,
    };
    probs
        .matmul(&v.contiguous()?)? // [b, kv, groups·t, hd]
        .reshape((b, heads, t, hd))?
        .transpose(1, 2)?
        .reshape((b, t, heads * hd))
}

struct CausalAttention {
    scale: f64,
    window: Option<usize>,
    heads: usize,
    kv_heads: usize,
    /// when q and k are rotated
    rope: Option<RopeTables>,
}

/// `cos`, `sin` as `[t, hd/2]`, in f64 and rounded to f32.
struct RopeTables {
    cos: Vec<f64>,
    sin: Vec<f64>,
    cos32: Vec<f32>,
    sin32: Vec<f32>,
}

impl RopeTables {
    fn new(cos: Vec<f64>, sin: Vec<f64>) -> Self {
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect();
        Self {
            cos32: f32s(&cos),
            sin32: f32s(&sin),
            cos,
            sin,
        }
    }
}

/// Sizes of one call: `units = b · kv_heads`, each with `rows = groups · t` query rows.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    hd: usize,
    groups: usize,
}

impl Dims {
    fn rows(&self) -> usize {
        self.groups * self.t
    }
}

/// Which heads of a `[b, t, heads·hd]` tensor one unit holds: `per_unit` consecutive heads
/// out of `heads`, as rows `[per_unit·t, hd]` (head-major, then position).
#[derive(Clone, Copy)]
struct HeadSplit {
    heads: usize,
    per_unit: usize,
}

/// Query positions per block. A block reads only the keys up to its last position (and from
/// the first one its window reaches), so most of the masked upper triangle of the scores is
/// never computed: at 256 positions, 62.5% of the full products.
const Q_BLOCK: usize = 64;

/// One block of a unit's query rows: rows `r0..r0 + nr` (one group's positions `r0 % t ..`),
/// reading keys `k0..k1`.
#[derive(Clone, Copy)]
struct Block {
    r0: usize,
    nr: usize,
    k0: usize,
    k1: usize,
}

impl Block {
    fn keys(&self) -> usize {
        self.k1 - self.k0
    }
}

/// Softmax of each row of `p: [nr, keys]` (scaled scores of `blk`) over the keys its position
/// sees; the others in the block are set to 0.
fn softmax_block<T: WithDType>(p: &mut [T], blk: Block, t: usize, window: Option<usize>) {
    let kk = blk.keys();
    for (i, row) in p.chunks_mut(kk).enumerate() {
        let pos = (blk.r0 + i) % t;
        let first = window.map_or(0, |w| (pos + 1).saturating_sub(w)) - blk.k0;
        let last = pos - blk.k0;
        if T::DTYPE == DType::F32 {
            // SAFETY: T is f32 (its DType says so).
            let row = unsafe { std::slice::from_raw_parts_mut(row.as_mut_ptr() as *mut f32, kk) };
            let max = crate::ops::max_f32(&row[first..=last]);
            let inv = 1.0 / crate::ops::exp_shifted_sum(&mut row[first..=last], max);
            row[first..=last].iter_mut().for_each(|v| *v *= inv);
            row[..first].iter_mut().for_each(|v| *v = 0.0);
            row[last + 1..].iter_mut().for_each(|v| *v = 0.0);
        } else {
            let max = row[first..=last]
                .iter()
                .map(|v| v.to_f64())
                .fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for v in &mut row[first..=last] {
                let e = (v.to_f64() - max).exp();
                sum += e;
                *v = T::from_f64(e);
            }
            for v in &mut row[first..=last] {
                *v = T::from_f64(v.to_f64() / sum);
            }
            row[..first].iter_mut().for_each(|v| *v = T::zero());
            row[last + 1..].iter_mut().for_each(|v| *v = T::zero());
        }
    }
}

impl CausalAttention {
    /// The blocks of one unit's `groups · t` query rows.
    fn blocks(&self, d: Dims) -> Vec<Block> {
        let mut out = Vec::new();
        for g in 0..d.groups {
            for p0 in (0..d.t).step_by(Q_BLOCK) {
                let p1 = (p0 + Q_BLOCK).min(d.t);
                let k0 = self.window.map_or(0, |w| (p0 + 1).saturating_sub(w));
                out.push(Block {
                    r0: g * d.t + p0,
                    nr: p1 - p0,
                    k0,
                    k1: p1,
                });
            }
        }
        out
    }

    /// The probabilities `[nr, keys]` of one block of a unit.
    fn block_probs<T: WithDType>(&self, q: &[T], k: &[T], blk: Block, d: Dims) -> Vec<T> {
        let (hd, kk) = (d.hd, blk.keys());
        let mut p = vec![T::zero(); blk.nr * kk];
        let (qb, kb) = (&q[blk.r0 * hd..], &k[blk.k0 * hd..]);
        gemm(
            (blk.nr, kk, hd),
            &mut p,
            false,
            qb,
            (hd, 1),
            kb,
            (1, hd),
            self.scale,
        );
        softmax_block(&mut p, blk, d.t, self.window);
        p
    }

    /// One unit's heads of `x: [b, t, split.heads·hd]` as rows `[split.per_unit·t, hd]`,
    /// rotated by position when `rotate`.
    fn gather<T: WithDType>(
        &self,
        x: &[T],
        u: usize,
        split: HeadSplit,
        d: Dims,
        rotate: bool,
    ) -> Vec<T> {
        let (t, hd) = (d.t, d.hd);
        let units_per_seq = split.heads / split.per_unit;
        let (bi, j) = (u / units_per_seq, u % units_per_seq);
        let mut out = vec![T::zero(); split.per_unit * t * hd];
        for (r, row) in out.chunks_mut(hd).enumerate() {
            let (g, p) = (r / t, r % t);
            let src = (bi * t + p) * split.heads * hd + (j * split.per_unit + g) * hd;
            let src = &x[src..src + hd];
            match (&self.rope, rotate) {
                (Some(tables), true) => rotate_row(row, src, tables, p, false),
                _ => row.copy_from_slice(src),
            }
        }
        out
    }

    /// The inverse of [`Self::gather`]: per-unit rows back into `[b, t, split.heads·hd]`,
    /// rotated back by position when `rotate` (the transpose of the rotation).
    fn scatter<T: WithDType>(
        &self,
        units: &[Vec<T>],
        split: HeadSplit,
        d: Dims,
        rotate: bool,
    ) -> Vec<T> {
        let (t, hd) = (d.t, d.hd);
        let units_per_seq = split.heads / split.per_unit;
        let mut y = vec![T::zero(); d.b * t * split.heads * hd];
        y.par_chunks_mut(split.heads * hd)
            .enumerate()
            .for_each(|(bp, yr)| {
                let (bi, p) = (bp / t, bp % t);
                for (h, dst) in yr.chunks_mut(hd).enumerate() {
                    let unit = &units[bi * units_per_seq + h / split.per_unit];
                    let src = ((h % split.per_unit) * t + p) * hd;
                    let src = &unit[src..src + hd];
                    match (&self.rope, rotate) {
                        (Some(tables), true) => rotate_row(dst, src, tables, p, true),
                        _ => dst.copy_from_slice(src),
                    }
                }
            });
        y
    }

    fn splits(&self, d: Dims) -> (HeadSplit, HeadSplit) {
        let q = HeadSplit {
            heads: d.nh,
            per_unit: d.groups,
        };
        let kv = HeadSplit {
            heads: d.nkv,
            per_unit: 1,
        };
        (q, kv)
    }

    fn cpu_forward<T: WithDType>(&self, q: &[T], k: &[T], v: &[T], d: Dims) -> Vec<T> {
        let (qs, kvs) = self.splits(d);
        let (rows, hd) = (d.rows(), d.hd);
        let blocks = self.blocks(d);
        // one unit per (sequence, kv head): q rows [groups·t, hd], k and v [t, hd]
        let outs: Vec<Vec<T>> = (0..d.b * d.nkv)
            .into_par_iter()
            .map(|u| {
                let qu = self.gather(q, u, qs, d, true);
                let ku = self.gather(k, u, kvs, d, true);
                let vu = self.gather(v, u, kvs, d, false);
                serial(|| {
                    let mut o = vec![T::zero(); rows * hd];
                    for &blk in &blocks {
                        let p = self.block_probs(&qu, &ku, blk, d);
                        let (ob, vb) = (&mut o[blk.r0 * hd..], &vu[blk.k0 * hd..]);
                        gemm(
                            (blk.nr, hd, blk.keys()),
                            ob,
                            false,
                            &p,
                            (blk.keys(), 1),
                            vb,
                            (hd, 1),
                            1.0,
                        );
                    }
                    o
                })
            })
            .collect();
        self.scatter(&outs, qs, d, false)
    }

    /// (dq, dk, dv) in the inputs' layout for `dy: [b, t, heads·hd]`.
    fn cpu_backward<T: WithDType>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        dy: &[T],
        d: Dims,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (qs, kvs) = self.splits(d);
        let hd = d.hd;
        let blocks = self.blocks(d);
        let grads: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..d.b * d.nkv)
            .into_par_iter()
            .map(|u| {
                let qu = self.gather(q, u, qs, d, true);
                let ku = self.gather(k, u, kvs, d, true);
                let vu = self.gather(v, u, kvs, d, false);
                let dyu = self.gather(dy, u, qs, d, false);
                let mut dqu = vec![T::zero(); qu.len()];
                let mut dku = vec![T::zero(); ku.len()];
                let mut dvu = vec![T::zero(); vu.len()];
                serial(|| {
                    for &blk in &blocks {
                        let (nr, kk) = (blk.nr, blk.keys());
                        let p = self.block_probs(&qu, &ku, blk, d);
                        let dyb = &dyu[blk.r0 * hd..];
                        // dV += Pᵀ dO: [keys, nr] x [nr, hd]
                        let dvb = &mut dvu[blk.k0 * hd..];
                        gemm((kk, hd, nr), dvb, true, &p, (1, kk), dyb, (hd, 1), 1.0);
                        // dP = dO Vᵀ: [nr, hd] x [hd, keys], then dS in place
                        let mut ds = vec![T::zero(); nr * kk];
                        let vb = &vu[blk.k0 * hd..];
                        gemm((nr, kk, hd), &mut ds, false, dyb, (hd, 1), vb, (1, hd), 1.0);
                        for (dr, pr) in ds.chunks_mut(kk).zip(p.chunks(kk)) {
                            let dot = row_dot(dr, pr);
                            for (dv, pv) in dr.iter_mut().zip(pr) {
                                *dv = *pv * (*dv - dot);
                            }
                        }
                        // dQ = scale · dS K: [nr, keys] x [keys, hd] (each row in one block)
                        let (dqb, kb) = (&mut dqu[blk.r0 * hd..], &ku[blk.k0 * hd..]);
                        gemm(
                            (nr, hd, kk),
                            dqb,
                            false,
                            &ds,
                            (kk, 1),
                            kb,
                            (hd, 1),
                            self.scale,
                        );
                        // dK += scale · dSᵀ Q: [keys, nr] x [nr, hd]
                        let (dkb, qb) = (&mut dku[blk.k0 * hd..], &qu[blk.r0 * hd..]);
                        gemm(
                            (kk, hd, nr),
                            dkb,
                            true,
                            &ds,
                            (1, kk),
                            qb,
                            (hd, 1),
                            self.scale,
                        );
                    }
                });
                (dqu, dku, dvu)
            })
            .collect();
        let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
        for (dq, dk, dv) in grads {
            dqs.push(dq);
            dks.push(dk);
            dvs.push(dv);
        }
        (
            self.scatter(&dqs, qs, d, true),
            self.scatter(&dks, kvs, d, true),
            self.scatter(&dvs, kvs, d, false),
        )
    }

    fn dims(&self, q: &Shape) -> CResult<Dims> {
        let (b, t) = (q.dims()[0], q.dims()[1]);
        let hd = q.elem_count() / (b * t * self.heads);
        Ok(Dims {
            b,
            nh: self.heads,
            nkv: self.kv_heads,
            t,
            hd,
            groups: self.heads / self.kv_heads,
        })
    }
}

/// `Σ a_i b_i` of two rows: in f32 lanes for f32, in f64 otherwise.
fn row_dot<T: WithDType>(a: &[T], b: &[T]) -> T {
    if T::DTYPE == DType::F32 {
        // SAFETY: T is f32 (its DType says so), so both slices are f32 slices.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(a.as_ptr() as *const f32, a.len()),
                std::slice::from_raw_parts(b.as_ptr() as *const f32, b.len()),
            )
        };
        return T::from_f64(crate::ops::dot_f32(a, b) as f64);
    }
    T::from_f64(a.iter().zip(b).map(|(x, y)| x.to_f64() * y.to_f64()).sum())
}

/// `dst = R(θ_p) src` for one head row (`R(−θ_p)` when `inverse`): the halves `(x1, x2)`
/// become `(x1 c − x2 s, x2 c + x1 s)` with `c, s` of position `p`. f32 rows are rotated in
/// f32 (so the loop vectorises), others in f64.
#[inline]
fn rotate_row<T: WithDType>(
    dst: &mut [T],
    src: &[T],
    tables: &RopeTables,
    p: usize,
    inverse: bool,
) {
    let half = src.len() / 2;
    let at = p * half..(p + 1) * half;
    if T::DTYPE == DType::F32 {
        // SAFETY: T is f32 (its DType says so), so both slices are f32 slices.
        let (dst, src) = unsafe {
            (
                std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut f32, dst.len()),
                std::slice::from_raw_parts(src.as_ptr() as *const f32, src.len()),
            )
        };
        let sign = if inverse { -1.0f32 } else { 1.0 };
        rotate(dst, src, &tables.cos32[at.clone()], &tables.sin32[at], sign);
    } else {
        let sign = if inverse { -1.0 } else { 1.0 };
        let (c, s) = (&tables.cos[at.clone()], &tables.sin[at]);
        let (d1, d2) = dst.split_at_mut(half);
        let (x1, x2) = src.split_at(half);
        for i in 0..half {
            let (ci, si) = (c[i], sign * s[i]);
            let (a, b) = (x1[i].to_f64(), x2[i].to_f64());
            d1[i] = T::from_f64(a * ci - b * si);
            d2[i] = T::from_f64(b * ci + a * si);
        }
    }
}

#[inline]
fn rotate(dst: &mut [f32], src: &[f32], c: &[f32], s: &[f32], sign: f32) {
    let half = src.len() / 2;
    let (d1, d2) = dst.split_at_mut(half);
    let (x1, x2) = src.split_at(half);
    for i in 0..half {
        let (ci, si) = (c[i], sign * s[i]);
        d1[i] = x1[i] * ci - x2[i] * si;
        d2[i] = x2[i] * ci + x1[i] * si;
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "ftbench-causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let d = self.dims(ql.shape())?;
        let shape = Shape::from((d.b, d.t, d.nh * d.hd));
        macro_rules! run {
            ($t:ty) => {
                <$t>::to_cpu_storage_owned(self.cpu_forward::<$t>(
                    contiguous_slice(qs, ql, "causal_attention q")?,
                    contiguous_slice(ks, kl, "causal_attention k")?,
                    contiguous_slice(vs, vl, "causal_attention v")?,
                    d,
                ))
            };
        }
        let y = match qs.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => candle_core::bail!("causal_attention: unsupported dtype {dt:?}"),
        };
        Ok((y, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(q.shape())?;
        let dy = dy.contiguous()?;
        let guards = [q, k, v, &dy].map(|t| t.storage_and_layout());
        macro_rules! run {
            ($t:ty) => {{
                let s: Vec<&[$t]> = guards
                    .iter()
                    .zip([
                        "causal_attention q",
                        "causal_attention k",
                        "causal_attention v",
                        "causal_attention dy",
                    ])
                    .map(|(g, what)| guard_slice::<$t, _>(g, what))
                    .collect::<CResult<_>>()?;
                let (dq, dk, dv) = self.cpu_backward::<$t>(s[0], s[1], s[2], s[3], d);
                let dev = q.device();
                (
                    Tensor::from_vec(dq, q.shape(), dev)?,
                    Tensor::from_vec(dk, k.shape(), dev)?,
                    Tensor::from_vec(dv, v.shape(), dev)?,
                )
            }};
        }
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => candle_core::bail!("causal_attention: unsupported dtype {dt:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    use crate::test_util::{check_against_composed, max_abs_diff as max_diff};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        crate::fused_lora::uniform(shape, seed).unwrap()
    }

    /// Rotary tables for `t` positions of head size `hd` (arbitrary angles: the op must not
    /// depend on their being a geometric series).
    fn tables(t: usize, hd: usize) -> (Tensor, Tensor) {
        let angles = (randn(&[t, hd / 2], 11) * 3.0).unwrap();
        (angles.cos().unwrap(), angles.sin().unwrap())
    }

    /// The fused op against the composed ops in f64: output and the gradients of q, k, v,
    /// for plain and grouped heads, with and without rotary embeddings and a sliding window.
    #[test]
    fn fused_attention_matches_composed_ops() {
        for &(b, nh, nkv, t, hd, window, rotate) in &[
            (1, 2, 2, 5, 4, None, false),
            (1, 2, 2, 5, 4, None, true),
            (2, 6, 2, 7, 8, None, true),
            (2, 4, 1, 9, 4, Some(3), true),
            // several query blocks, the last one partial, with and without a window
            (1, 4, 2, 150, 8, None, true),
            (1, 2, 1, 130, 4, Some(70), false),
        ] {
            let q = (randn(&[b, t, nh * hd], 1) * 2.0).unwrap();
            let k = (randn(&[b, t, nkv * hd], 2) * 2.0).unwrap();
            let v = randn(&[b, t, nkv * hd], 3);
            let (cos, sin) = tables(t, hd);
            let rope = rotate.then_some(Rotary {
                cos: &cos,
                sin: &sin,
            });
            let scale = 0.35;
            check_against_composed(
                &[q, k, v],
                |x| causal_attention(&x[0], &x[1], &x[2], nh, nkv, rope, scale, window).unwrap(),
                |x| {
                    causal_attention_composed(&x[0], &x[1], &x[2], nh, nkv, rope, scale, window)
                        .unwrap()
                },
                1e-12,
            );
        }
    }

    /// Heads given as a separate dimension, `[b, t, heads, hd]` (as after Gemma's q/k norms):
    /// the same output, and gradients in that shape.
    #[test]
    fn fused_attention_takes_split_heads() {
        let (b, nh, nkv, t, hd) = (2, 4, 2, 6, 8);
        let q = randn(&[b, t, nh, hd], 1);
        let k = randn(&[b, t, nkv, hd], 2);
        let v = randn(&[b, t, nkv, hd], 3);
        let (cos, sin) = tables(t, hd);
        let rope = Some(Rotary {
            cos: &cos,
            sin: &sin,
        });
        check_against_composed(
            &[q, k, v],
            |x| causal_attention(&x[0], &x[1], &x[2], nh, nkv, rope, 0.5, None).unwrap(),
            |x| {
                let flat = |x: &Tensor| x.flatten_from(2).unwrap();
                causal_attention_composed(
                    &flat(&x[0]),
                    &flat(&x[1]),
                    &flat(&x[2]),
                    nh,
                    nkv,
                    rope,
                    0.5,
                    None,
                )
                .unwrap()
            },
            1e-12,
        );
    }

    /// Shapes that do not fit the head counts are refused with the shapes named.
    #[test]
    fn mismatched_shapes_are_refused() {
        let q = randn(&[1, 4, 12], 1);
        let k = randn(&[1, 4, 6], 2);
        let e = causal_attention(&q, &k, &k, 3, 2, None, 1.0, None).unwrap_err();
        assert!(e.to_string().contains("[1, 4, 12]"), "{e}");
        let (cos, sin) = tables(3, 4);
        let rope = Some(Rotary {
            cos: &cos,
            sin: &sin,
        });
        let e = causal_attention(&q, &q, &q, 3, 3, rope, 1.0, None).unwrap_err();
        assert!(e.to_string().contains("rope tables"), "{e}");
    }

    /// The f32 kernel (fast exp, f32 products) against the f64 one.
    #[test]
    fn f32_attention_is_close_to_f64() {
        let (b, nh, nkv, t, hd) = (2, 6, 3, 33, 16);
        let q = (randn(&[b, t, nh * hd], 5) * 3.0).unwrap();
        let k = (randn(&[b, t, nkv * hd], 6) * 3.0).unwrap();
        let v = randn(&[b, t, nkv * hd], 7);
        let (cos, sin) = tables(t, hd);
        let rope = Some(Rotary {
            cos: &cos,
            sin: &sin,
        });
        let attend = |q: &Tensor, k: &Tensor, v: &Tensor| {
            causal_attention(q, k, v, nh, nkv, rope, 0.25, Some(20)).unwrap()
        };
        let f = |x: &Tensor| Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap();
        let (q32, k32, v32) = (f(&q), f(&k), f(&v));
        let y64 = attend(&q, &k, &v);
        let y32 = attend(q32.as_tensor(), k32.as_tensor(), v32.as_tensor());
        let err = max_diff(&y32.to_dtype(DType::F64).unwrap(), &y64);
        assert!(err < 1e-5, "forward {err}");
        let g = y32.sum_all().unwrap().backward().unwrap();
        let (qv, kv, vv) = (
            Var::from_tensor(&q).unwrap(),
            Var::from_tensor(&k).unwrap(),
            Var::from_tensor(&v).unwrap(),
        );
        let y = attend(qv.as_tensor(), kv.as_tensor(), vv.as_tensor());
        let g64 = y.sum_all().unwrap().backward().unwrap();
        for (a, c) in [(&q32, &qv), (&k32, &kv), (&v32, &vv)] {
            let d = max_diff(
                &g.get(a).unwrap().to_dtype(DType::F64).unwrap(),
                g64.get(c).unwrap(),
            );
            assert!(d < 1e-4, "gradient differs by {d}");
        }
    }
}
