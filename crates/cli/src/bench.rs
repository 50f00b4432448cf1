//! `ftbench bench`: benchmarks on random weights, one JSON line each.

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use ftbench_trainer::config::ModelConfig;
use ftbench_trainer::data::Batch;
use ftbench_trainer::lora::{LoraConfig, TargetModules};
use ftbench_trainer::model::{random_weights, Decoder, QuantWeights, TrainMode, Weights};
use ftbench_trainer::quant::nf4::Nf4Weight;
use ftbench_trainer::quant::{is_quantizable, QuantWeight};
use ftbench_trainer::train::{self, Optim, TrainConfig};
use serde_json::json;

use crate::run::{one_line_errors::Context, set_threads, CliResult};

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Time training steps (forward, backward, AdamW) of a preset shape on random weights
    Train(BenchTrainArgs),
}

#[derive(clap::Args)]
pub struct BenchTrainArgs {
    /// Model shape: smollm-135m, gemma3-270m or llama-3.2-1b
    #[arg(long)]
    pub preset: String,
    /// lora, qlora (LoRA on a frozen quantized base) or full
    #[arg(long, default_value = "lora")]
    pub mode: String,
    /// With --mode qlora: the base's format, nf4 (bitsandbytes NF4 with double
    /// quantization) or a GGUF block type (q4k, q5k, q6k, q8_0, q4_0, q5_0)
    #[arg(long, default_value = "nf4")]
    pub quant: String,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Timed steps (one more warm-up step runs first)
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// LoRA rank and alpha; adapters on all seven projections
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// Compute threads; 0 = all cores
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Override the preset's number of layers (quick runs)
    #[arg(long)]
    pub layers: Option<usize>,
}

pub fn run(cmd: &BenchCommand) -> CliResult<()> {
    match cmd {
        BenchCommand::Train(a) => bench_train(a),
    }
}

fn bench_train(a: &BenchTrainArgs) -> CliResult<()> {
    let threads = set_threads(a.threads);
    let mut config = ModelConfig::preset(&a.preset).ok_or_else(|| {
        format!(
            "--preset {}: unknown (expected one of {})",
            a.preset,
            ModelConfig::PRESETS.join(", ")
        )
    })?;
    if let Some(l) = a.layers {
        config.num_hidden_layers = l;
        config.sliding_layers.truncate(l);
    }
    if a.steps == 0 || a.batch == 0 || a.seq < 2 {
        return Err("--steps, --batch must be at least 1 and --seq at least 2".into());
    }
    let targets: Vec<String> = ftbench_meter::flops::LINEAR_MODULES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let lora = LoraConfig {
        rank: a.rank,
        alpha: a.alpha,
        dropout: 0.0,
        target_modules: TargetModules::List(targets.clone()),
        use_rslora: false,
    };
    let (mode, trainable) = match a.mode.as_str() {
        "lora" | "qlora" => (
            TrainMode::Lora(lora.clone()),
            ftbench_meter::Trainable::Lora(ftbench_meter::LoraShape {
                rank: a.rank,
                target_modules: targets,
            }),
        ),
        "full" => (TrainMode::Full, ftbench_meter::Trainable::Full),
        other => return Err(format!("--mode {other}: expected lora, qlora or full")),
    };
    let device = Device::Cpu;
    let mut weights = random_weights(&config, 0, &device).ctx()?;
    let quantized = if a.mode == "qlora" {
        quantize_projections(&mut weights, &a.quant)?
    } else {
        QuantWeights::new()
    };
    let model =
        Decoder::with_quantized(config.clone(), weights, quantized, mode, 0, &device).ctx()?;
    let (base_params, base_bytes) = model.base_linear_footprint();
    let base_formats = model.base_linear_formats();
    let vars: Vec<_> = model.trainable().into_iter().map(|(_, v)| v).collect();
    let n_trainable: usize = vars.iter().map(|v| v.as_tensor().elem_count()).sum();
    let tcfg = TrainConfig {
        steps: a.steps + 1,
        warmup_steps: 0,
        ..Default::default()
    };
    let mut optim = Optim::new(vars, &tcfg).ctx()?;
    let mut rng = ftbench_trainer::lora::rng(0);
    let n = a.batch * a.seq;
    let vocab = config.vocab_size as u64;
    // a fixed pseudo-random batch: every position carries loss
    let ids: Vec<u32> = (0..n as u64)
        .map(|i| ((i * 2_654_435_761 + 12_345) % vocab) as u32)
        .collect();
    let targets: Vec<u32> = ids
        .iter()
        .skip(1)
        .copied()
        .chain(std::iter::once(ids[0]))
        .collect();
    let batch = Batch {
        batch_size: a.batch,
        seq_len: a.seq,
        input_ids: ids,
        targets,
        loss_mask: vec![1.0; n],
        n_loss_tokens: n,
        n_tokens: n,
    };
    let mut times = Vec::new();
    for step in 0..=a.steps {
        let t = Instant::now();
        train::train_step(
            &model,
            &mut optim,
            std::slice::from_ref(&batch),
            &tcfg,
            step + 1,
            &mut rng,
        )
        .ctx()?;
        let s = t.elapsed().as_secs_f64();
        if step > 0 {
            times.push(s);
        }
        eprintln!(
            "step {step}{}: {s:.3} s",
            if step == 0 { " (warm-up)" } else { "" }
        );
    }
    times.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let median = times[times.len() / 2];
    let tps = n as f64 / median;
    let flops = ftbench_meter::training_flops_per_token(&config.shape(), a.seq, &trainable);
    let out = json!({
        "bench": "train",
        "preset": a.preset,
        "mode": a.mode,
        "layers": config.num_hidden_layers,
        "batch": a.batch,
        "seq": a.seq,
        "threads": threads,
        "lora_rank": (a.mode != "full").then_some(a.rank),
        "base_format": if a.mode == "qlora" { a.quant.as_str() } else { "f32" },
        "base_linear_formats": base_formats,
        "base_linear_parameters": base_params,
        "base_linear_bytes": base_bytes,
        "base_bytes_per_parameter": base_bytes as f64 / base_params as f64,
        "trainable_parameters": n_trainable,
        "timed_steps": a.steps,
        "median_s_per_step": median,
        "min_s_per_step": times[0],
        "tokens_per_s": tps,
        "flops_per_token": flops.total,
        "achieved_gflops_per_s": flops.total * tps / 1e9,
        "peak_rss_bytes": ftbench_meter::peak_rss_bytes(),
        "device": "cpu",
        "dtype": "f32",
    });
    println!("{out}");
    Ok(())
}

/// Replaces the seven projections of every layer by their quantized form (`nf4` or a GGUF
/// block type), one weight at a time.
fn quantize_projections(weights: &mut Weights, format: &str) -> CliResult<QuantWeights> {
    let gguf = match format {
        "nf4" => None,
        "q4k" => Some(GgmlDType::Q4K),
        "q5k" => Some(GgmlDType::Q5K),
        "q6k" => Some(GgmlDType::Q6K),
        "q8_0" => Some(GgmlDType::Q8_0),
        "q4_0" => Some(GgmlDType::Q4_0),
        "q5_0" => Some(GgmlDType::Q5_0),
        other => {
            return Err(format!(
                "--quant {other}: expected nf4, q4k, q5k, q6k, q8_0, q4_0 or q5_0"
            ))
        }
    };
    let mut names: Vec<String> = weights
        .keys()
        .filter(|k| is_quantizable(k))
        .cloned()
        .collect();
    names.sort();
    let mut out = QuantWeights::new();
    for name in names {
        let t = weights.remove(&name).expect("listed above");
        let q = match gguf {
            None => {
                let (o, i) = t.dims2().ctx()?;
                let v = t.flatten_all().ctx()?.to_vec1::<f32>().ctx()?;
                let q = Nf4Weight::quantize(&name, &v, o, i, true).map_err(|e| e.to_string())?;
                QuantWeight::Nf4(Arc::new(q))
            }
            Some(dt) => {
                // as llama.cpp does: a k-quant whose 256-value blocks do not tile the rows
                // falls back to a 32-value block type of about the same size
                let in_f = t.dim(1).ctx()?;
                let dt = match dt {
                    GgmlDType::Q4K if in_f % 256 != 0 => GgmlDType::Q5_0,
                    GgmlDType::Q5K if in_f % 256 != 0 => GgmlDType::Q5_1,
                    GgmlDType::Q6K if in_f % 256 != 0 => GgmlDType::Q8_0,
                    dt => dt,
                };
                let qt = QTensor::quantize(&t, dt)
                    .map_err(|e| format!("--quant {format}: `{name}`: {}", first_line(&e)))?;
                QuantWeight::from_gguf(&qt, None)
                    .map_err(|e| format!("--quant {format}: `{name}`: {}", first_line(&e)))?
            }
        };
        out.insert(name, q);
    }
    Ok(out)
}

/// A candle error's message without the backtrace it may carry.
fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}
