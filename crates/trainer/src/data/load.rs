//! Reading data files into tokenized examples.

use std::path::Path;

use serde_json::{Map, Value};

use super::chat::{chat_segments, ChatMessage, Role, Segment};
use super::gsm8k::{gsm8k_prompt, strip_calculator_annotations};
use super::rng::{SplitMix64, TAG_HELDOUT};
use super::{DataConfig, DataFormat, Example, TextEncoder};
use crate::error::{Error, Result};

/// What one [`load_examples_with_report`] call found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// The format used (never `auto`).
    pub format: Option<DataFormat>,
    /// Non-blank JSONL lines read (0 for text files).
    pub records: usize,
    /// Examples returned.
    pub examples: usize,
    /// Examples cut from the right to `max_seq_len`.
    pub truncated: usize,
    /// Records dropped because the prompt left no room in `max_seq_len` for any completion token.
    pub dropped_no_room: usize,
    /// Records dropped because they have no completion token at all (an empty completion
    /// without EOS, or a conversation without an assistant turn).
    pub dropped_no_completion: usize,
    /// Tokens in the returned examples.
    pub tokens: usize,
    /// Tokens that carry loss in the returned examples.
    pub loss_tokens: usize,
}

/// Loads one data file as tokenized examples, in file order. See [`DataFormat`] for the
/// shapes; blank lines are skipped, keys other than the format's are ignored, a UTF-8 byte
/// order mark and CRLF line ends are accepted. Examples longer than `cfg.max_seq_len` are
/// cut from the right, and records whose prompt leaves no room for a completion token are
/// dropped; both are counted in one warning per file (and in [`LoadReport`]).
///
/// Errors (`file:line: message`): unreadable file, invalid UTF-8 or JSON, a line that is not
/// an object, a missing key or a value of the wrong type, a line of another shape than the
/// file's first, an empty `messages` list, an unknown role, and a file without usable
/// examples (`file: contains no examples`).
pub fn load_examples(path: &Path, cfg: &DataConfig, tok: &dyn TextEncoder) -> Result<Vec<Example>> {
    load_examples_with_report(path, cfg, tok).map(|(e, _)| e)
}

/// [`load_examples`], also returning the counts it found.
pub fn load_examples_with_report(
    path: &Path,
    cfg: &DataConfig,
    tok: &dyn TextEncoder,
) -> Result<(Vec<Example>, LoadReport)> {
    cfg.validate()?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let format = match cfg.format {
        DataFormat::Auto => sniff(path, &bytes)?,
        f => f,
    };
    let mut report = LoadReport {
        format: Some(format),
        ..LoadReport::default()
    };
    let examples = if format == DataFormat::Text {
        load_text(path, &bytes, cfg, tok)?
    } else {
        let mut out = Vec::new();
        let mut expected = format;
        let mut first = true;
        for (line, obj) in JsonLines::new(path, &bytes) {
            let obj = obj?;
            // An auto-detected format is the first line's; an explicit one is the config's.
            let origin = if cfg.format == DataFormat::Auto {
                Origin::FirstLine
            } else {
                Origin::Config
            };
            if first && cfg.format == DataFormat::Auto {
                expected = detect(&obj).ok_or_else(|| {
                    Error::data(
                        path,
                        line,
                        format!(
                            "cannot tell the format from the keys {}; expected `question` and \
                             `answer` (gsm8k), `prompt` and `completion` (prompt_completion) or \
                             `messages` (chat), or set data.format",
                            key_list(&obj)
                        ),
                    )
                })?;
                report.format = Some(expected);
            }
            first = false;
            report.records += 1;
            let (segments, eos_loss) = record_segments(path, line, &obj, expected, origin, cfg)?;
            let (ids, mask) = encode_segments(path, line, &segments, eos_loss, cfg, tok)?;
            match fit(ids, mask, cfg.max_seq_len) {
                Fit::Kept(e) => out.push(e),
                Fit::Truncated(e) => {
                    report.truncated += 1;
                    out.push(e)
                }
                Fit::NoRoom => report.dropped_no_room += 1,
                Fit::NoCompletion => report.dropped_no_completion += 1,
            }
        }
        out
    };
    if examples.is_empty() {
        let why = if report.records > 0 {
            format!(
                "contains no examples ({} records: {} with no room for a completion in \
                 max_seq_len {}, {} without completion tokens)",
                report.records,
                report.dropped_no_room,
                cfg.max_seq_len,
                report.dropped_no_completion
            )
        } else {
            "contains no examples".to_string()
        };
        return Err(Error::data(path, 0, why));
    }
    report.examples = examples.len();
    report.tokens = examples.iter().map(Example::len).sum();
    report.loss_tokens = examples.iter().map(Example::n_loss_tokens).sum();
    if report.truncated + report.dropped_no_room + report.dropped_no_completion > 0 {
        tracing::warn!(
            "{}: {} of {} records cut to max_seq_len {}; dropped {} whose prompt leaves no room \
             for a completion and {} without completion tokens",
            path.display(),
            report.truncated,
            report.records,
            cfg.max_seq_len,
            report.dropped_no_room,
            report.dropped_no_completion
        );
    }
    Ok((examples, report))
}

/// Splits examples into (train, held-out): `round(n * fraction)` examples, chosen by a shuffle
/// seeded by `seed`, are held out; at least one when `fraction > 0` and `n >= 2`, and never
/// all of them. Both parts keep the input order. `fraction` is clamped to `[0, 1]`.
pub fn split_heldout(
    examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let n = examples.len();
    let fraction = if fraction.is_nan() {
        0.0
    } else {
        fraction.clamp(0.0, 1.0)
    };
    let mut k = (n as f64 * fraction).round() as usize;
    if fraction > 0.0 && n >= 2 {
        k = k.max(1);
    }
    k = k.min(n.saturating_sub(1));
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed, TAG_HELDOUT, 0).shuffle(&mut order);
    let mut held = vec![false; n];
    for &i in &order[..k] {
        held[i] = true;
    }
    let (mut train, mut heldout) = (Vec::with_capacity(n - k), Vec::with_capacity(k));
    for (i, e) in examples.into_iter().enumerate() {
        if held[i] {
            heldout.push(e)
        } else {
            train.push(e)
        }
    }
    (train, heldout)
}

/// Where the expected shape of a line comes from, for messages.
#[derive(Clone, Copy)]
enum Origin {
    FirstLine,
    Config,
}

fn sniff(path: &Path, bytes: &[u8]) -> Result<DataFormat> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "txt" => return Ok(DataFormat::Text),
        // The first line decides between the JSONL shapes.
        "jsonl" | "json" => return Ok(DataFormat::Auto),
        _ => {}
    }
    let first = bytes
        .split(|&b| b == b'\n')
        .map(strip_bom)
        .find(|l| !l.iter().all(u8::is_ascii_whitespace));
    Ok(match first {
        Some(l) if l.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') => DataFormat::Auto,
        _ => DataFormat::Text,
    })
}

fn strip_bom(l: &[u8]) -> &[u8] {
    l.strip_prefix(b"\xef\xbb\xbf".as_slice()).unwrap_or(l)
}

/// The shape a line's keys suggest.
fn detect(obj: &Map<String, Value>) -> Option<DataFormat> {
    if obj.contains_key("messages") {
        Some(DataFormat::Chat)
    } else if obj.contains_key("prompt") && obj.contains_key("completion") {
        Some(DataFormat::PromptCompletion)
    } else if obj.contains_key("question") && obj.contains_key("answer") {
        Some(DataFormat::Gsm8k)
    } else {
        None
    }
}

fn required_keys(format: DataFormat) -> &'static [&'static str] {
    match format {
        DataFormat::Gsm8k => &["question", "answer"],
        DataFormat::PromptCompletion => &["prompt", "completion"],
        DataFormat::Chat => &["messages"],
        DataFormat::Auto | DataFormat::Text => &[],
    }
}

fn key_list(obj: &Map<String, Value>) -> String {
    if obj.is_empty() {
        return "{}".to_string();
    }
    obj.keys()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn keys_phrase(format: DataFormat) -> String {
    let keys: Vec<String> = required_keys(format)
        .iter()
        .map(|k| format!("`{k}`"))
        .collect();
    keys.join(" and ")
}

pub(crate) fn type_name(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(_) => "a string".to_string(),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

/// A string value of `obj[key]`, or an error naming the key, the expected and the found type.
pub(crate) fn get_str<'a>(
    path: &Path,
    line: usize,
    obj: &'a Map<String, Value>,
    key: &str,
) -> Result<&'a str> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(Error::data(
            path,
            line,
            format!("key `{key}`: expected a string, found {}", type_name(v)),
        )),
        None => Err(Error::data(path, line, format!("missing key `{key}`"))),
    }
}

/// Checks that a line has the keys of `expected`; a line of another known shape gets its own
/// message.
pub(crate) fn check_shape(
    path: &Path,
    line: usize,
    obj: &Map<String, Value>,
    expected: DataFormat,
    from_first_line: bool,
) -> Result<()> {
    let missing = required_keys(expected)
        .iter()
        .find(|k| !obj.contains_key(**k));
    let Some(missing) = missing else {
        return Ok(());
    };
    let source = if from_first_line {
        format!(
            "the file's first line is {expected} ({})",
            keys_phrase(expected)
        )
    } else {
        format!("data.format is {expected} ({})", keys_phrase(expected))
    };
    match detect(obj) {
        Some(other) if other != expected => Err(Error::data(
            path,
            line,
            format!(
                "line has the keys of a {other} line ({}), but {source}",
                keys_phrase(other)
            ),
        )),
        _ => Err(Error::data(
            path,
            line,
            format!(
                "missing key `{missing}` (expected {}; found {})",
                keys_phrase(expected),
                key_list(obj)
            ),
        )),
    }
}

fn record_segments(
    path: &Path,
    line: usize,
    obj: &Map<String, Value>,
    format: DataFormat,
    origin: Origin,
    cfg: &DataConfig,
) -> Result<(Vec<Segment>, bool)> {
    check_shape(path, line, obj, format, matches!(origin, Origin::FirstLine))?;
    Ok(match format {
        DataFormat::Gsm8k => {
            let q = get_str(path, line, obj, "question")?;
            let a = get_str(path, line, obj, "answer")?;
            let a = if cfg.strip_calculator_annotations {
                strip_calculator_annotations(a)
            } else {
                a.to_string()
            };
            (
                vec![
                    Segment::new(gsm8k_prompt(cfg, q), false),
                    Segment::new(a, true),
                ],
                true,
            )
        }
        DataFormat::PromptCompletion => {
            let p = get_str(path, line, obj, "prompt")?;
            let c = get_str(path, line, obj, "completion")?;
            (vec![Segment::new(p, false), Segment::new(c, true)], true)
        }
        DataFormat::Chat => {
            let messages = parse_messages(path, line, obj)?;
            let last_is_assistant = messages.last().is_some_and(|m| m.role == Role::Assistant);
            (
                chat_segments(cfg.chat_template, &messages),
                last_is_assistant,
            )
        }
        DataFormat::Auto | DataFormat::Text => unreachable!("not a JSONL format"),
    })
}

fn parse_messages(path: &Path, line: usize, obj: &Map<String, Value>) -> Result<Vec<ChatMessage>> {
    let list = match obj.get("messages") {
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(Error::data(
                path,
                line,
                format!("key `messages`: expected a list, found {}", type_name(v)),
            ))
        }
        None => return Err(Error::data(path, line, "missing key `messages`")),
    };
    if list.is_empty() {
        return Err(Error::data(
            path,
            line,
            "key `messages`: expected a non-empty list, found []",
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(Error::data(
                path,
                line,
                format!(
                    "messages[{i}]: expected an object with `role` and `content`, found {}",
                    type_name(m)
                ),
            ));
        };
        let field = |key: &str| -> Result<&str> {
            match m.get(key) {
                Some(Value::String(s)) => Ok(s),
                Some(v) => Err(Error::data(
                    path,
                    line,
                    format!(
                        "messages[{i}].{key}: expected a string, found {}",
                        type_name(v)
                    ),
                )),
                None => Err(Error::data(
                    path,
                    line,
                    format!("messages[{i}]: missing key `{key}`"),
                )),
            }
        };
        let role_s = field("role")?;
        let role = Role::parse(role_s).ok_or_else(|| {
            Error::data(
                path,
                line,
                format!(
                    "messages[{i}].role: unknown role `{role_s}`, expected `system`, `user` or \
                     `assistant` (or `model`)"
                ),
            )
        })?;
        out.push(ChatMessage {
            role,
            content: field("content")?.to_string(),
        });
    }
    Ok(out)
}

/// Encodes segments one by one (so that completion tokens are exactly those of completion
/// text) and appends EOS when configured, carrying loss when `eos_loss` (the example ends with
/// a completion: always for gsm8k and prompt_completion, for chat when the last message is the
/// assistant's).
fn encode_segments(
    path: &Path,
    line: usize,
    segments: &[Segment],
    eos_loss: bool,
    cfg: &DataConfig,
    tok: &dyn TextEncoder,
) -> Result<(Vec<u32>, Vec<bool>)> {
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    if cfg.add_bos {
        if let Some(b) = tok.bos_id() {
            ids.push(b);
            mask.push(false);
        }
    }
    for s in segments {
        let t = tok
            .encode(&s.text, false)
            .map_err(|e| Error::data(path, line, format!("cannot tokenize: {e}")))?;
        mask.extend(std::iter::repeat_n(s.loss, t.len()));
        ids.extend(t);
    }
    if cfg.add_eos {
        if let Some(e) = tok.eos_id() {
            ids.push(e);
            mask.push(eos_loss);
        }
    }
    Ok((ids, mask))
}

enum Fit {
    Kept(Example),
    Truncated(Example),
    NoRoom,
    NoCompletion,
}

/// A completion token that is predicted: position 1 onwards (position 0 has no predecessor).
fn has_predicted_completion(mask: &[bool]) -> bool {
    mask.iter().skip(1).any(|&m| m)
}

fn fit(mut ids: Vec<u32>, mut mask: Vec<bool>, max: usize) -> Fit {
    if !has_predicted_completion(&mask) {
        return Fit::NoCompletion;
    }
    if ids.len() <= max {
        return Fit::Kept(Example {
            input_ids: ids,
            loss_mask: mask,
        });
    }
    if !has_predicted_completion(&mask[..max]) {
        return Fit::NoRoom;
    }
    ids.truncate(max);
    mask.truncate(max);
    Fit::Truncated(Example {
        input_ids: ids,
        loss_mask: mask,
    })
}

/// A plain-text file as one token stream (BOS not included, EOS at the end when configured),
/// cut into windows of `max_seq_len` tokens, each starting with BOS when configured.
/// Consecutive windows overlap by one token whose flag is off in the later window, so every
/// token after the first is predicted exactly once and always from real context.
fn load_text(
    path: &Path,
    bytes: &[u8],
    cfg: &DataConfig,
    tok: &dyn TextEncoder,
) -> Result<Vec<Example>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        Error::data(path, line, "not valid UTF-8 text")
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(Error::data(path, 0, "contains no examples"));
    }
    let mut stream = tok
        .encode(text, false)
        .map_err(|e| Error::data(path, 0, format!("cannot tokenize: {e}")))?;
    if cfg.add_eos {
        stream.extend(tok.eos_id());
    }
    let bos = if cfg.add_bos { tok.bos_id() } else { None };
    let cap = cfg.max_seq_len - usize::from(bos.is_some());
    let overlap = usize::from(cap >= 2);
    let mut out = Vec::new();
    let mut start = 0;
    while start < stream.len() {
        let end = (start + cap).min(stream.len());
        let mut input_ids = Vec::with_capacity(cfg.max_seq_len);
        let mut loss_mask = Vec::with_capacity(cfg.max_seq_len);
        if let Some(b) = bos {
            input_ids.push(b);
            loss_mask.push(false);
        }
        for (j, &t) in stream[start..end].iter().enumerate() {
            input_ids.push(t);
            loss_mask.push(!(j == 0 && start > 0 && overlap == 1));
        }
        let ex = Example {
            input_ids,
            loss_mask,
        };
        if ex.n_loss_tokens() > 0 {
            out.push(ex);
        }
        if end == stream.len() {
            break;
        }
        start = end - overlap;
    }
    Ok(out)
}

/// The non-blank lines of a JSONL file as objects, with 1-based line numbers.
pub(crate) struct JsonLines<'a> {
    path: &'a Path,
    lines: std::iter::Enumerate<RawLines<'a>>,
}

type RawLines<'a> = std::slice::Split<'a, u8, fn(&u8) -> bool>;

impl<'a> JsonLines<'a> {
    pub(crate) fn new(path: &'a Path, bytes: &'a [u8]) -> Self {
        let is_nl: fn(&u8) -> bool = |&b| b == b'\n';
        JsonLines {
            path,
            lines: bytes.split(is_nl).enumerate(),
        }
    }
}

impl Iterator for JsonLines<'_> {
    type Item = (usize, Result<Map<String, Value>>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (i, raw) = self.lines.next()?;
            let line = i + 1;
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let raw = if i == 0 { strip_bom(raw) } else { raw };
            if raw.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some((line, parse_line(self.path, line, raw)));
        }
    }
}

fn parse_line(path: &Path, line: usize, raw: &[u8]) -> Result<Map<String, Value>> {
    let s = std::str::from_utf8(raw).map_err(|e| {
        Error::data(
            path,
            line,
            format!("not valid UTF-8 (at byte {})", e.valid_up_to() + 1),
        )
    })?;
    match serde_json::from_str::<Value>(s) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(v) => Err(Error::data(
            path,
            line,
            format!("expected a JSON object, found {}", type_name(&v)),
        )),
        Err(e) => {
            let full = e.to_string();
            let suffix = format!(" at line {} column {}", e.line(), e.column());
            let msg = full.strip_suffix(&suffix).unwrap_or(&full);
            Err(Error::data(
                path,
                line,
                format!("invalid JSON at column {}: {msg}", e.column()),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::{ids, temp_file, CharEncoder, BOS, EOS};
    use crate::data::ChatTemplate;

    fn cfg() -> DataConfig {
        DataConfig {
            prompt_template: "Q:{question}\nA:".into(),
            max_seq_len: 64,
            ..DataConfig::default()
        }
    }

    fn load(name: &str, content: &str, cfg: &DataConfig) -> Result<(Vec<Example>, LoadReport)> {
        let p = temp_file(name, content);
        load_examples_with_report(&p, cfg, &CharEncoder)
    }

    /// The error message of loading `content`, with the file's path replaced by `F`.
    fn error(name: &str, content: &str, cfg: &DataConfig) -> String {
        let p = temp_file(name, content);
        let e = load_examples(&p, cfg, &CharEncoder)
            .unwrap_err()
            .to_string();
        e.replace(&p.display().to_string(), "F")
    }

    /// `(ids, mask)` of prompt text followed by completion text, BOS first and EOS last.
    fn expected(prompt: &str, completion: &str) -> Example {
        let mut input_ids = vec![BOS];
        input_ids.extend(ids(prompt));
        input_ids.extend(ids(completion));
        input_ids.push(EOS);
        let mut loss_mask = vec![false; 1 + prompt.chars().count()];
        loss_mask.extend(vec![true; completion.chars().count() + 1]);
        Example {
            input_ids,
            loss_mask,
        }
    }

    #[test]
    fn gsm8k_mask_is_exactly_the_completion_hand_checked() {
        let (ex, report) = load(
            "a.jsonl",
            "{\"question\": \"hi\", \"answer\": \"ok\"}\n",
            &cfg(),
        )
        .unwrap();
        // BOS Q : h i \n A : | o k EOS
        let want = Example {
            input_ids: vec![1, 81, 58, 104, 105, 10, 65, 58, 111, 107, 2],
            loss_mask: vec![
                false, false, false, false, false, false, false, false, true, true, true,
            ],
        };
        assert_eq!(ex, vec![want]);
        assert_eq!(report.format, Some(DataFormat::Gsm8k));
        assert_eq!(
            (
                report.records,
                report.examples,
                report.tokens,
                report.loss_tokens
            ),
            (1, 1, 11, 3)
        );
    }

    #[test]
    fn gsm8k_default_template_and_calculator_option() {
        let line = "{\"question\": \"q\", \"answer\": \"2 = <<1+1=2>>2\\n#### 2\"}\n";
        let c = DataConfig {
            max_seq_len: 64,
            ..DataConfig::default()
        };
        let (ex, _) = load("g.jsonl", line, &c).unwrap();
        assert_eq!(
            ex[0],
            expected("Question: q\nAnswer: ", "2 = <<1+1=2>>2\n#### 2")
        );
        let c = DataConfig {
            strip_calculator_annotations: true,
            ..c
        };
        let (ex, _) = load("g.jsonl", line, &c).unwrap();
        assert_eq!(ex[0], expected("Question: q\nAnswer: ", "2 = 2\n#### 2"));
    }

    #[test]
    fn prompt_completion_and_no_bos_no_eos() {
        let text = "{\"prompt\": \"ab\", \"completion\": \"cd\", \"id\": 7}\n{\"prompt\": \"\", \"completion\": \"e\"}\n";
        let (ex, r) = load("pc.jsonl", text, &cfg()).unwrap();
        assert_eq!(r.format, Some(DataFormat::PromptCompletion));
        assert_eq!(ex, vec![expected("ab", "cd"), expected("", "e")]);
        let c = DataConfig {
            add_bos: false,
            add_eos: false,
            ..cfg()
        };
        let (ex, r) = load("pc.jsonl", text, &c).unwrap();
        assert_eq!(
            ex[0],
            Example {
                input_ids: ids("abcd"),
                loss_mask: vec![false, false, true, true]
            }
        );
        // "e" alone: its only completion token is at position 0, never predicted.
        assert_eq!((ex.len(), r.dropped_no_completion), (1, 1));
    }

    #[test]
    fn chat_loss_on_assistant_turns_and_markers_only() {
        let text = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Q"}, {"role": "model", "content": "A"}]}"#;
        let c = DataConfig {
            chat_template: ChatTemplate::ChatMl,
            max_seq_len: 256,
            ..cfg()
        };
        let (ex, r) = load("c.jsonl", text, &c).unwrap();
        assert_eq!(r.format, Some(DataFormat::Chat));
        let e = &ex[0];
        let loss_text: String = e
            .input_ids
            .iter()
            .zip(&e.loss_mask)
            .filter(|(_, &m)| m)
            .map(|(&i, _)| {
                if i == EOS {
                    '$'
                } else {
                    char::from_u32(i).unwrap()
                }
            })
            .collect();
        assert_eq!(loss_text, "Yo<|im_end|>A<|im_end|>$");
        let all: String = e.input_ids[1..e.len() - 1]
            .iter()
            .map(|&i| char::from_u32(i).unwrap())
            .collect();
        assert_eq!(
            all,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n\
             <|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
        );
        // A conversation ending with the user: EOS carries no loss.
        let text = r#"{"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "B"}]}"#;
        let (ex, _) = load("c.jsonl", text, &c).unwrap();
        assert_eq!(ex[0].loss_mask.last(), Some(&false));
        // No assistant turn at all: nothing to learn, dropped.
        let text = "{\"messages\": [{\"role\": \"user\", \"content\": \"B\"}]}\n";
        assert_eq!(error("c.jsonl", text, &c), "F: contains no examples (1 records: 0 with no room for a completion in max_seq_len 256, 1 without completion tokens)");
    }

    #[test]
    fn text_windows_overlap_by_one_and_predict_every_token_once() {
        let c = DataConfig {
            max_seq_len: 5,
            ..cfg()
        };
        let (ex, r) = load("t.txt", "abcdefgh", &c).unwrap();
        assert_eq!(r.format, Some(DataFormat::Text));
        let a = |s: &str| ids(s);
        let w = |body: Vec<u32>, mask: Vec<bool>| {
            let mut input_ids = vec![BOS];
            input_ids.extend(body);
            Example {
                input_ids,
                loss_mask: mask,
            }
        };
        assert_eq!(
            ex,
            vec![
                w(a("abcd"), vec![false, true, true, true, true]),
                w(a("defg"), vec![false, false, true, true, true]),
                w(
                    [a("gh"), vec![EOS]].concat(),
                    vec![false, false, true, true]
                ),
            ]
        );
        assert_eq!(r.loss_tokens, 9, "a..h and EOS, each once");
        // Without BOS/EOS the windows are max_seq_len tokens of text.
        let c = DataConfig {
            max_seq_len: 4,
            add_bos: false,
            add_eos: false,
            ..cfg()
        };
        let (ex, _) = load("t.txt", "abcdefg", &c).unwrap();
        let got: Vec<Vec<u32>> = ex.iter().map(|e| e.input_ids.clone()).collect();
        assert_eq!(got, vec![a("abcd"), a("defg")]);
        assert_eq!(
            ex.iter().map(Example::n_loss_tokens).sum::<usize>(),
            6,
            "b..g"
        );
    }

    #[test]
    fn auto_detection() {
        let c = cfg();
        let fmt = |name: &str, text: &str| load(name, text, &c).unwrap().1.format.unwrap();
        assert_eq!(
            fmt("x.txt", "{\"question\": \"a\", \"answer\": \"b\"}"),
            DataFormat::Text
        );
        assert_eq!(
            fmt("x.jsonl", "\n\n{\"question\": \"a\", \"answer\": \"b\"}"),
            DataFormat::Gsm8k
        );
        assert_eq!(
            fmt("x", "  {\"prompt\": \"a\", \"completion\": \"b\"}"),
            DataFormat::PromptCompletion
        );
        assert_eq!(fmt("x.data", "just words"), DataFormat::Text);
        // An explicit format wins over the extension.
        let t = DataConfig {
            format: DataFormat::Text,
            ..cfg()
        };
        assert_eq!(
            load("x.jsonl", "{}", &t).unwrap().1.format,
            Some(DataFormat::Text)
        );
    }

    #[test]
    fn blank_lines_crlf_and_bom_are_accepted() {
        let text = "\u{feff}{\"prompt\": \"a\", \"completion\": \"b\"}\r\n\r\n   \n{\"prompt\": \"c\", \"completion\": \"d\"}\r\n";
        let (ex, r) = load("b.jsonl", text, &cfg()).unwrap();
        assert_eq!(ex, vec![expected("a", "b"), expected("c", "d")]);
        assert_eq!(r.records, 2);
    }

    #[test]
    fn long_examples_are_cut_or_dropped_and_counted() {
        let c = DataConfig {
            max_seq_len: 6,
            ..cfg()
        };
        let text = [
            r#"{"prompt": "ab", "completion": "cdefgh"}"#, // 1+2+6+1 = 10 tokens: cut to 6
            r#"{"prompt": "abcdef", "completion": "g"}"#,  // prompt fills the window: dropped
            r#"{"prompt": "abcd", "completion": "e"}"#,    // 1+4+1+1 = 7: "e" still fits, EOS cut
            r#"{"prompt": "a", "completion": "b"}"#,       // fits
        ]
        .join("\n");
        let (ex, r) = load("l.jsonl", &text, &c).unwrap();
        assert_eq!(
            (r.records, r.examples, r.truncated, r.dropped_no_room),
            (4, 3, 2, 1)
        );
        assert_eq!(
            ex[0],
            Example {
                input_ids: [vec![BOS], ids("abcde")].concat(),
                loss_mask: vec![false, false, false, true, true, true]
            }
        );
        assert_eq!(ex[1].input_ids, [vec![BOS], ids("abcde")].concat());
        assert_eq!(ex[1].n_loss_tokens(), 1);
        assert_eq!(ex[2], expected("a", "b"));
        let only_long = r#"{"prompt": "abcdefgh", "completion": "i"}"#;
        assert_eq!(
            error("l.jsonl", only_long, &c),
            "F: contains no examples (1 records: 1 with no room for a completion in max_seq_len 6, 0 without completion tokens)"
        );
    }

    #[test]
    fn bad_inputs_name_file_line_and_what_is_wrong() {
        let c = cfg();
        let good = r#"{"question": "a", "answer": "b"}"#;
        let e = |body: &str| error("bad.jsonl", &format!("{good}\n\n{body}\n"), &c);
        assert_eq!(
            e(r#"{"question": "a", "answer": }"#),
            "F:3: invalid JSON at column 29: expected value"
        );
        assert_eq!(
            e(r#"{"question": "a""#),
            "F:3: invalid JSON at column 16: EOF while parsing an object"
        );
        assert_eq!(
            e(r#"{"question": "a"}"#),
            "F:3: missing key `answer` (expected `question` and `answer`; found `question`)"
        );
        assert_eq!(
            e(r#"{"question": 5, "answer": "b"}"#),
            "F:3: key `question`: expected a string, found number 5"
        );
        assert_eq!(
            e(r#"{"question": "a", "answer": null}"#),
            "F:3: key `answer`: expected a string, found null"
        );
        assert_eq!(
            e(r#"{"prompt": "a", "completion": "b"}"#),
            "F:3: line has the keys of a prompt_completion line (`prompt` and `completion`), but the \
             file's first line is gsm8k (`question` and `answer`)"
        );
        assert_eq!(e("[1, 2]"), "F:3: expected a JSON object, found a list");
        assert_eq!(
            e("{}"),
            "F:3: missing key `question` (expected `question` and `answer`; found {})"
        );
        assert_eq!(error("e.jsonl", "", &c), "F: contains no examples");
        assert_eq!(error("e.jsonl", "\n  \n", &c), "F: contains no examples");
        assert_eq!(error("e.txt", " \n", &c), "F: contains no examples");
        assert_eq!(
            error("u.jsonl", r#"{"text": "a"}"#, &c),
            "F:1: cannot tell the format from the keys `text`; expected `question` and `answer` \
             (gsm8k), `prompt` and `completion` (prompt_completion) or `messages` (chat), or set data.format"
        );
        let g = DataConfig {
            format: DataFormat::Gsm8k,
            ..cfg()
        };
        assert_eq!(
            error("x.jsonl", r#"{"prompt": "a", "completion": "b"}"#, &g),
            "F:1: line has the keys of a prompt_completion line (`prompt` and `completion`), but \
             data.format is gsm8k (`question` and `answer`)"
        );
        let p = temp_file("bin.jsonl", "");
        std::fs::write(
            &p,
            b"{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"\xff\"}\n",
        )
        .unwrap();
        let msg = load_examples(&p, &c, &CharEncoder).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!("{}:2: not valid UTF-8 (at byte 13)", p.display())
        );
        let missing = std::path::Path::new("/nonexistent/ftbench/none.jsonl");
        assert!(load_examples(missing, &c, &CharEncoder)
            .unwrap_err()
            .to_string()
            .starts_with("/nonexistent/ftbench/none.jsonl: "));
    }

    #[test]
    fn bad_chat_lines() {
        let c = cfg();
        let first = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
        let e = |body: &str| error("chat.jsonl", &format!("{first}\n{body}\n"), &c);
        assert_eq!(
            e(r#"{"messages": []}"#),
            "F:2: key `messages`: expected a non-empty list, found []"
        );
        assert_eq!(
            e(r#"{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}"#),
            "F:2: messages[1].role: unknown role `bot`, expected `system`, `user` or `assistant` (or `model`)"
        );
        assert_eq!(
            e(r#"{"messages": "hi"}"#),
            "F:2: key `messages`: expected a list, found a string"
        );
        assert_eq!(
            e(r#"{"messages": [{"role": "user"}]}"#),
            "F:2: messages[0]: missing key `content`"
        );
        assert_eq!(
            e(r#"{"messages": [{"role": "user", "content": 3}]}"#),
            "F:2: messages[0].content: expected a string, found number 3"
        );
        assert_eq!(
            e(r#"{"messages": ["hi"]}"#),
            "F:2: messages[0]: expected an object with `role` and `content`, found a string"
        );
        assert_eq!(
            e(r#"{"question": "a", "answer": "b"}"#),
            "F:2: line has the keys of a gsm8k line (`question` and `answer`), but the file's first line is chat (`messages`)"
        );
    }

    #[test]
    fn invalid_config_is_rejected() {
        let p = temp_file("ok.jsonl", r#"{"prompt": "a", "completion": "b"}"#);
        let bad = |c: DataConfig| load_examples(&p, &c, &CharEncoder).unwrap_err().to_string();
        assert_eq!(
            bad(DataConfig {
                max_seq_len: 1,
                ..cfg()
            }),
            "config key `data.max_seq_len`: expected at least 2, found 1"
        );
        assert_eq!(
            bad(DataConfig {
                heldout_fraction: 1.0,
                ..cfg()
            }),
            "config key `data.heldout_fraction`: expected a number in [0, 1), found 1"
        );
        assert_eq!(
            bad(DataConfig { prompt_template: "Q:".into(), ..cfg() }),
            "config key `data.prompt_template`: expected a template containing `{question}`, found \"Q:\""
        );
    }

    fn numbered(n: usize) -> Vec<Example> {
        (0..n as u32)
            .map(|i| Example {
                input_ids: vec![i, i],
                loss_mask: vec![false, true],
            })
            .collect()
    }

    #[test]
    fn heldout_split_is_disjoint_deterministic_and_ordered() {
        let (train, held) = split_heldout(numbered(100), 0.1, 7);
        assert_eq!((train.len(), held.len()), (90, 10));
        let mut all: Vec<u32> = train.iter().chain(&held).map(|e| e.input_ids[0]).collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>(), "disjoint and complete");
        let ids = |v: &[Example]| v.iter().map(|e| e.input_ids[0]).collect::<Vec<_>>();
        assert!(
            ids(&held).windows(2).all(|w| w[0] < w[1]),
            "input order kept"
        );
        let (train2, held2) = split_heldout(numbered(100), 0.1, 7);
        assert_eq!((ids(&train), ids(&held)), (ids(&train2), ids(&held2)));
        let (_, held3) = split_heldout(numbered(100), 0.1, 8);
        assert_ne!(ids(&held), ids(&held3));
        // Edge cases: at least one held out, never all, none for fraction 0.
        assert_eq!(split_heldout(numbered(3), 0.01, 0).1.len(), 1);
        assert_eq!(split_heldout(numbered(3), 1.0, 0).0.len(), 1);
        assert_eq!(split_heldout(numbered(3), 0.0, 0).1.len(), 0);
        assert_eq!(split_heldout(numbered(1), 0.5, 0), (numbered(1), vec![]));
    }
}
