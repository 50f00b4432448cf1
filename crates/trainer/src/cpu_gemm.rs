//! The CPU matrix product behind the fused LoRA layer: `C = (accumulate ? C : 0) + alpha·A·B`
//! on strided row-major buffers.
//!
//! Default build: the `gemm` crate (the kernel candle itself uses, with its AVX-512 kernels
//! turned on by this workspace). With the `mkl` feature: Intel MKL's `cblas_sgemm` /
//! `cblas_dgemm`, the same library candle's own products then call, so that every large
//! product of a training step runs on one kernel; other dtypes stay on the `gemm` crate.
//!
//! [`gemm_bf16`] multiplies bf16 operands into an f32 result (f32 accumulation), for a frozen
//! base held in bf16: MKL's `cblas_gemm_bf16bf16f32`, which runs on AMX tiles where the CPU
//! has them; without MKL the operands are widened to f32 and multiplied as above.

use candle_core::WithDType;
use half::bf16;
use rayon::prelude::*;

/// Which library runs the CPU products of this build, for run records.
pub fn backend() -> &'static str {
    if cfg!(feature = "mkl") {
        "mkl"
    } else {
        "gemm"
    }
}

/// Sets the threads of the CPU product library where it keeps its own pool (MKL's OpenMP
/// threads); the `gemm` crate uses rayon's pool, set by the caller.
pub fn set_threads(n: usize) {
    #[cfg(feature = "mkl")]
    mkl::set_threads(n);
    #[cfg(not(feature = "mkl"))]
    let _ = n;
}

std::thread_local! {
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this thread's products on one thread: for work that is already spread over
/// the cores (one product per task), where a threaded product would oversubscribe them.
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    let before = SERIAL.with(|s| s.replace(true));
    #[cfg(feature = "mkl")]
    let mkl_before = mkl::set_local_threads(1);
    let r = f();
    #[cfg(feature = "mkl")]
    mkl::set_local_threads(mkl_before);
    SERIAL.with(|s| s.set(before));
    r
}

/// `C = (accumulate ? C : 0) + alpha · A B` with `A: [m, k]`, `B: [k, n]`, `C: [m, n]`
/// (row-major, contiguous); each operand's strides are given as (row stride, column stride)
/// in elements, so a transposed view is passed by swapping them.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    c: &mut [T],
    accumulate: bool,
    a: &[T],
    a_strides: (usize, usize),
    b: &[T],
    b_strides: (usize, usize),
    alpha: f64,
) {
    gemm_ldc(
        (m, n, k),
        c,
        n,
        accumulate,
        a,
        a_strides,
        b,
        b_strides,
        alpha,
    )
}

/// As [`gemm`] with C's rows `ldc` elements apart (`ldc >= n`): the product written into a
/// block of a wider matrix.
#[allow(clippy::too_many_arguments)]
pub fn gemm_ldc<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    c: &mut [T],
    ldc: usize,
    accumulate: bool,
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
    alpha: f64,
) {
    assert!(ldc >= n, "gemm: row stride {ldc} < {n} columns");
    assert!(
        m == 0 || c.len() >= (m - 1) * ldc + n,
        "gemm: destination holds {} < {m}x{n} with row stride {ldc}",
        c.len()
    );
    check_operands(
        (m, n, k),
        a.len(),
        (a_rs, a_cs),
        b.len(),
        (b_rs, b_cs),
        "gemm",
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: `c` holds the strided destination (checked above) and is borrowed mutably, so
    // it aliases neither operand.
    unsafe {
        gemm_ptr(
            (m, n, k),
            c.as_mut_ptr(),
            ldc,
            accumulate,
            a,
            (a_rs, a_cs),
            b,
            (b_rs, b_cs),
            alpha,
        )
    }
}

/// A new `[m, n]` buffer holding `alpha · A B`, operands as in [`gemm`]. The buffer is not
/// zero-filled first: the product writes every element (BLAS's `beta = 0`), which saves a
/// pass over a destination that is often several megabytes.
pub fn gemm_new<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    a: &[T],
    a_strides: (usize, usize),
    b: &[T],
    b_strides: (usize, usize),
    alpha: f64,
) -> Vec<T> {
    if m == 0 || n == 0 || k == 0 {
        return vec![T::zero(); m * n];
    }
    check_operands((m, n, k), a.len(), a_strides, b.len(), b_strides, "gemm");
    // SAFETY: the operands were checked for these strides, and a product without
    // accumulation writes all m·n elements of its destination without reading them.
    let c = unsafe {
        written_by(m * n, |c| {
            gemm_ptr((m, n, k), c, n, false, a, a_strides, b, b_strides, alpha);
            true
        })
    };
    c.expect("the product always writes")
}

/// A new buffer of `len` elements that `write` fills through a raw pointer, or None when
/// `write` returns false (and wrote nothing the buffer is read for).
///
/// # Safety
/// When `write` returns true it must have written all `len` elements.
unsafe fn written_by<T>(len: usize, write: impl FnOnce(*mut T) -> bool) -> Option<Vec<T>> {
    let mut c = Vec::with_capacity(len);
    if !write(c.as_mut_ptr()) {
        return None;
    }
    // SAFETY: the caller's contract: every element is initialised.
    unsafe { c.set_len(len) };
    Some(c)
}

/// Panics unless `a` and `b` hold `[m, k]` and `[k, n]` matrices with these strides.
fn check_operands(
    (m, n, k): (usize, usize, usize),
    a_len: usize,
    (a_rs, a_cs): (usize, usize),
    b_len: usize,
    (b_rs, b_cs): (usize, usize),
    what: &str,
) {
    assert!(
        m == 0 || k == 0 || a_len > (m - 1) * a_rs + (k - 1) * a_cs,
        "{what}: left operand too short"
    );
    assert!(
        n == 0 || k == 0 || b_len > (k - 1) * b_rs + (n - 1) * b_cs,
        "{what}: right operand too short"
    );
}

/// The product into a raw destination with rows `ldc` apart, on MKL or the `gemm` crate.
///
/// # Safety
/// `c` must be valid for writes of `(m - 1)·ldc + n` elements (and for reads when
/// `accumulate`), must not overlap `a` or `b`, and the operands must hold their matrices.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_ptr<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    c: *mut T,
    ldc: usize,
    accumulate: bool,
    a: &[T],
    a_strides: (usize, usize),
    b: &[T],
    b_strides: (usize, usize),
    alpha: f64,
) {
    #[cfg(feature = "mkl")]
    if mkl::try_gemm(
        (m, n, k),
        c,
        ldc,
        accumulate,
        a,
        a_strides,
        b,
        b_strides,
        alpha,
    ) {
        return;
    }
    gemm_crate(
        (m, n, k),
        c,
        ldc,
        accumulate,
        a,
        a_strides,
        b,
        b_strides,
        alpha,
    )
}

/// `x` rounded to bf16 (nearest, ties to even), in parallel.
pub fn to_bf16(x: &[f32]) -> Vec<bf16> {
    use half::slice::HalfFloatSliceExt;
    let mut out = vec![bf16::ZERO; x.len()];
    out.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(o, x)| o.convert_from_f32_slice(x));
    out
}

/// `x` widened to f32, in parallel.
pub fn bf16_to_f32(x: &[bf16]) -> Vec<f32> {
    use half::slice::HalfFloatSliceExt;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(o, x)| x.convert_to_f32_slice(o));
    out
}

/// As [`gemm`] for bf16 operands and an f32 destination, products accumulated in f32.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
    accumulate: bool,
    a: &[bf16],
    a_strides: (usize, usize),
    b: &[bf16],
    b_strides: (usize, usize),
    alpha: f64,
) {
    assert!(
        c.len() >= m * n,
        "gemm_bf16: destination holds {} < {m}x{n}",
        c.len()
    );
    check_operands(
        (m, n, k),
        a.len(),
        a_strides,
        b.len(),
        b_strides,
        "gemm_bf16",
    );
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(feature = "mkl")]
    // SAFETY: `c` holds `[m, n]` (checked above), borrowed mutably so aliasing neither operand.
    if unsafe {
        mkl::try_gemm_bf16(
            (m, n, k),
            c.as_mut_ptr(),
            accumulate,
            a,
            a_strides,
            b,
            b_strides,
            alpha,
        )
    } {
        return;
    }
    let (a, b) = (bf16_to_f32(a), bf16_to_f32(b));
    gemm(
        (m, n, k),
        c,
        accumulate,
        &a,
        a_strides,
        &b,
        b_strides,
        alpha,
    )
}

/// A new `[m, n]` f32 buffer holding `alpha · A B` for bf16 operands, as [`gemm_bf16`]
/// without accumulation; not zero-filled first (see [`gemm_new`]).
pub fn gemm_bf16_new(
    (m, n, k): (usize, usize, usize),
    a: &[bf16],
    a_strides: (usize, usize),
    b: &[bf16],
    b_strides: (usize, usize),
    alpha: f64,
) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    check_operands(
        (m, n, k),
        a.len(),
        a_strides,
        b.len(),
        b_strides,
        "gemm_bf16",
    );
    #[cfg(feature = "mkl")]
    // SAFETY: operands checked above; a product with beta = 0 writes all m·n elements
    // without reading them.
    if let Some(c) = unsafe {
        written_by(m * n, |c| {
            mkl::try_gemm_bf16((m, n, k), c, false, a, a_strides, b, b_strides, alpha)
        })
    } {
        return c;
    }
    let (a, b) = (bf16_to_f32(a), bf16_to_f32(b));
    gemm_new((m, n, k), &a, a_strides, &b, b_strides, alpha)
}

/// # Safety
/// As [`gemm_ptr`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_crate<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    c: *mut T,
    ldc: usize,
    accumulate: bool,
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
    alpha: f64,
) {
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k > 64 * 64 * 64 && !SERIAL.with(|s| s.get()) {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller's contract (see `gemm_ptr`); with `read_dst` false the crate writes
    // the destination without reading it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::from_f64(1.0),
            T::from_f64(alpha),
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(feature = "mkl")]
mod mkl {
    use candle_core::{DType, WithDType};

    // CBLAS constants (mkl_cblas.h) and the LP64 interface (32-bit integers).
    const ROW_MAJOR: i32 = 101;
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;

    extern "C" {
        fn cblas_sgemm(
            layout: i32,
            ta: i32,
            tb: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
        fn cblas_dgemm(
            layout: i32,
            ta: i32,
            tb: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f64,
            a: *const f64,
            lda: i32,
            b: *const f64,
            ldb: i32,
            beta: f64,
            c: *mut f64,
            ldc: i32,
        );
        fn cblas_gemm_bf16bf16f32(
            layout: i32,
            ta: i32,
            tb: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const u16,
            lda: i32,
            b: *const u16,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
        fn MKL_Set_Num_Threads(n: i32);
        fn MKL_Set_Num_Threads_Local(n: i32) -> i32;
    }

    /// Sets this thread's MKL threads (0: the global setting); returns the previous value.
    pub fn set_local_threads(n: i32) -> i32 {
        // SAFETY: a thread-local MKL setting; no pointers involved.
        unsafe { MKL_Set_Num_Threads_Local(n) }
    }

    /// [`super::gemm_bf16`] on MKL; false when the strides do not fit CBLAS.
    ///
    /// # Safety
    /// `c` must be valid for `[m, n]` f32 writes (and reads when `accumulate`) and not overlap
    /// the operands, which must hold their matrices.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn try_gemm_bf16(
        (m, n, k): (usize, usize, usize),
        c: *mut f32,
        accumulate: bool,
        a: &[half::bf16],
        a_strides: (usize, usize),
        b: &[half::bf16],
        b_strides: (usize, usize),
        alpha: f64,
    ) -> bool {
        let Some(Cblas {
            ta,
            lda,
            tb,
            ldb,
            mi,
            ni,
            ki,
        }) = cblas_args((m, n, k), a_strides, b_strides)
        else {
            return false;
        };
        let beta = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: as in `try_gemm`; `half::bf16` is a transparent u16, MKL's MKL_BF16.
        unsafe {
            cblas_gemm_bf16bf16f32(
                ROW_MAJOR,
                ta,
                tb,
                mi,
                ni,
                ki,
                alpha as f32,
                a.as_ptr() as *const u16,
                lda,
                b.as_ptr() as *const u16,
                ldb,
                beta,
                c,
                ni,
            )
        };
        true
    }

    pub fn set_threads(n: usize) {
        // SAFETY: sets a process-wide MKL setting; no pointers involved.
        unsafe { MKL_Set_Num_Threads(n.max(1).min(i32::MAX as usize) as i32) }
    }

    /// A `rows x cols` operand with strides (rs, cs) as a CBLAS (transpose, leading
    /// dimension) pair, when one of its strides is 1.
    fn cblas_operand((rows, cols): (usize, usize), (rs, cs): (usize, usize)) -> Option<(i32, i32)> {
        let ld = |v: usize| i32::try_from(v.max(1)).ok();
        if cs == 1 || cols == 1 {
            Some((NO_TRANS, ld(if rows == 1 { cols } else { rs.max(cols) })?))
        } else if rs == 1 || rows == 1 {
            Some((TRANS, ld(if cols == 1 { rows } else { cs.max(rows) })?))
        } else {
            None
        }
    }

    /// The CBLAS arguments of a product.
    struct Cblas {
        ta: i32,
        lda: i32,
        tb: i32,
        ldb: i32,
        mi: i32,
        ni: i32,
        ki: i32,
    }

    /// The CBLAS arguments of `[m, k] x [k, n]` with these strides, when CBLAS can take them.
    fn cblas_args(
        (m, n, k): (usize, usize, usize),
        a_strides: (usize, usize),
        b_strides: (usize, usize),
    ) -> Option<Cblas> {
        let (ta, lda) = cblas_operand((m, k), a_strides)?;
        let (tb, ldb) = cblas_operand((k, n), b_strides)?;
        let int = |v: usize| i32::try_from(v).ok();
        Some(Cblas {
            ta,
            lda,
            tb,
            ldb,
            mi: int(m)?,
            ni: int(n)?,
            ki: int(k)?,
        })
    }

    /// Runs the product on MKL when the dtype and strides allow; false leaves it to the caller.
    ///
    /// # Safety
    /// As [`super::gemm_ptr`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn try_gemm<T: WithDType>(
        (m, n, k): (usize, usize, usize),
        c: *mut T,
        ldc: usize,
        accumulate: bool,
        a: &[T],
        a_strides: (usize, usize),
        b: &[T],
        b_strides: (usize, usize),
        alpha: f64,
    ) -> bool {
        let Some(Cblas {
            ta,
            lda,
            tb,
            ldb,
            mi,
            ni,
            ki,
        }) = cblas_args((m, n, k), a_strides, b_strides)
        else {
            return false;
        };
        let Ok(ldc) = i32::try_from(ldc) else {
            return false;
        };
        let beta = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: the operands' extents were checked by the caller for these strides, the
        // leading dimensions cover each row, and with beta = 0 BLAS does not read `c`.
        macro_rules! call {
            ($f:ident, $t:ty) => {
                unsafe {
                    $f(
                        ROW_MAJOR,
                        ta,
                        tb,
                        mi,
                        ni,
                        ki,
                        alpha as $t,
                        a.as_ptr() as *const $t,
                        lda,
                        b.as_ptr() as *const $t,
                        ldb,
                        beta as $t,
                        c as *mut $t,
                        ldc,
                    )
                }
            };
        }
        match T::DTYPE {
            DType::F32 => call!(cblas_sgemm, f32),
            DType::F64 => call!(cblas_dgemm, f64),
            _ => return false,
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive triple loop, the reference for every stride combination the layer uses.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        (m, n, k): (usize, usize, usize),
        c: &mut [f64],
        accumulate: bool,
        a: &[f64],
        (a_rs, a_cs): (usize, usize),
        b: &[f64],
        (b_rs, b_cs): (usize, usize),
        alpha: f64,
    ) {
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| a[i * a_rs + p * a_cs] * b[p * b_rs + j * b_cs])
                    .sum();
                c[i * n + j] = if accumulate { c[i * n + j] } else { 0.0 } + alpha * dot;
            }
        }
    }

    #[test]
    fn strided_products_match_a_triple_loop() {
        let vals = |len: usize, seed: usize| -> Vec<f64> {
            (0..len)
                .map(|i| (((i * 7919 + seed * 104_729) % 211) as f64 - 105.0) / 37.0)
                .collect()
        };
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 7),
            (70, 33, 129),
            (1, 17, 9),
            (9, 1, 17),
            (16, 16, 1),
        ] {
            for a_t in [false, true] {
                for b_t in [false, true] {
                    for accumulate in [false, true] {
                        let a = vals(m * k, 1);
                        let b = vals(k * n, 2);
                        let a_s = if a_t { (1, m) } else { (k, 1) };
                        let b_s = if b_t { (1, k) } else { (n, 1) };
                        let mut want = vals(m * n, 3);
                        let mut got64 = want.clone();
                        let mut got32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
                        reference((m, n, k), &mut want, accumulate, &a, a_s, &b, b_s, 0.5);
                        gemm((m, n, k), &mut got64, accumulate, &a, a_s, &b, b_s, 0.5);
                        let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
                        let b32: Vec<f32> = b.iter().map(|&v| v as f32).collect();
                        gemm((m, n, k), &mut got32, accumulate, &a32, a_s, &b32, b_s, 0.5);
                        if !accumulate {
                            // a fresh destination: the same values, exactly. The NaN
                            // buffers freed first are likely handed back by the allocator, so
                            // a product that read its destination would show it.
                            drop(vec![f64::NAN; m * n]);
                            let new64 = gemm_new((m, n, k), &a, a_s, &b, b_s, 0.5);
                            drop(vec![f32::NAN; m * n]);
                            let new32 = gemm_new((m, n, k), &a32, a_s, &b32, b_s, 0.5);
                            assert_eq!(new64, got64, "gemm_new f64 {m}x{n}x{k}");
                            assert_eq!(new32, got32, "gemm_new f32 {m}x{n}x{k}");
                        }
                        for i in 0..m * n {
                            let tol = 1e-9 * (1.0 + want[i].abs());
                            assert!(
                                (got64[i] - want[i]).abs() < tol,
                                "f64 {m}x{n}x{k} a_t {a_t} b_t {b_t} acc {accumulate} at {i}"
                            );
                            let tol32 = 1e-4 * (1.0 + want[i].abs()) * (k as f64).sqrt();
                            assert!(
                                (got32[i] as f64 - want[i]).abs() < tol32,
                                "f32 {m}x{n}x{k} a_t {a_t} b_t {b_t} acc {accumulate} at {i}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn an_empty_inner_dimension_gives_zeros() {
        assert_eq!(
            gemm_new::<f32>((2, 3, 0), &[], (0, 1), &[], (3, 1), 1.0),
            [0.0; 6]
        );
        assert_eq!(
            gemm_bf16_new((2, 1, 0), &[], (0, 1), &[], (1, 1), 1.0),
            [0.0; 2]
        );
    }

    #[test]
    fn a_row_stride_writes_a_block_and_leaves_the_rest() {
        // a 3x4 product into columns 2..6 of a 3x9 matrix
        let a: Vec<f64> = (0..15).map(|i| i as f64 - 7.0).collect(); // [3, 5]
        let b: Vec<f64> = (0..20).map(|i| (i % 7) as f64 * 0.5).collect(); // [5, 4]
        let mut c = vec![-1.0f64; 27];
        gemm_ldc(
            (3, 4, 5),
            &mut c[2..],
            9,
            false,
            &a,
            (5, 1),
            &b,
            (4, 1),
            1.0,
        );
        let mut want = vec![0.0f64; 12];
        reference((3, 4, 5), &mut want, false, &a, (5, 1), &b, (4, 1), 1.0);
        for i in 0..3 {
            for j in 0..9 {
                let got = c[i * 9 + j];
                if (2..6).contains(&j) {
                    assert!((got - want[i * 4 + j - 2]).abs() < 1e-12, "({i}, {j})");
                } else {
                    assert_eq!(got, -1.0, "({i}, {j}) outside the block");
                }
            }
        }
    }

    #[test]
    fn bf16_products_match_f32_products_of_the_same_values() {
        // operands exactly representable in bf16, so both products see the same numbers
        let vals = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i * 7919 + seed * 104_729) % 211) as f32 - 105.0) / 64.0)
                .collect()
        };
        for &(m, n, k) in &[(1, 1, 1), (5, 3, 7), (96, 130, 72)] {
            for (a_t, b_t) in [(false, false), (false, true), (true, false)] {
                for accumulate in [false, true] {
                    let a = vals(m * k, 1);
                    let b = vals(k * n, 2);
                    let a_s = if a_t { (1, m) } else { (k, 1) };
                    let b_s = if b_t { (1, k) } else { (n, 1) };
                    let mut want = vals(m * n, 3);
                    let mut got = want.clone();
                    gemm((m, n, k), &mut want, accumulate, &a, a_s, &b, b_s, 0.5);
                    let (ab, bb) = (to_bf16(&a), to_bf16(&b));
                    assert_eq!(bf16_to_f32(&ab), a);
                    gemm_bf16((m, n, k), &mut got, accumulate, &ab, a_s, &bb, b_s, 0.5);
                    if !accumulate {
                        let fresh = gemm_bf16_new((m, n, k), &ab, a_s, &bb, b_s, 0.5);
                        assert_eq!(fresh, got, "gemm_bf16_new {m}x{n}x{k}");
                    }
                    for i in 0..m * n {
                        let tol = 1e-5 * (1.0 + want[i].abs());
                        assert!(
                            (got[i] - want[i]).abs() < tol,
                            "{m}x{n}x{k} at {i}: {} vs {}",
                            got[i],
                            want[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn to_bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to even (1)
        let x = [1.0f32, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5e-3];
        let y = bf16_to_f32(&to_bf16(&x));
        assert_eq!(y[0], 1.0);
        assert_eq!(y[1], 1.0);
        assert_eq!(y[2], 1.0 + 4.0 / 256.0);
        assert!((y[3] + 2.5e-3).abs() < 2.5e-3 / 128.0);
    }
}
