//! `ftbench bench`: benchmarks on random weights, one JSON line each.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, Var};
use ftbench_trainer::config::ModelConfig;
use ftbench_trainer::data::Batch;
use ftbench_trainer::device::device_name;
use ftbench_trainer::fused_lora::{self, uniform};
use ftbench_trainer::lora::{LoraConfig, LoraKernel, TargetModules};
use ftbench_trainer::model::{random_weights, Decoder, QuantWeights, TrainMode, Weights};
use ftbench_trainer::quant::weight::{bf16_projections, nf4_projections, projection_names};
use ftbench_trainer::quant::QuantWeight;
use ftbench_trainer::train::{self, Optim, TrainConfig};
use serde_json::json;

use crate::run::{
    one_line_errors::one_line, one_line_errors::Context, open_device, set_threads, CliResult,
};

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Time training steps (forward, backward, AdamW) of a preset shape on random weights
    Train(BenchTrainArgs),
    /// Time the frozen linear, the naive and the fused LoRA layer, forward and backward
    LoraKernel(BenchLoraArgs),
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
    /// quantization; the default) or a GGUF block type (q4k, q5k, q6k, q8_0, q4_0, q5_0)
    #[arg(long)]
    pub quant: Option<String>,
    /// With --mode lora: the frozen base's dtype, f32 (the default) or bf16 (products in bf16
    /// with f32 accumulation; on AMX with an MKL build). Adapters and optimizer state stay f32.
    #[arg(long)]
    pub base_dtype: Option<String>,
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
    /// cpu, cuda, cuda:N, metal or auto (the best one present)
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// The LoRA layer: fused or naive
    #[arg(long, default_value = "fused")]
    pub lora_kernel: LoraKernel,
}

#[derive(clap::Args)]
pub struct BenchLoraArgs {
    /// cpu, cuda, cuda:N, metal or auto (the best one present)
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Square layer sizes (in = out), comma-separated
    #[arg(long, value_delimiter = ',', default_value = "4096,5120,8192")]
    pub dims: Vec<usize>,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Tokens per call, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192")]
    pub tokens: Vec<usize>,
    /// f32 or bf16 (bf16: CUDA only)
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Timed repetitions per measurement (the median is reported; one warm-up first)
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Dropout on the adapter input (the same mask for naive and fused)
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Compute threads on the CPU; 0 = all cores
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Also print each row as a JSON line
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: &BenchCommand) -> CliResult<()> {
    match cmd {
        BenchCommand::Train(a) => bench_train(a),
        BenchCommand::LoraKernel(a) => bench_lora_kernel(a).map(|_| ()),
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
        kernel: a.lora_kernel,
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
    // a flag given for another mode is refused, whatever its value
    if let (Some(q), false) = (&a.quant, a.mode == "qlora") {
        return Err(format!(
            "--quant {q}: only with --mode qlora (found --mode {})",
            a.mode
        ));
    }
    let quant = a.quant.clone().unwrap_or_else(|| "nf4".into());
    let base_dtype = a.base_dtype.clone().unwrap_or_else(|| "f32".into());
    if a.base_dtype.is_some() && a.mode != "lora" {
        return Err(format!(
            "--base-dtype {base_dtype}: only with --mode lora (found --mode {})",
            a.mode
        ));
    }
    let bf16_base = match base_dtype.as_str() {
        "f32" => false,
        "bf16" => true,
        other => return Err(format!("--base-dtype {other}: expected f32 or bf16")),
    };
    let device = open_device("--device", &a.device)?;
    let mut weights = random_weights(&config, 0, &device).ctx()?;
    let quantized = if a.mode == "qlora" {
        quantize_projections(&mut weights, &quant)?
    } else if bf16_base {
        bf16_projections(&mut weights).ctx()?
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
        device.synchronize().ctx()?;
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
    // MFU against the device's dense f32 peak (the whole step runs in f32)
    let fp = ftbench_meter::Fingerprint::detect(threads, &device_name(&device));
    let device_model = match (&fp.gpu_name, device.is_cpu()) {
        (Some(gpu), false) => gpu.clone(),
        _ => fp.cpu_model.clone(),
    };
    let mfu = ftbench_meter::mfu(flops.total * tps, &device_model, "f32", None);
    let out = json!({
        "bench": "train",
        "preset": a.preset,
        "mode": a.mode,
        "layers": config.num_hidden_layers,
        "batch": a.batch,
        "seq": a.seq,
        "threads": threads,
        "lora_rank": (a.mode != "full").then_some(a.rank),
        "base_format": if a.mode == "qlora" { quant.as_str() } else { base_dtype.as_str() },
        "cpu_gemm": ftbench_trainer::cpu_gemm::backend(),
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
        "device": device_name(&device),
        "device_model": device_model,
        "dtype": "f32",
        "lora_kernel": (a.mode != "full").then_some(a.lora_kernel),
        "mfu": mfu,
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
    let Some(gguf) = gguf else {
        return nf4_projections(weights).map_err(|e| e.to_string());
    };
    let mut out = QuantWeights::new();
    for name in projection_names(weights) {
        let t = weights.remove(&name).expect("listed above");
        // as llama.cpp does: a k-quant whose 256-value blocks do not tile the rows falls back
        // to a 32-value block type of about the same size
        let in_f = t.dim(1).ctx()?;
        let dt = match gguf {
            GgmlDType::Q4K if in_f % 256 != 0 => GgmlDType::Q5_0,
            GgmlDType::Q5K if in_f % 256 != 0 => GgmlDType::Q5_1,
            GgmlDType::Q6K if in_f % 256 != 0 => GgmlDType::Q8_0,
            dt => dt,
        };
        let q = QTensor::quantize(&t, dt)
            .and_then(|qt| QuantWeight::from_gguf(&qt, None))
            .map_err(|e| format!("--quant {format}: `{name}`: {}", one_line(&e.to_string())))?;
        out.insert(name, q);
    }
    Ok(out)
}

/// One measured shape of `bench lora-kernel`: median seconds per call.
#[derive(serde::Serialize)]
struct KernelRow {
    dim: usize,
    tokens: usize,
    rank: usize,
    /// plain frozen linear, naive LoRA, fused LoRA: forward
    fwd_s: [f64; 3],
    /// the same, forward + backward
    fwd_bwd_s: [f64; 3],
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|x, y| x.partial_cmp(y).unwrap());
    v[v.len() / 2]
}

/// Median seconds of `f` over `reps` runs after one warm-up, the device synchronised.
fn time_it(
    device: &Device,
    reps: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> CliResult<f64> {
    f().ctx()?;
    device.synchronize().ctx()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f().ctx()?;
        device.synchronize().ctx()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(median(v))
}

fn bench_lora_kernel(a: &BenchLoraArgs) -> CliResult<Vec<serde_json::Value>> {
    let threads = set_threads(a.threads);
    let device = open_device("--device", &a.device)?;
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => return Err(format!("--dtype {other}: expected f32 or bf16")),
    };
    if dtype == DType::BF16 && device.is_cpu() {
        return Err(
            "--dtype bf16: the fused layer on the cpu is f32 only (use --device cuda)".into(),
        );
    }
    if a.dims.is_empty() || a.tokens.is_empty() || a.rank == 0 || a.reps == 0 {
        return Err("--dims, --tokens need at least one value; --rank, --reps at least 1".into());
    }
    if a.dims.contains(&0) {
        return Err(format!(
            "--dims {:?}: every size must be at least 1",
            a.dims
        ));
    }
    if !(0.0..1.0).contains(&a.dropout) {
        return Err(format!("--dropout {}: must be in [0, 1)", a.dropout));
    }
    let scaling = 2.0;
    let mut rows = Vec::new();
    println!(
        "lora-kernel on {}, {:?}, rank {}, dropout {}, {} threads, median of {}",
        device_name(&device),
        dtype,
        a.rank,
        a.dropout,
        threads,
        a.reps
    );
    println!(
        "{:>6} {:>6} | {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>7} {:>7} | {:>8} {:>8}",
        "dim",
        "tokens",
        "plain ms",
        "naive ms",
        "fused ms",
        "plain ms",
        "naive ms",
        "fused ms",
        "fwd x",
        "f+b x",
        "ovh fwd",
        "ovh f+b"
    );
    println!(
        "{:>14}   {:^29}   {:^29}   {:^15}   {:^17}",
        "", "forward", "forward + backward", "fused / naive", "fused over plain"
    );
    for &dim in &a.dims {
        for &tokens in &a.tokens {
            let on = |t: Tensor| -> CliResult<Tensor> {
                t.to_dtype(dtype).and_then(|t| t.to_device(&device)).ctx()
            };
            let seed = (dim * 31 + tokens) as u64;
            let x = on(uniform(&[tokens, dim], seed).ctx()?)?;
            let w =
                on((uniform(&[dim, dim], seed + 1).ctx()? * (1.0 / (dim as f64).sqrt())).ctx()?)?;
            let av = Var::from_tensor(&on(
                (uniform(&[a.rank, dim], seed + 2).ctx()? * 0.01).ctx()?
            )?)
            .ctx()?;
            let bv = Var::from_tensor(&on(
                (uniform(&[dim, a.rank], seed + 3).ctx()? * 0.01).ctx()?
            )?)
            .ctx()?;
            let xv = Var::from_tensor(&x).ctx()?;
            let dy = on(uniform(&[tokens, dim], seed + 4).ctx()?)?;
            let mask = if a.dropout > 0.0 {
                let mut rng = ftbench_trainer::lora::rng(seed);
                let m = ftbench_trainer::lora::dropout_mask(
                    &[tokens, dim],
                    a.dropout,
                    &mut rng,
                    &Device::Cpu,
                )
                .ctx()?;
                Some(on(m)?)
            } else {
                None
            };
            let (xt, at, bt) = (xv.as_tensor(), av.as_tensor(), bv.as_tensor());
            let plain = || ftbench_trainer::ops::frozen_linear(xt, &w);
            let naive = || fused_lora::lora_linear_naive(xt, &w, at, bt, scaling, mask.as_ref());
            let fused = || fused_lora::lora_linear(xt, &w, at, bt, scaling, mask.as_ref());
            let layers: [&dyn Fn() -> candle_core::Result<Tensor>; 3] = [&plain, &naive, &fused];
            let mut fwd = [0.0; 3];
            let mut fwd_bwd = [0.0; 3];
            for (i, f) in layers.iter().enumerate() {
                fwd[i] = time_it(&device, a.reps, || f().map(|_| ()))?;
                fwd_bwd[i] = time_it(&device, a.reps, || {
                    let y = f()?;
                    // d(sum(y ⊙ dy))/dy = dy: the backward starts from the given gradient
                    let g = (y * &dy)?.sum_all()?.backward()?;
                    std::hint::black_box(g.get(xt).map(|t| t.dims().len()));
                    Ok(())
                })?;
            }
            let row = KernelRow {
                dim,
                tokens,
                rank: a.rank,
                fwd_s: fwd,
                fwd_bwd_s: fwd_bwd,
            };
            println!(
                "{dim:>6} {tokens:>6} | {:>9.2} {:>9.2} {:>9.2} | {:>9.2} {:>9.2} {:>9.2} | {:>7.2} {:>7.2} | {:>7.1}% {:>7.1}%",
                fwd[0] * 1e3, fwd[1] * 1e3, fwd[2] * 1e3,
                fwd_bwd[0] * 1e3, fwd_bwd[1] * 1e3, fwd_bwd[2] * 1e3,
                fwd[1] / fwd[2], fwd_bwd[1] / fwd_bwd[2],
                (fwd[2] / fwd[0] - 1.0) * 100.0, (fwd_bwd[2] / fwd_bwd[0] - 1.0) * 100.0,
            );
            let v = serde_json::json!({
                "bench": "lora-kernel",
                "device": device_name(&device),
                "dtype": a.dtype,
                "threads": threads,
                "dropout": a.dropout,
                "row": row,
                "fused_speedup_fwd": fwd[1] / fwd[2],
                "fused_speedup_fwd_bwd": fwd_bwd[1] / fwd_bwd[2],
                "fused_overhead_fwd": fwd[2] / fwd[0] - 1.0,
                "fused_overhead_fwd_bwd": fwd_bwd[2] / fwd_bwd[0] - 1.0,
            });
            if a.json {
                println!("{v}");
            }
            rows.push(v);
        }
    }
    let mean = |k: &str| {
        rows.iter()
            .map(|r| r[k].as_f64().unwrap_or(0.0))
            .sum::<f64>()
            / rows.len() as f64
    };
    println!(
        "mean fused speed-up over naive: forward {:.2}x, forward + backward {:.2}x; mean LoRA overhead over the plain linear (fused, forward + backward): {:.1}%",
        mean("fused_speedup_fwd"),
        mean("fused_speedup_fwd_bwd"),
        mean("fused_overhead_fwd_bwd") * 100.0
    );
    Ok(rows)
}

/// `ftbench selftest`: the fused and naive LoRA layers against an f64 reference on a device.
#[derive(clap::Args)]
pub struct SelftestArgs {
    /// cpu, cuda, cuda:N, metal or auto (the best one present)
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32, bf16 or f64; repeatable (default: f32 and f64 on the cpu, f32 and bf16 elsewhere)
    #[arg(long = "dtype")]
    pub dtypes: Vec<String>,
    /// Write the results as JSON to this file
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

pub fn selftest(a: &SelftestArgs) -> CliResult<()> {
    let device = open_device("--device", &a.device)?;
    let dtypes: Vec<String> = if a.dtypes.is_empty() {
        if device.is_cpu() {
            vec!["f32".into(), "f64".into()]
        } else {
            vec!["f32".into(), "bf16".into()]
        }
    } else {
        a.dtypes.clone()
    };
    let mut results = Vec::new();
    let mut failed = 0;
    for d in &dtypes {
        let dt = match d.as_str() {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f64" => DType::F64,
            other => return Err(format!("--dtype {other}: expected f32, bf16 or f64")),
        };
        if dt == DType::BF16 && device.is_cpu() {
            return Err(
                "--dtype bf16: the fused layer on the cpu is f32 and f64 only (bf16 needs --device cuda)"
                    .into(),
            );
        }
        for (i, &shape) in fused_lora::CHECK_SHAPES.iter().enumerate() {
            for dropout in [false, true] {
                let r = fused_lora::check(&device, dt, shape, dropout, 100 + i as u64).ctx()?;
                println!(
                    "{} {d:>4} tokens {:>4} in {:>4} out {:>4} r {:>2} dropout {:<5} fused err y/dx/dA/dB {:.1e} {:.1e} {:.1e} {:.1e}  naive {:.1e} {:.1e} {:.1e} {:.1e}",
                    if r.passed { "ok  " } else { "FAIL" },
                    r.shape[0], r.shape[1], r.shape[2], r.shape[3], r.dropout,
                    r.fused_rel_err[0], r.fused_rel_err[1], r.fused_rel_err[2], r.fused_rel_err[3],
                    r.naive_rel_err[0], r.naive_rel_err[1], r.naive_rel_err[2], r.naive_rel_err[3],
                );
                failed += usize::from(!r.passed);
                results.push(r);
            }
        }
    }
    if let Some(p) = &a.json {
        let v = serde_json::json!({
            "device": device_name(&device),
            "checks": results,
            "failed": failed,
        });
        std::fs::write(p, serde_json::to_string_pretty(&v).expect("json"))
            .map_err(|e| format!("--json {}: {e}", p.display()))?;
    }
    if failed > 0 {
        return Err(format!(
            "selftest: {failed} of {} checks failed",
            results.len()
        ));
    }
    println!(
        "selftest: {} checks passed on {}",
        results.len(),
        device_name(&device)
    );
    Ok(())
}
