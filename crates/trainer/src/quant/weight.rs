//! A frozen linear weight kept quantized: NF4 (bitsandbytes' format) or a GGUF file's own
//! blocks (Q4_K, Q6_K, Q8_0, ...). Neither is ever held as a persistent f32 copy: the
//! quantized linear op dequantizes one layer right before its product and drops it after.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::nf4::Nf4Weight;
use crate::model::{QuantWeights, Weights};

/// How the frozen base's linear projections are held (`[model] quantization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// Dense f32 (GGUF blocks and bitsandbytes NF4 files are dequantized at load).
    #[default]
    None,
    /// NF4 with double quantization, quantized at load from dense weights (QLoRA).
    Nf4,
    /// As stored: a GGUF file's quantized tensors or a pre-quantized bitsandbytes checkpoint.
    Keep,
    /// bfloat16, rounded at load (not a block format: 2 bytes a weight). On a build with MKL
    /// the products multiply bf16 operands with f32 accumulation (AMX where the CPU has it).
    Bf16,
}

impl Quantization {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Self::None),
            "nf4" => Some(Self::Nf4),
            "keep" => Some(Self::Keep),
            "bf16" => Some(Self::Bf16),
            _ => None,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Nf4 => "nf4",
            Self::Keep => "keep",
            Self::Bf16 => "bf16",
        }
    }
}

/// The HF weight names that may be held quantized: the seven projections of each layer (as
/// bitsandbytes does, embeddings, norms and the LM head stay dense).
pub fn is_quantizable(hf_name: &str) -> bool {
    hf_name.starts_with("model.layers.")
        && hf_name
            .strip_suffix(".weight")
            .and_then(|m| m.rsplit('.').next())
            .is_some_and(|last| ftbench_meter::flops::LINEAR_MODULES.contains(&last))
}

/// The names in `weights` that [`is_quantizable`] accepts, sorted.
pub fn projection_names(weights: &Weights) -> Vec<String> {
    let mut names: Vec<String> = weights
        .keys()
        .filter(|k| is_quantizable(k))
        .cloned()
        .collect();
    names.sort();
    names
}

/// Moves every projection of `weights` (see [`is_quantizable`]) into the form `hold` makes of
/// its f32 values (`name, values, out, in`), one weight at a time.
fn hold_projections(
    weights: &mut Weights,
    hold: impl Fn(&str, Vec<f32>, usize, usize) -> crate::Result<QuantWeight>,
) -> crate::Result<QuantWeights> {
    let mut out = QuantWeights::new();
    for name in projection_names(weights) {
        let t = weights.remove(&name).expect("listed above");
        let (out_f, in_f) = t.dims2()?;
        let v = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        drop(t);
        let q = hold(&name, v, out_f, in_f)?;
        out.insert(name, q);
    }
    Ok(out)
}

/// Moves every projection of `weights` (see [`is_quantizable`]) into NF4 with double
/// quantization, one weight at a time: QLoRA's frozen base.
pub fn nf4_projections(weights: &mut Weights) -> crate::Result<QuantWeights> {
    hold_projections(weights, |name, v, out_f, in_f| {
        let q = Nf4Weight::quantize(name, &v, out_f, in_f, true)?;
        Ok(QuantWeight::Nf4(Arc::new(q)))
    })
}

/// Moves every projection of `weights` (see [`is_quantizable`]) into bf16, one at a time.
pub fn bf16_projections(weights: &mut Weights) -> crate::Result<QuantWeights> {
    hold_projections(weights, |_, v, out_f, in_f| {
        let data = crate::cpu_gemm::to_bf16(&v);
        Ok(QuantWeight::Bf16(Arc::new(Bf16Weight {
            out_f,
            in_f,
            data,
        })))
    })
}

/// A `[out, in]` weight in bf16, row-major.
pub struct Bf16Weight {
    pub out_f: usize,
    pub in_f: usize,
    pub data: Vec<half::bf16>,
}

/// A quantized `[out, in]` weight.
#[derive(Clone)]
pub enum QuantWeight {
    Nf4(Arc<Nf4Weight>),
    Bf16(Arc<Bf16Weight>),
    /// Row bands of a GGUF tensor (each a `QTensor` of whole rows), dequantized in parallel.
    Gguf {
        dtype: GgmlDType,
        dims: (usize, usize),
        bands: Arc<Vec<QTensor>>,
    },
}

impl std::fmt::Debug for QuantWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantWeight({} {:?})", self.kind(), self.dims())
    }
}

/// Rows per band of a GGUF weight: small enough that each core gets several bands.
const GGUF_BAND_ROWS: usize = 64;

impl QuantWeight {
    /// Splits `qt: [out, in]` into bands of whole rows (a quantized row is a run of whole
    /// blocks, so rows can be cut and reordered as bytes). `row_order[i]` is the source row of
    /// output row `i` (used to undo llama.cpp's q/k permutation); None keeps the order.
    pub fn from_gguf(qt: &QTensor, row_order: Option<&[usize]>) -> candle_core::Result<Self> {
        let (out_f, in_f) = qt.shape().dims2()?;
        let dtype = qt.dtype();
        let bs = dtype.block_size();
        if in_f % bs != 0 {
            candle_core::bail!(
                "{dtype:?} tensor of shape [{out_f}, {in_f}]: rows of {in_f} values do not fill whole blocks of {bs}"
            );
        }
        let row_bytes = in_f / bs * dtype.type_size();
        let data = qt.data()?;
        if data.len() != out_f * row_bytes {
            candle_core::bail!(
                "{dtype:?} tensor of shape [{out_f}, {in_f}]: {} bytes, expected {}",
                data.len(),
                out_f * row_bytes
            );
        }
        let mut bands = Vec::new();
        let mut start = 0;
        while start < out_f {
            let end = (start + GGUF_BAND_ROWS).min(out_f);
            let mut bytes = Vec::with_capacity((end - start) * row_bytes);
            for r in start..end {
                let src = row_order.map_or(r, |o| o[r]);
                bytes.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
            let storage = candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Owned(bytes),
                &Device::Cpu,
                dtype,
            )?;
            bands.push(QTensor::new(storage, (end - start, in_f))?);
            start = end;
        }
        Ok(Self::Gguf {
            dtype,
            dims: (out_f, in_f),
            bands: Arc::new(bands),
        })
    }

    /// `(out_features, in_features)`
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Self::Nf4(w) => (w.out_features, w.in_features),
            Self::Bf16(w) => (w.out_f, w.in_f),
            Self::Gguf { dims, .. } => *dims,
        }
    }

    /// `nf4` or the GGUF block type in lower case (`q4k`, `q6k`, `q8_0`).
    pub fn kind(&self) -> String {
        match self {
            Self::Nf4(_) => "nf4".into(),
            Self::Bf16(_) => "bf16".into(),
            Self::Gguf { dtype, .. } => format!("{dtype:?}").to_lowercase(),
        }
    }

    /// Bytes held by the quantized weight.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Self::Nf4(w) => w.storage_bytes(),
            Self::Bf16(w) => w.data.len() * 2,
            Self::Gguf { bands, .. } => bands.iter().map(|b| b.storage_size_in_bytes()).sum(),
        }
    }

    /// The dequantized weight, f32 `[out, in]`, on `device`.
    pub fn dequantize(&self, device: &Device) -> candle_core::Result<Tensor> {
        let (out_f, in_f) = self.dims();
        match self {
            Self::Nf4(w) => {
                // rows in parallel bands of 64
                let mut dst = vec![0f32; out_f * in_f];
                dst.par_chunks_mut(64 * in_f)
                    .enumerate()
                    .for_each(|(i, chunk)| {
                        let r0 = i * 64;
                        w.dequantize_rows(r0..r0 + chunk.len() / in_f, chunk)
                    });
                Tensor::from_vec(dst, (out_f, in_f), device)
            }
            Self::Bf16(w) => {
                Tensor::from_vec(crate::cpu_gemm::bf16_to_f32(&w.data), (out_f, in_f), device)
            }
            Self::Gguf { bands, .. } => {
                // bands in parallel, joined by one copy
                let parts = bands
                    .par_iter()
                    .map(|band| band.dequantize(&Device::Cpu))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)?.to_device(device)
            }
        }
    }
}
