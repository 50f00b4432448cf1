//! NF4: bitsandbytes' 4-bit NormalFloat codec, as `quantize_4bit(quant_type="nf4",
//! blocksize=64)` computes it, with the optional double quantization of the block scales
//! (`compress_statistics=True`), and the safetensors layout of a `Linear4bit` weight.
//!
//! Quantization, per block of 64 consecutive values of the row-major `[out, in]` weight:
//! absmax = max |x|; each x is multiplied by 1 / max(absmax, 1e-38), clamped to [-1, 1] and
//! coded by the nearest of the 16 NF4 values, an exact tie going to the lower index (torch's
//! `bucketize` against the f32 midpoints, which bitsandbytes uses). Dequantization is
//! `NF4_CODE[idx] * absmax` in f32.
//!
//! Double quantization: offset = mean(absmax) (f32), then `absmax - offset` is quantized the
//! same way in blocks of 256 with the 256-value signed dynamic map, keeping one f32 scale per
//! 256 block. The scales come back as `map[code] * nested_absmax + offset`.
//!
//! bitsandbytes' native CPU kernel for the 8-bit step searches the map approximately and
//! sometimes picks a neighbour of the nearest code; this module follows bitsandbytes'
//! reference (torch) implementation, which always picks the nearest. Files written by either
//! are read as they are.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::QuantError;

/// Values per absmax block.
pub const NF4_BLOCK: usize = 64;
/// Absmax values per block in double quantization.
pub const NESTED_BLOCK: usize = 256;

/// bitsandbytes' NormalFloat4 values, ascending (index 7 is 0.0).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The smallest absmax bitsandbytes divides by; smaller blocks (subnormals, zeros) are
/// scaled by 1e38 and land on the codes nearest 0.
const MIN_ABSMAX: f32 = 1e-38;

/// The quant_state key suffix bitsandbytes writes for NF4.
const QUANT_STATE_NF4: &str = "quant_state.bitsandbytes__nf4";

/// bitsandbytes' `create_dynamic_map(signed=True)`: 8-bit codes with a dynamic exponent,
/// ascending, from -0.99297 to 1.0 with 0.0 at index 127.
///
/// Built as bitsandbytes builds it: for each exponent e in 0..7, 2^e + 1 points from 0.1 to
/// 1.0 (torch's f32 `linspace`), the means of neighbouring points (f32), scaled by
/// ±10^(e-6) in f32; then 0.0 and 1.0, sorted.
pub fn dynamic_map_signed() -> [f32; 256] {
    const SCALE: [f32; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data = Vec::with_capacity(256);
    for (e, &scale) in SCALE.iter().enumerate() {
        let points = linspace_f32(0.1, 1.0, (1 << e) + 1);
        for pair in points.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data.try_into().expect("2 * 127 + 2 values")
}

/// torch's CPU `linspace` for f32: the first half counted up from `start`, the second half
/// down from `end`, with an f32 step and a fused multiply-add (one rounding; two roundings
/// move 12 of the 65 points of the last exponent by one ulp).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// The f32 midpoints between neighbouring values of an ascending code.
fn midpoints(code: &[f32]) -> Vec<f32> {
    code.windows(2).map(|p| (p[0] + p[1]) / 2.0).collect()
}

/// Index of the nearest code to `x`, given the code's midpoints: the number of midpoints
/// strictly below `x`, so an exact tie goes to the lower index (torch `bucketize`).
#[inline]
fn nearest(mids: &[f32], x: f32) -> u8 {
    mids.partition_point(|&m| m < x) as u8
}

/// The block's absmax and the factor bitsandbytes scales its values by.
#[inline]
fn block_scale(block: &[f32]) -> (f32, f32) {
    let absmax = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    (absmax, 1.0 / absmax.max(MIN_ABSMAX))
}

/// bitsandbytes' 8-bit blockwise quantization (its reference implementation): per block of
/// `blocksize` values (the last one may be shorter), absmax = max |x| and each value coded by
/// the nearest entry of the ascending `map` to `x / absmax`. Returns (codes, absmax per block).
pub fn quantize_blockwise(values: &[f32], map: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    assert!(
        map.len() <= 256,
        "an 8-bit code has at most 256 values, found {}",
        map.len()
    );
    let mids = midpoints(map);
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    for block in values.chunks(blocksize) {
        let (am, inv) = block_scale(block);
        absmax.push(am);
        codes.extend(
            block
                .iter()
                .map(|&x| nearest(&mids, (x * inv).clamp(-1.0, 1.0))),
        );
    }
    (codes, absmax)
}

/// Per-block scales: plain f32, or double-quantized as bitsandbytes' compress_statistics does.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Nested {
        /// One 8-bit code per NF4 block, into `code_map`.
        codes: Vec<u8>,
        /// 256 values, ascending: bitsandbytes' signed dynamic map.
        code_map: Vec<f32>,
        /// One scale per `nested_blocksize` codes.
        nested_absmax: Vec<f32>,
        nested_blocksize: usize,
        /// The mean of the original scales, subtracted before quantizing them.
        offset: f32,
    },
}

impl Absmax {
    /// Double-quantizes plain scales: offset = their mean, then 8-bit blockwise quantization of
    /// `absmax - offset` in blocks of [`NESTED_BLOCK`] with [`dynamic_map_signed`].
    pub fn nest(absmax: &[f32]) -> Absmax {
        Absmax::nest_with_offset(absmax, mean_f32(absmax))
    }

    /// [`Absmax::nest`] with a given offset (bitsandbytes takes torch's f32 mean, whose
    /// summation order can move the last bit).
    pub fn nest_with_offset(absmax: &[f32], offset: f32) -> Absmax {
        let map = dynamic_map_signed();
        let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let (codes, nested_absmax) = quantize_blockwise(&centred, &map, NESTED_BLOCK);
        Absmax::Nested {
            codes,
            code_map: map.to_vec(),
            nested_absmax,
            nested_blocksize: NESTED_BLOCK,
            offset,
        }
    }

    /// Number of NF4 blocks described.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Nested { codes, .. } => codes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The scale of NF4 block `b`.
    #[inline]
    pub fn get(&self, b: usize) -> f32 {
        match self {
            Absmax::Plain(v) => v[b],
            Absmax::Nested {
                codes,
                code_map,
                nested_absmax,
                nested_blocksize,
                offset,
            } => code_map[codes[b] as usize] * nested_absmax[b / nested_blocksize] + offset,
        }
    }

    /// Bytes held: 4 per plain scale; 1 per code plus the f32 map, nested scales and offset.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => 4 * v.len(),
            Absmax::Nested {
                codes,
                code_map,
                nested_absmax,
                ..
            } => codes.len() + 4 * (code_map.len() + nested_absmax.len() + 1),
        }
    }
}

/// The mean of f32 values, summed in f64 and rounded once.
fn mean_f32(values: &[f32]) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    (values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64) as f32
}

/// An NF4 weight `[out, in]` (row-major), two codes per byte, first value in the high nibble.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Weight {
    pub out_features: usize,
    pub in_features: usize,
    /// `out * in / 2` bytes.
    pub packed: Vec<u8>,
    /// One scale per block of [`NF4_BLOCK`] values.
    pub absmax: Absmax,
    /// 16 values; [`NF4_CODE`].
    pub quant_map: Vec<f32>,
    /// The original dtype as bitsandbytes names it: "float32", "bfloat16", "float16".
    pub dtype: String,
}

impl Nf4Weight {
    /// Quantizes a row-major `[out_features, in_features]` f32 weight. The dtype recorded is
    /// "float32"; see [`Nf4Weight::with_dtype`].
    pub fn quantize(
        name: &str,
        w: &[f32],
        out_features: usize,
        in_features: usize,
        double_quant: bool,
    ) -> Result<Self, QuantError> {
        if in_features % NF4_BLOCK != 0 {
            return Err(QuantError::NotBlockAligned {
                name: name.to_string(),
                in_features,
                block: NF4_BLOCK,
            });
        }
        if w.len() != out_features * in_features {
            return Err(QuantError::Length {
                name: name.to_string(),
                out_features,
                in_features,
                expected: out_features * in_features,
                found: w.len(),
            });
        }
        let mids = midpoints(&NF4_CODE);
        let blocks = w.len() / NF4_BLOCK;
        let mut packed = vec![0u8; w.len() / 2];
        let mut absmax = vec![0f32; blocks];
        packed
            .par_chunks_mut(NF4_BLOCK / 2)
            .zip(absmax.par_iter_mut())
            .zip(w.par_chunks(NF4_BLOCK))
            .for_each(|((out, am), block)| {
                let (a, inv) = block_scale(block);
                *am = a;
                for (byte, pair) in out.iter_mut().zip(block.chunks_exact(2)) {
                    let hi = nearest(&mids, (pair[0] * inv).clamp(-1.0, 1.0));
                    let lo = nearest(&mids, (pair[1] * inv).clamp(-1.0, 1.0));
                    *byte = (hi << 4) | lo;
                }
            });
        let absmax = if double_quant {
            Absmax::nest(&absmax)
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Nf4Weight {
            out_features,
            in_features,
            packed,
            absmax,
            quant_map: NF4_CODE.to_vec(),
            dtype: "float32".to_string(),
        })
    }

    /// Records the original dtype (bitsandbytes' name: "bfloat16", "float16", "float32").
    pub fn with_dtype(mut self, dtype: &str) -> Self {
        self.dtype = dtype.to_string();
        self
    }

    /// Number of weights, `out * in`.
    pub fn numel(&self) -> usize {
        self.out_features * self.in_features
    }

    /// The per-block scales after undoing double quantization.
    pub fn absmax_values(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(v) => v.clone(),
            nested => (0..nested.len()).map(|b| nested.get(b)).collect(),
        }
    }

    /// The 4-bit code of weight `i` (flat, row-major).
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i % 2 == 0 {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }

    /// Dequantizes rows `rows` of `[out, in]` into `dst` (`rows.len() * in` values).
    ///
    /// # Panics
    /// When `rows` goes past `out_features` or `dst` has another length.
    pub fn dequantize_rows(&self, rows: Range<usize>, dst: &mut [f32]) {
        assert!(
            rows.start <= rows.end && rows.end <= self.out_features,
            "rows {rows:?} of a weight with {} rows",
            self.out_features
        );
        assert_eq!(
            dst.len(),
            rows.len() * self.in_features,
            "dst length for rows {rows:?}"
        );
        let code: &[f32; 16] = self
            .quant_map
            .as_slice()
            .try_into()
            .expect("16 quant_map values");
        let first = rows.start * self.in_features / NF4_BLOCK;
        let packed = &self.packed[first * NF4_BLOCK / 2..];
        for (b, (out, bytes)) in dst
            .chunks_exact_mut(NF4_BLOCK)
            .zip(packed.chunks_exact(NF4_BLOCK / 2))
            .enumerate()
        {
            // 16 scaled values per block, then one lookup per nibble; code * absmax in f32,
            // as bitsandbytes computes it
            let a = self.absmax.get(first + b);
            let table: [f32; 16] = std::array::from_fn(|i| code[i] * a);
            for (pair, &byte) in out.chunks_exact_mut(2).zip(bytes) {
                pair[0] = table[(byte >> 4) as usize];
                pair[1] = table[(byte & 0x0f) as usize];
            }
        }
    }

    /// Dequantizes the whole weight, `[out, in]` row-major.
    ///
    /// One thread: about 1 ns a value (0.8-1.9 ms for 2048 x 640 on a shared 2-core
    /// machine); splitting the rows over rayon's pool measured no clear gain there, so
    /// callers that want threads split rows with [`Nf4Weight::dequantize_rows`].
    pub fn dequantize(&self) -> Vec<f32> {
        let mut dst = vec![0f32; self.numel()];
        self.dequantize_rows(0..self.out_features, &mut dst);
        dst
    }

    /// Bytes held: packed codes, scales (see [`Absmax::storage_bytes`]) and the 16-value map.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + self.absmax.storage_bytes() + 4 * self.quant_map.len()
    }

    /// The quant_state dict bitsandbytes packs into `{prefix}.quant_state.bitsandbytes__nf4`,
    /// as `json.dumps` writes it (same keys, order and separators).
    pub fn quant_state_json(&self) -> String {
        let mut s = format!(
            "{{\"quant_type\": \"nf4\", \"blocksize\": {NF4_BLOCK}, \"dtype\": {}, \"shape\": [{}, {}]",
            serde_json::Value::from(self.dtype.as_str()),
            self.out_features,
            self.in_features
        );
        if let Absmax::Nested {
            nested_blocksize,
            offset,
            ..
        } = &self.absmax
        {
            s += &format!(
                ", \"nested_blocksize\": {nested_blocksize}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                python_float_repr(*offset as f64)
            );
        }
        s.push('}');
        s
    }

    /// bitsandbytes' safetensors layout for module weight `prefix` (e.g.
    /// "model.layers.0.mlp.up_proj.weight"), in the order a `Linear4bit` state dict has:
    /// `{prefix}` (u8 `[n/2, 1]`), `.absmax` (f32, or u8 codes when nested), `.quant_map`
    /// (f32 `[16]`), `.nested_absmax` (f32), `.nested_quant_map` (f32 `[256]`) and
    /// `.quant_state.bitsandbytes__nf4` (u8 bytes of the JSON dict).
    pub fn to_bnb_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let dev = &Device::Cpu;
        let u8s = |v: &[u8], shape: &[usize]| {
            Tensor::from_slice(v, shape, dev).expect("shape from the slice's own length")
        };
        let f32s = |v: &[f32]| Tensor::from_slice(v, v.len(), dev).expect("1-d tensor");
        let mut out = vec![(
            prefix.to_string(),
            u8s(&self.packed, &[self.packed.len(), 1]),
        )];
        let key = |suffix: &str| format!("{prefix}.{suffix}");
        match &self.absmax {
            Absmax::Plain(v) => {
                out.push((key("absmax"), f32s(v)));
                out.push((key("quant_map"), f32s(&self.quant_map)));
            }
            Absmax::Nested {
                codes,
                code_map,
                nested_absmax,
                ..
            } => {
                out.push((key("absmax"), u8s(codes, &[codes.len()])));
                out.push((key("quant_map"), f32s(&self.quant_map)));
                out.push((key("nested_absmax"), f32s(nested_absmax)));
                out.push((key("nested_quant_map"), f32s(code_map)));
            }
        }
        let json = self.quant_state_json().into_bytes();
        out.push((key(QUANT_STATE_NF4), u8s(&json, &[json.len()])));
        out
    }

    /// Reads bitsandbytes' layout for `prefix` (see [`Nf4Weight::to_bnb_tensors`]); `get(key)`
    /// returns the tensor of a full key if present. The weight must be 2-d with
    /// `in % 64 == 0`, blocksize 64 and bitsandbytes' NF4 quant_map; the packed codes must be
    /// stored as u8.
    pub fn from_bnb_tensors(
        prefix: &str,
        get: &dyn Fn(&str) -> Option<Tensor>,
    ) -> Result<Self, QuantError> {
        let key = |suffix: &str| format!("{prefix}.{suffix}");
        let qs_key = key(QUANT_STATE_NF4);
        let Some(qs) = get(&qs_key) else {
            let fp4 = key("quant_state.bitsandbytes__fp4");
            if get(&fp4).is_some() {
                return Err(QuantError::mismatch(
                    fp4,
                    "quant_type",
                    "\"nf4\"",
                    "\"fp4\"",
                ));
            }
            return Err(QuantError::Missing { key: qs_key });
        };
        let bytes = read_u8(&qs_key, &qs)?;
        let state: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| QuantError::Json {
                key: qs_key.clone(),
                msg: e.to_string(),
            })?;
        let field = |name: &str| {
            state.get(name).ok_or_else(|| QuantError::Missing {
                key: format!("{qs_key}[\"{name}\"]"),
            })
        };
        let bad = |what: &str, expected: &str, found: &serde_json::Value| {
            QuantError::mismatch(qs_key.clone(), what, expected, found)
        };

        let quant_type = field("quant_type")?;
        if quant_type.as_str() != Some("nf4") {
            return Err(bad("quant_type", "\"nf4\"", quant_type));
        }
        let blocksize = field("blocksize")?;
        if blocksize.as_u64() != Some(NF4_BLOCK as u64) {
            return Err(bad("blocksize", &NF4_BLOCK.to_string(), blocksize));
        }
        let dtype = field("dtype")?;
        let dtype = match dtype.as_str() {
            Some(d @ ("float32" | "bfloat16" | "float16")) => d.to_string(),
            _ => {
                return Err(bad(
                    "dtype",
                    "\"float32\", \"bfloat16\" or \"float16\"",
                    dtype,
                ))
            }
        };
        let shape = field("shape")?;
        let dims: Option<Vec<usize>> = shape
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect());
        let (out_features, in_features) = match dims.as_deref() {
            Some(&[o, i]) => (o, i),
            _ => return Err(bad("shape", "[out_features, in_features]", shape)),
        };
        if in_features % NF4_BLOCK != 0 {
            return Err(bad(
                "shape",
                &format!("in_features a multiple of {NF4_BLOCK}"),
                shape,
            ));
        }
        let n = out_features * in_features;
        let blocks = n / NF4_BLOCK;

        let packed_t = get(prefix).ok_or_else(|| QuantError::Missing {
            key: prefix.to_string(),
        })?;
        let packed = read_u8(prefix, &packed_t)?;
        if packed.len() != n / 2 {
            return Err(QuantError::mismatch(
                prefix,
                format!("packed bytes for shape [{out_features}, {in_features}]"),
                n / 2,
                packed.len(),
            ));
        }

        let map_key = key("quant_map");
        let quant_map = read_f32(&map_key, &required(get, &map_key)?)?;
        if quant_map.len() != 16 {
            return Err(QuantError::mismatch(map_key, "values", 16, quant_map.len()));
        }
        if let Some(i) = (0..16).find(|&i| quant_map[i] != NF4_CODE[i]) {
            return Err(QuantError::mismatch(
                map_key,
                format!("nf4 value {i}"),
                NF4_CODE[i],
                quant_map[i],
            ));
        }

        let absmax_key = key("absmax");
        let absmax_t = required(get, &absmax_key)?;
        let nested = state.get("nested_offset").is_some();
        let absmax = if nested {
            let codes = read_u8(&absmax_key, &absmax_t)?;
            if codes.len() != blocks {
                return Err(QuantError::mismatch(
                    absmax_key,
                    "codes (one per block of 64)",
                    blocks,
                    codes.len(),
                ));
            }
            let nb_field = field("nested_blocksize")?;
            let nested_blocksize = match nb_field.as_u64() {
                Some(b) if b > 0 => b as usize,
                _ => return Err(bad("nested_blocksize", "a positive integer", nb_field)),
            };
            let nested_dtype = field("nested_dtype")?;
            if nested_dtype.as_str() != Some("float32") {
                return Err(bad("nested_dtype", "\"float32\"", nested_dtype));
            }
            let offset_field = field("nested_offset")?;
            let offset = match offset_field.as_f64() {
                Some(o) => o as f32,
                None => return Err(bad("nested_offset", "a number", offset_field)),
            };
            let nabs_key = key("nested_absmax");
            let nested_absmax = read_f32(&nabs_key, &required(get, &nabs_key)?)?;
            let expected = blocks.div_ceil(nested_blocksize);
            if nested_absmax.len() != expected {
                return Err(QuantError::mismatch(
                    nabs_key,
                    format!("values (one per {nested_blocksize} blocks)"),
                    expected,
                    nested_absmax.len(),
                ));
            }
            let nmap_key = key("nested_quant_map");
            let code_map = read_f32(&nmap_key, &required(get, &nmap_key)?)?;
            if code_map.len() != 256 {
                return Err(QuantError::mismatch(
                    nmap_key,
                    "values",
                    256,
                    code_map.len(),
                ));
            }
            Absmax::Nested {
                codes,
                code_map,
                nested_absmax,
                nested_blocksize,
                offset,
            }
        } else {
            let values = read_f32(&absmax_key, &absmax_t)?;
            if values.len() != blocks {
                return Err(QuantError::mismatch(
                    absmax_key,
                    "values (one per block of 64)",
                    blocks,
                    values.len(),
                ));
            }
            Absmax::Plain(values)
        };

        Ok(Nf4Weight {
            out_features,
            in_features,
            packed,
            absmax,
            quant_map,
            dtype,
        })
    }
}

fn required(get: &dyn Fn(&str) -> Option<Tensor>, key: &str) -> Result<Tensor, QuantError> {
    get(key).ok_or_else(|| QuantError::Missing {
        key: key.to_string(),
    })
}

fn read_u8(key: &str, t: &Tensor) -> Result<Vec<u8>, QuantError> {
    if t.dtype() != DType::U8 {
        return Err(QuantError::mismatch(
            key,
            "dtype",
            "u8",
            format!("{:?}", t.dtype()).to_lowercase(),
        ));
    }
    t.flatten_all()
        .and_then(|t| t.to_vec1::<u8>())
        .map_err(|source| QuantError::Candle {
            key: key.to_string(),
            source,
        })
}

fn read_f32(key: &str, t: &Tensor) -> Result<Vec<f32>, QuantError> {
    if !t.dtype().is_float() {
        return Err(QuantError::mismatch(
            key,
            "dtype",
            "a float type",
            format!("{:?}", t.dtype()).to_lowercase(),
        ));
    }
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|source| QuantError::Candle {
            key: key.to_string(),
            source,
        })
}

/// A float as Python's `repr` writes it: the shortest round-trip digits, positional for
/// 1e-4 <= |x| < 1e16, otherwise scientific with a signed, at least two-digit exponent.
fn python_float_repr(x: f64) -> String {
    if x == 0.0 || (1e-4..1e16).contains(&x.abs()) {
        return format!("{x:?}");
    }
    if !x.is_finite() {
        return if x.is_nan() {
            "NaN".into()
        } else if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let s = format!("{x:e}");
    let (mantissa, exp) = s.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let sign = if exp < 0 { '-' } else { '+' };
    format!("{mantissa}e{sign}{:02}", exp.abs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_code_is_ascending_with_zero_at_seven() {
        assert!(NF4_CODE.windows(2).all(|p| p[0] < p[1]));
        assert_eq!((NF4_CODE[0], NF4_CODE[7], NF4_CODE[15]), (-1.0, 0.0, 1.0));
    }

    #[test]
    fn dynamic_map_shape() {
        let map = dynamic_map_signed();
        assert!(map.windows(2).all(|p| p[0] < p[1]));
        // 127 negative values, then 0.0, 127 positive values below 1.0, then 1.0
        assert_eq!((map[127], map[255]), (0.0, 1.0));
        // smallest magnitude: 1e-6 * (0.1 + 1.0) / 2
        assert_eq!(map[128], 1e-6f32 * 0.55);
        assert_eq!(map[126], -(1e-6f32 * 0.55));
    }

    #[test]
    fn ties_go_to_the_lower_code() {
        let mids = midpoints(&NF4_CODE);
        for (i, &m) in mids.iter().enumerate() {
            assert_eq!(nearest(&mids, m), i as u8, "midpoint {i}");
            assert_eq!(
                nearest(&mids, m.next_up()),
                i as u8 + 1,
                "above midpoint {i}"
            );
        }
    }

    #[test]
    fn packs_first_value_in_high_nibble() {
        // absmax 1.0; -1.0 -> code 0, 1.0 -> code 15, 0.0 -> code 7
        let mut w = vec![0.0f32; 64];
        w[0] = -1.0;
        w[1] = 1.0;
        let q = Nf4Weight::quantize("w", &w, 1, 64, false).unwrap();
        assert_eq!(q.packed[0], 0x0f);
        assert_eq!(q.packed[1], 0x77);
        assert_eq!((q.code(0), q.code(1), q.code(2)), (0, 15, 7));
        assert_eq!(q.absmax, Absmax::Plain(vec![1.0]));
    }

    #[test]
    fn zero_block_stays_zero() {
        let q = Nf4Weight::quantize("w", &[0.0; 128], 2, 64, true).unwrap();
        assert!(q.packed.iter().all(|&b| b == 0x77));
        assert_eq!(q.dequantize(), vec![0.0; 128]);
    }

    #[test]
    fn exact_code_values_round_trip() {
        // 0.25 * code, absmax 0.25: every value is exactly representable
        let w: Vec<f32> = (0..64).map(|i| 0.25 * NF4_CODE[i % 16]).collect();
        let q = Nf4Weight::quantize("w", &w, 1, 64, false).unwrap();
        assert_eq!(q.dequantize(), w);
    }

    #[test]
    fn rejects_unaligned_rows_and_wrong_length() {
        let err = Nf4Weight::quantize("layers.0.q_proj", &[0.0; 200], 2, 100, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "layers.0.q_proj: in_features 100 is not a multiple of the nf4 block size 64"
        );
        let err = Nf4Weight::quantize("w", &[0.0; 64], 2, 64, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "w: expected 128 values for [2, 64], found 64"
        );
    }

    #[test]
    fn dequantize_rows_matches_whole() {
        let w: Vec<f32> = (0..4 * 128)
            .map(|i| ((i * 7919) % 201) as f32 - 100.0)
            .collect();
        let q = Nf4Weight::quantize("w", &w, 4, 128, true).unwrap();
        let all = q.dequantize();
        let mut rows = vec![0.0; 2 * 128];
        q.dequantize_rows(1..3, &mut rows);
        assert_eq!(rows, all[128..3 * 128]);
    }

    #[test]
    fn python_repr_of_floats() {
        assert_eq!(
            python_float_repr(0.051387786865234375),
            "0.051387786865234375"
        );
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(1e-5), "1e-05");
        assert_eq!(python_float_repr(-2.5e-7), "-2.5e-07");
        assert_eq!(python_float_repr(1e16), "1e+16");
    }

    #[test]
    fn storage_of_a_nested_weight() {
        // 2 x 128: 128 packed bytes, 4 codes + 256 * 4 map + 1 * 4 nested + 4 offset, 64 map
        let q = Nf4Weight::quantize("w", &[0.5; 256], 2, 128, true).unwrap();
        assert_eq!(q.storage_bytes(), 128 + 4 + 1024 + 4 + 4 + 64);
    }
}
