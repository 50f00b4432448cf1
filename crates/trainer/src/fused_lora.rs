//! The LoRA layer as one op: `y = x Wᵀ + scaling · (dropout(x) Aᵀ) Bᵀ` for a frozen
//! `W: [out, in]` and trainable `A: [r, in]`, `B: [out, r]`.
//!
//! The naive layer ([`lora_linear_naive`]) runs the base product, then the adapter as three
//! more tensor ops (mask, two products, scale) and an add; its backward adds the two input
//! gradients in one more pass. The fused op ([`lora_linear`]) keeps the large activations to
//! as few passes as possible:
//!
//! - forward: `s = dropout(x) Aᵀ` (`[n, r]`, small), then `y = x Wᵀ` and the up-projection
//!   `scaling · s Bᵀ` accumulated into `y` by the GEMM itself (beta = 1), no buffer for it;
//! - backward: `ds = scaling · dy B` and `dB = scaling · dyᵀ s` (skinny products over `dy`),
//!   `dA = dsᵀ dropout(x)`, and `dx = dy W + mask ⊙ (ds A)` with `ds A` accumulated into
//!   `dx` by the GEMM when there is no dropout, or added with the mask in one pass when there
//!   is.
//!
//! CPU: [`crate::cpu_gemm`]'s accumulate-into-destination form (f32, f64; the `gemm` crate, or
//! MKL with the `mkl` feature). CUDA: candle's
//! cuBLAS products plus cuBLAS calls with beta = 1 (f32, bf16, f64). Other devices (Metal):
//! the same dataflow through candle's backend products, with the up-projection added in a
//! separate pass.
//!
//! `s` is kept from the forward for the backward (`[n, r]`, a few KB per token block).

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
#[cfg(any(feature = "cuda", feature = "metal"))]
use candle_core::op::BackpropOp;
#[cfg(feature = "cuda")]
use candle_core::Storage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu_gemm::{gemm, gemm_new};
use crate::ops::{contiguous_slice, guard_slice, with_cpu_slice};
use serde::{Deserialize, Serialize};

use crate::quant::QuantWeight;

type CResult<T> = candle_core::Result<T>;

/// Which implementation of the LoRA layer runs (`[lora] kernel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraKernel {
    /// Base product, then the adapter as separate tensor ops, added.
    Naive,
    /// One op with the up-projection accumulated into the base product (the default).
    #[default]
    Fused,
}

impl std::str::FromStr for LoraKernel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "naive" => Ok(LoraKernel::Naive),
            "fused" => Ok(LoraKernel::Fused),
            other => Err(format!("`{other}`: expected naive or fused")),
        }
    }
}

/// The naive LoRA layer: [`crate::ops::frozen_linear`], then `scaling · (x ⊙ mask) Aᵀ Bᵀ`
/// through candle ops, added.
pub fn lora_linear_naive(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    mask: Option<&Tensor>,
) -> CResult<Tensor> {
    let y = crate::ops::frozen_linear(x, w)?;
    let xm = match mask {
        Some(m) => x.mul(m)?,
        None => x.clone(),
    };
    let in_f = a.dim(1)?;
    let mut dims = x.dims().to_vec();
    let s = xm.reshape(((), in_f))?.matmul(&a.t()?)?;
    let up = s.matmul(&b.t()?)?;
    *dims.last_mut().expect("input has a feature dim") = up.dim(1)?;
    y + (up.reshape(dims)? * scaling)?
}

/// The fused LoRA layer for `x: [.., in]`; `mask` is dropout's keep-mask (same shape as `x`,
/// entries 0 or 1/(1-p)) or None. Gradients reach `x`, `a` and `b`, never `w`.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    mask: Option<&Tensor>,
) -> CResult<Tensor> {
    w.dims2()?;
    fused(x, FrozenWeight::Dense(w.contiguous()?), a, b, scaling, mask)
}

/// [`lora_linear`] on a frozen quantized base: the weight is dequantized for the forward's
/// product and again for the backward's, and never kept in f32 between them.
pub fn lora_linear_quantized(
    x: &Tensor,
    w: &QuantWeight,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    mask: Option<&Tensor>,
) -> CResult<Tensor> {
    fused(x, FrozenWeight::Quant(w.clone()), a, b, scaling, mask)
}

fn fused(
    x: &Tensor,
    w: FrozenWeight,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    mask: Option<&Tensor>,
) -> CResult<Tensor> {
    let (out_f, in_f) = w.dims();
    let (r, in_a) = a.dims2()?;
    let (out_b, r_b) = b.dims2()?;
    if x.dims().last() != Some(&in_f) || in_a != in_f || out_b != out_f || r_b != r {
        candle_core::bail!(
            "lora_linear: x {:?}, W [{out_f}, {in_f}], A [{r}, {in_a}], B [{out_b}, {r_b}]",
            x.dims()
        );
    }
    if let Some(m) = mask {
        if m.dims() != x.dims() {
            candle_core::bail!("lora_linear: mask {:?} for input {:?}", m.dims(), x.dims());
        }
    }
    let op = FusedLora {
        w,
        mask: mask.map(|m| m.contiguous()).transpose()?,
        scaling,
        s: Mutex::new(None),
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// The frozen `[out, in]` weight of a fused layer: dense, or quantized and dequantized on use.
enum FrozenWeight {
    Dense(Tensor),
    Quant(QuantWeight),
}

impl FrozenWeight {
    fn dims(&self) -> (usize, usize) {
        match self {
            Self::Dense(w) => (w.dims()[0], w.dims()[1]),
            Self::Quant(q) => q.dims(),
        }
    }

    /// The dense weight on `device` in `dtype` (a quantized weight's f32 copy lives only as
    /// long as the returned tensor).
    fn get(&self, device: &candle_core::Device, dtype: DType) -> CResult<Tensor> {
        match self {
            Self::Dense(w) => Ok(w.clone()),
            Self::Quant(q) => q.dequantize(device)?.to_dtype(dtype),
        }
    }
}

/// (dx when wanted, dA, dB) of the CPU backward.
type CpuGrads<T> = (Option<Vec<T>>, Vec<T>, Vec<T>);

struct FusedLora {
    /// `[out, in]`, frozen
    w: FrozenWeight,
    /// dropout keep-mask, shape of x
    mask: Option<Tensor>,
    scaling: f64,
    /// `s = dropout(x) Aᵀ`, `[n, r]`, set by the forward
    s: Mutex<Option<Tensor>>,
}

/// Rows `n`, in, r, out of one call.
#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    in_f: usize,
    r: usize,
    out_f: usize,
}

fn out_shape(xl: &Layout, out_f: usize) -> Shape {
    let mut d = xl.dims().to_vec();
    *d.last_mut().expect("input has a feature dim") = out_f;
    Shape::from(d)
}

// ---------------------------------------------------------------------------------------------
// CPU: `cpu_gemm` (the gemm crate, or MKL with the `mkl` feature)

/// `x ⊙ mask` into a fresh buffer.
fn masked<T: WithDType>(x: &[T], m: &[T]) -> Vec<T> {
    let mut v = vec![T::zero(); x.len()];
    v.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14).zip(m.par_chunks(1 << 14)))
        .for_each(|(o, (x, m))| {
            for ((o, x), m) in o.iter_mut().zip(x).zip(m) {
                *o = *x * *m;
            }
        });
    v
}

impl FusedLora {
    fn cpu_forward<T: WithDType>(
        &self,
        x: &[T],
        a: &[T],
        b: &[T],
        d: Dims,
    ) -> CResult<(Vec<T>, Vec<T>)> {
        let Dims { n, in_f, r, out_f } = d;
        let xm_buf;
        let xm: &[T] = match &self.mask {
            Some(m) => {
                xm_buf = with_cpu_slice::<T, _>(m, "lora_linear mask", |m| Ok(masked(x, m)))?;
                &xm_buf
            }
            None => x,
        };
        // s = xm Aᵀ: [n, in] x [in, r]
        let s = gemm_new((n, r, in_f), xm, (in_f, 1), a, (1, in_f), 1.0);
        // y = x Wᵀ, then y += scaling · s Bᵀ in the same buffer
        let mut y = self.base_product_cpu(x, (in_f, 1), (n, out_f, in_f), (1, in_f))?;
        gemm(
            (n, out_f, r),
            &mut y,
            true,
            &s,
            (r, 1),
            b,
            (1, r),
            self.scaling,
        );
        Ok((y, s))
    }

    /// `lhs · op(W)`, `[m, n]`, on the cpu for `lhs: [m, k]` (strides `lhs_s`) and W seen
    /// through strides `w_s` (`(1, in)`: `Wᵀ`, the forward; `(in, 1)`: `W`, the input
    /// gradient). A bf16 base under an f32 input multiplies in bf16 with f32 accumulation; any
    /// other base is used in `T` (a quantized one dequantized for this product only).
    fn base_product_cpu<T: WithDType>(
        &self,
        lhs: &[T],
        lhs_s: (usize, usize),
        (m, n, k): (usize, usize, usize),
        w_s: (usize, usize),
    ) -> CResult<Vec<T>> {
        if let (FrozenWeight::Quant(QuantWeight::Bf16(w)), DType::F32) = (&self.w, T::DTYPE) {
            // SAFETY: T is f32 (its DType says so), so the slice is an f32 slice.
            let lhs = unsafe { std::slice::from_raw_parts(lhs.as_ptr() as *const f32, lhs.len()) };
            let lhs = crate::cpu_gemm::to_bf16(lhs);
            let c = crate::cpu_gemm::gemm_bf16_new((m, n, k), &lhs, lhs_s, &w.data, w_s, 1.0);
            // T is f32: the vector is handed over as it is
            let c: Box<dyn std::any::Any> = Box::new(c);
            return Ok(*c.downcast::<Vec<T>>().expect("T is f32"));
        }
        let w = self.w.get(&candle_core::Device::Cpu, T::DTYPE)?;
        with_cpu_slice::<T, _>(&w, "lora_linear W", |w| {
            Ok(gemm_new((m, n, k), lhs, lhs_s, w, w_s, 1.0))
        })
    }

    /// (dx, dA, dB) from CPU tensors; dx only when `want_dx`.
    #[allow(clippy::too_many_arguments)]
    fn cpu_backward<T: WithDType>(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        s: &Tensor,
        dy: &Tensor,
        d: Dims,
        want_dx: bool,
    ) -> CResult<CpuGrads<T>> {
        let Dims { n, in_f, r, out_f } = d;
        let sc = self.scaling;
        // the operands borrowed in place (all contiguous: made so by `fused` and `bwd`)
        let guards = [dy, s, a, b, x].map(|t| t.storage_and_layout());
        let [dyv, sv, av, bv, xv] = [
            (0, "lora_linear dy"),
            (1, "lora_linear s"),
            (2, "lora_linear A"),
            (3, "lora_linear B"),
            (4, "lora_linear x"),
        ]
        .map(|(i, what)| guard_slice::<T, _>(&guards[i], what));
        let (dyv, sv, av, bv, xv) = (dyv?, sv?, av?, bv?, xv?);
        // ds = scaling · dy B: [n, out] x [out, r]; dB = scaling · dyᵀ s: [out, n] x [n, r]
        let ds = gemm_new((n, r, out_f), dyv, (out_f, 1), bv, (r, 1), sc);
        let db = gemm_new((out_f, r, n), dyv, (1, out_f), sv, (r, 1), sc);
        // dA = dsᵀ xm: [r, n] x [n, in]; with dropout, xm's buffer then takes ds A for dx
        let mut buf = match &self.mask {
            Some(m) => Some(with_cpu_slice::<T, _>(m, "lora_linear mask", |m| {
                Ok(masked(xv, m))
            })?),
            None => None,
        };
        let xm = buf.as_deref().unwrap_or(xv);
        let da = gemm_new((r, in_f, n), &ds, (1, r), xm, (in_f, 1), 1.0);
        if !want_dx {
            return Ok((None, da, db));
        }
        // dx = dy W, then + mask ⊙ (ds A)
        let mut dx = self.base_product_cpu(dyv, (out_f, 1), (n, in_f, out_f), (in_f, 1))?;
        match &self.mask {
            None => gemm((n, in_f, r), &mut dx, true, &ds, (r, 1), av, (in_f, 1), 1.0),
            Some(m) => {
                let buf = buf.as_mut().expect("made above when there is a mask");
                gemm((n, in_f, r), buf, false, &ds, (r, 1), av, (in_f, 1), 1.0);
                with_cpu_slice::<T, _>(m, "lora_linear mask", |m| {
                    dx.par_chunks_mut(1 << 14)
                        .zip(buf.par_chunks(1 << 14).zip(m.par_chunks(1 << 14)))
                        .for_each(|(o, (g, m))| {
                            for ((o, g), m) in o.iter_mut().zip(g).zip(m) {
                                *o += *g * *m;
                            }
                        });
                    Ok(())
                })?;
            }
        }
        Ok((Some(dx), da, db))
    }

    fn dims(&self, xl: &Layout, al: &Layout) -> CResult<Dims> {
        let (out_f, in_f) = self.w.dims();
        let r = al.dims()[0];
        Ok(Dims {
            n: xl.shape().elem_count() / in_f.max(1),
            in_f,
            r,
            out_f,
        })
    }

    fn check_dtypes(&self, x: DType, a: DType, b: DType) -> CResult<()> {
        let w = match &self.w {
            FrozenWeight::Dense(w) => w.dtype(),
            // dequantized to the input's dtype on use
            FrozenWeight::Quant(_) => x,
        };
        let m = self.mask.as_ref().map(|m| m.dtype());
        if a != x || b != x || w != x || m.is_some_and(|m| m != x) {
            candle_core::bail!(
                "lora_linear: dtypes differ: x {x:?}, A {a:?}, B {b:?}, W {w:?}, mask {m:?}"
            );
        }
        Ok(())
    }

    /// `s` as kept by the forward, or recomputed.
    fn kept_s(&self, x: &Tensor, a: &Tensor, in_f: usize) -> CResult<Tensor> {
        if let Some(s) = self.s.lock().unwrap().take() {
            return Ok(s);
        }
        let xm = match &self.mask {
            Some(m) => x.mul(m)?,
            None => x.clone(),
        };
        xm.reshape(((), in_f))?.matmul(&a.t()?)
    }
}

impl CustomOp3 for FusedLora {
    fn name(&self) -> &'static str {
        "ftbench-fused-lora"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        self.check_dtypes(xs.dtype(), as_.dtype(), bs.dtype())?;
        let d = self.dims(xl, al)?;
        let dev = candle_core::Device::Cpu;
        macro_rules! run {
            ($t:ty) => {{
                let (y, s) = self.cpu_forward::<$t>(
                    contiguous_slice(xs, xl, "lora_linear x")?,
                    contiguous_slice(as_, al, "lora_linear A")?,
                    contiguous_slice(bs, bl, "lora_linear B")?,
                    d,
                )?;
                *self.s.lock().unwrap() = Some(Tensor::from_vec(s, (d.n, d.r), &dev)?);
                Ok((<$t>::to_cpu_storage_owned(y), out_shape(xl, d.out_f)))
            }};
        }
        match xs.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => candle_core::bail!(
                "lora_linear: {dt:?} on the cpu is not supported (f32 or f64; use lora.kernel = \"naive\")"
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        as_: &candle_core::CudaStorage,
        al: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        self.check_dtypes(xs.dtype(), as_.dtype(), bs.dtype())?;
        let d = self.dims(xl, al)?;
        let (y, s) = cuda::forward(self, xs, xl, as_, al, bs, bl, d)?;
        let s = Tensor::from_storage(Storage::Cuda(s), (d.n, d.r), BackpropOp::none(), false);
        *self.s.lock().unwrap() = Some(s);
        Ok((y, out_shape(xl, d.out_f)))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        xs: &candle_core::MetalStorage,
        xl: &Layout,
        as_: &candle_core::MetalStorage,
        al: &Layout,
        bs: &candle_core::MetalStorage,
        bl: &Layout,
    ) -> CResult<(candle_core::MetalStorage, Shape)> {
        self.check_dtypes(xs.dtype(), as_.dtype(), bs.dtype())?;
        let d = self.dims(xl, al)?;
        let w = self
            .w
            .get(&candle_core::Device::Metal(xs.device().clone()), xs.dtype())?;
        let (ws, wl) = w.storage_and_layout();
        let Storage::Metal(ws) = &*ws else {
            candle_core::bail!("lora_linear: W is not on the metal device")
        };
        let mask = self.mask.as_ref().map(|m| m.storage_and_layout());
        let mask = match &mask {
            Some((ms, ml)) => match &**ms {
                Storage::Metal(ms) => Some((ms, *ml)),
                _ => candle_core::bail!("lora_linear: mask is not on the metal device"),
            },
            None => None,
        };
        let (y, s) = forward_generic(xs, xl, as_, al, bs, bl, ws, wl, mask, self.scaling, d)?;
        let s = Tensor::from_storage(Storage::Metal(s), (d.n, d.r), BackpropOp::none(), false);
        *self.s.lock().unwrap() = Some(s);
        Ok((y, out_shape(xl, d.out_f)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out_f, in_f) = self.w.dims();
        let r = a.dim(0)?;
        let n = x.elem_count() / in_f.max(1);
        let d = Dims { n, in_f, r, out_f };
        let s = self.kept_s(x, a, in_f)?;
        let dy = dy.contiguous()?;
        if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
            let dev = candle_core::Device::Cpu;
            // an input that needs no gradient (the first layer's, under a frozen embedding)
            // is spared the largest product of the backward
            let want_dx = x.track_op();
            macro_rules! run {
                ($t:ty) => {{
                    let (dx, da, db) = self.cpu_backward::<$t>(x, a, b, &s, &dy, d, want_dx)?;
                    (
                        dx.map(|dx| Tensor::from_vec(dx, x.shape(), &dev))
                            .transpose()?,
                        Tensor::from_vec(da, (r, in_f), &dev)?,
                        Tensor::from_vec(db, (out_f, r), &dev)?,
                    )
                }};
            }
            let (dx, da, db) = match x.dtype() {
                DType::F32 => run!(f32),
                _ => run!(f64),
            };
            return Ok((dx, Some(da), Some(db)));
        }
        // other devices: candle products; on CUDA, dx's second product accumulates in place
        let dy2 = dy.reshape((n, out_f))?;
        let ds = (dy2.matmul(b)? * self.scaling)?;
        let db = (dy2.t()?.matmul(&s)? * self.scaling)?;
        let x2 = x.reshape((n, in_f))?;
        let xm = match &self.mask {
            Some(m) => x2.mul(&m.reshape((n, in_f))?)?,
            None => x2,
        };
        let da = ds.t()?.matmul(&xm)?;
        let w = self.w.get(x.device(), x.dtype())?;
        let dx = input_grad(&dy2, &w, &ds, a, self.mask.as_ref())?;
        Ok((Some(dx.reshape(x.shape())?), Some(da), Some(db)))
    }
}

/// `dx = dy W + mask ⊙ (ds A)` on a non-CPU device, `[n, in]`.
fn input_grad(
    dy: &Tensor,
    w: &Tensor,
    ds: &Tensor,
    a: &Tensor,
    mask: Option<&Tensor>,
) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if dy.device().is_cuda() && mask.is_none() {
        return cuda::input_grad(dy, w, ds, a);
    }
    let base = dy.matmul(w)?;
    let lora = ds.matmul(a)?;
    match mask {
        Some(m) => base + lora.mul(&m.reshape(lora.shape())?)?,
        None => base + lora,
    }
}

/// The forward through a backend's own products and element-wise ops (Metal): `y = x Wᵀ`,
/// `s = xm Aᵀ`, `y + scaling · s Bᵀ` (this last add is a separate pass). Returns (y, s).
#[allow(clippy::too_many_arguments, dead_code)]
fn forward_generic<S: BackendStorage>(
    xs: &S,
    xl: &Layout,
    as_: &S,
    al: &Layout,
    bs: &S,
    bl: &Layout,
    ws: &S,
    wl: &Layout,
    mask: Option<(&S, &Layout)>,
    scaling: f64,
    d: Dims,
) -> CResult<(S, S)> {
    let Dims { n, in_f, r, out_f } = d;
    let Some((x_off, _)) = xl.contiguous_offsets() else {
        candle_core::bail!("lora_linear: x must be contiguous")
    };
    let x2 = Layout::contiguous_with_offset((n, in_f), x_off);
    let y = xs.matmul(ws, (1, n, out_f, in_f), &x2, &wl.transpose(0, 1)?)?;
    let xm;
    let (xm_s, xm_l) = match mask {
        Some((ms, ml)) => {
            xm = xs.binary_impl::<candle_core::op::Mul>(ms, xl, ml)?;
            (&xm, Layout::contiguous((n, in_f)))
        }
        None => (xs, x2),
    };
    let s = xm_s.matmul(as_, (1, n, r, in_f), &xm_l, &al.transpose(0, 1)?)?;
    let sl = Layout::contiguous((n, r));
    let up = s.matmul(bs, (1, n, out_f, r), &sl, &bl.transpose(0, 1)?)?;
    let yl = Layout::contiguous((n, out_f));
    let up = up.affine(&yl, scaling, 0.0)?;
    Ok((y.binary_impl::<candle_core::op::Add>(&up, &yl, &yl)?, s))
}

// ---------------------------------------------------------------------------------------------
// Checks: fused and naive against an f64 reference (tests and `ftbench selftest`)

/// One checked shape: the largest error of each path against the f64 reference, relative to
/// the reference's largest magnitude, per output (y, dx, dA, dB).
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// tokens, in, out, rank
    pub shape: [usize; 4],
    pub dropout: bool,
    pub dtype: String,
    /// [y, dx, dA, dB]
    pub fused_rel_err: [f64; 4],
    pub naive_rel_err: [f64; 4],
    pub tolerance: f64,
    pub passed: bool,
}

/// A deterministic uniform(-1, 1) tensor in f64 on the CPU.
pub fn uniform(shape: &[usize], seed: u64) -> CResult<Tensor> {
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
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

/// Checks [`lora_linear`] and [`lora_linear_naive`] on `device` in `dtype` against the layer
/// computed in f64 on the CPU by plain candle ops, forward and backward, for `x: [2, t, in]`
/// and the same dropout mask (p = 0.1) in every path when `dropout`.
pub fn check(
    device: &candle_core::Device,
    dtype: DType,
    (t, in_f, out_f, r): (usize, usize, usize, usize),
    dropout: bool,
    seed: u64,
) -> CResult<CheckResult> {
    use candle_core::Var;
    let x = uniform(&[2, t, in_f], seed)?;
    let w = (uniform(&[out_f, in_f], seed + 1)? * (1.0 / (in_f as f64).sqrt()))?;
    let a = (uniform(&[r, in_f], seed + 2)? * (1.0 / (in_f as f64).sqrt()))?;
    let b = (uniform(&[out_f, r], seed + 3)? * 0.5)?;
    let probe = uniform(&[2, t, out_f], seed + 4)?;
    let mask = if dropout {
        let keep = uniform(&[2, t, in_f], seed + 5)?
            .flatten_all()?
            .to_vec1::<f64>()?
            .into_iter()
            .map(|u| if u < -0.8 { 0.0 } else { 1.0 / 0.9 })
            .collect::<Vec<f64>>();
        Some(Tensor::from_vec(
            keep,
            &[2, t, in_f],
            &candle_core::Device::Cpu,
        )?)
    } else {
        None
    };
    let scaling = 2.0;
    type Layer = fn(&Tensor, &Tensor, &Tensor, &Tensor, f64, Option<&Tensor>) -> CResult<Tensor>;
    // y and the gradients of sum(y ⊙ probe) for x, A, B, as f64 on the CPU
    let run = |f: Layer, dev: &candle_core::Device, dt: DType| -> CResult<[Tensor; 4]> {
        let on = |t: &Tensor| t.to_dtype(dt)?.to_device(dev);
        let (xv, av, bv) = (
            Var::from_tensor(&on(&x)?)?,
            Var::from_tensor(&on(&a)?)?,
            Var::from_tensor(&on(&b)?)?,
        );
        let m = mask.as_ref().map(on).transpose()?;
        let y = f(
            xv.as_tensor(),
            &on(&w)?,
            av.as_tensor(),
            bv.as_tensor(),
            scaling,
            m.as_ref(),
        )?;
        let g = (y.to_dtype(DType::F64)? * &on(&probe)?.to_dtype(DType::F64)?)?
            .sum_all()?
            .backward()?;
        let back = |t: &Tensor| t.to_dtype(DType::F64)?.to_device(&candle_core::Device::Cpu);
        let grad = |v: &Var| match g.get(v) {
            Some(t) => back(t),
            None => candle_core::bail!("lora_linear check: no gradient"),
        };
        Ok([back(&y)?, grad(&xv)?, grad(&av)?, grad(&bv)?])
    };
    let reference: Layer = |x, w, a, b, scaling, m| {
        let xm = match m {
            Some(m) => x.mul(m)?,
            None => x.clone(),
        };
        let base = x.broadcast_matmul(&w.t()?)?;
        let up = xm.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
        base + (up * scaling)?
    };
    let cpu = candle_core::Device::Cpu;
    let want = run(reference, &cpu, DType::F64)?;
    let fused = run(lora_linear, device, dtype)?;
    let naive = run(lora_linear_naive, device, dtype)?;
    let rel = |got: &[Tensor; 4]| -> CResult<[f64; 4]> {
        let mut e = [0.0; 4];
        for i in 0..4 {
            let scale = want[i].abs()?.max_all()?.to_scalar::<f64>()?.max(1e-30);
            let diff = (&got[i] - &want[i])?.abs()?.max_all()?.to_scalar::<f64>()?;
            e[i] = diff / scale;
        }
        Ok(e)
    };
    let (fe, ne) = (rel(&fused)?, rel(&naive)?);
    let tolerance = match dtype {
        DType::F64 => 1e-10,
        DType::F32 => 1e-4,
        _ => 3e-2,
    };
    let passed = fe
        .iter()
        .chain(&ne)
        .all(|&e| e.is_finite() && e < tolerance);
    Ok(CheckResult {
        shape: [2 * t, in_f, out_f, r],
        dropout,
        dtype: format!("{dtype:?}").to_lowercase(),
        fused_rel_err: fe,
        naive_rel_err: ne,
        tolerance,
        passed,
    })
}

/// The shapes [`check`] runs by default: odd sizes, rank 1, in ≠ out, a larger one.
pub const CHECK_SHAPES: [(usize, usize, usize, usize); 5] = [
    (3, 5, 7, 2),
    (17, 33, 65, 8),
    (1, 64, 1, 1),
    (31, 127, 255, 16),
    (128, 512, 384, 16),
];

#[cfg(feature = "cuda")]
mod cuda {
    //! cuBLAS with beta = 1 through candle's CUDA device.

    use super::*;
    use candle_core::cuda::cudarc;
    use candle_core::cuda::cudarc::cublas::sys;
    use candle_core::cuda::cudarc::driver::{DevicePtr, DevicePtrMut};
    use candle_core::{CudaStorage, CustomOp3};

    fn cuda_dtype(dt: DType) -> CResult<sys::cudaDataType_t> {
        Ok(match dt {
            DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
            DType::F64 => sys::cudaDataType_t::CUDA_R_64F,
            dt => candle_core::bail!("lora_linear: {dt:?} is not supported on cuda"),
        })
    }

    /// A row-major matrix on the device: storage, element offset, row stride, transposed.
    pub(super) struct Mat<'a> {
        pub s: &'a CudaStorage,
        pub offset: usize,
        pub ld: usize,
        /// true: the matrix used is the transpose of the one stored row-major
        pub t: bool,
    }

    fn ptr(s: &CudaStorage, offset: usize) -> CResult<(u64, usize)> {
        let stream = s.device.cuda_stream();
        macro_rules! p {
            ($t:ty) => {{
                let sl = s.as_cuda_slice::<$t>()?;
                let (p, _sync) = sl.device_ptr(&stream);
                Ok((p + (offset * std::mem::size_of::<$t>()) as u64, sl.len()))
            }};
        }
        match s.dtype() {
            DType::F32 => p!(f32),
            DType::F64 => p!(f64),
            DType::BF16 => p!(half::bf16),
            DType::F16 => p!(half::f16),
            dt => candle_core::bail!("lora_linear: {dt:?} is not supported on cuda"),
        }
    }

    /// Row-major `C[m, n] = alpha · op(A)[m, k] op(B)[k, n] + beta · C`, C contiguous.
    ///
    /// cuBLAS is column-major: a row-major `C` is the column-major `Cᵀ = op(B)ᵀ op(A)ᵀ`,
    /// so the operands swap places and keep their transpose flags.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        (m, n, k): (usize, usize, usize),
        c: &mut CudaStorage,
        a: Mat,
        b: Mat,
        alpha: f64,
        beta: f64,
    ) -> CResult<()> {
        let dt = c.dtype();
        if a.s.dtype() != dt || b.s.dtype() != dt {
            candle_core::bail!("lora_linear: dtypes differ in a cuda product");
        }
        let ty = cuda_dtype(dt)?;
        let op = |t: bool| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (pa, _) = ptr(a.s, a.offset)?;
        let (pb, _) = ptr(b.s, b.offset)?;
        let blas = c.device.cublas_handle();
        let stream = c.device.cuda_stream();
        let (alpha32, beta32) = (alpha as f32, beta as f32);
        let (compute, al, be): (_, *const std::ffi::c_void, *const std::ffi::c_void) =
            if dt == DType::F64 {
                (
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_64F,
                    &alpha as *const f64 as *const _,
                    &beta as *const f64 as *const _,
                )
            } else {
                (
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    &alpha32 as *const f32 as *const _,
                    &beta32 as *const f32 as *const _,
                )
            };
        macro_rules! run {
            ($t:ty) => {{
                let cs = c.as_cuda_slice_mut::<$t>()?;
                if cs.len() < m * n {
                    candle_core::bail!("lora_linear: output buffer of {} for [{m}, {n}]", cs.len());
                }
                let (pc, _sync) = cs.device_ptr_mut(&stream);
                // SAFETY: the pointers address live device buffers of this stream holding the
                // matrices described by (m, n, k) and the leading dimensions; alpha and beta
                // live until the call returns.
                unsafe {
                    cudarc::cublas::result::gemm_ex(
                        *blas.handle(),
                        op(b.t),
                        op(a.t),
                        n as i32,
                        m as i32,
                        k as i32,
                        al,
                        pb as *const _,
                        ty,
                        b.ld as i32,
                        pa as *const _,
                        ty,
                        a.ld as i32,
                        be,
                        pc as *mut _,
                        ty,
                        n as i32,
                        compute,
                        sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
                .map_err(|e| candle_core::Error::Msg(format!("lora_linear: cublas: {e:?}")))?;
            }};
        }
        match dt {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            DType::BF16 => run!(half::bf16),
            DType::F16 => run!(half::f16),
            dt => candle_core::bail!("lora_linear: {dt:?} is not supported on cuda"),
        }
        Ok(())
    }

    fn contiguous_offset(l: &Layout, what: &str) -> CResult<usize> {
        match l.contiguous_offsets() {
            Some((o, _)) => Ok(o),
            None => candle_core::bail!("lora_linear: {what} must be contiguous"),
        }
    }

    /// (y, s): `y = x Wᵀ` by candle's product, `s = xm Aᵀ`, then `y += scaling · s Bᵀ`
    /// by cuBLAS with beta = 1.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        op: &FusedLora,
        xs: &CudaStorage,
        xl: &Layout,
        as_: &CudaStorage,
        al: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
        d: Dims,
    ) -> CResult<(CudaStorage, CudaStorage)> {
        let Dims { n, in_f, r, out_f } = d;
        let x_off = contiguous_offset(xl, "x")?;
        let x2 = Layout::contiguous_with_offset((n, in_f), x_off);
        let w =
            op.w.get(&candle_core::Device::Cuda(xs.device().clone()), xs.dtype())?;
        let (ws, wl) = w.storage_and_layout();
        let Storage::Cuda(ws) = &*ws else {
            candle_core::bail!("lora_linear: W is not on the cuda device")
        };
        let mut y = xs.matmul(ws, (1, n, out_f, in_f), &x2, &wl.transpose(0, 1)?)?;
        let xm;
        let (xm_s, xm_l) = match &op.mask {
            Some(m) => {
                let (ms, ml) = m.storage_and_layout();
                let Storage::Cuda(ms) = &*ms else {
                    candle_core::bail!("lora_linear: mask is not on the cuda device")
                };
                xm = xs.binary_impl::<candle_core::op::Mul>(ms, xl, ml)?;
                (&xm, Layout::contiguous((n, in_f)))
            }
            None => (xs, x2),
        };
        let s = xm_s.matmul(as_, (1, n, r, in_f), &xm_l, &al.transpose(0, 1)?)?;
        // y[n, out] += scaling · s[n, r] · Bᵀ (B stored [out, r])
        let b_off = contiguous_offset(bl, "B")?;
        gemm(
            (n, out_f, r),
            &mut y,
            Mat {
                s: &s,
                offset: 0,
                ld: r,
                t: false,
            },
            Mat {
                s: bs,
                offset: b_off,
                ld: r,
                t: true,
            },
            op.scaling,
            1.0,
        )?;
        Ok((y, s))
    }

    /// `dx = dy W + ds A` on (dy `[n, out]`, ds `[n, r]`, A `[r, in]`), the second product
    /// accumulated into the first's output.
    struct InputGrad {
        /// `[out, in]`
        w: Tensor,
    }

    impl CustomOp3 for InputGrad {
        fn name(&self) -> &'static str {
            "ftbench-lora-input-grad"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> CResult<(CpuStorage, Shape)> {
            candle_core::bail!("lora input gradient: the cpu has its own path")
        }

        fn cuda_fwd(
            &self,
            dys: &CudaStorage,
            dyl: &Layout,
            dss: &CudaStorage,
            dsl: &Layout,
            as_: &CudaStorage,
            al: &Layout,
        ) -> CResult<(CudaStorage, Shape)> {
            let (n, out_f) = dyl.shape().dims2()?;
            let (r, in_f) = al.shape().dims2()?;
            let (ws, wl) = self.w.storage_and_layout();
            let Storage::Cuda(ws) = &*ws else {
                candle_core::bail!("lora input gradient: W is not on the cuda device")
            };
            let mut dx = dys.matmul(ws, (1, n, in_f, out_f), dyl, wl)?;
            gemm(
                (n, in_f, r),
                &mut dx,
                Mat {
                    s: dss,
                    offset: contiguous_offset(dsl, "ds")?,
                    ld: r,
                    t: false,
                },
                Mat {
                    s: as_,
                    offset: contiguous_offset(al, "A")?,
                    ld: in_f,
                    t: false,
                },
                1.0,
                1.0,
            )?;
            Ok((dx, Shape::from((n, in_f))))
        }
    }

    /// `dx = dy W + ds A` on CUDA: candle's product, then cuBLAS with beta = 1 into it.
    pub(super) fn input_grad(dy: &Tensor, w: &Tensor, ds: &Tensor, a: &Tensor) -> CResult<Tensor> {
        let op = InputGrad { w: w.contiguous()? };
        dy.contiguous()?
            .apply_op3_no_bwd(&ds.contiguous()?, &a.contiguous()?, &op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_and_naive_match_f64_reference() {
        for dt in [DType::F64, DType::F32] {
            for (i, &shape) in CHECK_SHAPES.iter().enumerate() {
                for dropout in [false, true] {
                    let r = check(&Device::Cpu, dt, shape, dropout, 10 + i as u64).unwrap();
                    assert!(r.passed, "{r:?}");
                }
            }
        }
    }

    #[test]
    fn check_catches_a_wrong_scaling() {
        // the check itself must fail when the layer is wrong: naive with scaling doubled
        let x = uniform(&[4, 6], 1).unwrap();
        let w = uniform(&[5, 6], 2).unwrap();
        let a = uniform(&[2, 6], 3).unwrap();
        let b = uniform(&[5, 2], 4).unwrap();
        let good = lora_linear(&x, &w, &a, &b, 2.0, None).unwrap();
        let bad = lora_linear_naive(&x, &w, &a, &b, 4.0, None).unwrap();
        let d = (good - bad).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f64>().unwrap() > 1e-3);
    }

    #[test]
    fn fused_forward_by_hand() {
        // x = [1, 2], W = I, A = [1, 1], B = [[1], [0]], scaling 0.5:
        // s = 3, y = x + 0.5 · 3 · [1, 0] = [2.5, 2]
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.]], &dev).unwrap();
        let w = Tensor::new(&[[1f32, 0.], [0., 1.]], &dev).unwrap();
        let a = Tensor::new(&[[1f32, 1.]], &dev).unwrap();
        let b = Tensor::new(&[[1f32], [0.]], &dev).unwrap();
        let y = lora_linear(&x, &w, &a, &b, 0.5, None).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![2.5, 2.0]]);
        // with mask [0, 2]: s = 4, y = [1 + 2, 2]
        let m = Tensor::new(&[[0f32, 2.]], &dev).unwrap();
        let y = lora_linear(&x, &w, &a, &b, 0.5, Some(&m)).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![3.0, 2.0]]);
    }

    #[test]
    fn frozen_weight_gets_no_gradient_and_bad_shapes_are_refused() {
        let dev = Device::Cpu;
        let w = candle_core::Var::from_tensor(&uniform(&[5, 6], 2).unwrap()).unwrap();
        let x = uniform(&[4, 6], 1).unwrap();
        let a = candle_core::Var::from_tensor(&uniform(&[2, 6], 3).unwrap()).unwrap();
        let b = candle_core::Var::from_tensor(&uniform(&[5, 2], 4).unwrap()).unwrap();
        let y = lora_linear(&x, w.as_tensor(), a.as_tensor(), b.as_tensor(), 1.0, None).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&w).is_none());
        assert!(g.get(&a).is_some() && g.get(&b).is_some());
        let bad_a = uniform(&[2, 5], 3).unwrap();
        let e = lora_linear(&x, w.as_tensor(), &bad_a, b.as_tensor(), 1.0, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lora_linear: x [4, 6]"), "{e}");
        let bf = x.to_dtype(DType::BF16).unwrap();
        let to = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let e = lora_linear(
            &bf,
            &to(w.as_tensor()),
            &to(a.as_tensor()),
            &to(b.as_tensor()),
            1.0,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("BF16 on the cpu is not supported"), "{e}");
        let _ = dev;
    }

    /// An input that needs no gradient (the first layer's under a frozen embedding) gets
    /// none, and the adapters' gradients are the ones it gets as a variable.
    #[test]
    fn an_untracked_input_gets_no_gradient_and_the_same_adapter_gradients() {
        let w = uniform(&[5, 6], 2).unwrap();
        let x = uniform(&[4, 6], 1).unwrap();
        let xv = candle_core::Var::from_tensor(&x).unwrap();
        let a = candle_core::Var::from_tensor(&uniform(&[2, 6], 3).unwrap()).unwrap();
        let b = candle_core::Var::from_tensor(&uniform(&[5, 2], 4).unwrap()).unwrap();
        let probe = uniform(&[4, 5], 5).unwrap();
        let grads = |x: &Tensor| {
            let y = lora_linear(x, &w, a.as_tensor(), b.as_tensor(), 0.5, None).unwrap();
            (y * &probe).unwrap().sum_all().unwrap().backward().unwrap()
        };
        let (plain, tracked) = (grads(&x), grads(xv.as_tensor()));
        assert!(!x.track_op() && plain.get(&x).is_none());
        assert!(tracked.get(xv.as_tensor()).is_some());
        for v in [&a, &b] {
            let d = crate::test_util::max_abs_diff(plain.get(v).unwrap(), tracked.get(v).unwrap());
            assert_eq!(d, 0.0);
        }
    }
}
