//! Whole-model facts on tiny random models: gradients reach every trainable tensor, merged
//! adapters match unmerged ones, the KV cache matches a full forward, the chunked loss matches
//! full logits; on a quantized base (NF4, GGUF blocks) the same facts hold and the quantized
//! linear equals its dequantized weight.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, Var, D};
use ftbench_trainer::config::ModelConfig;
use ftbench_trainer::lora::{LoraConfig, TargetModules};
use ftbench_trainer::model::{
    masked_cross_entropy, random_weights, Decoder, KvCache, QuantWeights, TrainMode, Weights,
};
use ftbench_trainer::ops;
use ftbench_trainer::quant::nf4::Nf4Weight;
use ftbench_trainer::quant::weight::Bf16Weight;
use ftbench_trainer::quant::{is_quantizable, QuantWeight};
use serde_json::json;

fn tiny(family: &str) -> ModelConfig {
    tiny_with(family, json!({}))
}

/// [`tiny`] with some keys replaced.
fn tiny_with(family: &str, overrides: serde_json::Value) -> ModelConfig {
    let mut v = match family {
        "gemma3" => json!({
            "model_type": "gemma3_text", "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "vocab_size": 61, "rms_norm_eps": 1e-6, "sliding_window": 4,
            "sliding_window_pattern": 3, "query_pre_attn_scalar": 16, "max_position_embeddings": 128
        }),
        "llama" => json!({
            "model_type": "llama", "hidden_size": 32, "intermediate_size": 40,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
            "vocab_size": 53, "tie_word_embeddings": false, "max_position_embeddings": 128,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        }),
        "qwen2" => json!({
            "model_type": "qwen2", "hidden_size": 24, "intermediate_size": 40,
            "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
            "vocab_size": 47, "tie_word_embeddings": true, "max_position_embeddings": 128
        }),
        _ => unreachable!(),
    };
    for (k, x) in overrides.as_object().unwrap() {
        v[k] = x.clone();
    }
    ModelConfig::from_hf_value(&v).unwrap()
}

const FAMILIES: [&str; 3] = ["gemma3", "llama", "qwen2"];

fn ids(c: &ModelConfig, b: usize, t: usize, seed: u32) -> Tensor {
    let v: Vec<u32> = (0..b * t)
        .map(|i| (i as u32 * 7 + seed * 13 + 1) % c.vocab_size as u32)
        .collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

fn all_linear() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: TargetModules::Pattern("all-linear".into()),
        use_rslora: false,
        ..Default::default()
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(D::Minus1)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Sets every B to small random values so adapters change the output and A gets gradients.
fn perturb_adapters(model: &Decoder) {
    for (i, (_, ad)) in model.adapters().into_iter().enumerate() {
        let b = Tensor::randn(0f32, 0.05, ad.b.as_tensor().dims(), &Device::Cpu).unwrap();
        let _ = i;
        ad.b.set(&b).unwrap();
    }
}

#[test]
fn every_trainable_tensor_gets_a_nonzero_gradient() {
    for fam in FAMILIES {
        let c = tiny(fam);
        for mode in [TrainMode::Lora(all_linear()), TrainMode::Full] {
            let w = random_weights(&c, 1, &Device::Cpu).unwrap();
            let model = Decoder::new(c.clone(), w, mode.clone(), 2, &Device::Cpu).unwrap();
            perturb_adapters(&model);
            assert!(!model.trainable().is_empty());
            assert_every_trainable_gets_a_gradient(&model, &format!("{fam} {mode:?}"));
        }
    }
}

/// The loss on a fixed batch of 2 x 6 (inputs and targets drawn with `seeds`) and the gradient
/// of every trainable tensor, in `trainable()` order.
fn loss_and_grads(
    model: &Decoder,
    seeds: (u32, u32),
    rng: Option<&mut rand::rngs::StdRng>,
    what: &str,
) -> (f32, Vec<Tensor>) {
    let c = &model.config;
    let (b, t) = (2, 6);
    let targets: Vec<u32> = ids(c, b, t, seeds.1)
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let loss = model
        .loss(&ids(c, b, t, seeds.0), &targets, &vec![1.0f32; b * t], rng)
        .unwrap();
    let grads = loss.backward().unwrap();
    let g = model
        .trainable()
        .iter()
        .map(|(name, v)| {
            grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{what}: no gradient for {name}"))
                .clone()
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap(), g)
}

/// One loss and backward on a fixed batch; every trainable tensor must get a non-zero gradient.
fn assert_every_trainable_gets_a_gradient(model: &Decoder, what: &str) {
    let (_, grads) = loss_and_grads(model, (1, 2), None, what);
    for ((name, _), g) in model.trainable().iter().zip(&grads) {
        let n = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0, "{what}: zero gradient for {name}");
    }
}

#[test]
fn merged_adapters_match_unmerged() {
    for fam in FAMILIES {
        let c = tiny(fam);
        let w = random_weights(&c, 3, &Device::Cpu).unwrap();
        let mut model =
            Decoder::new(c.clone(), w, TrainMode::Lora(all_linear()), 4, &Device::Cpu).unwrap();
        perturb_adapters(&model);
        let x = ids(&c, 2, 5, 3);
        let unmerged = model.forward_logits(&x, None).unwrap();
        let base_weights = model.hf_weights(false).unwrap();
        let base =
            Decoder::new(c.clone(), base_weights, TrainMode::Frozen, 0, &Device::Cpu).unwrap();
        let base_logits = base.forward_logits(&x, None).unwrap();
        assert!(
            max_diff(&unmerged, &base_logits) > 1e-4,
            "{fam}: adapters should change the output"
        );
        let n = model.merge_adapters().unwrap();
        assert_eq!(n, 7 * c.num_hidden_layers);
        let merged = model.forward_logits(&x, None).unwrap();
        let d = max_diff(&unmerged, &merged);
        assert!(d < 1e-4, "{fam}: merged differs by {d}");
    }
}

#[test]
fn kv_cache_matches_full_forward() {
    for fam in FAMILIES {
        let c = tiny(fam);
        let w = random_weights(&c, 5, &Device::Cpu).unwrap();
        let model = Decoder::new(c.clone(), w, TrainMode::Frozen, 0, &Device::Cpu).unwrap();
        // 9 positions: longer than the gemma tiny sliding window of 4
        let x = ids(&c, 1, 9, 5);
        let full = model.forward_logits(&x, None).unwrap();
        let mut cache = KvCache::new();
        let first = model
            .forward_logits(&x.narrow(1, 0, 5).unwrap(), Some(&mut cache))
            .unwrap();
        let mut parts = vec![first];
        for p in 5..9 {
            parts.push(
                model
                    .forward_logits(&x.narrow(1, p, 1).unwrap(), Some(&mut cache))
                    .unwrap(),
            );
        }
        let stepped = Tensor::cat(&parts, 1).unwrap();
        let d = max_diff(&full, &stepped);
        assert!(d < 1e-4, "{fam}: cached logits differ by {d}");
    }
}

#[test]
fn chunked_loss_matches_full_logits() {
    for fam in FAMILIES {
        let c = tiny(fam);
        let w = random_weights(&c, 6, &Device::Cpu).unwrap();
        let model = Decoder::new(c.clone(), w, TrainMode::Frozen, 0, &Device::Cpu).unwrap();
        let (b, t) = (3, 7);
        let x = ids(&c, b, t, 6);
        let targets: Vec<u32> = ids(&c, b, t, 7).flatten_all().unwrap().to_vec1().unwrap();
        let mask: Vec<f32> = (0..b * t)
            .map(|i| if i % 3 == 0 { 0.0 } else { 1.0 })
            .collect();
        let chunked = model
            .loss(&x, &targets, &mask, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let logits = model
            .forward_logits(&x, None)
            .unwrap()
            .reshape((b * t, c.vocab_size))
            .unwrap();
        let full = masked_cross_entropy(&logits, &targets, &mask)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((chunked - full).abs() < 1e-4, "{fam}: {chunked} vs {full}");
        // a random model predicts about uniformly: loss near ln(vocab)
        assert!(
            (full - (c.vocab_size as f32).ln()).abs() < 0.5,
            "{fam}: {full}"
        );
    }
}

#[test]
fn padding_after_a_sequence_does_not_change_it() {
    // right padding: causal attention means the real positions never see the pad ones
    let c = tiny("gemma3");
    let w = random_weights(&c, 8, &Device::Cpu).unwrap();
    let model = Decoder::new(c.clone(), w, TrainMode::Frozen, 0, &Device::Cpu).unwrap();
    let x = ids(&c, 1, 6, 8);
    let padded = Tensor::cat(
        &[
            x.clone(),
            Tensor::zeros((1, 3), candle_core::DType::U32, &Device::Cpu).unwrap(),
        ],
        1,
    )
    .unwrap();
    let a = model.forward_logits(&x, None).unwrap();
    let b = model
        .forward_logits(&padded, None)
        .unwrap()
        .narrow(1, 0, 6)
        .unwrap();
    assert!(max_diff(&a, &b) < 1e-5);
}

#[test]
fn target_modules_that_match_nothing_are_an_error() {
    let c = tiny("llama");
    let w = random_weights(&c, 1, &Device::Cpu).unwrap();
    let lc = LoraConfig {
        target_modules: TargetModules::List(vec!["qkv".into()]),
        ..Default::default()
    };
    let err = Decoder::new(c, w, TrainMode::Lora(lc), 0, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("lora.target_modules") && err.contains("matches no linear layer"),
        "{err}"
    );
}

#[test]
fn fused_and_naive_lora_kernels_give_the_same_loss_and_gradients() {
    use ftbench_trainer::lora::LoraKernel;
    for fam in FAMILIES {
        let c = tiny(fam);
        let mut results = Vec::new();
        let mut first_b: Vec<Tensor> = Vec::new();
        for kernel in [LoraKernel::Naive, LoraKernel::Fused] {
            let lc = LoraConfig {
                dropout: 0.3,
                kernel,
                ..all_linear()
            };
            let w = random_weights(&c, 1, &Device::Cpu).unwrap();
            let model = Decoder::new(c.clone(), w, TrainMode::Lora(lc), 2, &Device::Cpu).unwrap();
            if first_b.is_empty() {
                perturb_adapters(&model);
                first_b = model
                    .adapters()
                    .iter()
                    .map(|(_, a)| a.b.as_tensor().copy().unwrap())
                    .collect();
            } else {
                for ((_, a), bt) in model.adapters().iter().zip(&first_b) {
                    a.b.set(bt).unwrap();
                }
            }
            // dropout on, from the same seed: both kernels see the same masks
            let mut rng = ftbench_trainer::lora::rng(7);
            let what = format!("{fam} {kernel:?}");
            results.push(loss_and_grads(&model, (3, 4), Some(&mut rng), &what));
        }
        let (l_naive, g_naive) = &results[0];
        let (l_fused, g_fused) = &results[1];
        assert!(
            (l_naive - l_fused).abs() < 1e-5,
            "{fam}: loss {l_naive} vs {l_fused}"
        );
        assert_eq!(g_naive.len(), g_fused.len());
        for (i, (a, b)) in g_naive.iter().zip(g_fused).enumerate() {
            let scale = a
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = max_diff(a, b);
            assert!(
                d <= 1e-4 * scale.max(1e-6),
                "{fam}: gradient {i} differs by {d} (scale {scale})"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// QLoRA: the frozen quantized linear carries gradients to the adapters and equals the same
// computation on its dequantized f32 weight; a quantized decoder gives the logits of a dense
// decoder holding the dequantized weights.

/// Tiny models whose widths (64, 128) fit NF4's 64-value blocks and Q8_0's 32.
fn tiny_wide(family: &str) -> ModelConfig {
    tiny_with(
        family,
        json!({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16}),
    )
}

fn quantize(name: &str, w: &Tensor, format: &str) -> QuantWeight {
    let (o, i) = w.dims2().unwrap();
    match format {
        "nf4" => {
            let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            QuantWeight::Nf4(Arc::new(Nf4Weight::quantize(name, &v, o, i, true).unwrap()))
        }
        "q8_0" => {
            QuantWeight::from_gguf(&QTensor::quantize(w, GgmlDType::Q8_0).unwrap(), None).unwrap()
        }
        "q4_0" => {
            QuantWeight::from_gguf(&QTensor::quantize(w, GgmlDType::Q4_0).unwrap(), None).unwrap()
        }
        "bf16" => {
            let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            QuantWeight::Bf16(Arc::new(Bf16Weight {
                out_f: o,
                in_f: i,
                data: ftbench_trainer::cpu_gemm::to_bf16(&v),
            }))
        }
        _ => unreachable!(),
    }
}

/// Splits `w` into the quantized projections and, for comparison, the dense weights with
/// each projection replaced by its dequantized value.
fn quantize_model(w: &Weights, format: &str) -> (Weights, QuantWeights, Weights) {
    let mut dense = w.clone();
    let mut quant = QuantWeights::new();
    let mut reference = w.clone();
    for (name, t) in w {
        if is_quantizable(name) {
            let q = quantize(name, t, format);
            reference.insert(name.clone(), q.dequantize(&Device::Cpu).unwrap());
            dense.remove(name);
            quant.insert(name.clone(), q);
        }
    }
    (dense, quant, reference)
}

#[test]
fn quantized_linear_matches_its_dequantized_weight_forward_and_backward() {
    let dev = Device::Cpu;
    for format in ["nf4", "q8_0", "q4_0"] {
        let w = Tensor::randn(0f32, 0.5, (96, 128), &dev).unwrap();
        let q = quantize("w", &w, format);
        let wd = q.dequantize(&dev).unwrap();
        assert_eq!(wd.dims(), &[96, 128]);
        // the dequantized weight is a small perturbation of the original
        let err = max_diff(&wd, &w);
        assert!(
            err > 0.0 && err < 0.5,
            "{format}: dequantization error {err}"
        );

        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 128), &dev).unwrap()).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (2, 5, 96), &dev).unwrap();
        let y = ops::quant_linear(x.as_tensor(), &q).unwrap();
        // reference: candle's own matmul on the dequantized weight
        let y_ref = x.as_tensor().broadcast_matmul(&wd.t().unwrap()).unwrap();
        assert!(max_diff(&y, &y_ref) < 1e-4, "{format}: forward");
        let g = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (y_ref * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx = g.get(x.as_tensor()).expect("input gradient");
        let dx_ref = g_ref.get(x.as_tensor()).unwrap();
        assert!(max_diff(dx, dx_ref) < 1e-4, "{format}: input gradient");
        // and the frozen dense op gives the same numbers
        let y_frozen = ops::frozen_linear(x.as_tensor(), &wd).unwrap();
        let y = ops::quant_linear(x.as_tensor(), &q).unwrap();
        assert_eq!(
            max_diff(&y, &y_frozen),
            0.0,
            "{format}: same kernel as frozen_linear"
        );
    }
}

#[test]
fn quantized_decoder_equals_dense_decoder_on_dequantized_weights() {
    for fam in FAMILIES {
        let c = tiny_wide(fam);
        let w = random_weights(&c, 3, &Device::Cpu).unwrap();
        for format in ["nf4", "q8_0"] {
            let (dense, quant, reference) = quantize_model(&w, format);
            let n_quant = quant.len();
            assert_eq!(n_quant, 7 * c.num_hidden_layers);
            let qm = Decoder::with_quantized(
                c.clone(),
                dense,
                quant,
                TrainMode::Frozen,
                0,
                &Device::Cpu,
            )
            .unwrap();
            let dm =
                Decoder::new(c.clone(), reference, TrainMode::Frozen, 0, &Device::Cpu).unwrap();
            assert_eq!(qm.base_linear_formats().get(format), Some(&n_quant));
            let x = ids(&c, 2, 7, 1);
            let a = qm.forward_logits(&x, None).unwrap();
            let b = dm.forward_logits(&x, None).unwrap();
            assert_eq!(max_diff(&a, &b), 0.0, "{fam} {format}: logits");
        }
    }
}

#[test]
fn every_adapter_on_a_quantized_base_gets_a_gradient() {
    for fam in FAMILIES {
        let c = tiny_wide(fam);
        let w = random_weights(&c, 1, &Device::Cpu).unwrap();
        for format in ["nf4", "q8_0", "bf16"] {
            let (dense, quant, _) = quantize_model(&w, format);
            let model = Decoder::with_quantized(
                c.clone(),
                dense,
                quant,
                TrainMode::Lora(all_linear()),
                2,
                &Device::Cpu,
            )
            .unwrap();
            for (_, ad) in model.adapters() {
                let b = Tensor::randn(0f32, 0.05, ad.b.as_tensor().dims(), &Device::Cpu).unwrap();
                ad.b.set(&b).unwrap();
            }
            // adapters on the 7 projections of each layer (+ the untied LM head for llama)
            assert!(model.trainable().len() >= 14 * c.num_hidden_layers);
            assert_every_trainable_gets_a_gradient(&model, &format!("{fam} {format}"));
        }
    }
}

#[test]
fn full_fine_tuning_refuses_a_quantized_base() {
    let c = tiny_wide("llama");
    let w = random_weights(&c, 1, &Device::Cpu).unwrap();
    let (dense, quant, _) = quantize_model(&w, "q8_0");
    let err = Decoder::with_quantized(c, dense, quant, TrainMode::Full, 0, &Device::Cpu)
        .err()
        .expect("full mode on a quantized base is an error")
        .to_string();
    assert!(
        err.contains("train.mode") && err.contains("quantization"),
        "{err}"
    );
}

#[test]
fn a_quantized_weight_that_matches_no_layer_is_named() {
    let c = tiny_wide("qwen2");
    let w = random_weights(&c, 1, &Device::Cpu).unwrap();
    let (dense, mut quant, _) = quantize_model(&w, "q8_0");
    let extra = quant["model.layers.0.mlp.up_proj.weight"].clone();
    quant.insert("model.layers.9.mlp.up_proj.weight".into(), extra);
    let err = Decoder::with_quantized(c, dense, quant, TrainMode::Frozen, 0, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.layers.9.mlp.up_proj.weight"), "{err}");
}

/// NF4 with double quantization holds a projection in about half a byte per parameter
/// (4 bits of code plus the 8-bit scale of each 64-value block and the f32 scale of each
/// 256 scales: 0.5 + 1/64 + 4/(64·256) bytes, plus two small code books).
#[test]
fn nf4_base_footprint_is_about_half_a_byte_per_parameter() {
    let c = ModelConfig::preset("smollm-135m").unwrap();
    let mut c = c;
    c.num_hidden_layers = 1;
    c.sliding_layers.truncate(1);
    let w = random_weights(&c, 0, &Device::Cpu).unwrap();
    let (dense, quant, _) = quantize_model(&w, "nf4");
    let m = Decoder::with_quantized(c.clone(), dense, quant, TrainMode::Frozen, 0, &Device::Cpu)
        .unwrap();
    let (params, bytes) = m.base_linear_footprint();
    let per = bytes as f64 / params as f64;
    eprintln!("nf4 base: {params} parameters in {bytes} bytes, {per:.4} bytes per parameter");
    assert!((0.5..0.56).contains(&per), "{per} bytes per parameter");
    let dense = Decoder::new(c, w, TrainMode::Frozen, 0, &Device::Cpu).unwrap();
    assert_eq!(dense.base_linear_footprint(), (params, 4 * params));
}

/// The fused LoRA kernel on a quantized base (weight dequantized in the forward and again in
/// the backward) gives the separate-op layer's loss and gradients.
#[test]
fn fused_and_naive_lora_agree_on_a_quantized_base() {
    use ftbench_trainer::lora::LoraKernel;
    for fam in FAMILIES {
        let c = tiny_wide(fam);
        let w = random_weights(&c, 4, &Device::Cpu).unwrap();
        for format in ["nf4", "bf16"] {
            let (dense, quant, _) = quantize_model(&w, format);
            let run = |kernel: LoraKernel| {
                let cfg = LoraConfig {
                    kernel,
                    ..all_linear()
                };
                let model = Decoder::with_quantized(
                    c.clone(),
                    dense.clone(),
                    quant.clone(),
                    TrainMode::Lora(cfg),
                    2,
                    &Device::Cpu,
                )
                .unwrap();
                for (i, (_, ad)) in model.adapters().into_iter().enumerate() {
                    let n = ad.b.as_tensor().elem_count();
                    let v: Vec<f32> = (0..n)
                        .map(|j| ((i * 31 + j * 7) % 13) as f32 * 0.01 - 0.06)
                        .collect();
                    ad.b.set(&Tensor::from_vec(v, ad.b.as_tensor().dims(), &Device::Cpu).unwrap())
                        .unwrap();
                }
                loss_and_grads(&model, (1, 2), None, &format!("{fam} {kernel:?}"))
            };
            let (lf, gf) = run(LoraKernel::Fused);
            let (ln, gn) = run(LoraKernel::Naive);
            assert!((lf - ln).abs() < 1e-5, "{fam}: loss {lf} vs {ln}");
            // a bf16 base rounds each product's input to bf16 (relative step 2^-8): the two
            // kernels' f32 inputs differ in the last bits, which can flip a rounding, so their
            // gradients agree to bf16 precision rather than f32's
            let tol = if format == "bf16" { 1e-2 } else { 1e-4 };
            for (a, b) in gf.iter().zip(&gn) {
                let scale = b
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let d = max_diff(a, b);
                assert!(
                    d <= tol * scale.max(1e-3),
                    "{fam} {format}: gradients differ by {d} (largest {scale})"
                );
            }
        }
    }
}

/// A bf16 base multiplies bf16-rounded activations by the bf16 weight with f32 accumulation:
/// the same numbers as an f32 product of the rounded operands, forward and input gradient.
#[test]
fn bf16_linear_is_the_f32_product_of_bf16_rounded_operands() {
    let dev = Device::Cpu;
    let round = |t: &Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let w = Tensor::randn(0f32, 0.5, (96, 128), &dev).unwrap();
    let q = quantize("w", &w, "bf16");
    let wd = q.dequantize(&dev).unwrap();
    assert_eq!(
        max_diff(&wd, &round(&w)),
        0.0,
        "dequantized = rounded weight"
    );
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 128), &dev).unwrap()).unwrap();
    let dy = Tensor::randn(0f32, 1.0, (2, 5, 96), &dev).unwrap();
    let y = ops::quant_linear(x.as_tensor(), &q).unwrap();
    let y_ref = round(x.as_tensor())
        .broadcast_matmul(&wd.t().unwrap())
        .unwrap();
    assert!(
        max_diff(&y, &y_ref) < 1e-4,
        "forward {}",
        max_diff(&y, &y_ref)
    );
    let g = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = g.get(x.as_tensor()).expect("input gradient");
    let dx_ref = round(&dy).broadcast_matmul(&wd).unwrap();
    assert!(
        max_diff(dx, &dx_ref) < 1e-4,
        "input gradient {}",
        max_diff(dx, &dx_ref)
    );
}

/// A decoder on a bf16 base stays within bf16 rounding of the f32 decoder: logits within
/// 2% of their range, and the bf16 base holds 2 bytes a parameter.
#[test]
fn bf16_decoder_is_close_to_the_f32_decoder() {
    for fam in FAMILIES {
        let c = tiny_wide(fam);
        let w = random_weights(&c, 3, &Device::Cpu).unwrap();
        let (dense, quant, _) = quantize_model(&w, "bf16");
        let qm =
            Decoder::with_quantized(c.clone(), dense, quant, TrainMode::Frozen, 0, &Device::Cpu)
                .unwrap();
        let (params, bytes) = qm.base_linear_footprint();
        assert_eq!(bytes, 2 * params);
        let dm = Decoder::new(c.clone(), w, TrainMode::Frozen, 0, &Device::Cpu).unwrap();
        let x = ids(&c, 2, 7, 1);
        let a = qm.forward_logits(&x, None).unwrap();
        let b = dm.forward_logits(&x, None).unwrap();
        let range = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let err = max_diff(&a, &b);
        eprintln!("{fam}: bf16 base logits max |diff| {err:.3e} of max |logit| {range:.3e}");
        assert!(err > 0.0 && err < 0.02 * range, "{fam}: {err} vs {range}");
    }
}
