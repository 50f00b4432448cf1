//! `ftbench bench`: benchmarks on random weights, one JSON line each.

use std::time::Instant;

use candle_core::Device;
use ftbench_trainer::config::ModelConfig;
use ftbench_trainer::data::Batch;
use ftbench_trainer::lora::{LoraConfig, TargetModules};
use ftbench_trainer::model::{random_weights, Decoder, TrainMode};
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
    /// lora or full
    #[arg(long, default_value = "lora")]
    pub mode: String,
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
        "lora" => (
            TrainMode::Lora(lora.clone()),
            ftbench_meter::Trainable::Lora(ftbench_meter::LoraShape {
                rank: a.rank,
                target_modules: targets,
            }),
        ),
        "full" => (TrainMode::Full, ftbench_meter::Trainable::Full),
        other => return Err(format!("--mode {other}: expected lora or full")),
    };
    let device = Device::Cpu;
    let weights = random_weights(&config, 0, &device).ctx()?;
    let model = Decoder::new(config.clone(), weights, mode, 0, &device).ctx()?;
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
        "lora_rank": (a.mode == "lora").then_some(a.rank),
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
