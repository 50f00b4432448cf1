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

/// Keys visible from query position `pos`.
fn visible(pos: usize, window: Option<usize>) -> std::ops::RangeInclusive<usize> {
    window.map_or(0, |w| (pos + 1).saturating_sub(w))..=pos
}

/// Each row of `p: [rows, t]` (scaled scores) replaced by its causal softmax; masked entries 0.
fn softmax_rows<T: WithDType>(p: &mut [T], t: usize, window: Option<usize>) {
    for (r, row) in p.chunks_mut(t).enumerate() {
        let keep = visible(r % t, window);
        let (first, last) = (*keep.start(), *keep.end());
        if T::DTYPE == DType::F32 {
            // SAFETY: T is f32 (its DType says so).
            let row = unsafe { std::slice::from_raw_parts_mut(row.as_mut_ptr() as *mut f32, t) };
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
    /// The probabilities `[rows, t]` of one unit.
    fn probs<T: WithDType>(&self, q: &[T], k: &[T], d: Dims) -> Vec<T> {
        let (rows, t, hd) = (d.rows(), d.t, d.hd);
        let mut p = vec![T::zero(); rows * t];
        gemm(
            (rows, t, hd),
            &mut p,
            false,
            q,
            (hd, 1),
            k,
            (1, hd),
            self.scale,
        );
        softmax_rows(&mut p, t, self.window);
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
        // one unit per (sequence, kv head): q rows [groups·t, hd], k and v [t, hd]
        let outs: Vec<Vec<T>> = q
            .par_chunks(rows * hd)
            .zip(k.par_chunks(t * hd).zip(v.par_chunks(t * hd)))
            .map(|(qu, (ku, vu))| {
                serial(|| {
                    let p = self.probs(qu, ku, d);
                    let mut o = vec![T::zero(); rows * hd];
                    gemm((rows, hd, t), &mut o, false, &p, (t, 1), vu, (hd, 1), 1.0);
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
                    let p = self.probs(qu, ku, d);
                    // dV = Pᵀ dO: [t, rows] x [rows, hd]
                    gemm((t, hd, rows), dvu, false, &p, (1, t), &dyu, (hd, 1), 1.0);
                    // dP = dO Vᵀ: [rows, hd] x [hd, t], then dS in place
                    let mut ds = vec![T::zero(); rows * t];
                    gemm(
                        (rows, t, hd),
                        &mut ds,
                        false,
                        &dyu,
                        (hd, 1),
                        vu,
                        (1, hd),
                        1.0,
                    );
                    for (dr, pr) in ds.chunks_mut(t).zip(p.chunks(t)) {
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
                    // dQ = scale · dS K: [rows, t] x [t, hd]; dK = scale · dSᵀ Q: [t, rows] x [rows, hd]
                    gemm(
                        (rows, hd, t),
                        dqu,
                        false,
                        &ds,
                        (t, 1),
                        ku,
                        (hd, 1),
                        self.scale,
                    );
                    gemm(
                        (t, hd, rows),
                        dku,
                        false,
                        &ds,
                        (1, t),
                        qu,
                        (hd, 1),
                        self.scale,
                    );
                });
            });
        (dq, dk, dv)
    }
}

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("causal_attention: {what} must be contiguous"),
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
        match qs.dtype() {
            DType::F32 => Ok((
                CpuStorage::F32(self.cpu_forward(
                    slice(qs, ql, "q")?,
                    slice(ks, kl, "k")?,
                    slice(vs, vl, "v")?,
                    d,
                )),
                shape,
            )),
            DType::F64 => Ok((
                CpuStorage::F64(self.cpu_forward(
                    slice(qs, ql, "q")?,
                    slice(ks, kl, "k")?,
                    slice(vs, vl, "v")?,
                    d,
                )),
                shape,
            )),
            dt => candle_core::bail!("causal_attention: unsupported dtype {dt:?}"),
        }
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
                    .zip(["q", "k", "v", "dy"])
                    .map(|((st, l), what)| match &**st {
                        candle_core::Storage::Cpu(st) => slice::<$t>(st, l, what),
                        _ => candle_core::bail!("causal_attention: expected cpu tensors"),
                    })
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
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// The fused op against the composed ops in f64: output and the gradients of q, k, v,
    /// for plain and grouped heads, with and without a sliding window.
    #[test]
    fn fused_attention_matches_composed_ops() {
        for &(b, nh, nkv, t, hd, window) in &[
            (1, 2, 2, 5, 4, None),
            (2, 6, 2, 7, 8, None),
            (2, 4, 1, 9, 4, Some(3)),
        ] {
            let q = Var::from_tensor(&(randn(&[b, nh, t, hd], 1) * 2.0).unwrap()).unwrap();
            let k = Var::from_tensor(&(randn(&[b, nkv, t, hd], 2) * 2.0).unwrap()).unwrap();
            let v = Var::from_tensor(&randn(&[b, nkv, t, hd], 3)).unwrap();
            let probe = randn(&[b, t, nh * hd], 4);
            let scale = 0.35;
            let y1 = causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, window)
                .unwrap();
            let y2 = causal_attention_composed(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                scale,
                window,
            )
            .unwrap();
            let case = format!("b{b} h{nh}/{nkv} t{t} d{hd} window {window:?}");
            assert!(
                max_diff(&y1, &y2) < 1e-12,
                "{case}: forward {}",
                max_diff(&y1, &y2)
            );
            let g1 = (&y1 * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (&y2 * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let a = g1
                    .get(var)
                    .unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
                let c = g2.get(var).unwrap();
                assert!(
                    max_diff(a, c) < 1e-12,
                    "{case}: d{name} differs by {}",
                    max_diff(a, c)
                );
            }
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
