//! `ftbench train`: one metered fine-tuning run, written to `results/<run-id>/`.
//!
//! The run is staged in `results/.<run-id>.partial/` and renamed into place only when every
//! file is written; a failed run removes its staging folder, so no half-written results remain.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use ftbench_meter::{MetricsLine, MetricsWriter, PhaseMeter, RunKind, RunRecord};
use ftbench_trainer::data::{self, Batcher};
use ftbench_trainer::device::{device_name, DeviceSpec};
use ftbench_trainer::eval::{gsm8k_exact_match, Gsm8kReport};
use ftbench_trainer::loader::{self, LoadedModel};
use ftbench_trainer::model::{Decoder, TrainMode};
use ftbench_trainer::train::{self, Mode, Optim, RunConfig};
use one_line_errors::Context;

use crate::progress::Progress;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// The run configuration (TOML)
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config key, e.g. --set train.steps=20 (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// cpu, cuda, cuda:N, metal or auto; overrides the config's `model.device`
    #[arg(long)]
    pub device: Option<String>,
}

/// Parses and opens a device named by `origin` (`--device` or a config key), as one line:
/// `--device cuda: this build has no CUDA support; rebuild with `--features cuda``.
pub fn open_device(origin: &str, spec: &str) -> CliResult<Device> {
    let spec: DeviceSpec = spec.parse().map_err(|e| device_error(origin, e))?;
    spec.open().map_err(|e| device_error(origin, e))
}

fn device_error(origin: &str, e: ftbench_trainer::Error) -> String {
    match e {
        ftbench_trainer::Error::Device { spec, msg } => {
            one_line_errors::one_line(&format!("{origin} {spec}: {msg}"))
        }
        other => one_line_errors::one_line(&other.to_string()),
    }
}

pub type CliResult<T> = std::result::Result<T, String>;

/// Error helpers: every error becomes one line.
pub mod one_line_errors {
    pub trait Context<T> {
        fn ctx(self) -> super::CliResult<T>;
    }
    impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
        fn ctx(self) -> super::CliResult<T> {
            self.map_err(|e| one_line(&e.to_string()))
        }
    }

    /// Joins a multi-line message into one line: drops the backtrace candle appends when
    /// `RUST_BACKTRACE` is set (from its first numbered frame on) and caret-only marker
    /// lines such as those under a regex parse error.
    pub fn one_line(msg: &str) -> String {
        if !msg.contains('\n') {
            return msg.to_string();
        }
        let is_frame = |t: &str| {
            t.split_once(": ")
                .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        };
        let mut parts = Vec::new();
        for line in msg.lines() {
            let t = line.trim();
            if is_frame(t) || t == "stack backtrace:" {
                break;
            }
            if !t.is_empty() && !t.chars().all(|c| c == '^' || c == '~') {
                parts.push(t);
            }
        }
        parts.join(" ")
    }

    #[cfg(test)]
    mod tests {
        use super::one_line;

        #[test]
        fn messages_become_one_line() {
            assert_eq!(one_line("a: b"), "a: b");
            let regex = "config key `lora.target_modules`: invalid regex: regex parse error:\n    ^(?:()$\n     ^\nerror: unclosed group";
            assert_eq!(one_line(regex), "config key `lora.target_modules`: invalid regex: regex parse error: ^(?:()$ error: unclosed group");
            let bt = "x.gguf: unknown magic 0x1\n   0: candle_core::error::Error::bt\n             at /src/error.rs:260:25\n   1: main";
            assert_eq!(one_line(bt), "x.gguf: unknown magic 0x1");
        }
    }
}

/// Sets the number of compute threads (0 = all cores); returns the number in use.
pub fn set_threads(threads: usize) -> usize {
    let n = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    // the global pool can be built once per process; later calls keep the first setting
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    let n = rayon::current_num_threads();
    ftbench_trainer::cpu_gemm::set_threads(n);
    n
}

/// A run id: UTC date-time and the config's name.
fn run_id(name: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}-{clean}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Claims a run folder: creates `parent/.<id>.partial` for the first id (`base`, then
/// `base-2`, `base-3`, ...) that neither a finished run nor another run's staging folder
/// uses. Run ids have a resolution of one second, so runs started within the same second
/// (or at the same time) get distinct folders instead of sharing one.
fn claim_run_dir(parent: &Path, base: &str) -> CliResult<(String, PathBuf, PathBuf)> {
    for n in 1usize.. {
        let id = if n == 1 {
            base.to_string()
        } else {
            format!("{base}-{n}")
        };
        let final_dir = parent.join(&id);
        if final_dir.exists() {
            continue;
        }
        let staging = parent.join(format!(".{id}.partial"));
        match std::fs::create_dir(&staging) {
            Ok(()) => return Ok((id, staging, final_dir)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("{}: {e}", staging.display())),
        }
    }
    unreachable!("an unused run id exists")
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether SIGINT or SIGTERM has arrived since [`catch_interrupts`].
fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// The first SIGINT/SIGTERM asks the run to stop at the next step or question and remove its
/// staging folder; a second one ends the process at once (the default action).
#[cfg(unix)]
fn catch_interrupts() {
    const SIGINT: i32 = 2;
    const SIGTERM: i32 = 15;
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    extern "C" fn on_signal(signum: i32) {
        INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: signal() is async-signal-safe; 0 is SIG_DFL
        unsafe {
            signal(signum, 0);
        }
    }
    // SAFETY: installs a handler that only stores to an atomic and resets itself
    unsafe {
        signal(SIGINT, on_signal as *const () as usize);
        signal(SIGTERM, on_signal as *const () as usize);
    }
}

#[cfg(not(unix))]
fn catch_interrupts() {}

fn check_interrupt() -> CliResult<()> {
    if interrupted() {
        return Err("interrupted; the run's staging folder was removed".into());
    }
    Ok(())
}

pub fn train(args: &TrainArgs) -> CliResult<()> {
    catch_interrupts();
    let cfg = RunConfig::load(&args.config, &args.set).ctx()?;
    let threads = set_threads(cfg.model.threads);
    // the device first: an absent one fails before any results folder exists
    let device = match &args.device {
        Some(d) => open_device("--device", d)?,
        None => open_device("config key `model.device`:", &cfg.model.device.to_string())?,
    };
    std::fs::create_dir_all(&cfg.output.dir)
        .map_err(|e| format!("{}: {e}", cfg.output.dir.display()))?;
    let (id, staging, final_dir) = claim_run_dir(&cfg.output.dir, &run_id(&cfg.name))?;
    match train_into(&cfg, &staging, &id, threads, &device) {
        Ok(()) => {
            std::fs::rename(&staging, &final_dir)
                .map_err(|e| format!("{}: {e}", final_dir.display()))?;
            println!("results: {}", final_dir.display());
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

/// Written beside a trained adapter: the base it was trained against (model, quantization).
pub const ADAPTER_BASE_FILE: &str = "ftbench_base.json";

fn train_into(
    cfg: &RunConfig,
    dir: &Path,
    id: &str,
    threads: usize,
    device: &Device,
) -> CliResult<()> {
    let device = device.clone();
    let wall = Instant::now();
    let mut record = RunRecord::new(
        id,
        RunKind::Train,
        &cfg.model.path,
        &device_name(&device),
        "f32",
        threads,
        cfg.seed,
    );

    // load: model, tokenizer, data
    let mut phase = PhaseMeter::start("load");
    let LoadedModel {
        config,
        weights,
        quantized,
        tokenizer,
        source,
        ..
    } = loader::load_with(&cfg.model.path, &device, cfg.model.quantization).ctx()?;
    let mode = match cfg.train.mode {
        Mode::Lora => TrainMode::Lora(cfg.lora.clone()),
        Mode::Full => TrainMode::Full,
    };
    let model =
        Decoder::with_quantized(config.clone(), weights, quantized, mode, cfg.seed, &device)
            .ctx()?;
    if cfg.data.max_seq_len > config.max_position_embeddings {
        return Err(format!(
            "config key `data.max_seq_len`: {} exceeds the model's context of {} tokens",
            cfg.data.max_seq_len, config.max_position_embeddings
        ));
    }
    let datasets = data::load_datasets(&cfg.data, &tokenizer).ctx()?;
    if datasets.eval.is_empty() && cfg.eval.heldout_loss {
        return Err(format!(
            "{}: no held-out examples (set data.eval_path or a larger data.heldout_fraction)",
            cfg.data.train_path.display()
        ));
    }
    let pad = data::default_pad_id(&tokenizer);
    let eval_batches = data::eval_batches(&datasets.eval, cfg.eval.batch_size, pad);
    let n_train = datasets.train.len();
    let mut batcher = Batcher::new(
        datasets.train,
        cfg.train.batch_size,
        cfg.data.max_seq_len,
        cfg.data.packing,
        pad,
        cfg.data.seed,
    )
    .ctx()?;
    record.phases.push(phase.finish());
    eprintln!(
        "model {source}: {} layers, {:.0}M parameters; {n_train} training and {} held-out examples; {threads} threads",
        config.num_hidden_layers,
        config.num_parameters() as f64 / 1e6,
        datasets.eval.len()
    );

    // eval before
    phase = PhaseMeter::start("eval");
    if cfg.eval.heldout_loss {
        let l = train::heldout_loss(&model, &eval_batches).ctx()?;
        eprintln!("held-out loss before: {l:.4}");
        record.heldout_loss_before = Some(l);
    }
    record.phases.push(phase.finish());
    let before = run_gsm8k(cfg, &model, &tokenizer, "before", &mut record)?;
    record.gsm8k_exact_match_before = before.as_ref().map(|r| r.exact_match);

    // train
    let vars: Vec<_> = model.trainable().into_iter().map(|(_, v)| v).collect();
    let n_trainable: usize = vars.iter().map(|v| v.as_tensor().elem_count()).sum();
    let mut optim = Optim::new(vars, &cfg.train).ctx()?;
    let mut metrics = MetricsWriter::create(&dir.join("metrics.jsonl")).ctx()?;
    let mut rng = ftbench_trainer::lora::rng(cfg.seed.wrapping_add(1));
    let mut phase = PhaseMeter::start("train");
    let progress = Progress::new(cfg.train.steps as u64, "train");
    let started = Instant::now();
    let mut total_tokens = 0u64;
    let mut last_loss = f64::NAN;
    for step in 1..=cfg.train.steps {
        check_interrupt()?;
        let batches: Vec<_> = (0..cfg.train.gradient_accumulation_steps)
            .map(|_| batcher.next_batch())
            .collect();
        let stats =
            train::train_step(&model, &mut optim, &batches, &cfg.train, step, &mut rng).ctx()?;
        total_tokens += stats.tokens as u64;
        phase.add_tokens(stats.tokens as u64);
        if step == 1 {
            // the first step pays one-off allocation costs; tokens/s excludes it
            phase.mark_warmup_done();
        }
        last_loss = stats.loss;
        let elapsed = started.elapsed().as_secs_f64();
        let tps = stats.tokens as f64 / stats.seconds.max(1e-9);
        metrics
            .write(&MetricsLine {
                step: step as u64,
                loss: stats.loss,
                lr: stats.lr,
                tokens: total_tokens,
                tokens_per_s: tps,
                elapsed_s: elapsed,
                grad_norm: Some(stats.grad_norm),
                extra: Default::default(),
            })
            .ctx()?;
        progress.step(
            step as u64,
            &format!(
                "loss {:.4} lr {:.2e} {:.0} tok/s",
                stats.loss, stats.lr, tps
            ),
        );
    }
    progress.finish();
    let train_phase = phase.finish();
    let train_tps = train_phase.tokens_per_s;
    record.phases.push(train_phase);

    check_interrupt()?;

    // eval after
    let phase = PhaseMeter::start("eval");
    if cfg.eval.heldout_loss {
        let l = train::heldout_loss(&model, &eval_batches).ctx()?;
        eprintln!("held-out loss after: {l:.4}");
        record.heldout_loss_after = Some(l);
    }
    record.phases.push(phase.finish());
    let after = run_gsm8k(cfg, &model, &tokenizer, "after", &mut record)?;
    record.gsm8k_exact_match_after = after.as_ref().map(|r| r.exact_match);

    // write: adapter, resolved config, run record
    match model.mode() {
        TrainMode::Lora(lc) => {
            {
                let adapter = dir.join("adapter");
                ftbench_trainer::lora::save_peft(&adapter, lc, &model.adapters(), &source).ctx()?;
                // what the adapter was trained against, so that eval and export can say when the
                // base is loaded otherwise (PEFT's adapter_config.json has no field for it)
                let base = serde_json::json!({
                    "model": source,
                    "quantization": cfg.model.quantization.as_str(),
                    "base_projections": model.base_linear_formats(),
                });
                let p = adapter.join(ADAPTER_BASE_FILE);
                ftbench_meter::write_atomic(
                    &p,
                    serde_json::to_string_pretty(&base).unwrap().as_bytes(),
                )
                .map_err(|e| format!("{}: {e}", p.display()))?
            }
        }
        // full fine-tuning: the trained weights, as an HF folder
        _ => loader::save_hf_dir(
            &dir.join("model"),
            &config,
            &model.hf_weights(false).ctx()?,
            &tokenizer,
        )
        .ctx()?,
    }
    ftbench_meter::write_atomic(&dir.join("config.toml"), cfg.to_toml().as_bytes()).ctx()?;
    let trainable = match cfg.train.mode {
        Mode::Lora => ftbench_meter::Trainable::Lora(ftbench_meter::LoraShape {
            rank: cfg.lora.rank,
            target_modules: lora_targets(&model),
        }),
        Mode::Full => ftbench_meter::Trainable::Full,
    };
    let mean_len = (total_tokens as f64
        / (cfg.train.steps * cfg.train.gradient_accumulation_steps * cfg.train.batch_size) as f64)
        .round()
        .max(1.0) as usize;
    let flops = ftbench_meter::training_flops_per_token(&config.shape(), mean_len, &trainable);
    record.steps = cfg.train.steps as u64;
    record.total_tokens = total_tokens;
    record.wall_s = wall.elapsed().as_secs_f64();
    record.tokens_per_s = train_tps;
    record.peak_rss_bytes = ftbench_meter::peak_rss_bytes();
    record.achieved_flops_per_s = Some(flops.total * train_tps);
    record.mfu = ftbench_meter::mfu(
        flops.total * train_tps,
        match &record.fingerprint.gpu_name {
            Some(gpu) if !device.is_cpu() => gpu,
            _ => &record.fingerprint.cpu_model,
        },
        "f32",
        None,
    );
    record.flops_per_token = Some(flops);
    record
        .extra
        .insert("mode".into(), serde_json::json!(cfg.train.mode));
    if let TrainMode::Lora(lc) = model.mode() {
        record
            .extra
            .insert("lora_kernel".into(), serde_json::json!(lc.kernel));
    }
    record.extra.insert(
        "quantization".into(),
        serde_json::json!(cfg.model.quantization.as_str()),
    );
    record.extra.insert(
        "base_projections".into(),
        serde_json::json!(model.base_linear_formats()),
    );
    record.extra.insert(
        "cpu_gemm".into(),
        serde_json::json!(ftbench_trainer::cpu_gemm::backend()),
    );
    let (base_params, base_bytes) = model.base_linear_footprint();
    record.extra.insert(
        "base_projection_bytes".into(),
        serde_json::json!({"parameters": base_params, "bytes": base_bytes}),
    );
    record.extra.insert(
        "trainable_parameters".into(),
        serde_json::json!(n_trainable),
    );
    record
        .extra
        .insert("batch_size".into(), serde_json::json!(cfg.train.batch_size));
    record.extra.insert(
        "gradient_accumulation_steps".into(),
        serde_json::json!(cfg.train.gradient_accumulation_steps),
    );
    record.extra.insert(
        "max_seq_len".into(),
        serde_json::json!(cfg.data.max_seq_len),
    );
    record
        .extra
        .insert("final_train_loss".into(), serde_json::json!(last_loss));
    record
        .extra
        .insert("dataset".into(), serde_json::json!(cfg.data.train_path));
    if cfg.train.mode == Mode::Lora {
        let lc = &cfg.lora;
        record.extra.insert(
            "lora".into(),
            serde_json::json!({"rank": lc.rank, "alpha": lc.alpha, "scaling": lc.scaling()}),
        );
    }
    record.write_atomic(&dir.join("run.json")).ctx()?;
    if let (Some(b), Some(a)) = (record.heldout_loss_before, record.heldout_loss_after) {
        eprintln!("held-out loss {b:.4} -> {a:.4}; {train_tps:.0} tokens/s training");
    }
    Ok(())
}

/// Canonical projection names that carry adapters (q_proj, ..., down_proj).
fn lora_targets(model: &Decoder) -> Vec<String> {
    let mut names: Vec<String> = model
        .adapters()
        .iter()
        .map(|(n, _)| n.rsplit('.').next().unwrap_or(n).to_string())
        .collect();
    names.sort();
    names.dedup();
    names
}

fn run_gsm8k(
    cfg: &RunConfig,
    model: &Decoder,
    tok: &ftbench_trainer::tokenizer::Tokenizer,
    label: &str,
    record: &mut RunRecord,
) -> CliResult<Option<Gsm8kReport>> {
    if cfg.eval.gsm8k_examples == 0 {
        return Ok(None);
    }
    // a phase of its own, so generation throughput can calibrate serving costs
    let mut phase = PhaseMeter::start("generate");
    let items = data::load_gsm8k(&cfg.eval.gsm8k_path, Some(cfg.eval.gsm8k_examples)).ctx()?;
    let progress = Progress::new(items.len() as u64, &format!("gsm8k {label}"));
    let report = gsm8k_exact_match(
        model,
        tok,
        &cfg.data,
        &items,
        cfg.eval.max_new_tokens,
        |i, correct| {
            progress.step(i as u64, &format!("{correct} correct"));
            !interrupted()
        },
    )
    .ctx()?;
    progress.finish();
    phase.add_tokens(report.generated_tokens as u64);
    record.phases.push(phase.finish());
    eprintln!(
        "gsm8k exact match {label}: {}/{} = {:.1}%",
        report.correct,
        report.total,
        100.0 * report.exact_match
    );
    Ok(Some(report))
}
