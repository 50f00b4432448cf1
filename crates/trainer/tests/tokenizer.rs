//! Tokenizer tests: golden ids from the `sentencepiece` library for the Gemma 3 vocabulary
//! (skipped with a printed reason when the GGUF file is absent), round trips through
//! decode and through a saved tokenizer.json, a hand-worked byte-level BPE vocabulary
//! written as a tiny GGUF file, and bad GGUF vocabularies.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::{self, Value};
use ftbench_trainer::tokenizer::Tokenizer;

/// Golden ids written by scripts/reference/spm_golden.py.
const GOLDEN: &str = include_str!("data/gemma3_spm_golden.json");

struct Case {
    text: String,
    ids: Vec<u32>,
}

fn golden_cases() -> (usize, Vec<Case>) {
    parse_cases(GOLDEN)
}

fn parse_cases(json: &str) -> (usize, Vec<Case>) {
    let v: serde_json::Value = serde_json::from_str(json).expect("golden fixture is valid json");
    let vocab_size = v["vocab_size"].as_u64().expect("vocab_size") as usize;
    let cases = v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("text").to_string(),
            ids: c["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|i| i.as_u64().expect("id") as u32)
                .collect(),
        })
        .collect();
    (vocab_size, cases)
}

fn gemma_path() -> PathBuf {
    match std::env::var_os("FTBENCH_GEMMA3_GGUF") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/gemma-3-270m-q4_k_m.gguf"),
    }
}

struct Loaded {
    tokenizer: Tokenizer,
    read_gguf: Duration,
    build: Duration,
}

/// The Gemma 3 tokenizer, loaded once per test binary; None (after printing why) when the
/// GGUF file is absent.
fn gemma() -> Option<&'static Loaded> {
    static LOADED: OnceLock<Option<Loaded>> = OnceLock::new();
    let loaded = LOADED.get_or_init(|| {
        let path = gemma_path();
        if !path.is_file() {
            return None;
        }
        let t0 = Instant::now();
        let mut f = std::fs::File::open(&path).expect("open gguf");
        let content = gguf_file::Content::read(&mut f).expect("read gguf");
        let read_gguf = t0.elapsed();
        let t1 = Instant::now();
        let tokenizer = Tokenizer::from_gguf(&content, &path).expect("tokenizer from gguf");
        let build = t1.elapsed();
        Some(Loaded {
            tokenizer,
            read_gguf,
            build,
        })
    });
    if loaded.is_none() {
        eprintln!(
            "skipped: Gemma 3 GGUF not found at {} (set FTBENCH_GEMMA3_GGUF to its path)",
            gemma_path().display()
        );
    }
    loaded.as_ref()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ftbench-tokenizer-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Compares ids case by case and panics with every mismatch.
fn check_ids(what: &str, cases: &[Case], encode: impl Fn(&str) -> Vec<u32>) {
    let mut bad = Vec::new();
    for c in cases {
        let got = encode(&c.text);
        if got != c.ids {
            bad.push(format!(
                "{:?}\n  expected {:?}\n  found    {:?}",
                c.text, c.ids, got
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {} cases differ:\n{}",
        bad.len(),
        cases.len(),
        bad.join("\n")
    );
}

#[test]
fn gemma3_ids_match_sentencepiece() {
    let Some(g) = gemma() else { return };
    let (vocab_size, cases) = golden_cases();
    let t = &g.tokenizer;
    eprintln!(
        "gemma 3 vocabulary: {} entries, gguf metadata read in {:.3} s, tokenizer built in {:.3} s",
        t.vocab_size(),
        g.read_gguf.as_secs_f64(),
        g.build.as_secs_f64()
    );
    assert_eq!(t.vocab_size(), vocab_size, "vocabulary size of the fixture");
    check_ids("sentencepiece golden ids", &cases, |s| {
        t.encode(s, false).unwrap()
    });

    if let Some((extra, cases)) = extra_cases() {
        let bytes: usize = cases.iter().map(|c| c.text.len()).sum();
        let t0 = Instant::now();
        check_ids("extra sentencepiece golden ids", &cases, |s| {
            t.encode(s, false).unwrap()
        });
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "{}: {} cases, {bytes} bytes encoded in {secs:.2} s ({:.1} MB/s)",
            extra.display(),
            cases.len(),
            bytes as f64 / secs / 1e6
        );
    }
}

/// A larger fixture written by `spm_golden.py --corpus/--random`, when
/// FTBENCH_SPM_GOLDEN_EXTRA names one.
fn extra_cases() -> Option<(PathBuf, Vec<Case>)> {
    let path = PathBuf::from(std::env::var_os("FTBENCH_SPM_GOLDEN_EXTRA")?);
    let json = std::fs::read_to_string(&path).expect("read FTBENCH_SPM_GOLDEN_EXTRA");
    Some((path, parse_cases(&json).1))
}

/// What decoding gives back: the text itself, except that a literal U+2581 comes back as a
/// space (SentencePiece writes spaces as U+2581, so its decoder cannot tell them apart).
fn decoded(text: &str) -> String {
    text.replace('\u{2581}', " ")
}

#[test]
fn gemma3_decode_inverts_encode() {
    let Some(g) = gemma() else { return };
    let (_, cases) = golden_cases();
    for c in &cases {
        let ids = g.tokenizer.encode(&c.text, false).unwrap();
        assert_eq!(
            g.tokenizer.decode(&ids, false).unwrap(),
            decoded(&c.text),
            "ids {ids:?}"
        );
    }
}

#[test]
fn gemma3_special_tokens() {
    let Some(g) = gemma() else { return };
    let t = &g.tokenizer;
    assert_eq!(
        (t.bos_id(), t.eos_id(), t.pad_id()),
        (Some(2), Some(1), Some(0))
    );
    assert!(t.add_bos_default());
    assert_eq!(t.stop_ids(), vec![1, 106]);
    assert_eq!(t.piece(248).as_deref(), Some("<0x0A>"));
    assert_eq!(t.piece(106).as_deref(), Some("<end_of_turn>"));
    assert_eq!(t.token_id("\u{2581}the"), Some(506));
    assert_eq!(t.piece(t.vocab_size() as u32), None);
    let ids = t
        .encode("<start_of_turn>user\nHi<end_of_turn>", true)
        .unwrap();
    assert_eq!(&ids[..2], &[2, 105]);
    assert_eq!(ids.last(), Some(&106));
    assert_eq!(t.decode(&ids, true).unwrap(), "user\nHi");
    assert_eq!(
        t.decode(&ids, false).unwrap(),
        "<bos><start_of_turn>user\nHi<end_of_turn>"
    );
    let err = t.decode(&[5, 300_000], false).unwrap_err().to_string();
    assert!(err.contains("300000"), "{err}");
}

#[test]
fn gemma3_saved_tokenizer_json_gives_the_same_ids() {
    let Some(g) = gemma() else { return };
    let (_, cases) = golden_cases();
    // FTBENCH_TOKENIZER_OUT keeps the files for scripts/reference/hf_check.py.
    let keep = std::env::var_os("FTBENCH_TOKENIZER_OUT").map(PathBuf::from);
    let dir = keep.clone().unwrap_or_else(|| temp_dir("gemma3-hf"));
    let t0 = Instant::now();
    g.tokenizer.save_hf(&dir).unwrap();
    let saved = t0.elapsed();
    let t1 = Instant::now();
    let hf = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    eprintln!(
        "tokenizer.json written in {:.2} s, loaded in {:.2} s",
        saved.as_secs_f64(),
        t1.elapsed().as_secs_f64()
    );
    assert_eq!(hf.vocab_size(), g.tokenizer.vocab_size());
    assert_eq!(
        (hf.bos_id(), hf.eos_id(), hf.pad_id()),
        (Some(2), Some(1), Some(0))
    );
    assert!(hf.add_bos_default());
    assert_eq!(hf.stop_ids(), vec![1, 106]);
    check_ids("tokenizer.json written by save_hf", &cases, |s| {
        hf.encode(s, false).unwrap()
    });
    for c in &cases {
        assert_eq!(hf.decode(&c.ids, false).unwrap(), decoded(&c.text));
    }
    assert_eq!(
        hf.encode("Hello", true).unwrap(),
        g.tokenizer.encode("Hello", true).unwrap()
    );
    if let Some((_, cases)) = extra_cases() {
        check_ids("extra golden ids, saved tokenizer.json", &cases, |s| {
            hf.encode(s, false).unwrap()
        });
    }
    if keep.is_none() {
        std::fs::remove_dir_all(&dir).ok();
    }
}

// ---------------------------------------------------------------------------------------
// Tiny GGUF files written by the tests

fn strings(v: &[&str]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
}

fn write_gguf(path: &Path, metadata: &[(&str, Value)]) {
    let refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).expect("create gguf");
    gguf_file::write(&mut f, &refs, &[]).expect("write gguf");
}

fn load(path: &Path) -> ftbench_trainer::Result<Tokenizer> {
    let mut f = std::fs::File::open(path).expect("open gguf");
    let content = gguf_file::Content::read(&mut f).expect("read gguf");
    Tokenizer::from_gguf(&content, path)
}

/// A byte-level BPE vocabulary worked by hand.
///
/// "hello world" is pre-tokenized to "hello" and "Ġworld". Merges, best first:
/// h e, l l, he ll, hell o, Ġ w, o r, Ġw or, l d, r l.
/// "hello": h e l l o -> he l l o -> he ll o -> hell o -> hello = [12].
/// "Ġworld": Ġ w o r l d -> Ġw o r l d -> Ġw or l d -> Ġwor l d -> Ġwor ld = [15, 16];
/// "r l" (rank 8) never applies because "o r" (rank 5) takes the r first.
fn tiny_gpt2_metadata() -> Vec<(&'static str, Value)> {
    let tokens = [
        "<|endoftext|>",
        "h",
        "e",
        "l",
        "o",
        "Ġ",
        "w",
        "r",
        "d",
        "he",
        "ll",
        "hell",
        "hello",
        "Ġw",
        "or",
        "Ġwor",
        "ld",
        "rl",
    ];
    let mut types = vec![Value::I32(1); tokens.len()];
    types[0] = Value::I32(3);
    vec![
        ("general.architecture", Value::String("gpt2".into())),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt-2".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        (
            "tokenizer.ggml.merges",
            strings(&[
                "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "r l",
            ]),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
    ]
}

#[test]
fn gpt2_gguf_vocabulary_encodes_by_merge_rank() {
    let dir = temp_dir("gpt2");
    let path = dir.join("tiny-gpt2.gguf");
    write_gguf(&path, &tiny_gpt2_metadata());
    let t = load(&path).unwrap();
    assert_eq!(t.vocab_size(), 18);
    assert_eq!(t.encode("hello world", false).unwrap(), vec![12, 15, 16]);
    assert_eq!(t.encode("hello<|endoftext|>", false).unwrap(), vec![12, 0]);
    assert_eq!(t.encode("hello", true).unwrap(), vec![0, 12]);
    assert!(!t.add_bos_default());
    assert_eq!(t.decode(&[12, 15, 16], false).unwrap(), "hello world");
    assert_eq!(t.decode(&[12, 0], true).unwrap(), "hello");
    assert_eq!(t.decode(&[12, 0], false).unwrap(), "hello<|endoftext|>");
    assert_eq!(t.piece(13).as_deref(), Some("Ġw"));
    assert_eq!(t.stop_ids(), vec![0]);

    // The saved tokenizer.json loads and gives the same ids.
    let hf_dir = dir.join("hf");
    t.save_hf(&hf_dir).unwrap();
    let hf = Tokenizer::from_file(&hf_dir.join("tokenizer.json")).unwrap();
    assert_eq!(hf.encode("hello world", false).unwrap(), vec![12, 15, 16]);
    assert_eq!(hf.encode("hello<|endoftext|>", false).unwrap(), vec![12, 0]);
    assert_eq!((hf.bos_id(), hf.eos_id()), (Some(0), Some(0)));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn tiny_spm_gguf_vocabulary() {
    // A SentencePiece vocabulary as GGUF stores it: unknown token typed as control, a
    // user-defined space run written with spaces, byte pieces.
    let mut tokens = vec![
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
        "  ",
        "▁",
        "h",
        "i",
        "▁h",
        "▁hi",
    ];
    let mut scores = vec![
        -1000.0, -1000.0, -1000.0, -1000.0, -1000.0, -1000.0, -1000.0, -1.0, -2.0, -3.0, -4.0, -5.0,
    ];
    let mut types = vec![3, 3, 3, 3, 3, 3, 4, 1, 1, 1, 1, 1];
    let bytes: Vec<String> = (0..=255u8).map(|b| format!("<0x{b:02X}>")).collect();
    for b in &bytes {
        tokens.push(b);
        scores.push(0.0);
        types.push(6);
    }
    let meta = vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        (
            "tokenizer.ggml.scores",
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(2)),
        ("tokenizer.ggml.eos_token_id", Value::U32(1)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(3)),
        ("tokenizer.ggml.padding_token_id", Value::U32(0)),
        ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
    ];
    let dir = temp_dir("spm");
    let path = dir.join("tiny-spm.gguf");
    write_gguf(&path, &meta);
    let t = load(&path).unwrap();
    let byte = |b: u8| 12 + b as u32;
    let expected = vec![4, 8, 9, 6, 11, byte(b'!'), 5];
    assert_eq!(
        t.encode("<start_of_turn>hi   hi!<end_of_turn>", false)
            .unwrap(),
        expected
    );
    assert_eq!(t.encode("hi", true).unwrap(), vec![2, 8, 9]);
    assert_eq!(t.stop_ids(), vec![1, 5]);

    let hf_dir = dir.join("hf");
    t.save_hf(&hf_dir).unwrap();
    let hf = Tokenizer::from_file(&hf_dir.join("tokenizer.json")).unwrap();
    assert_eq!(
        hf.encode("<start_of_turn>hi   hi!<end_of_turn>", false)
            .unwrap(),
        expected
    );
    assert_eq!(
        hf.decode(&expected, false).unwrap(),
        "<start_of_turn>hi   hi!<end_of_turn>"
    );
    assert_eq!(hf.encode("hi", true).unwrap(), vec![2, 8, 9]);
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------------------
// Bad input

fn load_err(name: &str, meta: &[(&str, Value)]) -> String {
    let dir = temp_dir(name);
    let path = dir.join(format!("{name}.gguf"));
    write_gguf(&path, meta);
    let err = load(&path)
        .expect_err("a bad vocabulary must not load")
        .to_string();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        err.contains(&format!("{name}.gguf")),
        "error names the file: {err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn unknown_tokenizer_model_is_a_clear_error() {
    let mut meta = tiny_gpt2_metadata();
    meta[1].1 = Value::String("wordpiece".into());
    let err = load_err("unknown-model", &meta);
    assert!(
        err.contains("tokenizer.ggml.model `wordpiece`") && err.contains("\"llama\" or \"gpt2\""),
        "{err}"
    );
}

#[test]
fn missing_tokenizer_model_is_a_clear_error() {
    let meta: Vec<_> = tiny_gpt2_metadata()
        .into_iter()
        .filter(|(k, _)| *k != "tokenizer.ggml.model")
        .collect();
    let err = load_err("no-model", &meta);
    assert!(err.contains("missing key tokenizer.ggml.model"), "{err}");
}

#[test]
fn tokens_and_scores_of_different_lengths_are_a_clear_error() {
    let meta = vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strings(&["<unk>", "a", "b"])),
        (
            "tokenizer.ggml.scores",
            Value::Array(vec![Value::F32(0.0), Value::F32(-1.0)]),
        ),
    ];
    let err = load_err("short-scores", &meta);
    assert!(
        err.contains("tokenizer.ggml.scores has 2 entries, expected 3"),
        "{err}"
    );
}

#[test]
fn gpt2_merge_of_unknown_tokens_is_a_clear_error() {
    let mut meta = tiny_gpt2_metadata();
    meta[5].1 = strings(&["h e", "x y"]);
    let err = load_err("bad-merge", &meta);
    assert!(err.contains("tokenizer.ggml.merges"), "{err}");
}

#[test]
fn special_token_id_out_of_range_is_a_clear_error() {
    let mut meta = tiny_gpt2_metadata();
    meta[6].1 = Value::U32(99);
    let err = load_err("bad-bos", &meta);
    assert!(
        err.contains("tokenizer.ggml.bos_token_id is 99, expected less than 18"),
        "{err}"
    );
}

#[test]
fn missing_tokenizer_json_is_a_clear_error() {
    let path = temp_dir("missing").join("tokenizer.json");
    let err = Tokenizer::from_file(&path).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("not found"),
        "{err}"
    );
}
