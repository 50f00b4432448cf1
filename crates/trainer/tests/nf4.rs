//! NF4 against bitsandbytes 0.50.2 (CPU): goldens written by scripts/reference/nf4_golden.py.
//! Codes, packed bytes, scales and dequantized values are compared bit for bit; the one
//! place bitsandbytes itself is not exact (its native CPU kernel for the 8-bit quantization
//! of the scales) is compared with a stated bound. Also: reading and writing bitsandbytes'
//! safetensors layout, the errors of bad files, and the error and size on a normal weight.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ftbench_trainer::quant::nf4::{dynamic_map_signed, quantize_blockwise};
use ftbench_trainer::quant::{Absmax, Nf4Weight, QuantError, NESTED_BLOCK, NF4_BLOCK, NF4_CODE};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::Value;

const GOLDEN: &str = include_str!("data/nf4_golden.json");

fn data(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn golden() -> Value {
    serde_json::from_str(GOLDEN).expect("golden fixture is valid json")
}

/// A float array of the fixture: decimals of f32 values widened to f64, exact as f32.
fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("float array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn hex(v: &Value) -> Vec<u8> {
    let s = v.as_str().expect("hex string");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Bit-exact comparison; reports the first difference.
fn assert_bits(what: &str, ours: &[f32], bnb: &[f32]) {
    assert_eq!(ours.len(), bnb.len(), "{what}: length");
    if let Some(i) = (0..ours.len()).find(|&i| ours[i].to_bits() != bnb[i].to_bits()) {
        panic!(
            "{what}: index {i}: ours {:e}, bitsandbytes {:e}",
            ours[i], bnb[i]
        );
    }
}

/// The "wide" case's input, recomputed exactly as the script computes it.
fn wide_input(out_features: usize, in_features: usize) -> Vec<f32> {
    (0..out_features * in_features)
        .map(|k| {
            let h = (k as u64 * 2_654_435_761) % (1 << 32);
            let u = ((h >> 8) as i64 - (1 << 23)) as f32 * 2f32.powi(-23);
            let row = k / in_features;
            u * (0.01f32 * (1 + row % 7) as f32)
        })
        .collect()
}

#[test]
fn code_and_dynamic_map_equal_bnb() {
    let g = golden();
    assert_eq!(g["bitsandbytes"], "0.50.2");
    assert_bits("nf4 code", &NF4_CODE, &f32s(&g["nf4_code"]));
    assert_bits(
        "dynamic map",
        &dynamic_map_signed(),
        &f32s(&g["dynamic_map"]),
    );
}

#[test]
fn blockwise8_equals_bnb_reference_and_stays_near_its_cpu_kernel() {
    let g = golden();
    let case = &g["blockwise8"];
    let input = f32s(&case["input"]);
    let map = dynamic_map_signed();
    let (codes, absmax) = quantize_blockwise(&input, &map, NESTED_BLOCK);
    assert_bits("absmax", &absmax, &f32s(&case["absmax"]));
    // exact midpoints of the map go to the lower code, one step above to the upper one
    assert_eq!(
        codes,
        hex(&case["reference_codes"]),
        "codes of bnb's reference backend"
    );
    assert_eq!(codes[1], 0);
    assert_eq!(codes[256 + 1], 1);

    // bitsandbytes' native CPU kernel searches the map approximately: on these near-ties it
    // often takes the other neighbour, and it sends the smallest magnitudes (|x| < 2e-5) to
    // +-2.1e-5, a few codes away. In value it stays within the widest gap of the map.
    let cpu = hex(&case["cpu_codes"]);
    let widest = map.windows(2).map(|p| p[1] - p[0]).fold(0.0f32, f32::max);
    let mut differ = 0;
    for (i, (&a, &b)) in codes.iter().zip(&cpu).enumerate() {
        differ += (a != b) as usize;
        let gap = (map[a as usize] - map[b as usize]).abs();
        assert!(
            gap <= widest,
            "value {i}: cpu code {b} is {gap:e} from the nearest, code {a}"
        );
    }
    println!(
        "blockwise8: the cpu kernel differs from the nearest code on {differ} of {}",
        codes.len()
    );
}

#[test]
fn quantize_equals_bnb() {
    let g = golden();
    for case in g["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let (out_f, in_f) = (shape[0], shape[1]);
        let input = match case.get("input") {
            Some(v) => f32s(v),
            None => wide_input(out_f, in_f),
        };
        // dequantized values: the whole weight, or a few rows keyed by row number
        let check_dequant = |what: &str, ours: &[f32], bnb: &Value| match bnb {
            Value::Object(rows) => {
                for (r, v) in rows {
                    let r: usize = r.parse().unwrap();
                    assert_bits(
                        &format!("{name} {what} row {r}"),
                        &ours[r * in_f..(r + 1) * in_f],
                        &f32s(v),
                    );
                }
            }
            v => assert_bits(&format!("{name} {what}"), ours, &f32s(v)),
        };

        // plain scales
        let plain = &case["plain"];
        let q = Nf4Weight::quantize(name, &input, out_f, in_f, false).unwrap();
        assert_eq!(q.packed, hex(&plain["packed"]), "{name}: packed bytes");
        assert_bits(
            &format!("{name} absmax"),
            &q.absmax_values(),
            &f32s(&plain["absmax"]),
        );
        check_dequant("dequant", &q.dequantize(), &plain["dequant"]);

        // double quantization with bitsandbytes' offset (torch's f32 mean)
        let nested = &case["nested"];
        let offset = nested["offset"].as_f64().unwrap() as f32;
        let reference = &nested["reference"];
        let qn = Nf4Weight {
            absmax: Absmax::nest_with_offset(&q.absmax_values(), offset),
            ..q.clone()
        };
        let Absmax::Nested {
            codes,
            nested_absmax,
            nested_blocksize,
            ..
        } = &qn.absmax
        else {
            unreachable!()
        };
        assert_eq!(
            *nested_blocksize,
            nested["nested_blocksize"].as_u64().unwrap() as usize
        );
        assert_eq!(*codes, hex(&reference["codes"]), "{name}: nested codes");
        assert_bits(
            &format!("{name} nested_absmax"),
            nested_absmax,
            &f32s(&reference["nested_absmax"]),
        );
        assert_bits(
            &format!("{name} nested absmax values"),
            &qn.absmax_values(),
            &f32s(&reference["absmax_values"]),
        );
        check_dequant("nested dequant", &qn.dequantize(), &reference["dequant"]);

        // our own offset: a mean summed in f64, which may differ from torch's in the last bit
        let ours = Nf4Weight::quantize(name, &input, out_f, in_f, true).unwrap();
        let Absmax::Nested {
            offset: our_offset, ..
        } = ours.absmax
        else {
            unreachable!()
        };
        let ulps = (our_offset.to_bits() as i64 - offset.to_bits() as i64).abs();
        println!("{name}: offset ours {our_offset:e}, bitsandbytes {offset:e} ({ulps} ulp apart)");
        assert!(
            ulps <= 2,
            "{name}: offset {our_offset:e} vs bitsandbytes {offset:e}"
        );
        if ulps == 0 {
            assert_eq!(ours, qn, "{name}: quantize with double quantization");
        } else {
            // the scales then move by a rounding error, or by one code where a value sits
            // on a midpoint of the map
            let Absmax::Nested {
                codes: our_codes, ..
            } = &ours.absmax
            else {
                unreachable!()
            };
            let flips = our_codes.iter().zip(codes).filter(|(a, b)| a != b).count();
            let widest = dynamic_map_signed()
                .windows(2)
                .map(|p| p[1] - p[0])
                .fold(0.0f32, f32::max);
            let bnb_scales = f32s(&reference["absmax_values"]);
            for (b, (x, y)) in ours.absmax_values().iter().zip(&bnb_scales).enumerate() {
                let bound = widest * nested_absmax[b / NESTED_BLOCK] + 4.0 * f32::EPSILON * y.abs();
                assert!(
                    (x - y).abs() <= bound,
                    "{name}: scale {b}: ours {x:e}, bitsandbytes {y:e}"
                );
            }
            println!(
                "{name}: with our offset, {flips} of {} nested codes differ",
                codes.len()
            );
        }

        // bitsandbytes' own (native kernel) codes dequantize to its scales
        let cpu = &nested["cpu"];
        let from_cpu = Absmax::Nested {
            codes: hex(&cpu["codes"]),
            code_map: dynamic_map_signed().to_vec(),
            nested_absmax: f32s(&cpu["nested_absmax"]),
            nested_blocksize: NESTED_BLOCK,
            offset,
        };
        let values: Vec<f32> = (0..from_cpu.len()).map(|b| from_cpu.get(b)).collect();
        assert_bits(
            &format!("{name} cpu absmax values"),
            &values,
            &f32s(&cpu["absmax_values"]),
        );
    }
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(data(name), &Device::Cpu).expect("fixture loads")
}

#[test]
fn reads_bnb_safetensors() {
    let file = load("nf4_bnb.safetensors");
    let expected = load("nf4_bnb_dequant.safetensors");
    for (layer, dtype, nested) in [(0, "bfloat16", true), (1, "float32", false)] {
        let prefix = format!("model.layers.{layer}.mlp.up_proj.weight");
        let w = Nf4Weight::from_bnb_tensors(&prefix, &|k| file.get(k).cloned()).unwrap();
        assert_eq!((w.out_features, w.in_features), (128, 64));
        assert_eq!(w.dtype, dtype);
        assert_eq!(matches!(w.absmax, Absmax::Nested { .. }), nested);

        let ours = w.dequantize();
        let bnb = expected[&prefix].to_vec2::<f32>().unwrap().concat();
        assert_bits(&prefix, &ours, &bnb);
        if let Some(native) = expected.get(&format!("{prefix}.native")) {
            // bitsandbytes returns the weight's own dtype: f32 rounded to bf16
            assert_eq!(native.dtype(), DType::BF16);
            let native: Vec<f32> = native
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let rounded: Vec<f32> = ours
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect();
            assert_bits(&format!("{prefix} bf16"), &rounded, &native);
        }

        // writing it back gives bitsandbytes' tensors byte for byte, the JSON included
        let written = w.to_bnb_tensors(&prefix);
        let in_file = file
            .keys()
            .filter(|k| k.starts_with(&format!("{prefix}")))
            .count();
        assert_eq!(written.len(), in_file, "{prefix}: tensor count");
        for (key, t) in written {
            let theirs = &file[&key];
            assert_eq!(t.dtype(), theirs.dtype(), "{key}: dtype");
            assert_eq!(t.dims(), theirs.dims(), "{key}: shape");
            let bytes = |t: &Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            assert_eq!(bytes(&t), bytes(theirs), "{key}: values");
        }
    }
}

fn gaussian(n: usize, std: f64, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            // Box-Muller
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random::<f64>();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}

fn to_map(tensors: Vec<(String, Tensor)>) -> HashMap<String, Tensor> {
    tensors.into_iter().collect()
}

#[test]
fn bnb_layout_round_trips() {
    let w = gaussian(8 * 512, 0.02, 1);
    for nested in [false, true] {
        let q = Nf4Weight::quantize("w", &w, 8, 512, nested)
            .unwrap()
            .with_dtype("bfloat16");
        let map = to_map(q.to_bnb_tensors("m.weight"));
        let back = Nf4Weight::from_bnb_tensors("m.weight", &|k| map.get(k).cloned()).unwrap();
        assert_eq!(back, q);
        assert_eq!(back.dequantize(), q.dequantize());
    }
}

/// The layout of a nested 2 x 64 weight with one tensor replaced (or removed, with `None`).
fn reading_with(key: &str, replacement: Option<Tensor>) -> QuantError {
    let q = Nf4Weight::quantize("w", &gaussian(128, 0.02, 2), 2, 64, true).unwrap();
    let mut map = to_map(q.to_bnb_tensors("m.weight"));
    match replacement {
        Some(t) => map.insert(key.to_string(), t),
        None => map.remove(key),
    };
    Nf4Weight::from_bnb_tensors("m.weight", &|k| map.get(k).cloned()).unwrap_err()
}

fn json_tensor(json: &str) -> Tensor {
    Tensor::from_slice(json.as_bytes(), json.len(), &Device::Cpu).unwrap()
}

const QS: &str = "m.weight.quant_state.bitsandbytes__nf4";

#[test]
fn bad_files_give_named_errors() {
    let err = reading_with(QS, None);
    assert_eq!(err.to_string(), format!("{QS}: missing"));

    let fp4 = r#"{"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [2, 64], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.1}"#;
    let err = reading_with(QS, Some(json_tensor(fp4)));
    assert_eq!(
        err.to_string(),
        format!("{QS}: quant_type: expected \"nf4\", found \"fp4\"")
    );

    // an fp4 weight as bitsandbytes writes it: the quant_state key ends in __fp4
    let q = Nf4Weight::quantize("w", &[0.5; 128], 2, 64, false).unwrap();
    let mut map = to_map(q.to_bnb_tensors("m.weight"));
    let t = map.remove(QS).unwrap();
    map.insert("m.weight.quant_state.bitsandbytes__fp4".into(), t);
    let err = Nf4Weight::from_bnb_tensors("m.weight", &|k| map.get(k).cloned()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "m.weight.quant_state.bitsandbytes__fp4: quant_type: expected \"nf4\", found \"fp4\""
    );

    let wrong_shape = fp4.replace("fp4", "nf4").replace("[2, 64]", "[4, 64]");
    let err = reading_with(QS, Some(json_tensor(&wrong_shape)));
    assert_eq!(
        err.to_string(),
        "m.weight: packed bytes for shape [4, 64]: expected 128, found 64"
    );

    let unaligned = fp4.replace("fp4", "nf4").replace("[2, 64]", "[1, 100]");
    let err = reading_with(QS, Some(json_tensor(&unaligned)));
    assert_eq!(
        err.to_string(),
        format!("{QS}: shape: expected in_features a multiple of 64, found [1,100]")
    );

    let blocksize = fp4
        .replace("fp4", "nf4")
        .replace("\"blocksize\": 64", "\"blocksize\": 128");
    let err = reading_with(QS, Some(json_tensor(&blocksize)));
    assert_eq!(
        err.to_string(),
        format!("{QS}: blocksize: expected 64, found 128")
    );

    let err = reading_with(QS, Some(json_tensor("{\"quant_type\": ")));
    assert!(matches!(err, QuantError::Json { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("{QS}: quant_state is not valid json: ")),
        "{err}"
    );

    let err = reading_with(
        "m.weight.absmax",
        Some(Tensor::zeros(3, DType::U8, &Device::Cpu).unwrap()),
    );
    assert_eq!(
        err.to_string(),
        "m.weight.absmax: codes (one per block of 64): expected 2, found 3"
    );

    let err = reading_with(
        "m.weight.nested_quant_map",
        Some(Tensor::zeros(255, DType::F32, &Device::Cpu).unwrap()),
    );
    assert_eq!(
        err.to_string(),
        "m.weight.nested_quant_map: values: expected 256, found 255"
    );

    let err = reading_with(
        "m.weight.quant_map",
        Some(Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap()),
    );
    assert_eq!(
        err.to_string(),
        "m.weight.quant_map: nf4 value 0: expected -1, found 0"
    );

    let err = reading_with(
        "m.weight",
        Some(Tensor::zeros((32, 1), DType::BF16, &Device::Cpu).unwrap()),
    );
    assert_eq!(err.to_string(), "m.weight: dtype: expected u8, found bf16");

    let err = reading_with("m.weight.nested_absmax", None);
    assert_eq!(err.to_string(), "m.weight.nested_absmax: missing");

    // and through the trainer's error type
    let err: ftbench_trainer::Error = reading_with(QS, None).into();
    assert_eq!(err.to_string(), format!("{QS}: missing"));
}

/// Error and size on a normal weight the size of a small model's projection.
#[test]
fn normal_weight_error_and_size() {
    let (out_f, in_f) = (2048, 640);
    let w = gaussian(out_f * in_f, 0.02, 7);
    let n = w.len() as f64;
    let rms_w = (w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n).sqrt();
    for nested in [false, true] {
        let q = Nf4Weight::quantize("w", &w, out_f, in_f, nested).unwrap();
        let t = Instant::now();
        let d = q.dequantize();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        // errors relative to the true block absmax, which with double quantization includes
        // the error of the scale itself
        let absmax: Vec<f32> = w
            .chunks(NF4_BLOCK)
            .map(|b| b.iter().fold(0.0f32, |m, x| m.max(x.abs())))
            .collect();
        let scale_err = q
            .absmax_values()
            .iter()
            .zip(&absmax)
            .map(|(&s, &a)| ((s - a) / a).abs() as f64)
            .fold(0.0, f64::max);
        let (mut sq, mut max_block_rel, mut max_rel_big) = (0.0f64, 0.0f64, 0.0f64);
        for (i, (&x, &y)) in w.iter().zip(&d).enumerate() {
            let e = (x as f64 - y as f64).abs();
            sq += e * e;
            max_block_rel = max_block_rel.max(e / absmax[i / NF4_BLOCK] as f64);
            if (x as f64).abs() >= 0.02 {
                max_rel_big = max_rel_big.max(e / (x as f64).abs());
            }
        }
        let rms = (sq / n).sqrt();
        let per_param = q.storage_bytes() as f64 / n;
        println!(
            "2048x640 N(0, 0.02) nested={nested}: rms error {rms:.3e} ({:.2}% of rms weight), \
             max |error| / block absmax {max_block_rel:.4}, max relative error where |w| >= 0.02 {max_rel_big:.4}, \
             max relative error of a scale {scale_err:.2e}, {per_param:.4} bytes/param, dequantize {ms:.2} ms",
            100.0 * rms / rms_w
        );
        // half the widest gap between NF4 values, (-0.6962 - -1) / 2 = 0.1519, plus the
        // error of the scale (none without double quantization)
        let bound = (NF4_CODE[1] - NF4_CODE[0]) as f64 / 2.0 + scale_err + 1e-6;
        assert!(max_block_rel <= bound, "{max_block_rel} > {bound}");
        // a nested scale is within half a gap of the dynamic map (at most 0.007 of its 256-block's
        // largest |absmax - offset|): about 1% of a scale here
        assert!(
            scale_err < if nested { 0.02 } else { 1e-7 },
            "scale error {scale_err}"
        );
        assert!(rms / rms_w < 0.12, "relative rms error {}", rms / rms_w);
        if nested {
            assert!((0.5..0.53).contains(&per_param), "{per_param}");
        } else {
            assert!((0.5625..0.563).contains(&per_param), "{per_param}");
        }
    }
}
