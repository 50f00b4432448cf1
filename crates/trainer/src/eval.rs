//! GSM8K exact match: greedy generation with a KV cache, the final number after `####`
//! compared with the gold answer's.

use serde::Serialize;

use crate::data::{gsm8k_final_answer, gsm8k_prompt, DataConfig, Gsm8kItem};
use crate::error::Result;
use crate::generate::generate_greedy;
use crate::model::Decoder;
use crate::tokenizer::Tokenizer;

/// One question's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Gsm8kSample {
    pub question: String,
    pub gold: Option<String>,
    pub predicted: Option<String>,
    pub completion: String,
    pub correct: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Gsm8kReport {
    pub correct: usize,
    pub total: usize,
    /// correct / total
    pub exact_match: f64,
    pub generated_tokens: usize,
    pub samples: Vec<Gsm8kSample>,
}

/// Generates an answer for each item with the prompt template of `data` and scores it.
/// `on_item(done, correct_so_far)` is called after each question; when it returns false the
/// evaluation stops with an error (an interrupted run).
pub fn gsm8k_exact_match(
    model: &Decoder,
    tok: &Tokenizer,
    data: &DataConfig,
    items: &[Gsm8kItem],
    max_new_tokens: usize,
    mut on_item: impl FnMut(usize, usize) -> bool,
) -> Result<Gsm8kReport> {
    let stops = tok.stop_ids();
    let mut samples = Vec::with_capacity(items.len());
    let mut correct = 0;
    let mut generated = 0;
    for (i, item) in items.iter().enumerate() {
        let prompt = gsm8k_prompt(data, &item.question);
        let ids = tok.encode(&prompt, data.add_bos && tok.bos_id().is_some())?;
        let g = generate_greedy(model, &ids, max_new_tokens, &stops, tok.vocab_size())?;
        generated += g.new_ids.len();
        let completion = tok.decode(&g.new_ids, true)?;
        // a model may go on with another "Question:"; the answer is the first "####" line
        let answer_part = completion
            .split("\nQuestion:")
            .next()
            .unwrap_or(&completion);
        let predicted = gsm8k_final_answer(answer_part);
        let gold = item.gold();
        let ok = predicted.is_some() && predicted == gold;
        correct += ok as usize;
        samples.push(Gsm8kSample {
            question: item.question.clone(),
            gold,
            predicted,
            completion,
            correct: ok,
        });
        if !on_item(i + 1, correct) {
            return Err(crate::Error::Training("interrupted".into()));
        }
    }
    let total = items.len();
    Ok(Gsm8kReport {
        correct,
        total,
        exact_match: if total == 0 {
            0.0
        } else {
            correct as f64 / total as f64
        },
        generated_tokens: generated,
        samples,
    })
}
