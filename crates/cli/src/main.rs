//! `ftbench`: fine-tune language models and measure what it costs.

mod bench;
mod commands;
mod progress;
mod run;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ftbench",
    version,
    about = "Fine-tune language models with LoRA and measure what it costs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// LoRA (or full) fine-tuning from a TOML config; writes results/<run-id>/
    Train(run::TrainArgs),
    /// Held-out loss and GSM8K exact match of a model, with or without an adapter
    Eval(commands::EvalArgs),
    /// Per-token log-probabilities of a text
    Score(commands::ScoreArgs),
    /// Greedy completion of a prompt
    Generate(commands::GenerateArgs),
    /// Write a GGUF model as an HF folder (config.json, model.safetensors, tokenizer.json)
    Convert(commands::ConvertArgs),
    /// Merge an adapter into its base model and write an HF folder
    Export(commands::ExportArgs),
    /// Benchmarks on random weights
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Check the fused and naive LoRA layers against an f64 reference on a device
    Selftest(bench::SelftestArgs),
    /// Cost of each adaptation strategy by daily call volume, optionally calibrated from runs
    Cost(ftbench_cost::cli::CostArgs),
    /// Markdown report with SVG charts from run folders
    Report(ftbench_cost::cli::ReportArgs),
}

/// candle's CPU thread pool spins 25,000 times before sleeping after each parallel
/// elementwise op; on a 2-core machine those spinning threads take the cores from the
/// GEMM threads. Measured on `bench train --preset gemma3-270m --layers 6`: 12.8 s a step at
/// the default, 5.5 s at 100-200. The user's own setting wins.
const CANDLE_SPIN_LIMIT: &str = "100";

/// glibc serves allocations above its mmap threshold with fresh, zero-filled pages and
/// returns them on free, and trims the heap top after each step, so every step page-faults
/// its activations in again. Raising the threshold to its maximum (32 MiB) and never trimming
/// keeps such buffers for reuse: on `bench train --preset smollm-135m --steps 4`, 1.4M page
/// faults instead of 11.6M and 6.2 s a step instead of 8.6 s.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_buffers() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, -1); // never give the heap top back
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_buffers() {}

fn main() -> ExitCode {
    if std::env::var_os("FTBENCH_DEFAULT_MALLOC").is_none() {
        keep_freed_buffers();
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // set before any candle op starts the pool; no other thread exists yet
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT);
    }
    if ftbench_trainer::cpu_gemm::backend() == "mkl" {
        // MKL's OpenMP threads spin, then yield, for 200 ms after each product, taking the
        // cores from rayon's and candle's threads in between; sleeping at once measured 3.0 s
        // against 3.1-3.4 s a step (`bench train --preset smollm-135m`, 2 threads)
        for (key, value) in [("KMP_BLOCKTIME", "0"), ("KMP_LIBRARY", "throughput")] {
            if std::env::var_os(key).is_none() {
                // set before the OpenMP runtime starts; no other thread exists yet
                std::env::set_var(key, value);
            }
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => run::train(&a),
        Command::Eval(a) => commands::eval(&a),
        Command::Score(a) => commands::score(&a),
        Command::Generate(a) => commands::generate(&a),
        Command::Convert(a) => commands::convert(&a),
        Command::Export(a) => commands::export(&a),
        Command::Bench(b) => bench::run(&b),
        Command::Selftest(a) => bench::selftest(&a),
        Command::Cost(a) => ftbench_cost::cli::run_cost(&a).map_err(|e| e.to_string()),
        Command::Report(a) => ftbench_cost::cli::run_report(&a)
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
