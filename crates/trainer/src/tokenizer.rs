//! Tokenizers: HF tokenizer.json files and vocabularies embedded in GGUF files.
//!
//! One type, [`Tokenizer`], with two engines behind it:
//!
//! - SentencePiece BPE, for GGUF files whose `tokenizer.ggml.model` is `"llama"` (Gemma,
//!   Llama 2 and friends). The encoder is our own implementation of SentencePiece's BPE
//!   algorithm: the text is normalized (spaces become `▁`, optionally a leading `▁`), split
//!   into characters, and the adjacent pair whose concatenation is in the vocabulary with the
//!   highest score is merged, leftmost first on equal scores, until no pair is left. Pieces
//!   that are not in the vocabulary fall back to their UTF-8 bytes (`<0xNN>` tokens).
//!   Control, unknown and user-defined tokens written in the text are matched whole (longest
//!   match, left to right) and never merged with their neighbours.
//! - Hugging Face `tokenizers`, for tokenizer.json files and for GGUF files whose
//!   `tokenizer.ggml.model` is `"gpt2"` (byte-level BPE with explicit merges).
//!
//! [`Tokenizer::save_hf`] writes either kind as a tokenizer.json that Hugging Face
//! `tokenizers` and `transformers` load. A SentencePiece vocabulary is written as a BPE
//! model whose merges are derived from the scores: every pair `(l, r)` whose parts and
//! concatenation are all in the vocabulary, ranked by the score of `l + r`.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::json;

use crate::error::{Error, Result};

/// The SentencePiece whitespace symbol (U+2581).
const SPACE_SYMBOL: char = '\u{2581}';

/// Token names that end a turn in the chat templates we know; see [`Tokenizer::stop_ids`].
const END_OF_TURN_TOKENS: [&str; 3] = ["<end_of_turn>", "<|eot_id|>", "<|im_end|>"];

/// A tokenizer for one model: text to token ids and back.
pub struct Tokenizer {
    engine: Engine,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
}

enum Engine {
    Spm(Box<Spm>),
    Hf(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.engine {
            Engine::Spm(_) => "sentencepiece-bpe",
            Engine::Hf(_) => "hf-tokenizers",
        };
        f.debug_struct("Tokenizer")
            .field("kind", &kind)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

impl Tokenizer {
    /// Loads an HF tokenizer.json. tokenizer_config.json and special_tokens_map.json beside
    /// it, when present, give the bos/eos/pad tokens and `add_bos_token`; without them the
    /// bos token is the one the file's post-processor puts in front of a sequence, if any.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::model(path, "tokenizer file not found"));
        }
        let hf = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::model(path, format!("cannot load tokenizer.json: {e}")))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
        let special_map = read_json_if_present(&dir.join("special_tokens_map.json"))?;

        // The sequence the post-processor builds around an empty input, e.g. [bos].
        let template = hf
            .encode("", true)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default();

        let lookup = |key: &str| -> Result<Option<u32>> {
            let sources = [
                (config.as_ref(), "tokenizer_config.json"),
                (special_map.as_ref(), "special_tokens_map.json"),
            ];
            for (json, file) in sources {
                let Some(json) = json else { continue };
                if let Some(name) = token_name(json, key) {
                    return match hf.token_to_id(&name) {
                        Some(id) => Ok(Some(id)),
                        None => Err(Error::model(
                            dir.join(file),
                            format!(
                                "{key} `{name}` is not in the vocabulary of {}",
                                path.display()
                            ),
                        )),
                    };
                }
            }
            Ok(None)
        };
        let mut bos = lookup("bos_token")?;
        let eos = lookup("eos_token")?;
        let pad = lookup("pad_token")?;
        if bos.is_none() && template.len() == 1 {
            bos = Some(template[0]);
        }
        let add_bos = match config.as_ref().and_then(|c| c.get("add_bos_token")) {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(other) => {
                return Err(Error::model(
                    dir.join("tokenizer_config.json"),
                    format!("add_bos_token: expected true or false, found {other}"),
                ))
            }
            None => bos.is_some() && template.first() == bos.as_ref(),
        };
        Ok(Self {
            engine: Engine::Hf(Box::new(hf)),
            bos,
            eos,
            pad,
            add_bos,
        })
    }

    /// Builds the tokenizer from the vocabulary embedded in a GGUF file: `"llama"`
    /// (SentencePiece BPE with scores and byte fallback) or `"gpt2"` (byte-level BPE with
    /// `tokenizer.ggml.merges`). `path` is only used in error messages.
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let meta = Meta { content, path };
        let model = meta.string("tokenizer.ggml.model")?.ok_or_else(|| {
            meta.err("missing key tokenizer.ggml.model (expected \"llama\" or \"gpt2\")")
        })?;
        let tokens = meta
            .strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| meta.err("missing key tokenizer.ggml.tokens"))?;
        let n = tokens.len();
        if n == 0 {
            return Err(meta.err("tokenizer.ggml.tokens is empty"));
        }
        let types = match meta.ints("tokenizer.ggml.token_type")? {
            Some(t) if t.len() != n => {
                return Err(meta.err(format!(
                    "tokenizer.ggml.token_type has {} entries, expected {n} (one per entry of tokenizer.ggml.tokens)",
                    t.len()
                )))
            }
            t => t,
        };
        let special_id = |key: &str| -> Result<Option<u32>> {
            match meta.u32(key)? {
                Some(id) if id as usize >= n => Err(meta.err(format!(
                    "{key} is {id}, expected less than {n} (the vocabulary size)"
                ))),
                id => Ok(id),
            }
        };
        let bos = special_id("tokenizer.ggml.bos_token_id")?;
        let eos = special_id("tokenizer.ggml.eos_token_id")?;
        let pad = special_id("tokenizer.ggml.padding_token_id")?;
        let unk = special_id("tokenizer.ggml.unknown_token_id")?;

        let mut kinds = Vec::with_capacity(n);
        for (i, tok) in tokens.iter().enumerate() {
            let t = types.as_ref().map_or(1, |t| t[i]);
            let kind = match t {
                0 | 1 => Kind::Normal,
                2 => Kind::Unknown,
                3 => Kind::Control,
                4 => Kind::UserDefined,
                5 => Kind::Unused,
                6 => match parse_byte_piece(tok) {
                    Some(b) => Kind::Byte(b),
                    None => {
                        return Err(meta.err(format!(
                            "tokenizer.ggml.tokens[{i}] is {tok:?} with token type 6 (byte), expected the form <0xNN>"
                        )))
                    }
                },
                t => {
                    return Err(meta.err(format!(
                        "tokenizer.ggml.token_type[{i}] is {t}, expected a value in 0..=6"
                    )))
                }
            };
            kinds.push(kind);
        }

        let engine = match model {
            "llama" => {
                let scores = meta.floats("tokenizer.ggml.scores")?.ok_or_else(|| {
                    meta.err("missing key tokenizer.ggml.scores (a \"llama\" vocabulary needs one score per token)")
                })?;
                if scores.len() != n {
                    return Err(meta.err(format!(
                        "tokenizer.ggml.scores has {} entries, expected {n} (one per entry of tokenizer.ggml.tokens)",
                        scores.len()
                    )));
                }
                if let Some(u) = unk {
                    kinds[u as usize] = Kind::Unknown;
                }
                let add_space_prefix = meta
                    .bool("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(true);
                Engine::Spm(Box::new(Spm::new(tokens, scores, kinds, add_space_prefix)))
            }
            "gpt2" => {
                let merges = meta.strings("tokenizer.ggml.merges")?.ok_or_else(|| {
                    meta.err("missing key tokenizer.ggml.merges (a \"gpt2\" vocabulary needs its BPE merges)")
                })?;
                let pre = meta.string("tokenizer.ggml.pre")?;
                Engine::Hf(Box::new(byte_level_bpe(
                    &meta, tokens, &kinds, merges, pre,
                )?))
            }
            other => {
                return Err(meta.err(format!(
                    "unsupported tokenizer.ggml.model `{other}`, expected \"llama\" or \"gpt2\""
                )))
            }
        };
        let add_bos = meta
            .bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(bos.is_some() && model == "llama");
        Ok(Self {
            engine,
            bos,
            eos,
            pad,
            add_bos,
        })
    }

    /// Token ids of `text`, with the bos token in front when `add_bos` is true. Special
    /// tokens written in the text (e.g. `<start_of_turn>`) become their own ids.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if add_bos {
            match self.bos {
                Some(b) => ids.push(b),
                None => {
                    return Err(Error::Tokenizer(
                        "bos requested but the vocabulary has no bos token".into(),
                    ))
                }
            }
        }
        match &self.engine {
            Engine::Spm(spm) => spm.encode(text, &mut ids),
            Engine::Hf(hf) => {
                let enc = hf
                    .encode(text, false)
                    .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
                ids.extend_from_slice(enc.get_ids());
            }
        }
        Ok(ids)
    }

    /// The text of `ids`. With `skip_special`, control tokens (bos, eos, pad, turn markers,
    /// ...) are left out. An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let n = self.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= n) {
            return Err(Error::Tokenizer(format!(
                "token id {bad} is out of range, expected less than {n} (the vocabulary size)"
            )));
        }
        match &self.engine {
            Engine::Spm(spm) => Ok(spm.decode(ids, skip_special)),
            Engine::Hf(hf) => hf
                .decode(ids, skip_special)
                .map_err(|e| Error::Tokenizer(format!("cannot decode ids: {e}"))),
        }
    }

    /// The vocabulary entry of `id` as stored (e.g. `"▁the"`, `"<0x0A>"`, `"Ġthe"`).
    pub fn piece(&self, id: u32) -> Option<String> {
        match &self.engine {
            Engine::Spm(spm) => spm.pieces.get(id as usize).cloned(),
            Engine::Hf(hf) => hf.id_to_token(id),
        }
    }

    /// The id of a vocabulary entry written as stored (see [`Tokenizer::piece`]).
    pub fn token_id(&self, piece: &str) -> Option<u32> {
        match &self.engine {
            Engine::Spm(spm) => spm.ids.get(piece).copied(),
            Engine::Hf(hf) => hf.token_to_id(piece),
        }
    }

    /// The beginning-of-sequence token, if the vocabulary names one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token, if the vocabulary names one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The padding token, if the vocabulary names one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// Ids that end a generation: eos, then the end-of-turn tokens present in the vocabulary
    /// (`<end_of_turn>`, `<|eot_id|>`, `<|im_end|>`), without repeats.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos.into_iter().collect();
        for name in END_OF_TURN_TOKENS {
            if let Some(id) = self.token_id(name) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// Whether the model expects a bos token in front of every sequence.
    pub fn add_bos_default(&self) -> bool {
        self.add_bos
    }

    /// The number of token ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        match &self.engine {
            Engine::Spm(spm) => spm.pieces.len(),
            Engine::Hf(hf) => hf.get_vocab_size(true),
        }
    }

    /// Writes `dir/tokenizer.json` and `dir/tokenizer_config.json` (bos, eos, pad, unk,
    /// `add_bos_token`) so that HF `tokenizers` and `transformers` load the tokenizer and
    /// encode text to the same ids. The folder is created when missing.
    ///
    /// A SentencePiece vocabulary becomes a BPE model with byte fallback whose merges are
    /// derived from the scores. Two corners of SentencePiece have no exact equivalent there:
    /// - Where two merges that make the same piece overlap (`ab|a|ba` making `aba` either
    ///   way), SentencePiece takes the left one and HF BPE the one ranked first. A check on
    ///   47k strings (`scripts/reference/spm_golden.py --corpus --random`) met no such case.
    /// - With a space prefix (Llama 2 style vocabularies), HF adds the `▁` to every stretch
    ///   of text after a special token, SentencePiece only at the start of the text.
    ///
    /// User-defined tokens are written with `▁` for their spaces, so [`Tokenizer::piece`]
    /// of a reloaded tokenizer shows `"▁▁"` where the GGUF stores `"  "`.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tokenizer_path = dir.join("tokenizer.json");
        let unk;
        match &self.engine {
            Engine::Spm(spm) => {
                unk = spm.unk.map(|u| spm.pieces[u as usize].clone());
                let file = std::fs::File::create(&tokenizer_path)
                    .map_err(|e| Error::io(&tokenizer_path, e))?;
                let mut w = std::io::BufWriter::new(file);
                let bos = if self.add_bos { self.bos } else { None };
                spm.write_hf_json(&mut w, bos).map_err(|e| {
                    Error::model(&tokenizer_path, format!("cannot write tokenizer.json: {e}"))
                })?;
                std::io::Write::flush(&mut w).map_err(|e| Error::io(&tokenizer_path, e))?;
            }
            Engine::Hf(hf) => {
                unk = None;
                let mut hf = hf.as_ref().clone();
                if self.add_bos && hf.get_post_processor().is_none() {
                    if let Some(bos) = self.bos {
                        let name = hf.id_to_token(bos).unwrap_or_default();
                        hf.with_post_processor(Some(bos_template(&name, bos)?));
                    }
                }
                hf.save(&tokenizer_path, false).map_err(|e| {
                    Error::model(&tokenizer_path, format!("cannot write tokenizer.json: {e}"))
                })?;
            }
        }
        let name = |id: Option<u32>| id.and_then(|i| self.piece(i));
        let config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "bos_token": name(self.bos),
            "eos_token": name(self.eos),
            "pad_token": name(self.pad),
            "unk_token": unk,
            "clean_up_tokenization_spaces": false,
        });
        let config_path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&config).expect("a json value serializes");
        std::fs::write(&config_path, text + "\n").map_err(|e| Error::io(&config_path, e))?;
        Ok(())
    }
}

/// A post-processor that puts `name` (id `bos`) in front of every sequence.
fn bos_template(
    name: &str,
    bos: u32,
) -> Result<tokenizers::processors::template::TemplateProcessing> {
    use tokenizers::processors::template::TemplateProcessing;
    let err =
        |e: String| Error::Tokenizer(format!("cannot build the bos template for `{name}`: {e}"));
    TemplateProcessing::builder()
        .try_single(vec![name.to_string(), "$A".to_string()])
        .map_err(|e| err(e.to_string()))?
        .try_pair(vec![
            name.to_string(),
            "$A".to_string(),
            name.to_string(),
            "$B".to_string(),
        ])
        .map_err(|e| err(e.to_string()))?
        .special_tokens(vec![(name.to_string(), bos)])
        .build()
        .map_err(|e| err(e.to_string()))
}

fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::model(path, format!("invalid json: {e}")))
}

/// A token named in tokenizer_config.json or special_tokens_map.json: a string or an object
/// with a `content` string.
fn token_name(json: &serde_json::Value, key: &str) -> Option<String> {
    match json.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

// ---------------------------------------------------------------------------------------
// GGUF metadata access

struct Meta<'a> {
    content: &'a gguf_file::Content,
    path: &'a Path,
}

impl Meta<'_> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::model(self.path, msg)
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> Error {
        self.err(format!(
            "{key}: expected {expected}, found a value of type {:?}",
            found.value_type()
        ))
    }

    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong_type(key, "a string", v)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, "a bool", v)),
        }
    }

    fn u32(&self, key: &str) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match int_value(v).and_then(|i| u32::try_from(i).ok()) {
                Some(i) => Ok(Some(i)),
                None => Err(self.wrong_type(key, "a non-negative integer", v)),
            },
        }
    }

    fn array(&self, key: &str) -> Result<Option<&Vec<Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong_type(key, "an array", v)),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(a) = self.array(key)? else {
            return Ok(None);
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                v => Err(self.wrong_type(&format!("{key}[{i}]"), "a string", v)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(a) = self.array(key)? else {
            return Ok(None);
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                v => Err(self.wrong_type(&format!("{key}[{i}]"), "a float", v)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(a) = self.array(key)? else {
            return Ok(None);
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| {
                int_value(v).ok_or_else(|| self.wrong_type(&format!("{key}[{i}]"), "an integer", v))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

fn int_value(v: &Value) -> Option<i64> {
    Some(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => i64::try_from(x).ok()?,
        Value::I64(x) => x,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------
// Byte-level BPE ("gpt2") vocabularies, built on HF tokenizers

/// The GPT-2 split regex with digits split one by one, as used by SmolLM and StarCoder.
const PRE_DIGITS_THEN_GPT2: &[&str] = &["smollm", "starcoder", "refact"];
const PRE_GPT2: &[&str] = &["gpt2", "gpt-2"];
const PRE_LLAMA3: &[&str] = &["llama-bpe", "llama3", "dbrx", "smaug-bpe"];
const PRE_QWEN2: &[&str] = &["qwen2", "deepseek-r1-qwen"];

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level_bpe(
    meta: &Meta<'_>,
    tokens: Vec<String>,
    kinds: &[Kind],
    merges: Vec<String>,
    pre: Option<&str>,
) -> Result<tokenizers::Tokenizer> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

    let pre_name = pre.unwrap_or("gpt2");
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        let s = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| {
            meta.err(format!(
                "tokenizer.ggml.pre `{pre_name}`: bad split regex: {e}"
            ))
        })?;
        Ok(s.into())
    };
    let (pre_tokenizer, ignore_merges): (PreTokenizerWrapper, bool) = if PRE_GPT2
        .contains(&pre_name)
    {
        (ByteLevel::new(false, true, true).into(), false)
    } else if PRE_LLAMA3.contains(&pre_name) {
        (
            Sequence::new(vec![
                split(LLAMA3_SPLIT)?,
                ByteLevel::new(false, true, false).into(),
            ])
            .into(),
            true,
        )
    } else if PRE_QWEN2.contains(&pre_name) {
        (
            Sequence::new(vec![
                split(QWEN2_SPLIT)?,
                ByteLevel::new(false, true, false).into(),
            ])
            .into(),
            false,
        )
    } else if PRE_DIGITS_THEN_GPT2.contains(&pre_name) {
        (
            Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            false,
        )
    } else {
        let known: Vec<&str> = [PRE_GPT2, PRE_LLAMA3, PRE_QWEN2, PRE_DIGITS_THEN_GPT2]
            .iter()
            .flat_map(|l| l.iter().copied())
            .collect();
        return Err(meta.err(format!(
            "unsupported tokenizer.ggml.pre `{pre_name}` for a \"gpt2\" vocabulary, expected one of: {}",
            known.join(", ")
        )));
    };

    let mut pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.into_iter().enumerate() {
        match m.split_once(' ') {
            Some((l, r)) if !l.is_empty() && !r.is_empty() && !r.contains(' ') => {
                pairs.push((l.to_string(), r.to_string()))
            }
            _ => {
                return Err(meta.err(format!(
                "tokenizer.ggml.merges[{i}] is {m:?}, expected two tokens separated by one space"
            )))
            }
        }
    }
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        if vocab.insert(t.clone(), i as u32).is_some() {
            return Err(meta.err(format!(
                "tokenizer.ggml.tokens[{i}] {t:?} appears twice, expected unique tokens"
            )));
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| meta.err(format!("tokenizer.ggml.merges: {e}")))?;
    let mut hf = tokenizers::Tokenizer::new(bpe);
    hf.with_pre_tokenizer(Some(pre_tokenizer));
    hf.with_decoder(Some(ByteLevelDecoder::default()));
    let mut special = Vec::new();
    let mut added = Vec::new();
    for (t, k) in tokens.iter().zip(kinds) {
        match k {
            Kind::Control | Kind::Unknown => special.push(AddedToken::from(t.clone(), true)),
            Kind::UserDefined => added.push(AddedToken::from(t.clone(), false).normalized(false)),
            _ => {}
        }
    }
    hf.add_special_tokens(&special);
    hf.add_tokens(&added);
    Ok(hf)
}

// ---------------------------------------------------------------------------------------
// SentencePiece BPE

/// The role of a vocabulary entry (GGUF token types, which are SentencePiece's piece types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    /// In the vocabulary and reachable by merges, but split back into the two pieces it
    /// was merged from (SentencePiece's treatment of unused pieces).
    Unused,
    Byte(u8),
}

impl Kind {
    /// Whether a merge may produce this piece.
    fn mergeable(self) -> bool {
        matches!(self, Kind::Normal | Kind::UserDefined | Kind::Unused)
    }
}

/// A SentencePiece BPE vocabulary and its encoder.
struct Spm {
    pieces: Vec<String>,
    scores: Vec<f32>,
    kinds: Vec<Kind>,
    /// Every piece by its stored text (the first id wins for repeated text).
    ids: HashMap<String, u32>,
    /// Byte-fallback ids when all 256 byte pieces are present.
    byte_ids: Option<Box<[u32; 256]>>,
    unk: Option<u32>,
    add_space_prefix: bool,
    has_unused: bool,
    specials: SpecialMatcher,
}

impl Spm {
    fn new(
        pieces: Vec<String>,
        scores: Vec<f32>,
        kinds: Vec<Kind>,
        add_space_prefix: bool,
    ) -> Self {
        let mut ids = HashMap::with_capacity(pieces.len());
        let mut bytes = [u32::MAX; 256];
        let mut unk = None;
        let mut specials = SpecialMatcher::default();
        for (i, (p, k)) in pieces.iter().zip(&kinds).enumerate() {
            let id = i as u32;
            ids.entry(p.clone()).or_insert(id);
            match *k {
                Kind::Byte(b) if bytes[b as usize] == u32::MAX => bytes[b as usize] = id,
                Kind::Unknown if unk.is_none() => unk = Some(id),
                _ => {}
            }
            // Matched in the normalized text, where every space is already "▁". GGUF
            // converters store user-defined tokens with "▁" written as a space.
            if matches!(k, Kind::Control | Kind::Unknown | Kind::UserDefined) && !p.is_empty() {
                specials.insert(p.replace(' ', "\u{2581}"), id);
            }
        }
        specials.finish();
        let byte_ids = bytes
            .iter()
            .all(|&b| b != u32::MAX)
            .then(|| Box::new(bytes));
        let has_unused = kinds.contains(&Kind::Unused);
        Self {
            pieces,
            scores,
            kinds,
            ids,
            byte_ids,
            unk,
            add_space_prefix,
            has_unused,
            specials,
        }
    }

    fn encode(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut norm = String::with_capacity(text.len() + text.len() / 2 + 3);
        if self.add_space_prefix {
            norm.push(SPACE_SYMBOL);
        }
        for c in text.chars() {
            norm.push(if c == ' ' { SPACE_SYMBOL } else { c });
        }
        let bytes = norm.as_bytes();
        let (mut start, mut i) = (0, 0);
        while i < bytes.len() {
            if let Some((len, id)) = self.specials.longest_at(bytes, i) {
                self.bpe(&norm[start..i], out);
                out.push(id);
                i += len;
                start = i;
            } else {
                i += utf8_len(bytes[i]);
            }
        }
        self.bpe(&norm[start..], out);
    }

    /// The id of a piece that a merge may produce.
    fn mergeable_id(&self, piece: &str) -> Option<u32> {
        self.ids
            .get(piece)
            .copied()
            .filter(|&id| self.kinds[id as usize].mergeable())
    }

    /// SentencePiece's BPE on one normalized segment free of special tokens.
    fn bpe<'s>(&self, s: &'s str, out: &mut Vec<u32>) {
        if s.is_empty() {
            return;
        }
        let mut syms: Vec<Symbol> = Vec::with_capacity(s.len());
        for (start, c) in s.char_indices() {
            let n = syms.len();
            syms.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: n.checked_sub(1),
                next: None,
            });
            if n > 0 {
                syms[n - 1].next = Some(n);
            }
        }
        let mut heap = BinaryHeap::with_capacity(syms.len());
        // How an unused piece was formed, to split it back; the last candidate wins, as in
        // SentencePiece.
        let mut rev_merge: HashMap<&'s str, (&'s str, &'s str)> = HashMap::new();
        let push_pair = |syms: &[Symbol],
                         heap: &mut BinaryHeap<Candidate>,
                         rev: &mut HashMap<&'s str, (&'s str, &'s str)>,
                         left: Option<usize>,
                         right: Option<usize>| {
            let (Some(l), Some(r)) = (left, right) else {
                return;
            };
            let (a, b) = (&syms[l], &syms[r]);
            let piece = &s[a.start..b.start + b.len];
            let Some(id) = self.mergeable_id(piece) else {
                return;
            };
            heap.push(Candidate {
                score: self.scores[id as usize],
                left: l,
                right: r,
                len: piece.len(),
            });
            if self.has_unused && self.kinds[id as usize] == Kind::Unused {
                rev.insert(
                    piece,
                    (&s[a.start..a.start + a.len], &s[b.start..b.start + b.len]),
                );
            }
        };
        for i in 1..syms.len() {
            push_pair(&syms, &mut heap, &mut rev_merge, Some(i - 1), Some(i));
        }
        while let Some(top) = heap.pop() {
            let (l, r) = (top.left, top.right);
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != top.len {
                continue; // stale: one side has merged since
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            let next = syms[r].next;
            syms[l].next = next;
            if let Some(n) = next {
                syms[n].prev = Some(l);
            }
            let prev = syms[l].prev;
            push_pair(&syms, &mut heap, &mut rev_merge, prev, Some(l));
            push_pair(&syms, &mut heap, &mut rev_merge, Some(l), next);
        }
        let mut prev_unk = false;
        let mut cur = Some(0);
        while let Some(i) = cur {
            let sym = &syms[i];
            self.emit(
                &s[sym.start..sym.start + sym.len],
                &rev_merge,
                out,
                &mut prev_unk,
            );
            cur = sym.next;
        }
    }

    /// Appends the ids of one final symbol: its id, the pieces an unused piece was merged
    /// from, or its bytes when it is not in the vocabulary.
    fn emit(
        &self,
        piece: &str,
        rev_merge: &HashMap<&str, (&str, &str)>,
        out: &mut Vec<u32>,
        prev_unk: &mut bool,
    ) {
        match self.ids.get(piece) {
            Some(&id)
                if self.kinds[id as usize] == Kind::Unused && rev_merge.contains_key(piece) =>
            {
                let (a, b) = rev_merge[piece];
                self.emit(a, rev_merge, out, prev_unk);
                self.emit(b, rev_merge, out, prev_unk);
            }
            Some(&id) => {
                out.push(id);
                *prev_unk = false;
            }
            None => match (&self.byte_ids, self.unk) {
                (Some(bytes), _) => {
                    out.extend(piece.bytes().map(|b| bytes[b as usize]));
                    *prev_unk = false;
                }
                (None, Some(unk)) => {
                    // Runs of unknown pieces become one unknown token, as in SentencePiece.
                    if !*prev_unk {
                        out.push(unk);
                    }
                    *prev_unk = true;
                }
                (None, None) => *prev_unk = false,
            },
        }
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut text = String::new();
        let mut bytes = Vec::new();
        for &id in ids {
            let kind = self.kinds[id as usize];
            if let Kind::Byte(b) = kind {
                bytes.push(b);
                continue;
            }
            flush_bytes(&mut bytes, &mut text);
            if skip_special && matches!(kind, Kind::Control | Kind::Unknown) {
                continue;
            }
            text.extend(self.pieces[id as usize].chars().map(|c| {
                if c == SPACE_SYMBOL {
                    ' '
                } else {
                    c
                }
            }));
        }
        flush_bytes(&mut bytes, &mut text);
        if self.add_space_prefix && text.starts_with(' ') {
            text.remove(0);
        }
        text
    }

    /// The merges of the equivalent HF BPE model: every `(l, r)` whose concatenation is a
    /// normal piece and whose parts can be BPE symbols (normal pieces, or single
    /// characters in the vocabulary), best score first.
    fn derived_merges(&self) -> Vec<(&str, &str)> {
        let symbol_ok = |p: &str| {
            self.ids.get(p).is_some_and(|&id| {
                let k = self.kinds[id as usize];
                k == Kind::Normal || (p.chars().nth(1).is_none() && !matches!(k, Kind::Byte(_)))
            })
        };
        let mut merges: Vec<(f32, u32, usize)> = Vec::new();
        for (id, piece) in self.pieces.iter().enumerate() {
            if self.kinds[id] != Kind::Normal || self.ids.get(piece.as_str()) != Some(&(id as u32))
            {
                continue;
            }
            for (k, _) in piece.char_indices().skip(1) {
                if symbol_ok(&piece[..k]) && symbol_ok(&piece[k..]) {
                    merges.push((self.scores[id], id as u32, k));
                }
            }
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        merges
            .into_iter()
            .map(|(_, id, k)| {
                let p = self.pieces[id as usize].as_str();
                (&p[..k], &p[k..])
            })
            .collect()
    }

    /// Writes the HF tokenizer.json of this vocabulary.
    fn write_hf_json<W: std::io::Write>(&self, w: W, bos: Option<u32>) -> serde_json::Result<()> {
        // Special tokens are matched in the raw text, user-defined ones in the normalized
        // text (spaces already "▁"), as SentencePiece does.
        let content = |i: usize| -> String {
            if self.kinds[i] == Kind::UserDefined {
                self.pieces[i].replace(' ', "\u{2581}")
            } else {
                self.pieces[i].clone()
            }
        };
        let added: Vec<serde_json::Value> = (0..self.pieces.len())
            .filter(|&i| {
                matches!(
                    self.kinds[i],
                    Kind::Control | Kind::Unknown | Kind::UserDefined
                )
            })
            .map(|i| {
                let special = self.kinds[i] != Kind::UserDefined;
                json!({
                    "id": i, "content": content(i), "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": !special, "special": special,
                })
            })
            .collect();
        let replace_space =
            json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
        let normalizer = if self.add_space_prefix {
            let prepend = json!({"type": "Prepend", "prepend": "\u{2581}"});
            json!({"type": "Sequence", "normalizers": [prepend, replace_space]})
        } else {
            replace_space
        };
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if self.add_space_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let post_processor = bos.map(|b| {
            let name = &self.pieces[b as usize];
            let special = |s: &str| json!({"SpecialToken": {"id": s, "type_id": 0}});
            let seq = |s: &str| json!({"Sequence": {"id": s, "type_id": 0}});
            json!({
                "type": "TemplateProcessing",
                "single": [special(name), seq("A")],
                "pair": [special(name), seq("A"), special(name), seq("B")],
                "special_tokens": {name.as_str(): {"id": name, "ids": [b], "tokens": [name]}},
            })
        });
        let vocab: Vec<(String, u32)> = (0..self.pieces.len())
            .map(|i| (content(i), i as u32))
            .collect();
        let merges = self.derived_merges();
        let file = HfFile {
            version: "1.0",
            truncation: None,
            padding: None,
            added_tokens: added,
            normalizer,
            pre_tokenizer: None,
            post_processor,
            decoder: json!({"type": "Sequence", "decoders": decoders}),
            model: HfBpe {
                kind: "BPE",
                dropout: None,
                unk_token: self.unk.map(|u| self.pieces[u as usize].as_str()),
                continuing_subword_prefix: None,
                end_of_word_suffix: None,
                fuse_unk: true,
                byte_fallback: self.byte_ids.is_some(),
                ignore_merges: false,
                vocab: VocabMap(&vocab),
                merges,
            },
        };
        serde_json::to_writer(w, &file)
    }
}

#[derive(serde::Serialize)]
struct HfFile<'a> {
    version: &'static str,
    truncation: Option<()>,
    padding: Option<()>,
    added_tokens: Vec<serde_json::Value>,
    normalizer: serde_json::Value,
    pre_tokenizer: Option<()>,
    post_processor: Option<serde_json::Value>,
    decoder: serde_json::Value,
    model: HfBpe<'a>,
}

#[derive(serde::Serialize)]
struct HfBpe<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f32>,
    unk_token: Option<&'a str>,
    continuing_subword_prefix: Option<&'a str>,
    end_of_word_suffix: Option<&'a str>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: VocabMap<'a>,
    merges: Vec<(&'a str, &'a str)>,
}

/// A vocabulary serialized as a JSON object in id order.
struct VocabMap<'a>(&'a [(String, u32)]);

impl Serialize for VocabMap<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut seen = std::collections::HashSet::with_capacity(self.0.len());
        let mut map = s.serialize_map(None)?;
        for (piece, id) in self.0 {
            // A JSON object cannot hold a key twice; the first id keeps the text.
            if seen.insert(piece.as_str()) {
                map.serialize_entry(piece, id)?;
            }
        }
        map.end()
    }
}

/// Appends pending byte-fallback bytes: their text when they are valid UTF-8, else one
/// U+FFFD per byte (as HF's ByteFallback decoder does).
fn flush_bytes(bytes: &mut Vec<u8>, text: &mut String) {
    if bytes.is_empty() {
        return;
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => text.push_str(s),
        Err(_) => text.extend(std::iter::repeat_n('\u{FFFD}', bytes.len())),
    }
    bytes.clear();
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    /// Byte length; 0 once merged into the symbol on its left.
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A merge candidate: the higher score first, then the leftmost.
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Longest-match lookup of special tokens at a position of the normalized text.
#[derive(Default)]
struct SpecialMatcher {
    by_text: HashMap<Box<[u8]>, u32>,
    /// Distinct token lengths in bytes, longest first.
    lens: Vec<usize>,
    first_byte: Vec<bool>,
}

impl SpecialMatcher {
    fn insert(&mut self, text: String, id: u32) {
        let bytes = text.into_bytes().into_boxed_slice();
        if !self.lens.contains(&bytes.len()) {
            self.lens.push(bytes.len());
        }
        if self.first_byte.is_empty() {
            self.first_byte = vec![false; 256];
        }
        self.first_byte[bytes[0] as usize] = true;
        self.by_text.entry(bytes).or_insert(id);
    }

    fn finish(&mut self) {
        self.lens.sort_unstable_by(|a, b| b.cmp(a));
    }

    fn longest_at(&self, text: &[u8], i: usize) -> Option<(usize, u32)> {
        if !self
            .first_byte
            .get(text[i] as usize)
            .copied()
            .unwrap_or(false)
        {
            return None;
        }
        let rest = &text[i..];
        self.lens
            .iter()
            .filter(|&&len| len <= rest.len())
            .find_map(|&len| self.by_text.get(&rest[..len]).map(|&id| (len, id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny SentencePiece vocabulary: pieces with scores and kinds.
    fn spm(entries: &[(&str, f32, Kind)], add_space_prefix: bool) -> Tokenizer {
        let pieces = entries.iter().map(|e| e.0.to_string()).collect();
        let scores = entries.iter().map(|e| e.1).collect();
        let kinds = entries.iter().map(|e| e.2).collect();
        let spm = Spm::new(pieces, scores, kinds, add_space_prefix);
        Tokenizer {
            engine: Engine::Spm(Box::new(spm)),
            bos: Some(1),
            eos: Some(2),
            pad: None,
            add_bos: true,
        }
    }

    fn base() -> Vec<(&'static str, f32, Kind)> {
        use Kind::*;
        vec![
            ("<unk>", 0.0, Unknown),
            ("<s>", 0.0, Control),
            ("</s>", 0.0, Control),
            ("<turn>", 0.0, Control),
            ("  ", 0.0, UserDefined), // stored with a space, as GGUF converters write it
            ("a", -1.0, Normal),
            ("b", -2.0, Normal),
            ("c", -3.0, Normal),
            ("\u{2581}", -4.0, Normal),
            ("ab", -5.0, Normal),
            ("bc", -6.0, Normal),
            ("abc", -7.0, Normal),
            ("\u{2581}a", -8.0, Normal),
        ]
    }

    fn with_bytes(mut v: Vec<(&'static str, f32, Kind)>) -> Vec<(String, f32, Kind)> {
        let mut out: Vec<(String, f32, Kind)> =
            v.drain(..).map(|(p, s, k)| (p.to_string(), s, k)).collect();
        for b in 0..=255u8 {
            out.push((format!("<0x{b:02X}>"), 0.0, Kind::Byte(b)));
        }
        out
    }

    fn spm_owned(entries: &[(String, f32, Kind)], prefix: bool) -> Tokenizer {
        let e: Vec<(&str, f32, Kind)> = entries
            .iter()
            .map(|(p, s, k)| (p.as_str(), *s, *k))
            .collect();
        spm(&e, prefix)
    }

    #[test]
    fn merges_by_score_not_by_position() {
        // "abc": ab (-5) beats bc (-6), then ab+c -> abc.
        let t = spm(&base(), false);
        assert_eq!(t.encode("abc", false).unwrap(), vec![11]);
        // "bca": bc, then bc+a is not a piece.
        assert_eq!(t.encode("bca", false).unwrap(), vec![10, 5]);
        // a space becomes ▁ and merges with a following a.
        assert_eq!(t.encode("b a", false).unwrap(), vec![6, 12]);
        assert_eq!(t.encode("b a", true).unwrap(), vec![1, 6, 12]);
    }

    #[test]
    fn equal_scores_merge_leftmost_first() {
        use Kind::*;
        // "aaa" with "aa" in the vocabulary: the left pair merges first.
        let t = spm(
            &[
                ("<unk>", 0.0, Unknown),
                ("a", -1.0, Normal),
                ("aa", -2.0, Normal),
            ],
            false,
        );
        assert_eq!(t.encode("aaa", false).unwrap(), vec![2, 1]);
    }

    #[test]
    fn specials_and_user_defined_are_matched_whole() {
        let t = spm(&base(), false);
        // <turn> is recognised; "a  b" keeps the two-space user-defined token, which stops
        // the second space from merging with the a that follows.
        assert_eq!(t.encode("a<turn>b", false).unwrap(), vec![5, 3, 6]);
        assert_eq!(t.encode("b  a", false).unwrap(), vec![6, 4, 5]);
        assert_eq!(t.encode("b   a", false).unwrap(), vec![6, 4, 12]);
        assert_eq!(t.decode(&[6, 4, 12], false).unwrap(), "b   a");
        assert_eq!(t.decode(&[1, 5, 3, 6, 2], true).unwrap(), "ab");
        assert_eq!(
            t.decode(&[1, 5, 3, 6, 2], false).unwrap(),
            "<s>a<turn>b</s>"
        );
    }

    #[test]
    fn byte_fallback_and_unknown_runs() {
        let with = with_bytes(base());
        let t = spm_owned(&with, false);
        let b = |x: u8| 13 + x as u32;
        assert_eq!(t.encode("aé", false).unwrap(), vec![5, b(0xC3), b(0xA9)]);
        assert_eq!(t.decode(&[5, b(0xC3), b(0xA9)], false).unwrap(), "aé");
        // An incomplete UTF-8 sequence decodes to one replacement character per byte.
        assert_eq!(t.decode(&[b(0xC3), 5], false).unwrap(), "\u{FFFD}a");
        // Without byte pieces, a run of unknown characters is one <unk>.
        let t = spm(&base(), false);
        assert_eq!(t.encode("aéèb", false).unwrap(), vec![5, 0, 6]);
    }

    #[test]
    fn unused_pieces_are_split_back() {
        use Kind::*;
        // "ab" is unused: it is merged (so a and b cannot merge elsewhere) and then split back.
        let t = spm(
            &[
                ("<unk>", 0.0, Unknown),
                ("a", -1.0, Normal),
                ("b", -2.0, Normal),
                ("ab", -3.0, Unused),
                ("bb", -4.0, Normal),
            ],
            false,
        );
        assert_eq!(t.encode("abb", false).unwrap(), vec![1, 2, 2]);
    }

    #[test]
    fn space_prefix_is_added_and_removed() {
        let t = spm(&base(), true);
        assert_eq!(t.encode("a", false).unwrap(), vec![12]);
        assert_eq!(t.encode("", false).unwrap(), Vec::<u32>::new());
        assert_eq!(t.decode(&[12, 8, 5], false).unwrap(), "a a");
    }

    #[test]
    fn derived_merges_rank_by_score() {
        let t = spm(&base(), false);
        let Engine::Spm(s) = &t.engine else {
            unreachable!()
        };
        let merges = s.derived_merges();
        assert_eq!(
            merges,
            vec![
                ("a", "b"),
                ("b", "c"),
                ("a", "bc"),
                ("ab", "c"),
                ("\u{2581}", "a")
            ]
        );
    }

    #[test]
    fn tokenizer_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
    }

    #[test]
    fn out_of_range_ids_are_an_error() {
        let t = spm(&base(), false);
        let err = t.decode(&[5, 99], false).unwrap_err().to_string();
        assert!(err.contains("token id 99") && err.contains("13"), "{err}");
    }
}

impl crate::data::TextEncoder for Tokenizer {
    fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        Tokenizer::encode(self, text, add_bos)
    }
    fn bos_id(&self) -> Option<u32> {
        Tokenizer::bos_id(self)
    }
    fn eos_id(&self) -> Option<u32> {
        Tokenizer::eos_id(self)
    }
    fn pad_id(&self) -> Option<u32> {
        Tokenizer::pad_id(self)
    }
}
