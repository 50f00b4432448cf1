//! Greedy generation with a KV cache, and per-token scoring.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::model::{Decoder, KvCache};

/// What a generation produced.
pub struct Generation {
    pub prompt_tokens: usize,
    pub new_ids: Vec<u32>,
    /// Seconds for the prompt (prefill) and for the new tokens after the first.
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// Greedy decoding of up to `max_new_tokens` after `prompt_ids`, stopping at any of
/// `stop_ids` (not included in the output). Only ids below `vocab_limit` are chosen:
/// checkpoints often pad their embedding past the tokenizer's vocabulary.
pub fn generate_greedy(
    model: &Decoder,
    prompt_ids: &[u32],
    max_new_tokens: usize,
    stop_ids: &[u32],
    vocab_limit: usize,
) -> Result<Generation> {
    let device = &model.device;
    let mut cache = KvCache::new();
    let limit = model.config.max_position_embeddings;
    let start = std::time::Instant::now();
    let input = Tensor::new(prompt_ids, device)?.unsqueeze(0)?;
    let logits = model.forward_logits(&input, Some(&mut cache))?;
    let mut next = last_argmax(&logits, vocab_limit)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    let mut new_ids = Vec::new();
    while new_ids.len() < max_new_tokens && !stop_ids.contains(&next) {
        new_ids.push(next);
        if prompt_ids.len() + new_ids.len() >= limit || new_ids.len() == max_new_tokens {
            break;
        }
        let input = Tensor::new(&[next], device)?.unsqueeze(0)?;
        let logits = model.forward_logits(&input, Some(&mut cache))?;
        next = last_argmax(&logits, vocab_limit)?;
    }
    Ok(Generation {
        prompt_tokens: prompt_ids.len(),
        new_ids,
        prefill_s,
        decode_s: start.elapsed().as_secs_f64(),
    })
}

fn last_argmax(logits: &Tensor, vocab_limit: usize) -> Result<u32> {
    let t = logits.dim(1)?;
    let mut last = logits.narrow(1, t - 1, 1)?.flatten_all()?;
    let v = last.dim(0)?;
    if vocab_limit > 0 && vocab_limit < v {
        last = last.narrow(0, 0, vocab_limit)?;
    }
    Ok(last.argmax(D::Minus1)?.to_scalar::<u32>()?)
}

/// Log-probability of each token given the ones before it; the first token (usually BOS) has
/// none. Returns one entry per id.
pub fn score(model: &Decoder, ids: &[u32]) -> Result<Vec<Option<f64>>> {
    let input = Tensor::new(ids, &model.device)?.unsqueeze(0)?;
    let logits = model
        .forward_logits(&input, None)?
        .squeeze(0)?
        .to_dtype(DType::F64)?; // [t, vocab]
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let mut out = vec![None];
    for i in 1..ids.len() {
        let v = logp.get(i - 1)?.get(ids[i] as usize)?.to_scalar::<f64>()?;
        out.push(Some(v));
    }
    Ok(out)
}
