//! Tiny models for integration tests: configs for each family, a word-level tokenizer with
//! `<pad>`/`<eos>`/`<bos>`/`<unk>` and a small arithmetic vocabulary, and HF folders written
//! with the crate's own saver. Shared by the trainer's and the CLI's tests (`#[path]`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::Device;
use ftbench_trainer::config::ModelConfig;
use ftbench_trainer::loader;
use ftbench_trainer::model::{random_weights, Weights};
use ftbench_trainer::tokenizer::Tokenizer;
use serde_json::json;

/// The special tokens first (ids 0..4), then the words.
pub const SPECIALS: [&str; 4] = ["<pad>", "<eos>", "<bos>", "<unk>"];
pub const WORDS: [&str; 36] = [
    "Question", "Answer", ":", "?", ".", "####", "+", "=", "how", "many", "apples", "does",
    "tom", "have", "he", "has", "and", "buys", "more", "so", "the", "answer", "is", "0", "1",
    "2", "3", "4", "5", "6", "7", "8", "9", "pears", "eats", "left",
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
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string_pretty(&tokenizer_json()).unwrap()).unwrap();
    let cfg = json!({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": true});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap()
}

/// The HF config.json values of a tiny model of `family` (gemma3, llama or qwen2). The model
/// vocabulary is a little larger than the tokenizer's, as in real checkpoints.
pub fn config_json(family: &str) -> serde_json::Value {
    let ids = json!({"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0});
    let mut v = match family {
        // 6 layers so that layer 5 is a global layer with the default pattern of 6
        "gemma3" => json!({
            "model_type": "gemma3_text", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "vocab_size": 48, "rms_norm_eps": 1e-6, "sliding_window": 4,
            "sliding_window_pattern": 6, "query_pre_attn_scalar": 16, "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0, "max_position_embeddings": 128
        }),
        // untied head, GQA (4 query heads on 2 kv heads)
        "llama" => json!({
            "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 48, "tie_word_embeddings": false, "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0
        }),
        // q/k/v biases, tied head
        "qwen2" => json!({
            "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
            "vocab_size": 48, "tie_word_embeddings": true, "max_position_embeddings": 128,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0
        }),
        other => panic!("no tiny config for {other}"),
    };
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
