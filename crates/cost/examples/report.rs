//! `cargo run -p ftbench-cost --example report -- RUN_DIR... --cost C --out DIR`: the
//! `ftbench report` subcommand without the rest of the CLI.

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ftbench_cost::cli::ReportArgs,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = ftbench_cost::cli::run_report(&cli.args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
