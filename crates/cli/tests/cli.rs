//! The `ftbench` binary end to end on a tiny Gemma 3 model the test writes itself: `train`
//! writes a complete run folder, two runs with one seed agree, `eval`, `score`, `generate`
//! and `export --merge` use what it wrote, and bad input stops with one `error:` line and
//! no results folder.

#[path = "../../trainer/tests/common/tiny.rs"]
mod tiny;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ftbench");

/// A temp folder with a tiny Gemma 3 HF folder, a GSM8K-style file and a config.
struct Setup {
    root: PathBuf,
    model: PathBuf,
    data: PathBuf,
    config: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if !std::thread::panicking() && std::env::var_os("FTBENCH_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// Ten GSM8K-style lines made of the tiny vocabulary's words.
fn gsm8k_lines() -> String {
    let mut out = String::new();
    for i in 0..10u32 {
        let (a, b) = (i % 4 + 1, (i * 3) % 5 + 1);
        let (a, b) = if a + b > 9 { (4, 3) } else { (a, b) };
        let fruit = if i % 2 == 0 { "apples" } else { "pears" };
        let q = format!("tom has {a} {fruit} and buys {b} more . how many {fruit} does he have ?");
        let ans = format!("he has {a} + {b} = {} {fruit} . #### {}", a + b, a + b);
        out.push_str(&serde_json::json!({"question": q, "answer": ans}).to_string());
        out.push('\n');
    }
    out
}

fn setup(name: &str) -> Setup {
    let root = tiny::temp_dir(&format!("cli-{name}"));
    let model = root.join("model");
    tiny::write_hf_folder(&model, "gemma3", 5);
    let data = root.join("gsm8k.jsonl");
    std::fs::write(&data, gsm8k_lines()).unwrap();
    let config = root.join("tiny.toml");
    let toml = format!(
        r#"name = "tiny"
seed = 7

[model]
path = "{model}"
threads = 1

[lora]
rank = 8
alpha = 16
dropout = 0.0
target_modules = "all-linear"

[data]
train_path = "{data}"
eval_path = "{data}"
format = "gsm8k"
max_seq_len = 64

[train]
steps = 6
batch_size = 4
learning_rate = 0.02
warmup_steps = 1

[eval]
heldout_loss = true
batch_size = 4
gsm8k_examples = 2
gsm8k_path = "{data}"
max_new_tokens = 6
"#,
        model = model.display(),
        data = data.display()
    );
    std::fs::write(&config, toml).unwrap();
    Setup {
        root,
        model,
        data,
        config,
    }
}

/// Runs the binary with `RUST_BACKTRACE=1`, under which candle attaches backtraces to its
/// errors: error messages must stay one line all the same.
fn ftbench(cwd: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run ftbench")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs and requires success; returns stdout.
fn ok(cwd: &Path, args: &[&str]) -> String {
    let out = ftbench(cwd, args);
    assert!(
        out.status.success(),
        "ftbench {args:?} failed ({})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs and requires failure with exactly one `error:` line; returns that line.
fn fails(cwd: &Path, args: &[&str]) -> String {
    let out = ftbench(cwd, args);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "ftbench {args:?} succeeded, expected an error\nstderr:\n{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors.len(),
        1,
        "ftbench {args:?}: expected one error line, stderr:\n{stderr}"
    );
    let line = errors[0];
    eprintln!("{line}");
    // nothing after the error line (no backtrace, no second message)
    let after: Vec<&str> = stderr
        .lines()
        .skip_while(|l| !l.starts_with("error:"))
        .skip(1)
        .collect();
    assert!(
        after.iter().all(|l| l.trim().is_empty()),
        "ftbench {args:?}: lines after the error:\n{stderr}"
    );
    line.to_string()
}

/// Run folders under `results/` (names starting with a dot included).
fn results(cwd: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(cwd.join("results")) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn metric_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["loss"].as_f64().unwrap()
        })
        .collect()
}

/// `score --json` log-probabilities, None for the first token.
fn score(cwd: &Path, model: &Path, adapter: Option<&Path>, text: &str) -> Vec<(u64, Option<f64>)> {
    let m = model.to_str().unwrap();
    let mut args = vec![
        "score",
        "--model",
        m,
        "--threads",
        "1",
        "--text",
        text,
        "--json",
    ];
    let a;
    if let Some(ad) = adapter {
        a = ad.to_str().unwrap().to_string();
        args.extend(["--adapter", a.as_str()]);
    }
    let out: Value = serde_json::from_str(ok(cwd, &args).trim()).unwrap();
    out["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_u64().unwrap(), t["logprob"].as_f64()))
        .collect()
}

#[test]
fn train_then_eval_score_generate_export() {
    let s = setup("train");
    let cwd = &s.root;
    let cfg = s.config.to_str().unwrap();
    ok(cwd, &["train", "--config", cfg]);
    let runs = results(cwd);
    assert_eq!(runs.len(), 1, "one run folder, no staging left: {runs:?}");
    let run = cwd.join("results").join(&runs[0]);

    // config.toml: the resolved config, readable again
    let resolved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let resolved: toml::Value = toml::from_str(&resolved).unwrap();
    assert_eq!(resolved["train"]["steps"].as_integer(), Some(6));
    assert_eq!(resolved["seed"].as_integer(), Some(7));

    // metrics.jsonl: one line per step with the promised fields
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    let mut last_tokens = 0;
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"].as_u64(), Some(i as u64 + 1));
        for key in ["loss", "lr", "tokens_per_s", "elapsed_s"] {
            let v = l[key]
                .as_f64()
                .unwrap_or_else(|| panic!("step {}: no `{key}` in {l}", i + 1));
            assert!(v.is_finite() && v >= 0.0, "step {}: {key} = {v}", i + 1);
        }
        let tokens = l["tokens"].as_u64().unwrap();
        assert!(tokens > last_tokens, "tokens are cumulative");
        last_tokens = tokens;
    }

    // run.json: held-out loss before and after, lower after
    let record = read_json(&run.join("run.json"));
    let before = record["heldout_loss_before"]
        .as_f64()
        .expect("heldout_loss_before");
    let after = record["heldout_loss_after"]
        .as_f64()
        .expect("heldout_loss_after");
    assert!(after < before, "held-out loss {before} -> {after}");
    eprintln!("held-out loss {before} -> {after}");
    assert_eq!(record["steps"].as_u64(), Some(6));
    assert_eq!(record["total_tokens"].as_u64(), Some(last_tokens));

    // adapter in PEFT's layout
    let adapter = run.join("adapter");
    let ac = read_json(&adapter.join("adapter_config.json"));
    assert_eq!(ac["peft_type"], "LORA");
    assert_eq!(ac["r"].as_u64(), Some(8));
    assert_eq!(ac["lora_alpha"].as_f64(), Some(16.0));
    let tensors = candle_core::safetensors::load(
        adapter.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for key in [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        "base_model.model.model.layers.5.mlp.down_proj.lora_B.weight",
    ] {
        assert!(
            tensors.contains_key(key),
            "adapter has no {key}; keys: {:?}",
            tensors.keys().collect::<Vec<_>>()
        );
    }
    assert_eq!(
        tensors.len(),
        2 * 7 * 6,
        "all-linear: 7 projections in 6 layers"
    );

    // eval: the held-out loss of the base and of base + adapter match the run's before/after
    let (m, d) = (s.model.to_str().unwrap(), s.data.to_str().unwrap());
    let ad = adapter.to_str().unwrap();
    let eval = |extra: &[&str]| -> Value {
        let mut args = vec![
            "eval",
            "--model",
            m,
            "--threads",
            "1",
            "--data",
            d,
            "--max-seq-len",
            "64",
            "--json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(ok(cwd, &args).trim()).unwrap()
    };
    let base = eval(&[]);
    let tuned = eval(&[
        "--adapter",
        ad,
        "--gsm8k",
        "2",
        "--gsm8k-path",
        d,
        "--max-new-tokens",
        "6",
    ]);
    let (lb, la) = (
        base["heldout_loss"].as_f64().unwrap(),
        tuned["heldout_loss"].as_f64().unwrap(),
    );
    assert!(
        (lb - before).abs() < 1e-4,
        "eval base {lb} vs run before {before}"
    );
    assert!(
        (la - after).abs() < 1e-4,
        "eval adapter {la} vs run after {after}"
    );
    assert_eq!(tuned["gsm8k"]["total"].as_u64(), Some(2));

    // score: one entry per token, BOS first without a log-probability
    let words = "tom has 3 apples and buys 4 more";
    let scored = score(cwd, &s.model, Some(&adapter), words);
    assert_eq!(scored.len(), 1 + words.split(' ').count());
    assert_eq!(
        scored[0],
        (2, None),
        "first entry is the BOS without a log-probability"
    );
    assert!(scored[1..]
        .iter()
        .all(|(_, lp)| lp.is_some_and(|v| v <= 0.0 && v.is_finite())));

    // generate prints the prompt and a completion
    let prompt = "Question : tom has 3 apples";
    let out = ok(
        cwd,
        &[
            "generate",
            "--model",
            m,
            "--adapter",
            ad,
            "--threads",
            "1",
            "--prompt",
            prompt,
            "--max-new-tokens",
            "5",
        ],
    );
    assert!(out.starts_with(prompt), "{out:?}");

    // export --merge: the merged model scores like base + adapter
    let merged = s.root.join("merged");
    ok(
        cwd,
        &[
            "export",
            "--model",
            m,
            "--adapter",
            ad,
            "--threads",
            "1",
            "--merge",
            "--out",
            merged.to_str().unwrap(),
        ],
    );
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(merged.join(f).is_file(), "export wrote no {f}");
    }
    let merged_scores = score(cwd, &merged, None, words);
    assert_eq!(merged_scores.len(), scored.len());
    for ((ia, a), (ib, b)) in scored.iter().zip(&merged_scores) {
        assert_eq!(ia, ib);
        match (a, b) {
            (None, None) => {}
            (Some(a), Some(b)) => assert!((a - b).abs() < 1e-4, "merged {b} vs adapter {a}"),
            _ => panic!("{a:?} vs {b:?}"),
        }
    }
    // exporting onto an existing folder is refused
    let line = fails(
        cwd,
        &[
            "export",
            "--model",
            m,
            "--adapter",
            ad,
            "--threads",
            "1",
            "--merge",
            "--out",
            merged.to_str().unwrap(),
        ],
    );
    assert!(line.contains("already exists"), "{line}");
}

#[test]
fn a_vocabulary_without_bos_scores_and_generates() {
    // Qwen2's tokenizer has no BOS token: no bos_token, no post-processor adding one
    let root = tiny::temp_dir("cli-nobos");
    let model = root.join("qwen");
    tiny::write_hf_folder(&model, "qwen2", 9);
    let mut tj = read_json(&model.join("tokenizer.json"));
    tj["post_processor"] = Value::Null;
    std::fs::write(model.join("tokenizer.json"), tj.to_string()).unwrap();
    let tc =
        serde_json::json!({"eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": false});
    std::fs::write(model.join("tokenizer_config.json"), tc.to_string()).unwrap();

    let scored = score(&root, &model, None, "tom has 3 apples");
    assert_eq!(scored.len(), 4);
    assert_eq!(
        scored[0],
        (16, None),
        "no BOS: the first word comes first, without a log-probability"
    );
    let m = model.to_str().unwrap();
    let out = ok(
        &root,
        &[
            "generate",
            "--model",
            m,
            "--threads",
            "1",
            "--prompt",
            "tom has",
            "--max-new-tokens",
            "3",
        ],
    );
    assert!(out.starts_with("tom has"), "{out:?}");
    let data = root.join("gsm8k.jsonl");
    std::fs::write(&data, gsm8k_lines()).unwrap();
    let out: Value = serde_json::from_str(
        ok(
            &root,
            &[
                "eval",
                "--model",
                m,
                "--threads",
                "1",
                "--data",
                data.to_str().unwrap(),
                "--max-seq-len",
                "64",
                "--json",
            ],
        )
        .trim(),
    )
    .unwrap();
    assert!(out["heldout_loss"].as_f64().unwrap().is_finite());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn full_fine_tuning_writes_the_model() {
    let s = setup("full");
    let cwd = &s.root;
    let cfg = s.config.to_str().unwrap();
    ok(
        cwd,
        &[
            "train",
            "--config",
            cfg,
            "--set",
            "train.mode=\"full\"",
            "--set",
            "train.learning_rate=0.001",
            "--set",
            "eval.gsm8k_examples=0",
        ],
    );
    let runs = results(cwd);
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = cwd.join("results").join(&runs[0]);
    assert!(!run.join("adapter").exists());
    let record = read_json(&run.join("run.json"));
    let after = record["heldout_loss_after"].as_f64().unwrap();
    assert!(after < record["heldout_loss_before"].as_f64().unwrap());
    // the trained model is written and evaluates to the run's held-out loss
    let model = run.join("model");
    let (m, d) = (model.to_str().unwrap(), s.data.to_str().unwrap());
    let out: Value = serde_json::from_str(
        ok(
            cwd,
            &[
                "eval",
                "--model",
                m,
                "--threads",
                "1",
                "--data",
                d,
                "--max-seq-len",
                "64",
                "--json",
            ],
        )
        .trim(),
    )
    .unwrap();
    let l = out["heldout_loss"].as_f64().unwrap();
    assert!(
        (l - after).abs() < 1e-4,
        "trained model {l} vs run after {after}"
    );
}

#[test]
fn same_seed_gives_the_same_losses() {
    let s = setup("seed");
    let cwd = &s.root;
    let cfg = s.config.to_str().unwrap();
    // no eval and no generation: only the training steps matter here
    let quick = [
        "--set",
        "eval.heldout_loss=false",
        "--set",
        "eval.gsm8k_examples=0",
        "--set",
        "lora.dropout=0.1",
    ];
    let mut args = vec!["train", "--config", cfg];
    args.extend(quick);
    ok(cwd, &args);
    ok(cwd, &args);
    let runs = results(cwd);
    assert_eq!(runs.len(), 2, "two run folders: {runs:?}");
    assert!(runs.iter().all(|r| !r.starts_with('.')), "{runs:?}");
    eprintln!("run folders: {runs:?}");
    let a = metric_losses(&cwd.join("results").join(&runs[0]));
    let b = metric_losses(&cwd.join("results").join(&runs[1]));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "same seed, same losses");
    // another seed changes the adapter initialisation, the dropout and the data order
    args.extend(["--set", "seed=8", "--set", "data.seed=8"]);
    ok(cwd, &args);
    let runs = results(cwd);
    assert_eq!(runs.len(), 3, "{runs:?}");
    let differing = runs
        .iter()
        .filter(|r| metric_losses(&cwd.join("results").join(r)) != a)
        .count();
    assert_eq!(differing, 1, "a different seed gives different losses");
}

#[test]
fn bad_input_stops_with_one_error_line_and_no_results() {
    let s = setup("bad");
    let cwd = &s.root;
    let cfg = s.config.to_str().unwrap();
    let train_fails = |extra: &[&str], config: &str| -> String {
        let mut args = vec!["train", "--config", config];
        args.extend_from_slice(extra);
        let line = fails(cwd, &args);
        assert!(
            results(cwd).is_empty(),
            "{args:?} left {:?} under results/",
            results(cwd)
        );
        line
    };

    // a key typo in the file
    let typo = s.root.join("typo.toml");
    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace("learning_rate", "lerning_rate");
    std::fs::write(&typo, text).unwrap();
    let line = train_fails(&[], typo.to_str().unwrap());
    assert!(line.contains("lerning_rate"), "{line}");

    // and through --set
    let line = train_fails(&["--set", "train.lerning_rate=0.1"], cfg);
    assert!(line.contains("lerning_rate"), "{line}");

    // target modules that match nothing
    let line = train_fails(&["--set", "lora.target_modules=[\"nope\"]"], cfg);
    assert!(
        line.contains("lora.target_modules") && line.contains("nope"),
        "{line}"
    );

    // an invalid regex
    let line = train_fails(&["--set", "lora.target_modules=\"(\""], cfg);
    assert!(
        line.contains("lora.target_modules") && line.contains("invalid regex"),
        "{line}"
    );

    // an empty dataset
    let empty = s.root.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let set_train = format!("data.train_path=\"{}\"", empty.display());
    let set_eval = format!("data.eval_path=\"{}\"", empty.display());
    let line = train_fails(&["--set", &set_train, "--set", &set_eval], cfg);
    assert!(
        line.contains("empty.jsonl") && line.contains("no examples"),
        "{line}"
    );

    // a sequence length beyond the model's context (128)
    let line = train_fails(&["--set", "data.max_seq_len=4096"], cfg);
    assert!(
        line.contains("data.max_seq_len") && line.contains("4096") && line.contains("128"),
        "{line}"
    );

    // invalid JSON on line 3
    let bad = s.root.join("bad.jsonl");
    let mut lines: Vec<String> = gsm8k_lines().lines().map(String::from).collect();
    lines[2] = "{\"question\": \"tom has\", \"answer\": ".into();
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let set_train = format!("data.train_path=\"{}\"", bad.display());
    let line = train_fails(&["--set", &set_train], cfg);
    assert!(line.contains("bad.jsonl:3"), "{line}");

    // a model that is not there
    let missing = s.root.join("no-model");
    let set_model = format!("model.path=\"{}\"", missing.display());
    let line = train_fails(&["--set", &set_model], cfg);
    assert!(line.contains("no-model"), "{line}");

    // a corrupt GGUF file
    let corrupt = s.root.join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF but not really a gguf file at all").unwrap();
    let set_model = format!("model.path=\"{}\"", corrupt.display());
    let line = train_fails(&["--set", &set_model], cfg);
    assert!(line.contains("corrupt.gguf"), "{line}");

    // a loss that becomes NaN
    let line = train_fails(
        &[
            "--set",
            "train.learning_rate=1e30",
            "--set",
            "train.max_grad_norm=0",
            "--set",
            "eval.gsm8k_examples=0",
        ],
        cfg,
    );
    assert!(
        line.contains("NaN") && line.contains("train.learning_rate"),
        "{line}"
    );

    // the other commands: a missing model, a missing adapter, a text beyond the context
    let m = s.model.to_str().unwrap();
    let long = vec!["tom has 3 apples"; 40].join(" ");
    let line = fails(cwd, &["score", "--model", m, "--text", &long]);
    assert!(
        line.contains("--text") && line.contains("161 tokens") && line.contains("context of 128"),
        "{line}"
    );
    let line = fails(cwd, &["generate", "--model", m, "--prompt", &long]);
    assert!(
        line.contains("--prompt") && line.contains("context of 128"),
        "{line}"
    );
    let line = fails(
        cwd,
        &[
            "score",
            "--model",
            missing.to_str().unwrap(),
            "--text",
            "tom",
        ],
    );
    assert!(line.contains("no-model"), "{line}");
    let no_adapter = s.root.join("no-adapter");
    let line = fails(
        cwd,
        &[
            "score",
            "--model",
            m,
            "--adapter",
            no_adapter.to_str().unwrap(),
            "--text",
            "tom",
        ],
    );
    assert!(line.contains("no-adapter"), "{line}");
}

#[test]
fn convert_writes_an_hf_folder_that_scores_like_the_gguf() {
    let root = tiny::temp_dir("cli-convert");
    for (fam, arch) in [("gemma3", "gemma3"), ("llama", "llama")] {
        let c = tiny::config(fam);
        let gguf = root.join(format!("{fam}.gguf"));
        tiny::write_gguf(&gguf, arch, &c, &tiny::weights(&c, 3));
        let out = root.join(format!("{fam}-hf"));
        ok(
            &root,
            &[
                "convert",
                "--model",
                gguf.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
        );
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(out.join(f).is_file(), "{fam}: convert wrote no {f}");
        }
        let config = read_json(&out.join("config.json"));
        assert_eq!(
            config["rms_norm_eps"].as_f64(),
            Some(c.rms_norm_eps),
            "{fam}"
        );
        // the embedded SentencePiece vocabulary encodes "ab ab" to <bos> ▁ab ▁ab, in both files
        let a = score(&root, &gguf, None, "ab ab");
        let b = score(&root, &out, None, "ab ab");
        assert_eq!(
            a.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![2, 10, 10],
            "{fam}"
        );
        assert_eq!(
            a, b,
            "{fam}: the converted folder scores differently from the GGUF"
        );
        let line = fails(
            &root,
            &[
                "convert",
                "--model",
                gguf.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(line.contains("already exists"), "{line}");
    }
    let line = fails(
        &root,
        &[
            "convert",
            "--model",
            root.join("llama-hf").to_str().unwrap(),
            "--out",
            "x",
        ],
    );
    assert!(line.contains("expected a .gguf file"), "{line}");
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Held-out loss of `model` (+ `adapter`) on the first `n` examples of `data` at 256 tokens.
fn eval_loss(
    cwd: &Path,
    model: &Path,
    adapter: Option<&Path>,
    quant: &str,
    data: &Path,
    n: usize,
) -> f64 {
    let n = n.to_string();
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--threads",
        "1",
        "--quantization",
        quant,
        "--data",
        data.to_str().unwrap(),
        "--max-examples",
        &n,
        "--json",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    let out: Value = serde_json::from_str(ok(cwd, &args).trim()).unwrap();
    out["heldout_loss"].as_f64().unwrap()
}

/// QLoRA end to end on a tiny Gemma 3 wide enough for NF4's 64-value blocks: training on an
/// NF4 base lowers the held-out loss, `eval` on the same quantized base reproduces it, and
/// both merges are written, measured against the unmerged adapter and load back.
#[test]
fn qlora_nf4_trains_exports_both_merges_and_reloads() {
    let s = setup("qlora");
    let cwd = &s.root;
    // a wider model in place of the setup's
    let mut cfg = tiny::config_json("gemma3");
    cfg["hidden_size"] = serde_json::json!(64);
    cfg["intermediate_size"] = serde_json::json!(128);
    let c = ftbench_trainer::config::ModelConfig::from_hf_value(&cfg).unwrap();
    let w = tiny::weights(&c, 3);
    let model = s.root.join("wide");
    let tok = tiny::write_tokenizer(&s.root.join("wide-tok"));
    ftbench_trainer::loader::save_hf_dir(&model, &c, &w, &tok).unwrap();
    let m = model.to_str().unwrap().to_string();
    let cfg_path = s.config.to_str().unwrap();
    ok(
        cwd,
        &[
            "train",
            "--config",
            cfg_path,
            "--set",
            &format!("model.path=\"{m}\""),
            "--set",
            "model.quantization=\"nf4\"",
            "--set",
            "eval.gsm8k_examples=0",
        ],
    );
    let runs = results(cwd);
    let run = cwd.join("results").join(&runs[0]);
    let record = read_json(&run.join("run.json"));
    assert_eq!(record["extra"]["quantization"], "nf4");
    assert_eq!(record["extra"]["base_projections"]["nf4"], 7 * 6);
    let (before, after) = (
        record["heldout_loss_before"].as_f64().unwrap(),
        record["heldout_loss_after"].as_f64().unwrap(),
    );
    assert!(after < before, "held-out loss {before} -> {after}");
    let adapter = run.join("adapter");
    assert_eq!(record["extra"]["lora_kernel"], "fused");
    let trained_on = read_json(&adapter.join("ftbench_base.json"));
    assert_eq!(trained_on["quantization"], "nf4");
    // the run's data has 10 examples with a held-out split; eval over the whole file instead
    let l_nf4 = eval_loss(cwd, &model, Some(&adapter), "nf4", &s.data, 8);
    let l_f32 = eval_loss(cwd, &model, Some(&adapter), "none", &s.data, 8);
    eprintln!("adapter on the nf4 base {l_nf4}, on the f32 base it was not trained on {l_f32}");

    for format in ["f32", "nf4"] {
        let out = cwd.join(format!("merged-{format}"));
        let msg = ok(
            cwd,
            &[
                "export",
                "--model",
                &m,
                "--quantization",
                "nf4",
                "--adapter",
                adapter.to_str().unwrap(),
                "--merge",
                "--merged-format",
                format,
                "--check-data",
                s.data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(msg.contains("onto the dequantized base (42 nf4)"), "{msg}");
        let report = read_json(&out.join("merge_report.json"));
        let check = &report["check"];
        assert!((check["unmerged_heldout_loss"].as_f64().unwrap() - l_nf4).abs() < 1e-5);
        // merging onto the dequantized weights in f32 is exact up to rounding; re-quantizing
        // the merged weights moves them
        let f = &check["f32"];
        let q = &check["nf4"];
        assert_eq!(report["adapter_trained_on"], "nf4");
        assert!(
            check["base_heldout_loss"].as_f64().unwrap() > l_nf4,
            "{check}"
        );
        let kept = f["adapter_gain_kept"].as_f64().unwrap();
        assert!(
            (kept - 1.0).abs() < 1e-3,
            "the f32 merge keeps the adapter's gain: {kept}"
        );
        assert!(q["adapter_gain_kept"].as_f64().is_some(), "{q}");
        assert!(f["logits_max_abs_diff"].as_f64().unwrap() < 1e-4, "{f}");
        assert!(
            q["logits_max_abs_diff"].as_f64().unwrap() > f["logits_max_abs_diff"].as_f64().unwrap(),
            "{q} vs {f}"
        );
        // what was written scores as the report says
        let (quant, expected) = if format == "nf4" {
            let cfg = read_json(&out.join("config.json"));
            assert_eq!(cfg["quantization_config"]["bnb_4bit_quant_type"], "nf4");
            ("keep", q["heldout_loss"].as_f64().unwrap())
        } else {
            assert!(msg.contains("stored in f32"), "{msg}");
            ("none", f["heldout_loss"].as_f64().unwrap())
        };
        let l = eval_loss(cwd, &out, None, quant, &s.data, 8);
        assert!(
            (l - expected).abs() < 1e-4,
            "{format}: reloaded {l} vs report {expected}"
        );
    }

    // nothing quantized to keep in an f32 folder: one error line naming the key
    let err = fails(
        cwd,
        &[
            "train",
            "--config",
            cfg_path,
            "--set",
            "model.quantization=\"keep\"",
        ],
    );
    assert!(err.contains("model.quantization"), "{err}");
}
