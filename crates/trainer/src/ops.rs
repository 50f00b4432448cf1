//! Custom ops with hand-written backward passes.
//!
//! candle's fast `rms_norm`, `softmax_last_dim` and `rope` record no backward, and a plain
//! `matmul` against a frozen weight still computes that weight's gradient. The ops here run a
//! fused forward kernel and record a backward, so gradients reach every trainable tensor:
//!
//! - [`rms_norm`]: `y = x / sqrt(mean(x²) + eps) * w` over the last dim, gradients for x and w;
//! - [`softmax_last_dim`]: with the backward `dx = y * (dy - sum(dy * y))`;
//! - [`rope`]: rotary embedding on `[b, h, t, d]` (halves rotated, HF layout), the backward
//!   being the rotation by the opposite angle;
//! - [`frozen_linear`]: `y = x Wᵀ` whose backward returns only `dx = dy W`;
//! - [`lm_head_loss`]: the LM head and masked cross-entropy computed chunk by chunk, so the
//!   `[tokens, vocab]` logits never exist in full.
//!
//! The forward kernels are written for the CPU (f32 and f64); the backward passes are candle
//! tensor ops. On CUDA and Metal the frozen linear runs the backend's own product (still no
//! weight gradient), and RMSNorm, softmax, the causal softmax, RoPE and the LM-head loss run
//! as composed candle ops, whose autograd gives the same gradients (tested on the CPU against
//! these ops); the LM-head loss there materialises the logits.

use std::sync::Mutex;

use crate::config::Activation;
use crate::quant::QuantWeight;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor, WithDType, D,
};
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

/// The elements of a contiguous CPU storage; `op` names the input in the error.
pub(crate) fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> CResult<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<T>()?[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The contiguous elements of a CPU tensor borrowed by `Tensor::storage_and_layout` (several
/// can be held at once).
pub(crate) fn guard_slice<'a, T, G>(g: &'a (G, &Layout), op: &str) -> CResult<&'a [T]>
where
    T: WithDType,
    G: std::ops::Deref<Target = candle_core::Storage>,
{
    let candle_core::Storage::Cpu(s) = &*g.0 else {
        candle_core::bail!("{op}: expected a cpu tensor")
    };
    contiguous_slice::<T>(s, g.1, op)
}

/// The contiguous elements of a CPU tensor, borrowed for `f`.
pub(crate) fn with_cpu_slice<T: WithDType, R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[T]) -> CResult<R>,
) -> CResult<R> {
    let g = t.storage_and_layout();
    f(guard_slice::<T, _>(&g, op)?)
}

macro_rules! dispatch_float {
    ($s:expr, $op:expr, $f:ident, $($arg:expr),*) => {
        match $s.dtype() {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            dt => candle_core::bail!("{}: unsupported dtype {dt:?} (expected f32 or f64)", $op),
        }
    };
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

struct RmsNorm {
    eps: f64,
}

fn rms_norm_fwd<T: WithDType>(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    eps: f64,
) -> CResult<(CpuStorage, Shape)> {
    let x = contiguous_slice::<T>(xs, xl, "rms_norm")?;
    let w = contiguous_slice::<T>(ws, wl, "rms_norm")?;
    let d = w.len();
    if d == 0 || xl.dims().last() != Some(&d) {
        candle_core::bail!("rms_norm: weight of {d} elements for input {:?}", xl.dims());
    }
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(yr, xr)| {
            let ms = xr.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / d as f64;
            let r = 1.0 / (ms + eps).sqrt();
            for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
                *yv = T::from_f64(xv.to_f64() * r * wv.to_f64());
            }
        });
    Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "ftbench-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        dispatch_float!(xs, "rms_norm", rms_norm_fwd, xs, xl, ws, wl, self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        // r = 1/rms(x), xhat = x r; dw = Σ_rows dy xhat; dx = r (g - xhat mean(g xhat)), g = dy w
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            let (dx, dw) = rms_norm_bwd_f32(
                &x.contiguous()?,
                &w.contiguous()?,
                &dy.contiguous()?,
                self.eps,
            )?;
            return Ok((Some(dx), Some(dw)));
        }
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let xhat = x.broadcast_mul(&r)?;
        let d = w.dim(0)?;
        let dw = (dy * &xhat)?.reshape(((), d))?.sum(0)?;
        let g = dy.broadcast_mul(w)?;
        let proj = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = (g - xhat.broadcast_mul(&proj)?)?.broadcast_mul(&r)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The RMSNorm backward in one pass over the rows (f32, CPU): dx, and dw summed per thread.
fn rms_norm_bwd_f32(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> CResult<(Tensor, Tensor)> {
    let d = w.dim(0)?;
    let xv = x.flatten_all()?;
    let (xs, _) = xv.storage_and_layout();
    let dyv = dy.flatten_all()?;
    let (dys, _) = dyv.storage_and_layout();
    let wv = w.to_vec1::<f32>()?;
    let (candle_core::Storage::Cpu(xs), candle_core::Storage::Cpu(dys)) = (&*xs, &*dys) else {
        candle_core::bail!("rms_norm backward: expected cpu tensors")
    };
    let (xs, dys) = (xs.as_slice::<f32>()?, dys.as_slice::<f32>()?);
    let (xs, dys) = (
        &xs[x.layout().start_offset()..][..x.elem_count()],
        &dys[dy.layout().start_offset()..][..dy.elem_count()],
    );
    let mut dx = vec![0f32; xs.len()];
    let rows_per_task = (4096 / d).max(1);
    let dw = dx
        .par_chunks_mut(d * rows_per_task)
        .zip(
            xs.par_chunks(d * rows_per_task)
                .zip(dys.par_chunks(d * rows_per_task)),
        )
        .map(|(dxb, (xb, dyb))| {
            let mut dw = vec![0f64; d];
            for ((dxr, xr), dyr) in dxb.chunks_mut(d).zip(xb.chunks(d)).zip(dyb.chunks(d)) {
                let ms = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
                let r = 1.0 / (ms + eps).sqrt();
                let mut proj = 0.0f64;
                for i in 0..d {
                    let xhat = xr[i] as f64 * r;
                    dw[i] += dyr[i] as f64 * xhat;
                    proj += dyr[i] as f64 * wv[i] as f64 * xhat;
                }
                proj /= d as f64;
                for i in 0..d {
                    let xhat = xr[i] as f64 * r;
                    dxr[i] = (r * (dyr[i] as f64 * wv[i] as f64 - xhat * proj)) as f32;
                }
            }
            dw
        })
        .reduce(
            || vec![0f64; d],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                a
            },
        );
    let dev = x.device();
    let dx = Tensor::from_vec(dx, x.shape(), dev)?;
    let dw = Tensor::from_vec(
        dw.into_iter().map(|v| v as f32).collect::<Vec<f32>>(),
        d,
        dev,
    )?;
    Ok((dx, dw))
}

/// RMS normalisation over the last dimension, `x / sqrt(mean(x²) + eps) * w`, with backward.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    if !x.device().is_cpu() {
        return rms_norm_composed(x, w, eps);
    }
    let x = x.contiguous()?;
    x.apply_op2(w, RmsNorm { eps })
}

/// RMSNorm as differentiable candle ops (non-CPU devices).
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    x.broadcast_div(&r)?.broadcast_mul(w)
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension

struct Softmax;

fn softmax_fwd<T: WithDType>(s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
    let x = contiguous_slice::<T>(s, l, "softmax")?;
    let d = *l.dims().last().unwrap_or(&1);
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(d.max(1))
        .zip(x.par_chunks(d.max(1)))
        .for_each(|(yr, xr)| {
            let max = xr
                .iter()
                .map(|v| v.to_f64())
                .fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for (yv, xv) in yr.iter_mut().zip(xr) {
                let e = (xv.to_f64() - max).exp();
                sum += e;
                *yv = T::from_f64(e);
            }
            let inv = 1.0 / sum;
            for yv in yr.iter_mut() {
                *yv = T::from_f64(yv.to_f64() * inv);
            }
        });
    Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "ftbench-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        dispatch_float!(s, "softmax", softmax_fwd, s, l)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        let dot = (dy * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * dy.broadcast_sub(&dot)?)?))
    }
}

/// Softmax over the last dimension, with backward.
pub fn softmax_last_dim(x: &Tensor) -> CResult<Tensor> {
    if !x.device().is_cpu() {
        return softmax_composed(x);
    }
    x.contiguous()?.apply_op1(Softmax)
}

/// Softmax over the last dimension as differentiable candle ops (non-CPU devices).
fn softmax_composed(x: &Tensor) -> CResult<Tensor> {
    let e = x
        .broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?
        .exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

// ---------------------------------------------------------------------------------------------
// Scaled, causally masked softmax of attention scores

struct CausalSoftmax {
    scale: f64,
    /// query positions per group of rows
    t: usize,
    /// cached positions before the first query
    past: usize,
    /// sliding window: key j is visible from query p when p - window < j <= p
    window: Option<usize>,
}

fn causal_softmax_fwd<T: WithDType>(
    s: &CpuStorage,
    l: &Layout,
    op: &CausalSoftmax,
) -> CResult<(CpuStorage, Shape)> {
    let x = contiguous_slice::<T>(s, l, "causal_softmax")?;
    let total = *l.dims().last().unwrap_or(&1);
    let rows_per_matrix = l.dims()[l.dims().len() - 2];
    if op.past + op.t != total || rows_per_matrix % op.t != 0 {
        candle_core::bail!(
            "causal_softmax: scores {:?} for {} past and {} new positions",
            l.dims(),
            op.past,
            op.t
        );
    }
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(total)
        .zip(x.par_chunks(total))
        .enumerate()
        .for_each(|(row, (yr, xr))| {
            let pos = op.past + row % rows_per_matrix % op.t;
            let first = op.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let visible = first..=pos;
            let max = xr[visible.clone()]
                .iter()
                .map(|v| v.to_f64() * op.scale)
                .fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for j in visible.clone() {
                let e = (xr[j].to_f64() * op.scale - max).exp();
                sum += e;
                yr[j] = T::from_f64(e);
            }
            let inv = 1.0 / sum;
            for v in &mut yr[visible] {
                *v = T::from_f64(v.to_f64() * inv);
            }
        });
    Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "ftbench-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        dispatch_float!(s, "causal_softmax", causal_softmax_fwd, s, l, self)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        if y.device().is_cpu() {
            let grad = CausalSoftmaxGrad { scale: self.scale };
            return Ok(Some(y.apply_op2_no_bwd(&dy.contiguous()?, &grad)?));
        }
        // masked entries have y = 0, so their gradient is 0 too
        let dot = (dy * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some(((y * dy.broadcast_sub(&dot)?)? * self.scale)?))
    }
}

/// The causal softmax's input gradient in one pass per row:
/// `dx = scale · y ⊙ (dy - Σ dy ⊙ y)`; masked entries (y = 0) get 0.
struct CausalSoftmaxGrad {
    scale: f64,
}

fn causal_softmax_grad<T: WithDType>(
    ys: &CpuStorage,
    yl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
    scale: f64,
) -> CResult<(CpuStorage, Shape)> {
    let y = contiguous_slice::<T>(ys, yl, "causal_softmax backward")?;
    let dy = contiguous_slice::<T>(gs, gl, "causal_softmax backward")?;
    if y.len() != dy.len() {
        candle_core::bail!(
            "causal_softmax backward: {:?} vs {:?}",
            yl.dims(),
            gl.dims()
        );
    }
    let total = (*yl.dims().last().unwrap_or(&1)).max(1);
    let mut dx = vec![T::zero(); y.len()];
    dx.par_chunks_mut(total)
        .zip(y.par_chunks(total).zip(dy.par_chunks(total)))
        .for_each(|(dxr, (yr, gr))| {
            let dot: f64 = yr
                .iter()
                .zip(gr)
                .map(|(a, b)| a.to_f64() * b.to_f64())
                .sum();
            for ((o, yv), gv) in dxr.iter_mut().zip(yr).zip(gr) {
                *o = T::from_f64(scale * yv.to_f64() * (gv.to_f64() - dot));
            }
        });
    Ok((T::to_cpu_storage_owned(dx), yl.shape().clone()))
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "ftbench-causal-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        dispatch_float!(
            ys,
            "causal_softmax backward",
            causal_softmax_grad,
            ys,
            yl,
            gs,
            gl,
            self.scale
        )
    }
}

/// `softmax(scale · scores + mask)` over the last dimension for attention scores
/// `[.., groups·t, past + t]` whose rows are `groups` copies of `t` query positions after
/// `past` cached ones: the causal mask (and a sliding window) is applied inside, with backward.
pub fn causal_softmax(
    scores: &Tensor,
    scale: f64,
    t: usize,
    past: usize,
    window: Option<usize>,
) -> CResult<Tensor> {
    if !scores.device().is_cpu() {
        return causal_softmax_composed(scores, scale, t, past, window);
    }
    scores.contiguous()?.apply_op1(CausalSoftmax {
        scale,
        t,
        past,
        window,
    })
}

/// [`causal_softmax`] as differentiable candle ops: an additive mask of `-inf` (non-CPU
/// devices).
pub fn causal_softmax_composed(
    scores: &Tensor,
    scale: f64,
    t: usize,
    past: usize,
    window: Option<usize>,
) -> CResult<Tensor> {
    let dims = scores.dims();
    let (rows, total) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    if past + t != total || rows % t != 0 {
        candle_core::bail!("causal_softmax: scores {dims:?} for {past} past and {t} new positions");
    }
    let mut mask = vec![0f32; rows * total];
    for (r, row) in mask.chunks_mut(total).enumerate() {
        let pos = past + r % t;
        let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        for (j, v) in row.iter_mut().enumerate() {
            if j > pos || j < first {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (rows, total), scores.device())?.to_dtype(scores.dtype())?;
    softmax_composed(&(scores * scale)?.broadcast_add(&mask)?)
}

// ---------------------------------------------------------------------------------------------
// Rotary position embedding

struct Rope {
    /// `[t, d/2]`
    cos: Tensor,
    /// `[t, d/2]`, negated for the backward pass
    sin: Tensor,
}

fn rope_fwd<T: WithDType>(
    s: &CpuStorage,
    l: &Layout,
    cos: &Tensor,
    sin: &Tensor,
) -> CResult<(CpuStorage, Shape)> {
    let x = contiguous_slice::<T>(s, l, "rope")?;
    let (_b, _h, t, d) = l.shape().dims4()?;
    let half = d / 2;
    if cos.dims() != [t, half] || sin.dims() != [t, half] {
        candle_core::bail!(
            "rope: cos/sin of shape {:?} for input {:?}",
            cos.dims(),
            l.dims()
        );
    }
    let cos = cos.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let sin = sin.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let mut y = vec![T::zero(); x.len()];
    // one chunk per (batch, head): [t, d]
    y.par_chunks_mut(t * d)
        .zip(x.par_chunks(t * d))
        .for_each(|(yh, xh)| {
            for p in 0..t {
                let (xr, yr) = (&xh[p * d..(p + 1) * d], &mut yh[p * d..(p + 1) * d]);
                for i in 0..half {
                    let (c, sn) = (cos[p * half + i], sin[p * half + i]);
                    let (x1, x2) = (xr[i].to_f64(), xr[i + half].to_f64());
                    yr[i] = T::from_f64(x1 * c - x2 * sn);
                    yr[i + half] = T::from_f64(x2 * c + x1 * sn);
                }
            }
        });
    Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "ftbench-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        dispatch_float!(s, "rope", rope_fwd, s, l, &self.cos, &self.sin)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        // The rotation is orthogonal: its transpose is the rotation by -θ.
        let inverse = Rope {
            cos: self.cos.clone(),
            sin: self.sin.neg()?,
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

/// Rotary embedding of `x: [b, h, t, d]` with `cos, sin: [t, d/2]` (the two halves of the head
/// dimension are rotated together, as in HF transformers), with backward.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    let cos = cos.to_dtype(x.dtype())?;
    let sin = sin.to_dtype(x.dtype())?;
    if !x.device().is_cpu() {
        return rope_composed(x, &cos, &sin);
    }
    x.contiguous()?.apply_op1(Rope { cos, sin })
}

/// [`rope`] as differentiable candle ops (non-CPU devices).
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    let half = x.dim(3)? / 2;
    let (x1, x2) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[a, b], 3)
}

// ---------------------------------------------------------------------------------------------
// Gated MLP activation

/// `act(gate) ⊙ up` (the MLP's SwiGLU / GeGLU product) as one op: one pass forward, one pass
/// backward for both input gradients, instead of an activation, a product and their composed
/// backward passes.
struct GatedAct {
    act: Activation,
}

/// SiLU and its derivative at `g`, f32 with [`fast_exp`].
#[inline(always)]
fn silu_and_grad_f32(g: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + fast_exp(-g));
    (g * s, s * (1.0 + g * (1.0 - s)))
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_CUBIC: f64 = 0.044_715;

/// tanh-approximated GELU and its derivative at `g`, f32 with [`fast_exp`].
#[inline(always)]
fn gelu_tanh_and_grad_f32(g: f32) -> (f32, f32) {
    let (c, k) = (SQRT_2_OVER_PI as f32, GELU_CUBIC as f32);
    let z = c * (g + k * g * g * g);
    let t = 1.0 - 2.0 / (fast_exp(2.0 * z) + 1.0);
    let dz = c * (1.0 + 3.0 * k * g * g);
    (
        0.5 * g * (1.0 + t),
        0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * dz,
    )
}

fn silu_and_grad_f64(g: f64) -> (f64, f64) {
    let s = 1.0 / (1.0 + (-g).exp());
    (g * s, s * (1.0 + g * (1.0 - s)))
}

fn gelu_tanh_and_grad_f64(g: f64) -> (f64, f64) {
    let t = (SQRT_2_OVER_PI * (g + GELU_CUBIC * g * g * g)).tanh();
    let dz = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * g * g);
    (
        0.5 * g * (1.0 + t),
        0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * dz,
    )
}

fn gated_fwd_f32(act: Activation, gate: &[f32], up: &[f32]) -> Vec<f32> {
    // one monomorphised loop per activation, so the compiler inlines and vectorises it
    fn run(f: impl Fn(f32) -> (f32, f32) + Sync, gate: &[f32], up: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; gate.len()];
        y.par_chunks_mut(1 << 14)
            .zip(gate.par_chunks(1 << 14).zip(up.par_chunks(1 << 14)))
            .for_each(|(y, (g, u))| {
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    *y = f(*g).0 * u;
                }
            });
        y
    }
    match act {
        Activation::Silu => run(silu_and_grad_f32, gate, up),
        Activation::GeluTanh => run(gelu_tanh_and_grad_f32, gate, up),
    }
}

fn gated_fwd_f64(act: Activation, gate: &[f64], up: &[f64]) -> Vec<f64> {
    let f = match act {
        Activation::Silu => silu_and_grad_f64,
        Activation::GeluTanh => gelu_tanh_and_grad_f64,
    };
    gate.iter().zip(up).map(|(g, u)| f(*g).0 * u).collect()
}

/// (d gate, d up) for `dy`: `dy ⊙ up ⊙ act'(gate)` and `dy ⊙ act(gate)`.
fn gated_bwd_f32(act: Activation, gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    fn run(
        f: impl Fn(f32) -> (f32, f32) + Sync,
        gate: &[f32],
        up: &[f32],
        dy: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let mut dg = vec![0f32; gate.len()];
        let mut du = vec![0f32; gate.len()];
        const C: usize = 1 << 14;
        dg.par_chunks_mut(C)
            .zip(du.par_chunks_mut(C))
            .zip(
                gate.par_chunks(C)
                    .zip(up.par_chunks(C))
                    .zip(dy.par_chunks(C)),
            )
            .for_each(|((dg, du), ((g, u), dy))| {
                let outs = dg.iter_mut().zip(du.iter_mut());
                for ((dg, du), ((g, u), dy)) in outs.zip(g.iter().zip(u).zip(dy)) {
                    let (a, da) = f(*g);
                    *dg = dy * u * da;
                    *du = dy * a;
                }
            });
        (dg, du)
    }
    match act {
        Activation::Silu => run(silu_and_grad_f32, gate, up, dy),
        Activation::GeluTanh => run(gelu_tanh_and_grad_f32, gate, up, dy),
    }
}

fn gated_bwd_f64(act: Activation, gate: &[f64], up: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let f = match act {
        Activation::Silu => silu_and_grad_f64,
        Activation::GeluTanh => gelu_tanh_and_grad_f64,
    };
    (0..gate.len())
        .map(|i| {
            let (a, da) = f(gate[i]);
            (dy[i] * up[i] * da, dy[i] * a)
        })
        .unzip()
}

/// (d gate, d up) as tensors of `gate`'s shape, from CPU tensors.
fn gated_bwd<T: WithDType>(
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
    kernel: fn(Activation, &[T], &[T], &[T]) -> (Vec<T>, Vec<T>),
    act: Activation,
) -> CResult<(Tensor, Tensor)> {
    let op = "gated_act backward";
    let (dg, du) = with_cpu_slice::<T, _>(gate, op, |g| {
        with_cpu_slice::<T, _>(up, op, |u| {
            with_cpu_slice::<T, _>(dy, op, |d| Ok(kernel(act, g, u, d)))
        })
    })?;
    let (shape, dev) = (gate.shape(), gate.device());
    Ok((
        Tensor::from_vec(dg, shape, dev)?,
        Tensor::from_vec(du, shape, dev)?,
    ))
}

impl CustomOp2 for GatedAct {
    fn name(&self) -> &'static str {
        "ftbench-gated-act"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        if gl.dims() != ul.dims() {
            candle_core::bail!("gated_act: gate {:?} vs up {:?}", gl.dims(), ul.dims());
        }
        let y = match gs.dtype() {
            DType::F32 => CpuStorage::F32(gated_fwd_f32(
                self.act,
                contiguous_slice(gs, gl, "gated_act")?,
                contiguous_slice(us, ul, "gated_act")?,
            )),
            DType::F64 => CpuStorage::F64(gated_fwd_f64(
                self.act,
                contiguous_slice(gs, gl, "gated_act")?,
                contiguous_slice(us, ul, "gated_act")?,
            )),
            dt => candle_core::bail!("gated_act: unsupported dtype {dt:?} (expected f32 or f64)"),
        };
        Ok((y, gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (gate, up, dy) = (gate.contiguous()?, up.contiguous()?, dy.contiguous()?);
        let (dg, du) = match gate.dtype() {
            DType::F32 => gated_bwd(&gate, &up, &dy, gated_bwd_f32, self.act)?,
            DType::F64 => gated_bwd(&gate, &up, &dy, gated_bwd_f64, self.act)?,
            dt => candle_core::bail!("gated_act: unsupported dtype {dt:?} (expected f32 or f64)"),
        };
        Ok((Some(dg), Some(du)))
    }
}

/// `act(gate) ⊙ up` with backward; SiLU or tanh-GELU (`hidden_act`).
pub fn gated_act(gate: &Tensor, up: &Tensor, act: Activation) -> CResult<Tensor> {
    if !gate.device().is_cpu() {
        return gated_act_composed(gate, up, act);
    }
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, GatedAct { act })
}

/// [`gated_act`] as differentiable candle ops (non-CPU devices, and the tests' reference).
pub fn gated_act_composed(gate: &Tensor, up: &Tensor, act: Activation) -> CResult<Tensor> {
    let a = match act {
        Activation::Silu => candle_nn::ops::silu(gate)?,
        Activation::GeluTanh => gate.gelu()?,
    };
    a * up
}

// ---------------------------------------------------------------------------------------------
// Frozen linear

struct FrozenLinear {
    /// `[out, in]`
    weight: Tensor,
}

/// `dx = dy W` for `dy: [.., out]` and `w: [out, in]`.
fn linear_input_grad(dy: &Tensor, weight: &Tensor) -> CResult<Tensor> {
    let (out_f, in_f) = weight.dims2()?;
    let mut dims = dy.dims().to_vec();
    let dx = dy.reshape(((), out_f))?.matmul(weight)?;
    *dims.last_mut().unwrap() = in_f;
    dx.reshape(dims)
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "ftbench-frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        linear_with(s, l, &self.weight, "frozen_linear")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        linear_with(s, l, &self.weight, "frozen_linear")
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> CResult<(candle_core::MetalStorage, Shape)> {
        linear_with(s, l, &self.weight, "frozen_linear")
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(linear_input_grad(dy, &self.weight)?))
    }
}

/// A backend's storage type, taken out of candle's storage enum.
trait BackendOf: BackendStorage + Sized {
    fn of(s: &candle_core::Storage) -> Option<&Self>;
}

impl BackendOf for CpuStorage {
    fn of(s: &candle_core::Storage) -> Option<&Self> {
        match s {
            candle_core::Storage::Cpu(s) => Some(s),
            _ => None,
        }
    }
}

#[cfg(feature = "cuda")]
impl BackendOf for candle_core::CudaStorage {
    fn of(s: &candle_core::Storage) -> Option<&Self> {
        match s {
            candle_core::Storage::Cuda(s) => Some(s),
            _ => None,
        }
    }
}

#[cfg(feature = "metal")]
impl BackendOf for candle_core::MetalStorage {
    fn of(s: &candle_core::Storage) -> Option<&Self> {
        match s {
            candle_core::Storage::Metal(s) => Some(s),
            _ => None,
        }
    }
}

/// `y = x Wᵀ` for the input storage `s` and a weight tensor on the same backend.
fn linear_with<S: BackendOf>(s: &S, l: &Layout, w: &Tensor, op: &str) -> CResult<(S, Shape)> {
    let (ws, wl) = w.storage_and_layout();
    let Some(ws) = S::of(&ws) else {
        candle_core::bail!("{op}: the weight is not on the input's device")
    };
    frozen_linear_fwd(s, l, ws, wl)
}

/// `y = x Wᵀ` through the backend's own product, for any backend's storage.
fn frozen_linear_fwd<S: BackendStorage>(
    s: &S,
    l: &Layout,
    ws: &S,
    wl: &Layout,
) -> CResult<(S, Shape)> {
    let (out_f, in_f) = wl.shape().dims2()?;
    let dims = l.dims();
    if dims.last() != Some(&in_f) || in_f == 0 {
        candle_core::bail!("frozen_linear: input {dims:?} for weight [{out_f}, {in_f}]");
    }
    let m = l.shape().elem_count() / in_f;
    let Some((offset, _)) = l.contiguous_offsets() else {
        candle_core::bail!("frozen_linear: input must be contiguous")
    };
    let xl = Layout::contiguous_with_offset((m, in_f), offset);
    let wt = wl.transpose(0, 1)?; // [in, out] view of [out, in]
    let y = s.matmul(ws, (1, m, out_f, in_f), &xl, &wt)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = out_f;
    Ok((y, Shape::from(out_dims)))
}

/// `x Wᵀ` for a frozen `W: [out, in]`; the backward returns only the input gradient.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> CResult<Tensor> {
    x.contiguous()?.apply_op1(FrozenLinear {
        weight: weight.clone(),
    })
}

// ---------------------------------------------------------------------------------------------
// Frozen quantized linear

struct QuantLinear {
    weight: QuantWeight,
}

impl CustomOp1 for QuantLinear {
    fn name(&self) -> &'static str {
        "ftbench-quant-linear"
    }

    // each forward dequantizes this layer's weight; the f32 copy is dropped with the product

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        if let (QuantWeight::Bf16(w), CpuStorage::F32(_)) = (&self.weight, s) {
            if l.dims().last() != Some(&w.in_f) {
                candle_core::bail!(
                    "quant_linear: input {:?} for a weight of {} columns",
                    l.dims(),
                    w.in_f
                );
            }
            let x = contiguous_slice::<f32>(s, l, "quant_linear")?;
            let y = bf16_product(x, w, false)?;
            let mut dims = l.dims().to_vec();
            *dims.last_mut().expect("checked by bf16_product") = w.out_f;
            return Ok((CpuStorage::F32(y), Shape::from(dims)));
        }
        let w = self.weight.dequantize(&Device::Cpu)?;
        linear_with(s, l, &w, "quant_linear")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        let w = self.weight.dequantize(&Device::Cuda(s.device().clone()))?;
        linear_with(s, l, &w, "quant_linear")
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> CResult<(candle_core::MetalStorage, Shape)> {
        let w = self.weight.dequantize(&Device::Metal(s.device().clone()))?;
        linear_with(s, l, &w, "quant_linear")
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        if let (QuantWeight::Bf16(w), true, DType::F32) =
            (&self.weight, dy.device().is_cpu(), dy.dtype())
        {
            let dy = dy.contiguous()?;
            let dx = with_cpu_slice::<f32, _>(&dy, "quant_linear backward", |d| {
                bf16_product(d, w, true)
            })?;
            return Tensor::from_vec(dx, x.shape(), x.device()).map(Some);
        }
        // dequantized again rather than kept from the forward: no f32 copy outlives a product
        let w = self.weight.dequantize(x.device())?;
        Ok(Some(linear_input_grad(dy, &w)?))
    }
}

/// `x Wᵀ` (`transpose` false, x: `[.., in]`) or `x W` (true, x: `[.., out]`) for a bf16
/// `W: [out, in]`, in bf16 with f32 accumulation.
fn bf16_product(
    x: &[f32],
    w: &crate::quant::weight::Bf16Weight,
    transpose: bool,
) -> CResult<Vec<f32>> {
    let (k, n, w_s) = if transpose {
        (w.out_f, w.in_f, (w.in_f, 1))
    } else {
        (w.in_f, w.out_f, (1, w.in_f))
    };
    if k == 0 || x.len() % k != 0 {
        candle_core::bail!("quant_linear: input of {} values for rows of {k}", x.len());
    }
    let m = x.len() / k;
    let mut y = vec![0f32; m * n];
    let xb = crate::cpu_gemm::to_bf16(x);
    crate::cpu_gemm::gemm_bf16((m, n, k), &mut y, false, &xb, (k, 1), &w.data, w_s, 1.0);
    Ok(y)
}

/// `x Wᵀ` for a frozen quantized `W: [out, in]`: the forward dequantizes the layer (on the
/// cpu, then copied to the input's device), multiplies and drops the f32 copy; the backward
/// returns only `dx = dy · dequant(W)` (no weight gradient).
pub fn quant_linear(x: &Tensor, weight: &QuantWeight) -> CResult<Tensor> {
    x.contiguous()?.apply_op1(QuantLinear {
        weight: weight.clone(),
    })
}

// ---------------------------------------------------------------------------------------------
// LM head + masked cross-entropy, chunked

/// Bytes of logits the LM head materialises at once: the tokens are cut into chunks whose
/// `[chunk, vocab]` logits fit in it (512 tokens for a 262k vocabulary in f32).
pub const LM_HEAD_CHUNK_BYTES: usize = 512 << 20;

fn lm_head_chunk(vocab: usize, elem_size: usize) -> usize {
    (LM_HEAD_CHUNK_BYTES / (vocab * elem_size).max(1)).max(1)
}

struct LmHeadLoss {
    targets: Vec<u32>,
    /// per-token loss weight (0 for tokens without loss); the loss is Σ mask·nll / Σ mask
    mask: Vec<f32>,
    /// when set, the gradient of `W` is computed too (full fine-tuning)
    weight_grad: bool,
    softcap: Option<f64>,
    /// tokens per chunk; None = as many as fit in [`LM_HEAD_CHUNK_BYTES`]
    chunk: Option<usize>,
    /// filled by the forward pass: (d loss / d hidden, d loss / d W)
    grads: Mutex<Option<(Tensor, Option<Tensor>)>>,
}

/// `exp(x)` for f32 by range reduction to `[-ln2/2, ln2/2]` and a degree-6 polynomial
/// (relative error below 2e-7); written so the compiler can vectorise loops over it.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // round to nearest by the 1.5·2^23 trick (no libm call, so the loop vectorises)
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// Lanes for the reductions below: a float sum or max in one accumulator is a serial chain
/// (the compiler keeps the order of float additions), in 16 it vectorises.
const LANES: usize = 16;

/// The largest element of `x` (-inf when empty).
pub(crate) fn max_f32(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = a.max(*v);
        }
    }
    rest.iter()
        .chain(&acc)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Replaces each `v` by `exp(v - shift)` and returns their sum.
pub(crate) fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
    for v in x.iter_mut() {
        *v = fast_exp(*v - shift);
    }
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += *v;
        }
    }
    rest.iter().chain(&acc).sum()
}

/// `Σ a_i b_i` over two slices of one length.
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    rest + acc.iter().sum::<f32>()
}

/// One row of logits in place: returns the row's negative log-likelihood of `tgt` and
/// replaces the logits by `scale · (softmax - onehot(tgt))`, the gradient of `scale · nll`.
fn nll_and_grad_f32(row: &mut [f32], tgt: usize, scale: f32) -> f64 {
    let max = max_f32(row);
    let target_logit = row[tgt];
    let sum = exp_shifted_sum(row, max);
    let k = scale / sum;
    for v in row.iter_mut() {
        *v *= k;
    }
    row[tgt] -= scale;
    (max as f64 + (sum as f64).ln()) - target_logit as f64
}

/// The same in f64, with optional soft-capping `z = cap·tanh(l / cap)`.
fn nll_and_grad_generic<T: WithDType>(
    row: &mut [T],
    tgt: usize,
    scale: f64,
    softcap: Option<f64>,
) -> f64 {
    let capped = |l: f64| match softcap {
        Some(cap) => cap * (l / cap).tanh(),
        None => l,
    };
    let max = row
        .iter()
        .map(|v| capped(v.to_f64()))
        .fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = row.iter().map(|v| (capped(v.to_f64()) - max).exp()).sum();
    let lse = max + sum.ln();
    let nll = lse - capped(row[tgt].to_f64());
    for (j, v) in row.iter_mut().enumerate() {
        let z = capped(v.to_f64());
        let mut g = (z - lse).exp();
        if j == tgt {
            g -= 1.0;
        }
        if let Some(cap) = softcap {
            // dz/dl = 1 - (z/cap)²
            g *= 1.0 - (z / cap) * (z / cap);
        }
        *v = T::from_f64(g * scale);
    }
    nll
}

/// The vector inside an owned storage, without a copy when the dtype matches.
fn owned_vec<T: WithDType>(s: CpuStorage) -> CResult<Vec<T>> {
    let v: Box<dyn std::any::Any> = match s {
        CpuStorage::F32(v) => Box::new(v),
        CpuStorage::F64(v) => Box::new(v),
        other => return Ok(other.as_slice::<T>()?.to_vec()),
    };
    match v.downcast::<Vec<T>>() {
        Ok(v) => Ok(*v),
        Err(_) => candle_core::bail!("lm_head_loss: unexpected dtype of the logits"),
    }
}

impl LmHeadLoss {
    fn forward<T: WithDType>(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (n, hidden) = hl.shape().dims2()?;
        let (vocab, hidden_w) = wl.shape().dims2()?;
        let (Some((h_off, _)), Some(_)) = (hl.contiguous_offsets(), wl.contiguous_offsets()) else {
            candle_core::bail!("lm_head_loss: inputs must be contiguous")
        };
        if hidden != hidden_w || self.targets.len() != n || self.mask.len() != n {
            candle_core::bail!(
                "lm_head_loss: hidden [{n}, {hidden}], weight [{vocab}, {hidden_w}], {} targets, {} mask values",
                self.targets.len(),
                self.mask.len()
            );
        }
        if let Some(&bad) = self.targets.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("lm_head_loss: target id {bad} outside the vocabulary of {vocab}");
        }
        let dev = candle_core::Device::Cpu;
        let wt = wl.transpose(0, 1)?; // [hidden, vocab] view of W
        let denom: f64 = self.mask.iter().map(|&m| m as f64).sum::<f64>().max(1.0);
        let mut loss = 0.0f64;
        let mut dh = vec![T::zero(); n * hidden];
        let mut dw: Option<CpuStorage> = None;
        let chunk = self
            .chunk
            .unwrap_or_else(|| lm_head_chunk(vocab, T::DTYPE.size_in_bytes()))
            .max(1);
        for start in (0..n).step_by(chunk) {
            let end = (start + chunk).min(n);
            let c = end - start;
            if self.mask[start..end].iter().all(|&m| m == 0.0) {
                continue;
            }
            // logits of the chunk: [c, vocab], straight from the storages (no copy of W)
            let hc_l = Layout::contiguous_with_offset((c, hidden), h_off + start * hidden);
            let logits = hs.matmul(ws, (1, c, vocab, hidden), &hc_l, &wt)?;
            let mut rows: Vec<T> = owned_vec(logits)?;
            // per row: loss and, in place, the gradient of the logits
            let chunk_loss: f64 = rows
                .par_chunks_mut(vocab)
                .enumerate()
                .map(|(i, row)| {
                    let m = self.mask[start + i] as f64;
                    if m == 0.0 {
                        row.iter_mut().for_each(|v| *v = T::zero());
                        return 0.0;
                    }
                    let tgt = self.targets[start + i] as usize;
                    let scale = m / denom;
                    let nll = match (T::DTYPE, self.softcap) {
                        (DType::F32, None) => {
                            // SAFETY: T::DTYPE is F32, so T is f32 and the slice keeps its layout
                            let row32: &mut [f32] = unsafe {
                                std::slice::from_raw_parts_mut(
                                    row.as_mut_ptr() as *mut f32,
                                    row.len(),
                                )
                            };
                            nll_and_grad_f32(row32, tgt, scale as f32)
                        }
                        _ => nll_and_grad_generic(row, tgt, scale, self.softcap),
                    };
                    nll * scale
                })
                .sum();
            loss += chunk_loss;
            // dh_chunk = dlogits · W: [c, vocab] x [vocab, hidden]
            let dl = T::to_cpu_storage_owned(rows);
            let dl_l = Layout::contiguous((c, vocab));
            let dhc = dl.matmul(ws, (1, c, hidden, vocab), &dl_l, wl)?;
            dh[start * hidden..end * hidden].copy_from_slice(dhc.as_slice::<T>()?);
            if self.weight_grad {
                // dW += dlogitsᵀ · h_chunk: [vocab, c] x [c, hidden]
                let g = dl.matmul(hs, (1, vocab, hidden, c), &dl_l.transpose(0, 1)?, &hc_l)?;
                dw = Some(match dw {
                    None => g,
                    Some(acc) => {
                        let l = Layout::contiguous((vocab, hidden));
                        acc.binary_impl::<candle_core::op::Add>(&g, &l, &l)?
                    }
                });
            }
        }
        let dh = Tensor::from_vec(dh, (n, hidden), &dev)?;
        let dw = match (self.weight_grad, dw) {
            (false, _) => None,
            (true, None) => Some(Tensor::zeros((vocab, hidden), T::DTYPE, &dev)?),
            (true, Some(s)) => Some(Tensor::from_vec(
                s.as_slice::<T>()?.to_vec(),
                (vocab, hidden),
                &dev,
            )?),
        };
        *self.grads.lock().unwrap() = Some((dh, dw));
        Ok((
            T::to_cpu_storage_owned(vec![T::from_f64(loss)]),
            Shape::from(()),
        ))
    }
}

impl CustomOp2 for LmHeadLoss {
    fn name(&self) -> &'static str {
        "ftbench-lm-head-loss"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        match hs.dtype() {
            DType::F32 => self.forward::<f32>(hs, hl, ws, wl),
            DType::F64 => self.forward::<f64>(hs, hl, ws, wl),
            dt => candle_core::bail!("lm_head_loss: unsupported dtype {dt:?}"),
        }
    }

    fn bwd(
        &self,
        _h: &Tensor,
        _w: &Tensor,
        _loss: &Tensor,
        dloss: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let guard = self.grads.lock().unwrap();
        let Some((dh, dw)) = guard.as_ref() else {
            candle_core::bail!("lm_head_loss: backward before forward")
        };
        let dh = dh.broadcast_mul(dloss)?;
        let dw = match dw {
            Some(dw) => Some(dw.broadcast_mul(dloss)?),
            None => None,
        };
        Ok((Some(dh), dw))
    }
}

/// Masked mean cross-entropy of `softcap(h Wᵀ)` against `targets`, computed in chunks of
/// tokens whose logits fit in [`LM_HEAD_CHUNK_BYTES`]. `h: [n, hidden]`, `w: [vocab, hidden]`; `mask[i]` weights token
/// i's loss (0 = no loss). The gradient for `h` (and for `w` when `weight_grad`) is computed
/// during the forward pass and kept until the backward.
pub fn lm_head_loss(
    h: &Tensor,
    w: &Tensor,
    targets: Vec<u32>,
    mask: Vec<f32>,
    weight_grad: bool,
    softcap: Option<f64>,
) -> CResult<Tensor> {
    lm_head_loss_chunked(h, w, targets, mask, weight_grad, softcap, None)
}

/// [`lm_head_loss`] with an explicit number of tokens per chunk.
pub fn lm_head_loss_chunked(
    h: &Tensor,
    w: &Tensor,
    targets: Vec<u32>,
    mask: Vec<f32>,
    weight_grad: bool,
    softcap: Option<f64>,
    chunk: Option<usize>,
) -> CResult<Tensor> {
    if !h.device().is_cpu() {
        // other devices: the full logits through candle ops (autograd gives dh, and dW when
        // W is a variable)
        let w = if weight_grad { w.clone() } else { w.detach() };
        let mut logits = h.matmul(&w.t()?)?;
        if let Some(cap) = softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        return masked_cross_entropy(&logits, &targets, &mask);
    }
    let op = LmHeadLoss {
        targets,
        mask,
        weight_grad,
        softcap,
        chunk,
        grads: Mutex::new(None),
    };
    h.contiguous()?.apply_op2(&w.contiguous()?, op)
}

/// The reference the chunked loss is tested against: full logits, log-softmax, masked mean.
pub fn lm_head_loss_reference(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    mask: &[f32],
) -> CResult<Tensor> {
    masked_cross_entropy(&h.matmul(&w.t()?)?, targets, mask)
}

/// Masked mean cross-entropy of `logits: [n, vocab]` (candle's own has no mask).
pub fn masked_cross_entropy(logits: &Tensor, targets: &[u32], mask: &[f32]) -> CResult<Tensor> {
    let n = targets.len();
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let idx = Tensor::from_slice(targets, (n, 1), logits.device())?;
    let nll = logp.gather(&idx, 1)?.squeeze(1)?.neg()?;
    let m = Tensor::from_slice(mask, n, logits.device())?.to_dtype(logits.dtype())?;
    let denom = mask.iter().map(|&v| v as f64).sum::<f64>().max(1.0);
    (nll * m)?.sum_all()? / denom
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // a small deterministic generator so the tests do not depend on candle's RNG
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    use crate::test_util::{check_against_composed, max_abs_diff};

    #[test]
    fn rms_norm_matches_composed_ops() {
        let x = randn(&[2, 3, 8], 1);
        let w = randn(&[8], 2);
        let eps = 1e-6;
        check_against_composed(
            &[x, w],
            |t| rms_norm(&t[0], &t[1], eps).unwrap(),
            |t| {
                let r = (t[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
                    .unwrap()
                    .sqrt()
                    .unwrap();
                t[0].broadcast_div(&r)
                    .unwrap()
                    .broadcast_mul(&t[1])
                    .unwrap()
            },
            1e-10,
        );
    }

    #[test]
    fn softmax_matches_composed_ops() {
        let x = (randn(&[3, 4, 7], 3) * 5.0).unwrap();
        check_against_composed(
            &[x],
            |t| softmax_last_dim(&t[0]).unwrap(),
            |t| {
                let e = t[0].exp().unwrap();
                e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
            },
            1e-10,
        );
    }

    #[test]
    fn rope_matches_composed_ops() {
        let (t, d) = (5, 8);
        let x = randn(&[2, 3, t, d], 4);
        let theta: Vec<f64> = (0..t)
            .flat_map(|p| {
                (0..d / 2).map(move |i| p as f64 / 10000f64.powf(2.0 * i as f64 / d as f64))
            })
            .collect();
        let theta = Tensor::from_vec(theta, (t, d / 2), &Device::Cpu).unwrap();
        let (cos, sin) = (theta.cos().unwrap(), theta.sin().unwrap());
        let (c2, s2) = (cos.clone(), sin.clone());
        check_against_composed(
            &[x],
            move |tt| rope(&tt[0], &cos, &sin).unwrap(),
            move |tt| {
                let x1 = tt[0].narrow(3, 0, d / 2).unwrap();
                let x2 = tt[0].narrow(3, d / 2, d / 2).unwrap();
                let a = (x1.broadcast_mul(&c2).unwrap() - x2.broadcast_mul(&s2).unwrap()).unwrap();
                let b = (x2.broadcast_mul(&c2).unwrap() + x1.broadcast_mul(&s2).unwrap()).unwrap();
                Tensor::cat(&[a, b], 3).unwrap()
            },
            1e-10,
        );
    }

    #[test]
    fn frozen_linear_gives_input_gradient_only() {
        let x = Var::from_tensor(&randn(&[2, 3, 6], 5)).unwrap();
        let w = Var::from_tensor(&randn(&[4, 6], 6)).unwrap();
        let y = frozen_linear(x.as_tensor(), w.as_tensor()).unwrap();
        let y_ref = x
            .as_tensor()
            .broadcast_matmul(&w.as_tensor().t().unwrap())
            .unwrap();
        assert!(max_abs_diff(&y, &y_ref) < 1e-12);
        let probe = randn(&[2, 3, 4], 7);
        let g = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ref = (&y_ref * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_abs_diff(g.get(&x).unwrap(), g_ref.get(&x).unwrap()) < 1e-12);
        assert!(
            g.get(&w).is_none(),
            "the frozen weight must get no gradient"
        );
    }

    #[test]
    fn chunked_lm_loss_matches_full_logits() {
        // 300 tokens: three chunks, the last one partial; some tokens masked out
        let (n, hidden, vocab) = (300, 16, 50);
        let h = randn(&[n, hidden], 8);
        let w = randn(&[vocab, hidden], 9);
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % vocab as u32).collect();
        let mask: Vec<f32> = (0..n).map(|i| if i % 5 == 0 { 0.0 } else { 1.0 }).collect();
        let (t2, m2) = (targets.clone(), mask.clone());
        let hv = Var::from_tensor(&h).unwrap();
        let wv = Var::from_tensor(&w).unwrap();
        let l1 = lm_head_loss_chunked(
            hv.as_tensor(),
            wv.as_tensor(),
            targets,
            mask,
            true,
            None,
            Some(128),
        )
        .unwrap();
        let l2 = lm_head_loss_reference(hv.as_tensor(), wv.as_tensor(), &t2, &m2).unwrap();
        assert!(max_abs_diff(&l1, &l2) < 1e-10);
        let g1 = (&l1 * 3.0).unwrap().backward().unwrap();
        let g2 = (&l2 * 3.0).unwrap().backward().unwrap();
        assert!(max_abs_diff(g1.get(&hv).unwrap(), g2.get(&hv).unwrap()) < 1e-10);
        assert!(max_abs_diff(g1.get(&wv).unwrap(), g2.get(&wv).unwrap()) < 1e-10);
    }

    #[test]
    fn rms_norm_gradient_matches_finite_differences() {
        let x = randn(&[1, 5], 10);
        let w = randn(&[5], 11);
        let xv = Var::from_tensor(&x).unwrap();
        let probe = randn(&[1, 5], 12);
        let f = |x: &Tensor| {
            (rms_norm(x, &w, 1e-6).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let g = (rms_norm(xv.as_tensor(), &w, 1e-6).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = g
            .get(&xv)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-6;
        for i in 0..xs.len() {
            let mut p = xs.clone();
            p[i] += h;
            let mut m = xs.clone();
            m[i] -= h;
            let fd = (f(&Tensor::from_vec(p, (1, 5), &Device::Cpu).unwrap())
                - f(&Tensor::from_vec(m, (1, 5), &Device::Cpu).unwrap()))
                / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 1e-7,
                "element {i}: finite difference {fd}, backward {}",
                g[i]
            );
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let rel = ((fast_exp(x) as f64) - (x as f64).exp()).abs() / (x as f64).exp();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(fast_exp(-1000.0) < 1e-37, true);
    }

    #[test]
    fn f32_lm_loss_matches_f64_reference() {
        let (n, hidden, vocab) = (37, 8, 300);
        let h = randn(&[n, hidden], 13);
        let w = randn(&[vocab, hidden], 14);
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 11 + 5) % vocab as u32).collect();
        let mask = vec![1.0f32; n];
        let reference = lm_head_loss_reference(&h, &w, &targets, &mask)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let h32 = Var::from_tensor(&h.to_dtype(DType::F32).unwrap()).unwrap();
        let w32 = w.to_dtype(DType::F32).unwrap();
        let l = lm_head_loss_chunked(
            h32.as_tensor(),
            &w32,
            targets.clone(),
            mask.clone(),
            false,
            None,
            Some(10),
        )
        .unwrap();
        assert!((l.to_scalar::<f32>().unwrap() as f64 - reference).abs() < 1e-5);
        let g = l.backward().unwrap();
        let hv = Var::from_tensor(&h).unwrap();
        let g_ref = lm_head_loss_reference(hv.as_tensor(), &w, &targets, &mask)
            .unwrap()
            .backward()
            .unwrap();
        let d = max_abs_diff(
            &g.get(&h32).unwrap().to_dtype(DType::F64).unwrap(),
            g_ref.get(&hv).unwrap(),
        );
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn rms_norm_f32_backward_matches_f64() {
        let x = randn(&[3, 5, 16], 21);
        let w = randn(&[16], 22);
        let probe = randn(&[3, 5, 16], 23);
        let grads = |dt: DType| {
            let xv = Var::from_tensor(&x.to_dtype(dt).unwrap()).unwrap();
            let wv = Var::from_tensor(&w.to_dtype(dt).unwrap()).unwrap();
            let y = rms_norm(xv.as_tensor(), wv.as_tensor(), 1e-6).unwrap();
            let g = (y * probe.to_dtype(dt).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let f = |v: &Var| g.get(v).unwrap().to_dtype(DType::F64).unwrap();
            (f(&xv), f(&wv))
        };
        let (dx32, dw32) = grads(DType::F32);
        let (dx64, dw64) = grads(DType::F64);
        assert!(max_abs_diff(&dx32, &dx64) < 1e-5);
        assert!(max_abs_diff(&dw32, &dw64) < 1e-5);
    }

    #[test]
    fn non_cpu_fallbacks_match_the_cpu_ops() {
        // the composed versions used on CUDA and Metal, checked here against the CPU kernels
        let x = randn(&[2, 3, 8], 41);
        let w = randn(&[8], 42);
        check_against_composed(
            &[x, w],
            |t| rms_norm(&t[0], &t[1], 1e-6).unwrap(),
            |t| rms_norm_composed(&t[0], &t[1], 1e-6).unwrap(),
            1e-10,
        );
        let s = (randn(&[2, 3, 7], 43) * 5.0).unwrap();
        check_against_composed(
            &[s],
            |t| softmax_last_dim(&t[0]).unwrap(),
            |t| softmax_composed(&t[0]).unwrap(),
            1e-10,
        );
        let (t, past, groups) = (4, 3, 2);
        let sc = (randn(&[1, 2, groups * t, past + t], 44) * 3.0).unwrap();
        for window in [None, Some(3)] {
            check_against_composed(
                &[sc.clone()],
                |v| causal_softmax(&v[0], 0.7, t, past, window).unwrap(),
                |v| causal_softmax_composed(&v[0], 0.7, t, past, window).unwrap(),
                1e-10,
            );
        }
        let x = randn(&[1, 2, 5, 6], 45);
        let (cos, sin) = (randn(&[5, 3], 46), randn(&[5, 3], 47));
        let (c2, s2) = (cos.clone(), sin.clone());
        check_against_composed(
            &[x],
            move |v| rope(&v[0], &cos, &sin).unwrap(),
            move |v| rope_composed(&v[0], &c2, &s2).unwrap(),
            1e-10,
        );
    }

    #[test]
    fn causal_softmax_matches_composed_ops() {
        // 2 groups of t = 3 queries after 2 cached positions, window 3
        let (t, past, groups, window) = (3, 2, 2, Some(3));
        let x = (randn(&[2, 1, groups * t, past + t], 31) * 4.0).unwrap();
        let mut mask = vec![0f64; groups * t * (past + t)];
        for r in 0..groups * t {
            let pos = past + r % t;
            for j in 0..past + t {
                if j > pos || j + 3 <= pos {
                    mask[r * (past + t) + j] = f64::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (groups * t, past + t), &Device::Cpu).unwrap();
        check_against_composed(
            &[x],
            |v| causal_softmax(&v[0], 0.5, t, past, window).unwrap(),
            |v| {
                let z = (&v[0] * 0.5).unwrap().broadcast_add(&mask).unwrap();
                let e = (z.broadcast_sub(&z.max_keepdim(D::Minus1).unwrap()))
                    .unwrap()
                    .exp()
                    .unwrap();
                e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
            },
            1e-10,
        );
    }

    #[test]
    fn gated_act_matches_composed_ops() {
        // candle's GELU backward writes its constants to 6 digits, hence the looser tolerance
        for (act, tol) in [(Activation::Silu, 1e-10), (Activation::GeluTanh, 1e-6)] {
            let g = (randn(&[2, 3, 40], 41) * 4.0).unwrap();
            let u = randn(&[2, 3, 40], 42);
            check_against_composed(
                &[g, u],
                move |v| gated_act(&v[0], &v[1], act).unwrap(),
                move |v| gated_act_composed(&v[0], &v[1], act).unwrap(),
                tol,
            );
        }
    }

    #[test]
    fn activation_derivatives_match_finite_differences() {
        for (name, f) in [
            ("silu", silu_and_grad_f64 as fn(f64) -> (f64, f64)),
            ("gelu_tanh", gelu_tanh_and_grad_f64),
        ] {
            for i in 0..=400 {
                let g = (i as f64 - 200.0) / 20.0;
                let h = 1e-5;
                let numeric = (f(g + h).0 - f(g - h).0) / (2.0 * h);
                let (_, analytic) = f(g);
                assert!(
                    (numeric - analytic).abs() < 1e-8,
                    "{name}'({g}): {analytic} vs {numeric}"
                );
            }
        }
    }

    #[test]
    fn gated_act_f32_kernel_matches_f64() {
        // the f32 kernel uses fast_exp; against the f64 kernel over a wide range of inputs
        for act in [Activation::Silu, Activation::GeluTanh] {
            let g: Vec<f64> = (0..4001).map(|i| (i as f64 - 2000.0) / 100.0).collect();
            let u: Vec<f64> = g.iter().map(|v| 1.0 - v / 40.0).collect();
            let dy: Vec<f64> = g.iter().map(|v| 0.5 + v / 80.0).collect();
            let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            let y64 = gated_fwd_f64(act, &g, &u);
            let y32 = gated_fwd_f32(act, &f(&g), &f(&u));
            let (dg64, du64) = gated_bwd_f64(act, &g, &u, &dy);
            let (dg32, du32) = gated_bwd_f32(act, &f(&g), &f(&u), &f(&dy));
            for i in 0..g.len() {
                for (name, a, b) in [
                    ("y", y32[i], y64[i]),
                    ("dgate", dg32[i], dg64[i]),
                    ("dup", du32[i], du64[i]),
                ] {
                    let err = (a as f64 - b).abs();
                    assert!(
                        err <= 2e-6 * (1.0 + b.abs()),
                        "{act:?} {name} at g = {}: {a} vs {b}",
                        g[i]
                    );
                }
            }
        }
    }

    #[test]
    fn lane_reductions_match_serial_ones() {
        for len in [0usize, 1, 15, 16, 17, 40, 1000] {
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let want_max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_f32(&x), want_max, "max of {len}");
            let mut y = x.clone();
            let shift = if len == 0 { 0.0 } else { want_max };
            let sum = exp_shifted_sum(&mut y, shift) as f64;
            let want: f64 = x.iter().map(|&v| ((v - shift) as f64).exp()).sum();
            assert!(
                (sum - want).abs() <= 1e-5 * want.max(1.0),
                "sum of {len}: {sum} vs {want}"
            );
            for (a, b) in y.iter().zip(&x) {
                assert!((*a as f64 - ((b - shift) as f64).exp()).abs() < 1e-6);
            }
            let w: Vec<f32> = (0..len).map(|i| (i % 5) as f32 - 2.0).collect();
            let dot = dot_f32(&x, &w) as f64;
            let want: f64 = x.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum();
            let size: f64 = x
                .iter()
                .zip(&w)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            assert!(
                (dot - want).abs() <= 1e-6 * size.max(1.0),
                "dot of {len}: {dot} vs {want}"
            );
        }
    }
}
