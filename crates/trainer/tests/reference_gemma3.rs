//! Our decoder against an independent implementation: candle-transformers' quantized Gemma 3
//! on the real Gemma 3 270M GGUF. Greedy generation must agree token for token and the
//! next-token logits closely. The reference multiplies with quantized activations (q8_K), our
//! decoder with the dequantized f32 weights, so the logits are close, not equal.
//!
//! candle-transformers 0.11 hard-codes SiLU in quantized Gemma 3's MLP, while Gemma 3 gates its
//! MLP with GELU-tanh (`hidden_activation = "gelu_pytorch_tanh"` in HF's config; llama.cpp
//! uses GELU too; reported upstream as huggingface/candle issue 3745). To compare everything
//! else, our decoder runs here with the reference's SiLU; the real config keeps GELU-tanh, which
//! `gemma3_gguf_config_uses_gelu_tanh` checks.
//!
//! Skipped with a printed reason when the model file is absent (`scripts/fetch-model.sh`
//! fetches it; `FTBENCH_GEMMA3_GGUF` points elsewhere).

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_gemma3::ModelWeights;
use ftbench_trainer::config::Activation;
use ftbench_trainer::generate::generate_greedy;
use ftbench_trainer::loader::load_gguf;
use ftbench_trainer::model::{Decoder, KvCache, TrainMode};

fn model_path() -> Option<PathBuf> {
    let p = std::env::var("FTBENCH_GEMMA3_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/gemma-3-270m-q4_k_m.gguf")
        });
    if p.is_file() {
        Some(p)
    } else {
        println!(
            "skipped: {} not found (run scripts/fetch-model.sh)",
            p.display()
        );
        None
    }
}

const PROMPTS: [&str; 5] = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):\n    ",
    "The three primary colors are",
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
];
const NEW_TOKENS: usize = 16;

/// Greedy decoding with the reference; returns the tokens and each step's logits.
fn reference_greedy(r: &mut ModelWeights, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let dev = Device::Cpu;
    let mut ids = Vec::new();
    let mut all = Vec::new();
    let mut input = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..n {
        let x = Tensor::new(input.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = r.forward(&x, pos).unwrap().squeeze(0).unwrap();
        pos += input.len();
        let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        all.push(logits.to_vec1::<f32>().unwrap());
        ids.push(next);
        input = vec![next];
    }
    (ids, all)
}

#[test]
fn greedy_generation_matches_candle_transformers_quantized_gemma3() {
    let Some(path) = model_path() else { return };
    let dev = Device::Cpu;
    let loaded = load_gguf(&path, &dev).unwrap();
    let tok = loaded.tokenizer;
    let mut config = loaded.config;
    assert_eq!(config.hidden_act, Activation::GeluTanh);
    config.hidden_act = Activation::Silu; // the reference's MLP activation, see the module doc
    let model = Decoder::new(config, loaded.weights, TrainMode::Frozen, 0, &dev).unwrap();

    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut reference = ModelWeights::from_gguf(content, &mut f, &dev).unwrap();

    let mut worst_rel = 0f64;
    let mut full_agreement = 0;
    for prompt in PROMPTS {
        let ids = tok.encode(prompt, true).unwrap();
        // the reference resets its cache when a forward starts at position 0
        let (ref_ids, ref_logits) = reference_greedy(&mut reference, &ids, NEW_TOKENS);
        let ours = generate_greedy(&model, &ids, NEW_TOKENS, &[], tok.vocab_size()).unwrap();
        let agree = ours
            .new_ids
            .iter()
            .zip(&ref_ids)
            .take_while(|(a, b)| a == b)
            .count();

        // next-token logits of the prompt
        let mut cache = KvCache::new();
        let x = Tensor::new(ids.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward_logits(&x, Some(&mut cache)).unwrap();
        let last: Vec<f32> = logits
            .squeeze(0)
            .unwrap()
            .get(ids.len() - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let first = &ref_logits[0];
        let num: f64 = last
            .iter()
            .zip(first)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let den: f64 = first.iter().map(|b| (*b as f64).powi(2)).sum();
        let rel = (num / den).sqrt();
        worst_rel = worst_rel.max(rel);
        println!(
            "prompt {prompt:?}: {agree}/{NEW_TOKENS} tokens agree; logits relative L2 error {rel:.2e}; ours {:?}",
            tok.decode(&ours.new_ids, false).unwrap()
        );
        if agree == NEW_TOKENS {
            full_agreement += 1;
            continue;
        }
        // Where the two part, the reference itself must be near a tie between its choice and
        // ours: its activation rounding, not a modelling difference, decided.
        let step = &ref_logits[agree];
        let margin = step[ref_ids[agree] as usize] - step[ours.new_ids[agree] as usize];
        println!("  parted at token {agree}: reference margin between the two choices {margin:.3} logits");
        assert!(
            margin < 0.5,
            "prompt {prompt:?}: parted at token {agree} with a reference margin of {margin} logits: ours {:?} vs reference {:?}",
            tok.decode(&ours.new_ids, false).unwrap(),
            tok.decode(&ref_ids, false).unwrap()
        );
    }
    assert!(
        full_agreement >= 2,
        "only {full_agreement} prompts agree for {NEW_TOKENS} tokens"
    );
    // Measured on the Q4_K_M file: 1.8e-2 to 7.3e-2 (the reference's q8 activation rounding);
    // errors of real modelling bugs are of order 1 (the GELU/SiLU swap alone gives ~0.3).
    assert!(worst_rel < 0.1, "logits relative error {worst_rel}");
}

#[test]
fn gemma3_gguf_config_uses_gelu_tanh() {
    let Some(path) = model_path() else { return };
    let c = ftbench_trainer::loader::load_config(path.to_str().unwrap()).unwrap();
    assert_eq!(c.hidden_act, Activation::GeluTanh);
    assert_eq!(
        (c.hidden_size, c.num_hidden_layers, c.head_dim, c.vocab_size),
        (640, 18, 256, 262_144)
    );
    let global: Vec<usize> = (0..18).filter(|&i| !c.sliding_layers[i]).collect();
    assert_eq!(global, vec![5, 11, 17]);
}
