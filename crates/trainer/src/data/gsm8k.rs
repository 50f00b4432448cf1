//! GSM8K helpers: the raw rows for evaluation, the prompt, and the final-answer extraction.

use std::path::Path;

use super::load::{check_shape, get_str, JsonLines};
use super::{DataConfig, DataFormat};
use crate::error::{Error, Result};

/// One GSM8K row as it is in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gsm8kItem {
    /// The word problem.
    pub question: String,
    /// The worked solution, ending with `#### <number>`.
    pub answer: String,
}

impl Gsm8kItem {
    /// The gold final answer (see [`gsm8k_final_answer`]).
    pub fn gold(&self) -> Option<String> {
        gsm8k_final_answer(&self.answer)
    }
}

/// Reads the first `limit` rows (all when `None`) of a GSM8K JSONL file; blank lines are
/// skipped. Errors as for [`super::load_examples`], with `file:line`.
pub fn load_gsm8k(path: &Path, limit: Option<usize>) -> Result<Vec<Gsm8kItem>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (line, obj) in JsonLines::new(path, &bytes) {
        if limit.is_some_and(|n| out.len() >= n) {
            break;
        }
        let obj = obj?;
        check_shape(path, line, &obj, DataFormat::Gsm8k, false)?;
        out.push(Gsm8kItem {
            question: get_str(path, line, &obj, "question")?.to_string(),
            answer: get_str(path, line, &obj, "answer")?.to_string(),
        });
    }
    if out.is_empty() {
        return Err(Error::data(path, 0, "contains no examples"));
    }
    Ok(out)
}

/// The prompt for a question: `cfg.prompt_template` with `{question}` replaced.
pub fn gsm8k_prompt(cfg: &DataConfig, question: &str) -> String {
    cfg.prompt_template.replace("{question}", question)
}

/// The answer without calculator annotations: `48/2 = <<48/2=24>>24` becomes `48/2 = 24`.
pub fn strip_calculator_annotations(answer: &str) -> String {
    let mut out = String::with_capacity(answer.len());
    let mut rest = answer;
    while let Some(start) = rest.find("<<") {
        match rest[start + 2..].find(">>") {
            Some(len) => {
                out.push_str(&rest[..start]);
                rest = &rest[start + 2 + len + 2..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out
}

/// The number after the last `####` in `text`, normalised for exact-match comparison: commas
/// and `$` removed, a leading `+` dropped, trailing zeros of a decimal part and a trailing `.`
/// removed (`-3.50` → `-3.5`, `7.0` → `7`), leading zeros removed. `None` when there is no
/// `####` or no number right after it (only spaces may come between).
pub fn gsm8k_final_answer(text: &str) -> Option<String> {
    let idx = text.rfind("####")?;
    let after = text[idx + 4..].trim_start();
    let raw: String = after
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, ',' | '.' | '$' | '-' | '+'))
        .filter(|c| !matches!(c, ',' | '$'))
        .collect();
    let (neg, digits) = match raw.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, raw.strip_prefix('+').unwrap_or(&raw)),
    };
    // Only digits with at most one '.', as in `12`, `12.5`, `.5` or `12.`.
    let (int, frac) = match digits.split_once('.') {
        Some((i, f)) => (i, f.trim_end_matches('.')),
        None => (digits, ""),
    };
    if !int.chars().all(|c| c.is_ascii_digit()) || !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let int = int.trim_start_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let frac = frac.trim_end_matches('0');
    let mut s = String::new();
    if neg && !(int == "0" && frac.is_empty()) {
        s.push('-');
    }
    s.push_str(int);
    if !frac.is_empty() {
        s.push('.');
        s.push_str(frac);
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_answer_cases() {
        let f = |s: &str| gsm8k_final_answer(s);
        assert_eq!(f("so 24 in all.\n#### 1,234").as_deref(), Some("1234"));
        assert_eq!(f("#### $5").as_deref(), Some("5"));
        assert_eq!(f("#### -3.50").as_deref(), Some("-3.5"));
        assert_eq!(f("no marker, 42"), None);
        assert_eq!(f("#### 7.0").as_deref(), Some("7"));
        assert_eq!(f("#### 72.").as_deref(), Some("72"));
        assert_eq!(f("#### 10").as_deref(), Some("10"));
        assert_eq!(f("#### 100.00").as_deref(), Some("100"));
        assert_eq!(f("#### 0.5").as_deref(), Some("0.5"));
        assert_eq!(f("#### .5").as_deref(), Some("0.5"));
        assert_eq!(f("#### 007").as_deref(), Some("7"));
        assert_eq!(f("#### +8").as_deref(), Some("8"));
        assert_eq!(f("#### -0").as_deref(), Some("0"));
        assert_eq!(f("#### 72 clips\nmore text").as_deref(), Some("72"));
        assert_eq!(
            f("#### 1\n#### 2").as_deref(),
            Some("2"),
            "the last marker wins"
        );
        assert_eq!(f("#### 3 #### "), None, "nothing after the last marker");
        assert_eq!(f("#### abc"), None);
        assert_eq!(f("#### 1.2.3"), None);
        assert_eq!(f("#### 5-3"), None);
        assert_eq!(f("####"), None);
    }

    #[test]
    fn calculator_annotations_are_stripped() {
        assert_eq!(
            strip_calculator_annotations("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72"),
            "Natalia sold 48/2 = 24 clips.\n#### 72"
        );
        assert_eq!(
            strip_calculator_annotations("a <<1+1=2>>2 b <<2*3=6>>6"),
            "a 2 b 6"
        );
        assert_eq!(
            strip_calculator_annotations("unclosed <<1+1"),
            "unclosed <<1+1"
        );
    }

    #[test]
    fn prompt_uses_template() {
        let cfg = DataConfig::default();
        assert_eq!(gsm8k_prompt(&cfg, "2+2?"), "Question: 2+2?\nAnswer: ");
    }
}
