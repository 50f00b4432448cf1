//! Whole-model facts on tiny random models: gradients reach every trainable tensor, merged
//! adapters match unmerged ones, the KV cache matches a full forward, the chunked loss matches
//! full logits.

use candle_core::{Device, Tensor, D};
use ftbench_trainer::config::ModelConfig;
use ftbench_trainer::lora::{LoraConfig, TargetModules};
use ftbench_trainer::model::{masked_cross_entropy, random_weights, Decoder, KvCache, TrainMode};
use serde_json::json;

fn tiny(family: &str) -> ModelConfig {
    let v = match family {
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
            let (b, t) = (2, 6);
            let x = ids(&c, b, t, 1);
            let targets: Vec<u32> = ids(&c, b, t, 2).flatten_all().unwrap().to_vec1().unwrap();
            let mask = vec![1.0f32; b * t];
            let loss = model.loss(&x, &targets, &mask, None).unwrap();
            let grads = loss.backward().unwrap();
            let vars = model.trainable();
            assert!(!vars.is_empty());
            for (name, v) in vars {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{fam} {mode:?}: no gradient for {name}"));
                let n = g
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(n > 0.0, "{fam}: zero gradient for {name}");
            }
        }
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
        let (b, t) = (2, 6);
        let x = ids(&c, b, t, 3);
        let targets: Vec<u32> = ids(&c, b, t, 4).flatten_all().unwrap().to_vec1().unwrap();
        let mask = vec![1.0f32; b * t];
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
            let loss = model.loss(&x, &targets, &mask, Some(&mut rng)).unwrap();
            let grads = loss.backward().unwrap();
            let g: Vec<Tensor> = model
                .trainable()
                .iter()
                .map(|(name, v)| {
                    grads
                        .get(v.as_tensor())
                        .unwrap_or_else(|| panic!("{fam} {kernel:?}: no gradient for {name}"))
                        .clone()
                })
                .collect();
            results.push((loss.to_scalar::<f32>().unwrap(), g));
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
