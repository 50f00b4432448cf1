//! `cargo run -p ftbench-cost --example cost -- --config configs/cost/article.toml`:
//! the `ftbench cost` subcommand without the rest of the CLI.

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ftbench_cost::cli::CostArgs,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = ftbench_cost::cli::run_cost(&cli.args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
