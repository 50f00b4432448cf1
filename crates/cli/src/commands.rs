//! `eval`, `score`, `generate`, `convert` and `export`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use ftbench_trainer::data::{self, DataConfig};
use ftbench_trainer::eval::gsm8k_exact_match;
use ftbench_trainer::generate::{generate_greedy, score as score_tokens};
use ftbench_trainer::loader::{self, LoadedModel};
use ftbench_trainer::lora::load_peft;
use ftbench_trainer::model::{Decoder, TrainMode};
use ftbench_trainer::quant::nf4::Nf4Weight;
use ftbench_trainer::quant::weight::nf4_projections;
use ftbench_trainer::quant::QuantWeight;
use ftbench_trainer::quant::Quantization;
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
    /// How the base's projections are held: none (dense f32), nf4 (quantized at load),
    /// keep (a GGUF file's quantized tensors or a bitsandbytes NF4 checkpoint as stored) or
    /// bf16 (rounded at load; products in bf16, fast on an MKL build)
    #[arg(long, default_value = "none", value_parser = parse_quantization)]
    pub quantization: Quantization,
    /// cpu, cuda, cuda:N, metal or auto (the best one present)
    #[arg(long, default_value = "auto")]
    pub device: String,
}

fn parse_quantization(s: &str) -> Result<Quantization, String> {
    Quantization::parse(s).ok_or_else(|| format!("expected none, nf4, keep or bf16, found `{s}`"))
}

/// Loads the base model and, when given, the adapter on top.
fn load_model(args: &ModelArgs) -> CliResult<(Decoder, Tokenizer)> {
    set_threads(args.threads);
    let device = open_device("--device", &args.device)?;
    let LoadedModel {
        config,
        weights,
        quantized,
        tokenizer,
        ..
    } = loader::load_with(&args.model, &device, args.quantization).ctx()?;
    let mut model =
        Decoder::with_quantized(config, weights, quantized, TrainMode::Frozen, 0, &device).ctx()?;
    if let Some(dir) = &args.adapter {
        if let Some(trained) = trained_quantization(dir) {
            if trained != args.quantization.as_str() {
                eprintln!(
                    "warning: {} was trained on a base held as `{trained}`; loading the base with --quantization {} (pass --quantization {trained} to use it as trained)",
                    dir.display(),
                    args.quantization.as_str()
                );
            }
        }
        let adapter = load_peft(dir, &device).ctx()?;
        model.load_adapter(&adapter, dir).ctx()?;
    }
    Ok((model, tokenizer))
}

/// The base quantization an adapter folder written by `train` records, if any.
fn trained_quantization(adapter: &Path) -> Option<String> {
    let text = std::fs::read_to_string(adapter.join(crate::run::ADAPTER_BASE_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["quantization"].as_str().map(str::to_string)
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
    /// Format of the merged projections: f32 (merged onto the dequantized base when it is
    /// quantized) or nf4 (the merged weights re-quantized, in bitsandbytes' layout)
    #[arg(long, default_value = "f32")]
    pub merged_format: String,
    /// Held-out data on which a quantized merge is compared with the unmerged adapter
    #[arg(long, default_value = "../shared/datasets/gsm8k/test.jsonl")]
    pub check_data: PathBuf,
    /// Examples of --check-data used for the comparison
    #[arg(long, default_value_t = 8)]
    pub check_examples: usize,
    /// The HF folder to write
    #[arg(long)]
    pub out: PathBuf,
}

/// How far a merged model is from the adapter on its base, on the check examples.
struct MergeCheck {
    loss: f64,
    loss_delta: f64,
    logits_max_abs_diff: f32,
    logits_mean_abs_diff: f64,
}

impl MergeCheck {
    fn json(&self) -> serde_json::Value {
        json!({
            "heldout_loss": self.loss,
            "heldout_loss_delta": self.loss_delta,
            "logits_max_abs_diff": self.logits_max_abs_diff,
            "logits_mean_abs_diff": self.logits_mean_abs_diff,
        })
    }
}

/// Compares each of `merged` with `reference` (the unmerged adapter) on `batches`: held-out
/// loss and logits, one sequence at a time so that a 262k-vocabulary model's logits fit.
fn merge_checks(
    reference: &Decoder,
    merged: &[&Decoder],
    batches: &[data::Batch],
) -> CliResult<(f64, Vec<MergeCheck>)> {
    let ref_loss = train::heldout_loss(reference, batches).ctx()?;
    // per merged model: max |diff|, Σ |diff|
    let mut diffs = vec![(0f32, 0f64); merged.len()];
    let mut n = 0usize;
    for b in batches {
        for row in b.input_ids.chunks(b.seq_len) {
            let ids = candle_core::Tensor::new(row, &reference.device)
                .and_then(|t| t.unsqueeze(0))
                .ctx()?;
            let a = reference.forward_logits(&ids, None).ctx()?;
            n += a.elem_count();
            for (m, (max, sum)) in merged.iter().zip(diffs.iter_mut()) {
                let c = m.forward_logits(&ids, None).ctx()?;
                let d = (&a - c).and_then(|d| d.abs()).ctx()?;
                *max = max.max(d.max_all().and_then(|x| x.to_scalar::<f32>()).ctx()?);
                *sum += d.sum_all().and_then(|x| x.to_scalar::<f32>()).ctx()? as f64;
            }
        }
    }
    let mut checks = Vec::new();
    for (m, (max, sum)) in merged.iter().zip(diffs) {
        let loss = train::heldout_loss(m, batches).ctx()?;
        checks.push(MergeCheck {
            loss,
            loss_delta: loss - ref_loss,
            logits_max_abs_diff: max,
            logits_mean_abs_diff: sum / n.max(1) as f64,
        });
    }
    Ok((ref_loss, checks))
}

pub fn export(a: &ExportArgs) -> CliResult<()> {
    if a.model.adapter.is_none() {
        return Err("--adapter: required for export".into());
    }
    if !a.merge {
        return Err("--merge: export writes a merged model; pass --merge (the adapter folder itself is already in PEFT's layout)".into());
    }
    if a.check_examples == 0 {
        return Err("--check-examples: must be at least 1".into());
    }
    if !matches!(a.merged_format.as_str(), "f32" | "nf4") {
        return Err(format!(
            "--merged-format {}: expected f32 or nf4",
            a.merged_format
        ));
    }
    let (model, tok) = load_model(&a.model)?;
    let base_formats = model.base_linear_formats();
    let quantized_base = base_formats.keys().any(|k| k != "f32");
    let base_desc = base_formats
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ");
    let n_adapters = model.adapters().len();

    // the merge onto the dequantized base, in f32, and its re-quantization to NF4
    let dense = model.hf_weights(true).ctx()?;
    let f32_model = Decoder::new(
        model.config.clone(),
        dense.clone(),
        TrainMode::Frozen,
        0,
        &model.device,
    )
    .ctx()?;
    let needs_nf4 = quantized_base || a.merged_format == "nf4";
    let mut nf4: HashMap<String, Arc<Nf4Weight>> = HashMap::new();
    let mut nf4_model = None;
    if needs_nf4 {
        let mut rest = dense.clone();
        let quant = nf4_projections(&mut rest).ctx()?;
        for (name, q) in &quant {
            if let QuantWeight::Nf4(w) = q {
                nf4.insert(name.clone(), w.clone());
            }
        }
        nf4_model = Some(
            Decoder::with_quantized(
                model.config.clone(),
                rest,
                quant,
                TrainMode::Frozen,
                0,
                &model.device,
            )
            .ctx()?,
        );
    }

    // how far each merge is from the adapter on its (quantized) base
    let mut report = json!({
        "model": a.model.model,
        "adapter": a.model.adapter,
        "quantization": a.model.quantization.as_str(),
        "base_projections": base_formats,
        "adapter_trained_on": a.model.adapter.as_deref().and_then(trained_quantization),
        "adapters_merged": n_adapters,
        "merged_format": a.merged_format,
    });
    if let Some(nm) = &nf4_model {
        if !a.check_data.is_file() {
            return Err(format!(
                "--check-data {}: no such file (merging onto a {} base compares the merges with the unmerged adapter on held-out examples; pass a JSONL file)",
                a.check_data.display(),
                a.model.quantization.as_str()
            ));
        }
        let cfg = DataConfig {
            train_path: a.check_data.clone(),
            max_seq_len: 256,
            ..Default::default()
        };
        let mut examples = data::load_examples(&a.check_data, &cfg, &tok).ctx()?;
        examples.truncate(a.check_examples);
        let batches = data::eval_batches(&examples, 4, data::default_pad_id(&tok));
        let (ref_loss, checks) = merge_checks(&model, &[&f32_model, nm], &batches)?;
        let tokens: usize = batches.iter().map(|b| b.n_loss_tokens).sum();
        // the base without the adapter, to say how much of the adapter's gain each merge keeps
        let base = Decoder::new(
            model.config.clone(),
            model.hf_weights(false).ctx()?,
            TrainMode::Frozen,
            0,
            &model.device,
        )
        .ctx()?;
        let base_loss = train::heldout_loss(&base, &batches).ctx()?;
        drop(base);
        let gain = base_loss - ref_loss;
        let kept = |c: &MergeCheck| (gain.abs() > 1e-9).then(|| (base_loss - c.loss) / gain);
        report["check"] = json!({
            "data": a.check_data,
            "examples": examples.len(),
            "loss_tokens": tokens,
            "unmerged_heldout_loss": ref_loss,
            "base_heldout_loss": base_loss,
            "f32": checks[0].json(),
            "nf4": checks[1].json(),
        });
        report["check"]["f32"]["adapter_gain_kept"] = json!(kept(&checks[0]));
        report["check"]["nf4"]["adapter_gain_kept"] = json!(kept(&checks[1]));
        eprintln!(
            "against the unmerged adapter on {} examples of {} (held-out loss {ref_loss:.5}; the base alone {base_loss:.5}):",
            examples.len(),
            a.check_data.display()
        );
        for (name, c) in [("f32 merge", &checks[0]), ("nf4 merge", &checks[1])] {
            let k = kept(c).map_or(String::new(), |k| {
                format!(", keeps {:.0}% of the adapter's gain", 100.0 * k)
            });
            eprintln!(
                "  {name}: held-out loss {:.5} ({:+.2e}), logits max |diff| {:.3e}, mean |diff| {:.3e}{k}",
                c.loss, c.loss_delta, c.logits_max_abs_diff, c.logits_mean_abs_diff
            );
        }
        if a.merged_format == "nf4" && kept(&checks[1]).is_some_and(|k| k < 0.5) {
            eprintln!(
                "warning: re-quantizing to nf4 keeps less than half of the adapter's gain on the check data (the update is small against nf4's step); --merged-format f32 keeps it, or serve the adapter unmerged on the quantized base"
            );
        }
    }

    // write the chosen merge
    let report_text = serde_json::to_string_pretty(&report).expect("json");
    write_folder(&a.out, |dir| {
        if a.merged_format == "nf4" {
            let nm = nf4_model.as_ref().expect("built above");
            let mut rest = nm.hf_weights(false).ctx()?;
            rest.retain(|k, _| !nf4.contains_key(k));
            loader::save_hf_dir_nf4(dir, &model.config, &rest, &nf4, &tok).ctx()?;
        } else {
            loader::save_hf_dir(dir, &model.config, &dense, &tok).ctx()?;
        }
        let p = dir.join("merge_report.json");
        std::fs::write(&p, &report_text).map_err(|e| format!("{}: {e}", p.display()))
    })?;
    let onto = if quantized_base {
        format!("the dequantized base ({base_desc})")
    } else {
        "the f32 base".to_string()
    };
    let stored = if a.merged_format == "nf4" {
        "re-quantized to nf4 (bitsandbytes layout)"
    } else {
        "stored in f32"
    };
    println!(
        "merged {n_adapters} adapters onto {onto}, {stored}; wrote {}",
        a.out.display()
    );
    Ok(())
}
