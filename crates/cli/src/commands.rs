//! `eval`, `score`, `generate`, `convert` and `export`.

use std::path::{Path, PathBuf};

use candle_core::Device;
use ftbench_trainer::data::{self, DataConfig};
use ftbench_trainer::eval::gsm8k_exact_match;
use ftbench_trainer::generate::{generate_greedy, score as score_tokens};
use ftbench_trainer::loader::{self, LoadedModel};
use ftbench_trainer::lora::load_peft;
use ftbench_trainer::model::{Decoder, TrainMode};
use ftbench_trainer::tokenizer::Tokenizer;
use ftbench_trainer::train;
use serde_json::json;

use crate::progress::Progress;
use crate::run::{one_line_errors::Context, open_device, set_threads, CliResult};

#[derive(clap::Args)]
pub struct ModelArgs {
    /// A .gguf file, an HF model folder or a hub id (org/name)
    #[arg(long)]
    pub model: String,
    /// A PEFT adapter folder (adapter_config.json, adapter_model.safetensors)
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Compute threads; 0 = all cores
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// cpu, cuda, cuda:N, metal or auto (the best one present)
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Loads the base model and, when given, the adapter on top.
fn load_model(args: &ModelArgs) -> CliResult<(Decoder, Tokenizer)> {
    set_threads(args.threads);
    let device = open_device("--device", &args.device)?;
    let LoadedModel {
        config,
        weights,
        tokenizer,
        ..
    } = loader::load(&args.model, &device).ctx()?;
    let mut model = Decoder::new(config, weights, TrainMode::Frozen, 0, &device).ctx()?;
    if let Some(dir) = &args.adapter {
        let adapter = load_peft(dir, &device).ctx()?;
        model.load_adapter(&adapter, dir).ctx()?;
    }
    Ok((model, tokenizer))
}

/// A text of `n` tokens must fit the model's context.
fn check_context(flag: &str, n: usize, model: &Decoder) -> CliResult<()> {
    let context = model.config.max_position_embeddings;
    if n > context {
        return Err(format!(
            "{flag}: {n} tokens exceed the model's context of {context} tokens"
        ));
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Evaluation file for the held-out loss (any format the data loader reads)
    #[arg(long, default_value = "../shared/datasets/gsm8k/test.jsonl")]
    pub data: PathBuf,
    /// Examples of the evaluation file used for the loss
    #[arg(long, default_value_t = 100)]
    pub max_examples: usize,
    /// Longest example in tokens (the quickstart trains at 256)
    #[arg(long, default_value_t = 256)]
    pub max_seq_len: usize,
    /// GSM8K test questions for exact match (0 skips generation)
    #[arg(long, default_value_t = 0)]
    pub gsm8k: usize,
    /// GSM8K test file
    #[arg(long, default_value = "../shared/datasets/gsm8k/test.jsonl")]
    pub gsm8k_path: PathBuf,
    /// Generation budget per question
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn eval(a: &EvalArgs) -> CliResult<()> {
    let (model, tok) = load_model(&a.model)?;
    let cfg = DataConfig {
        train_path: a.data.clone(),
        max_seq_len: a.max_seq_len,
        ..Default::default()
    };
    cfg.validate().ctx()?;
    let mut examples = data::load_examples(&a.data, &cfg, &tok).ctx()?;
    examples.truncate(a.max_examples);
    let batches = data::eval_batches(&examples, 4, data::default_pad_id(&tok));
    let loss = train::heldout_loss(&model, &batches).ctx()?;
    let gsm = if a.gsm8k > 0 {
        let items = data::load_gsm8k(&a.gsm8k_path, Some(a.gsm8k)).ctx()?;
        let progress = Progress::new(items.len() as u64, "gsm8k");
        let r = gsm8k_exact_match(&model, &tok, &cfg, &items, a.max_new_tokens, |i, c| {
            progress.step(i as u64, &format!("{c} correct"));
            true
        })
        .ctx()?;
        progress.finish();
        Some(r)
    } else {
        None
    };
    if a.json {
        let out = json!({
            "model": a.model.model,
            "adapter": a.model.adapter,
            "data": a.data,
            "examples": examples.len(),
            "heldout_loss": loss,
            "gsm8k": gsm.as_ref().map(|g| json!({"correct": g.correct, "total": g.total, "exact_match": g.exact_match})),
        });
        println!("{out}");
    } else {
        println!(
            "held-out loss on {} examples of {}: {loss:.4}",
            examples.len(),
            a.data.display()
        );
        if let Some(g) = gsm {
            println!(
                "gsm8k exact match: {}/{} = {:.1}%",
                g.correct,
                g.total,
                100.0 * g.exact_match
            );
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to score
    #[arg(long)]
    pub text: String,
    /// Do not prepend the BOS token (it is prepended when the vocabulary has one)
    #[arg(long)]
    pub no_bos: bool,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

pub fn score(a: &ScoreArgs) -> CliResult<()> {
    let (model, tok) = load_model(&a.model)?;
    // the BOS as training examples carry it: when the vocabulary has one (Qwen2's has none)
    let ids = tok
        .encode(&a.text, !a.no_bos && tok.bos_id().is_some())
        .ctx()?;
    if a.text.is_empty() || ids.is_empty() {
        return Err("--text: empty; give the text to score".into());
    }
    check_context("--text", ids.len(), &model)?;
    let lps = score_tokens(&model, &ids).ctx()?;
    let rows: Vec<_> = ids
        .iter()
        .zip(&lps)
        .map(|(&id, lp)| json!({"id": id, "piece": tok.piece(id), "logprob": lp}))
        .collect();
    let total: f64 = lps.iter().flatten().sum();
    if a.json {
        println!("{}", json!({"tokens": rows, "total_logprob": total}));
    } else {
        for (id, lp) in ids.iter().zip(&lps) {
            let piece = tok.piece(*id).unwrap_or_default();
            match lp {
                Some(v) => println!("{id:>8} {piece:<20} {v:>10.4}"),
                None => println!("{id:>8} {piece:<20} {:>10}", "-"),
            }
        }
        println!("total log-probability: {total:.4}");
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
}

pub fn generate(a: &GenerateArgs) -> CliResult<()> {
    let (model, tok) = load_model(&a.model)?;
    let ids = tok.encode(&a.prompt, tok.add_bos_default()).ctx()?;
    check_context("--prompt", ids.len(), &model)?;
    let g = generate_greedy(
        &model,
        &ids,
        a.max_new_tokens,
        &tok.stop_ids(),
        tok.vocab_size(),
    )
    .ctx()?;
    println!("{}{}", a.prompt, tok.decode(&g.new_ids, true).ctx()?);
    let n = g.new_ids.len();
    eprintln!(
        "{} prompt tokens in {:.2}s; {n} new tokens, {:.1} tokens/s after the first",
        g.prompt_tokens,
        g.prefill_s,
        (n.saturating_sub(1)) as f64 / g.decode_s.max(1e-9)
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// The .gguf file to convert
    #[arg(long)]
    pub model: PathBuf,
    /// The HF folder to write
    #[arg(long)]
    pub out: PathBuf,
}

/// Writes `dir` through a staging folder beside it, renamed into place when complete.
fn write_folder(out: &Path, f: impl FnOnce(&Path) -> CliResult<()>) -> CliResult<()> {
    if out.exists() {
        return Err(format!(
            "{}: already exists; choose another --out",
            out.display()
        ));
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let staging = out.with_file_name(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
    match f(&staging) {
        Ok(()) => std::fs::rename(&staging, out).map_err(|e| format!("{}: {e}", out.display())),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

pub fn convert(a: &ConvertArgs) -> CliResult<()> {
    if a.model.extension().is_none_or(|e| e != "gguf") {
        return Err(format!(
            "--model {}: expected a .gguf file",
            a.model.display()
        ));
    }
    let m = loader::load_gguf(&a.model, &Device::Cpu).ctx()?;
    write_folder(&a.out, |dir| {
        loader::save_hf_dir(dir, &m.config, &m.weights, &m.tokenizer).ctx()
    })?;
    println!(
        "wrote {} (config.json, model.safetensors, tokenizer.json)",
        a.out.display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Merge the adapter into the base weights (W + scaling·B·A)
    #[arg(long)]
    pub merge: bool,
    /// The HF folder to write
    #[arg(long)]
    pub out: PathBuf,
}

pub fn export(a: &ExportArgs) -> CliResult<()> {
    if a.model.adapter.is_none() {
        return Err("--adapter: required for export".into());
    }
    if !a.merge {
        return Err("--merge: export writes a merged model; pass --merge (the adapter folder itself is already in PEFT's layout)".into());
    }
    let (mut model, tok) = load_model(&a.model)?;
    let n = model.merge_adapters().ctx()?;
    let weights = model.hf_weights(false).ctx()?;
    write_folder(&a.out, |dir| {
        loader::save_hf_dir(dir, &model.config, &weights, &tok).ctx()
    })?;
    println!(
        "merged {n} adapters into f32 base weights; wrote {}",
        a.out.display()
    );
    Ok(())
}
