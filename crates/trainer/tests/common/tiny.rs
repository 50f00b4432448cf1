//! Tiny models for integration tests: configs for each family, a word-level tokenizer with
//! `<pad>`/`<eos>`/`<bos>`/`<unk>` and a small arithmetic vocabulary, and HF folders written
//! with the crate's own saver. Shared by the trainer's and the CLI's tests (`#[path]`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use ftbench_trainer::config::ModelConfig;
use ftbench_trainer::loader;
use ftbench_trainer::model::{random_weights, Weights};
use ftbench_trainer::tokenizer::Tokenizer;
use serde_json::json;

/// The special tokens first (ids 0..4), then the words.
pub const SPECIALS: [&str; 4] = ["<pad>", "<eos>", "<bos>", "<unk>"];
pub const WORDS: [&str; 36] = [
    "Question", "Answer", ":", "?", ".", "####", "+", "=", "how", "many", "apples", "does", "tom",
    "have", "he", "has", "and", "buys", "more", "so", "the", "answer", "is", "0", "1", "2", "3",
    "4", "5", "6", "7", "8", "9", "pears", "eats", "left",
];

/// Tokenizer vocabulary size (specials and words).
pub fn tokenizer_vocab() -> usize {
    SPECIALS.len() + WORDS.len()
}

/// A WordLevel tokenizer.json (whitespace pre-tokenizer, `<unk>` for anything else).
pub fn tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (i, w) in SPECIALS.iter().chain(WORDS.iter()).enumerate() {
        vocab.insert(w.to_string(), json!(i));
    }
    let added: Vec<_> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// Writes tokenizer.json and tokenizer_config.json into `dir` and loads them.
pub fn write_tokenizer(dir: &Path) -> Tokenizer {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string_pretty(&tokenizer_json()).unwrap(),
    )
    .unwrap();
    let cfg = json!({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": true});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap()
}

/// The HF config.json values of a tiny model of `family` (gemma3, llama or qwen2), with the
/// tokenizer's vocabulary size.
pub fn config_json(family: &str) -> serde_json::Value {
    let ids = json!({"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0});
    let mut v = match family {
        // 6 layers so that layer 5 is a global layer with the default pattern of 6
        "gemma3" => json!({
            "model_type": "gemma3_text", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "vocab_size": 40, "rms_norm_eps": 1e-6, "sliding_window": 4,
            "sliding_window_pattern": 6, "query_pre_attn_scalar": 16, "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0, "max_position_embeddings": 128
        }),
        // untied head, GQA (4 query heads on 2 kv heads)
        "llama" => json!({
            "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 40, "tie_word_embeddings": false, "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0
        }),
        // q/k/v biases, tied head
        "qwen2" => json!({
            "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
            "vocab_size": 40, "tie_word_embeddings": true, "max_position_embeddings": 128,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0
        }),
        other => panic!("no tiny config for {other}"),
    };
    assert_eq!(v["vocab_size"], json!(tokenizer_vocab()));
    for (k, x) in ids.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

pub fn config(family: &str) -> ModelConfig {
    ModelConfig::from_hf_value(&config_json(family)).unwrap()
}

/// Random weights for `config`. For Gemma the norm weights are rounded through `1 + w`, so
/// that a file storing `1 + w` (as GGUF does) holds exactly the same model.
pub fn weights(config: &ModelConfig, seed: u64) -> Weights {
    let mut w = random_weights(config, seed, &Device::Cpu).unwrap();
    if config.is_gemma() {
        for (k, t) in w.iter_mut() {
            if k.ends_with("norm.weight") {
                *t = ((&*t + 1.0).unwrap() - 1.0).unwrap();
            }
        }
    }
    w
}

/// Writes a tiny HF folder (config.json, model.safetensors, tokenizer files) with the crate's
/// saver and returns what it wrote.
pub fn write_hf_folder(dir: &Path, family: &str, seed: u64) -> (ModelConfig, Weights) {
    let c = config(family);
    let w = weights(&c, seed);
    let tok = write_tokenizer(&dir.with_extension("tok"));
    loader::save_hf_dir(dir, &c, &w, &tok).unwrap();
    (c, w)
}

/// A fresh empty folder under the system temp dir, unique to this process and `name`.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ftbench-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------
// GGUF files as llama.cpp writes them

/// The llama.cpp name of an HF tensor.
pub fn gguf_name(hf: &str, gemma: bool) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (module, kind) = rest.rsplit_once('.').unwrap();
    let g = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("no gguf name for {other}"),
    };
    format!("blk.{layer}.{g}.{kind}")
}

/// llama.cpp's row order for Llama q/k: `w.reshape(heads, 2, hd/2, in).swapaxes(1, 2)`.
pub fn permute_qk(w: &Tensor, heads: usize) -> Tensor {
    let (out_f, in_f) = w.dims2().unwrap();
    let hd = out_f / heads;
    w.reshape((heads, 2, hd / 2, in_f))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((out_f, in_f))
        .unwrap()
}

/// The inverse of [`permute_qk`]: HF's row order back from llama.cpp's.
pub fn unpermute_qk(w: &Tensor, heads: usize) -> Tensor {
    let (out_f, in_f) = w.dims2().unwrap();
    let hd = out_f / heads;
    w.reshape((heads, hd / 2, 2, in_f))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((out_f, in_f))
        .unwrap()
}

/// Tensors stored as Q8_0 in the tiny GGUF files (the rest are F32).
pub fn quantized(hf: &str) -> bool {
    matches!(
        hf,
        "model.embed_tokens.weight"
            | "model.layers.0.self_attn.q_proj.weight"
            | "model.layers.0.self_attn.k_proj.weight"
            | "model.layers.0.mlp.gate_proj.weight"
            | "model.layers.1.mlp.down_proj.weight"
    )
}

/// A SentencePiece vocabulary as llama.cpp embeds it: specials, then pieces scored so that
/// "ab ab" encodes to `▁ab ▁ab`.
pub fn tokenizer_metadata() -> Vec<(String, Value)> {
    let pieces: [(&str, f32, i32); 11] = [
        ("<pad>", 0.0, 3),
        ("<eos>", 0.0, 3),
        ("<bos>", 0.0, 3),
        ("<unk>", 0.0, 2),
        ("\u{2581}", -10.0, 1),
        ("a", -10.0, 1),
        ("b", -10.0, 1),
        ("\u{2581}a", -3.0, 1),
        ("\u{2581}b", -4.0, 1),
        ("ab", -2.0, 1),
        ("\u{2581}ab", -1.0, 1),
    ];
    vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(pieces.iter().map(|p| Value::String(p.0.into())).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(pieces.iter().map(|p| Value::F32(p.1)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(pieces.iter().map(|p| Value::I32(p.2)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(3)),
    ]
}

/// Writes `w` (HF names and conventions) as a GGUF file the way llama.cpp's converter does and
/// returns the weights an HF checkpoint of the same model holds: the Q8_0 tensors replaced by
/// their dequantized values, so both files hold exactly the same numbers.
pub fn write_gguf(path: &Path, arch: &str, c: &ModelConfig, w: &Weights) -> Weights {
    let gemma = c.is_gemma();
    let mut hf_side = Weights::new();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut names: Vec<&String> = w.keys().collect();
    names.sort();
    for name in names {
        let t = &w[name];
        let mut stored = t.clone();
        if gemma && name.ends_with("norm.weight") {
            stored = (stored + 1.0).unwrap();
        }
        if arch == "llama" && name.ends_with("self_attn.q_proj.weight") {
            stored = permute_qk(&stored, c.num_attention_heads);
        } else if arch == "llama" && name.ends_with("self_attn.k_proj.weight") {
            stored = permute_qk(&stored, c.num_key_value_heads);
        }
        let q = if quantized(name) {
            let q = QTensor::quantize(&stored, GgmlDType::Q8_0).unwrap();
            let mut back = q.dequantize(&Device::Cpu).unwrap();
            if arch == "llama" && name.ends_with("self_attn.q_proj.weight") {
                back = unpermute_qk(&back, c.num_attention_heads);
            } else if arch == "llama" && name.ends_with("self_attn.k_proj.weight") {
                back = unpermute_qk(&back, c.num_key_value_heads);
            }
            let moved = (&back - t)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(moved > 0.0, "{name}: Q8_0 should change the values");
            hf_side.insert(name.clone(), back);
            q
        } else {
            hf_side.insert(name.clone(), t.clone());
            QTensor::quantize(&stored, GgmlDType::F32).unwrap()
        };
        tensors.push((gguf_name(name, gemma), q));
    }
    let k = |s: &str| format!("{arch}.{s}");
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(format!("tiny {arch}"))),
        (
            k("context_length"),
            Value::U32(c.max_position_embeddings as u32),
        ),
        (k("embedding_length"), Value::U32(c.hidden_size as u32)),
        (k("block_count"), Value::U32(c.num_hidden_layers as u32)),
        (
            k("feed_forward_length"),
            Value::U32(c.intermediate_size as u32),
        ),
        (
            k("attention.head_count"),
            Value::U32(c.num_attention_heads as u32),
        ),
        (
            k("attention.head_count_kv"),
            Value::U32(c.num_key_value_heads as u32),
        ),
        (k("attention.key_length"), Value::U32(c.head_dim as u32)),
        (k("attention.value_length"), Value::U32(c.head_dim as u32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (k("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (k("rope.dimension_count"), Value::U32(c.head_dim as u32)),
    ];
    if gemma {
        md.push((
            k("attention.sliding_window"),
            Value::U32(c.sliding_window.unwrap() as u32),
        ));
    }
    match &c.rope_scaling {
        Some(s) if s.rope_type == "linear" => {
            md.push((k("rope.scaling.type"), Value::String("linear".into())));
            md.push((k("rope.scaling.factor"), Value::F32(s.factor as f32)));
        }
        Some(s) => {
            // llama.cpp's converter writes Llama 3 scaling as one divisor per frequency
            let (low, high) = (s.low_freq_factor.unwrap(), s.high_freq_factor.unwrap());
            let old = s.original_max_position_embeddings.unwrap() as f64;
            let d = c.head_dim;
            let divisors: Vec<f32> = (0..d / 2)
                .map(|i| {
                    let freq = 1.0 / c.rope_theta.powf(2.0 * i as f64 / d as f64);
                    let wl = 2.0 * std::f64::consts::PI / freq;
                    if wl < old / high {
                        1.0
                    } else if wl > old / low {
                        s.factor as f32
                    } else {
                        let smooth = (old / wl - low) / (high - low);
                        (1.0 / ((1.0 - smooth) / s.factor + smooth)) as f32
                    }
                })
                .collect();
            let t = Tensor::from_vec(divisors, d / 2, &Device::Cpu).unwrap();
            tensors.push((
                "rope_freqs.weight".into(),
                QTensor::quantize(&t, GgmlDType::F32).unwrap(),
            ));
        }
        None => {}
    }
    md.extend(tokenizer_metadata());
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
    hf_side
}
