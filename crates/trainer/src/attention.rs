//! Causal self-attention as one op: `softmax(scale · Q Kᵀ + mask) V`, with grouped-query heads,
//! an optional sliding window, and a hand-written backward.
//!
//! The composed form (two batched products around [`crate::ops::causal_softmax`], then a
//! transpose and a copy into `[b, t, heads·head_dim]`) leaves the `[groups·t, t]` scores and
//! probabilities of every head as tensors in the autograd graph, each gradient zero-filled and
//! accumulated by candle, plus the copies of the transposes. On the CPU this op works one
//! (sequence, key/value head) unit at a time: its scores live in a scratch buffer while the
//! unit's queries, keys and values are hot in cache, and the output is written straight into
//! `[b, t, heads·head_dim]`. Units run in parallel, each with single-threaded products.
//!
//! The backward recomputes the probabilities from Q and K (one product per unit, as
//! FlashAttention does) instead of keeping them: `[groups·t, t]` per unit per layer would be
//! the largest activation of a training step. With `P = softmax(S)`, `dO` the output gradient:
//!
//! - `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ⊙ (dP − rowsum(dP ⊙ P))`,
//! - `dQ = scale · dS K`, `dK = scale · dSᵀ Q`.
//!
//! Off the CPU, in other dtypes, and with a KV cache the composed form is used.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu_gemm::{gemm, serial};
use crate::ops::{contiguous_slice, guard_slice};

type CResult<T> = candle_core::Result<T>;

/// `softmax(scale · q kᵀ + causal mask) v` for `q: [b, heads, t, d]`, `k, v: [b, kv_heads, t,
/// d]` (heads a multiple of kv_heads; query head `h` reads kv head `h / (heads / kv_heads)`),
/// returned as `[b, t, heads·d]`. `window`: key `j` is visible from query `p` when
/// `p - window < j <= p`.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> CResult<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (bk, nkv, tk, hdk) = k.dims4()?;
    if (bk, tk, hdk) != (b, t, hd) || v.dims() != k.dims() || nkv == 0 || nh % nkv != 0 {
        candle_core::bail!(
            "causal_attention: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::F64) {
        let op = CausalAttention {
            scale,
            window,
            groups: nh / nkv,
        };
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    causal_attention_composed(q, k, v, scale, window)
}

/// [`causal_attention`] as candle ops with autograd (other devices and dtypes, and the tests'
/// reference).
pub fn causal_attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> CResult<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    // grouped-query attention without repeating k/v: q as [b, nkv, groups·t, hd]
    let qg = q.reshape((b, nkv, nh / nkv * t, hd))?;
    let scores = qg.matmul(&k.t()?)?;
    let probs = crate::ops::causal_softmax(&scores, scale, t, 0, window)?;
    probs
        .matmul(&v.contiguous()?)?
        .reshape((b, nh, t, hd))?
        .transpose(1, 2)?
        .reshape((b, t, nh * hd))
}

struct CausalAttention {
    scale: f64,
    window: Option<usize>,
    /// query heads per kv head
    groups: usize,
}

/// Sizes of one call: `units = b · kv_heads`, each with `rows = groups · t` query rows.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    nh: usize,
    t: usize,
    hd: usize,
    groups: usize,
}

impl Dims {
    fn rows(&self) -> usize {
        self.groups * self.t
    }
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

    fn cpu_forward<T: WithDType>(&self, q: &[T], k: &[T], v: &[T], d: Dims) -> Vec<T> {
        let Dims {
            b,
            nh,
            t,
            hd,
            groups,
        } = d;
        let rows = d.rows();
        let blocks = self.blocks(d);
        // one unit per (sequence, kv head): q rows [groups·t, hd], k and v [t, hd]
        let outs: Vec<Vec<T>> = q
            .par_chunks(rows * hd)
            .zip(k.par_chunks(t * hd).zip(v.par_chunks(t * hd)))
            .map(|(qu, (ku, vu))| {
                serial(|| {
                    let mut o = vec![T::zero(); rows * hd];
                    for &blk in &blocks {
                        let p = self.block_probs(qu, ku, blk, d);
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
        // [b, kv, groups, t, hd] -> [b, t, heads·hd]
        let mut y = vec![T::zero(); b * t * nh * hd];
        y.par_chunks_mut(nh * hd).enumerate().for_each(|(bp, yr)| {
            let (bi, p) = (bp / t, bp % t);
            for h in 0..nh {
                let o = &outs[bi * (nh / groups) + h / groups];
                let src = ((h % groups) * t + p) * hd;
                yr[h * hd..(h + 1) * hd].copy_from_slice(&o[src..src + hd]);
            }
        });
        y
    }

    /// (dq, dk, dv) for `dy: [b, t, heads·hd]`.
    fn cpu_backward<T: WithDType>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        dy: &[T],
        d: Dims,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let Dims {
            nh, t, hd, groups, ..
        } = d;
        let rows = d.rows();
        let nkv = nh / groups;
        let blocks = self.blocks(d);
        let mut dq = vec![T::zero(); q.len()];
        let mut dk = vec![T::zero(); k.len()];
        let mut dv = vec![T::zero(); v.len()];
        dq.par_chunks_mut(rows * hd)
            .zip(dk.par_chunks_mut(t * hd).zip(dv.par_chunks_mut(t * hd)))
            .enumerate()
            .for_each(|(u, (dqu, (dku, dvu)))| {
                let (bi, j) = (u / nkv, u % nkv);
                let qu = &q[u * rows * hd..(u + 1) * rows * hd];
                let ku = &k[u * t * hd..(u + 1) * t * hd];
                let vu = &v[u * t * hd..(u + 1) * t * hd];
                // this unit's output gradient, [groups·t, hd] from [b, t, heads·hd]
                let mut dyu = vec![T::zero(); rows * hd];
                for (r, row) in dyu.chunks_mut(hd).enumerate() {
                    let (g, p) = (r / t, r % t);
                    let src = (bi * t + p) * nh * hd + (j * groups + g) * hd;
                    row.copy_from_slice(&dy[src..src + hd]);
                }
                serial(|| {
                    for &blk in &blocks {
                        let (nr, kk) = (blk.nr, blk.keys());
                        let p = self.block_probs(qu, ku, blk, d);
                        let dyb = &dyu[blk.r0 * hd..];
                        // dV += Pᵀ dO: [keys, nr] x [nr, hd]
                        let dvb = &mut dvu[blk.k0 * hd..];
                        gemm((kk, hd, nr), dvb, true, &p, (1, kk), dyb, (hd, 1), 1.0);
                        // dP = dO Vᵀ: [nr, hd] x [hd, keys], then dS in place
                        let mut ds = vec![T::zero(); nr * kk];
                        let vb = &vu[blk.k0 * hd..];
                        gemm((nr, kk, hd), &mut ds, false, dyb, (hd, 1), vb, (1, hd), 1.0);
                        for (dr, pr) in ds.chunks_mut(kk).zip(p.chunks(kk)) {
                            let dot: f64 = dr
                                .iter()
                                .zip(pr)
                                .map(|(a, b)| a.to_f64() * b.to_f64())
                                .sum();
                            let dot = T::from_f64(dot);
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
            });
        (dq, dk, dv)
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
        let (b, nh, t, hd) = ql.shape().dims4()?;
        let d = Dims {
            b,
            nh,
            t,
            hd,
            groups: self.groups,
        };
        let shape = Shape::from((b, t, nh * hd));
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
        let (b, nh, t, hd) = q.dims4()?;
        let d = Dims {
            b,
            nh,
            t,
            hd,
            groups: self.groups,
        };
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

    /// The fused op against the composed ops in f64: output and the gradients of q, k, v,
    /// for plain and grouped heads, with and without a sliding window.
    #[test]
    fn fused_attention_matches_composed_ops() {
        for &(b, nh, nkv, t, hd, window) in &[
            (1, 2, 2, 5, 4, None),
            (2, 6, 2, 7, 8, None),
            (2, 4, 1, 9, 4, Some(3)),
            // several query blocks, the last one partial, with and without a window
            (1, 4, 2, 150, 8, None),
            (1, 2, 1, 130, 4, Some(70)),
        ] {
            let q = (randn(&[b, nh, t, hd], 1) * 2.0).unwrap();
            let k = (randn(&[b, nkv, t, hd], 2) * 2.0).unwrap();
            let v = randn(&[b, nkv, t, hd], 3);
            let scale = 0.35;
            check_against_composed(
                &[q, k, v],
                |x| causal_attention(&x[0], &x[1], &x[2], scale, window).unwrap(),
                |x| causal_attention_composed(&x[0], &x[1], &x[2], scale, window).unwrap(),
                1e-12,
            );
        }
    }

    /// The f32 kernel (fast exp, f32 products) against the f64 one.
    #[test]
    fn f32_attention_is_close_to_f64() {
        let (b, nh, nkv, t, hd) = (2, 6, 3, 33, 16);
        let q = (randn(&[b, nh, t, hd], 5) * 3.0).unwrap();
        let k = (randn(&[b, nkv, t, hd], 6) * 3.0).unwrap();
        let v = randn(&[b, nkv, t, hd], 7);
        let f = |x: &Tensor| Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap();
        let (q32, k32, v32) = (f(&q), f(&k), f(&v));
        let y64 = causal_attention(&q, &k, &v, 0.25, Some(20)).unwrap();
        let y32 = causal_attention(
            q32.as_tensor(),
            k32.as_tensor(),
            v32.as_tensor(),
            0.25,
            Some(20),
        )
        .unwrap();
        let err = max_diff(&y32.to_dtype(DType::F64).unwrap(), &y64);
        assert!(err < 1e-5, "forward {err}");
        let g = y32.sum_all().unwrap().backward().unwrap();
        let (qv, kv, vv) = (
            Var::from_tensor(&q).unwrap(),
            Var::from_tensor(&k).unwrap(),
            Var::from_tensor(&v).unwrap(),
        );
        let y = causal_attention(
            qv.as_tensor(),
            kv.as_tensor(),
            vv.as_tensor(),
            0.25,
            Some(20),
        )
        .unwrap();
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
