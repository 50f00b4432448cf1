//! Entry points for the `ftbench cost` and `ftbench report` subcommands.

use std::path::PathBuf;

use crate::calibrate::Calibration;
use crate::config::CostConfig;
use crate::error::{Error, Result};
use crate::output::CostReport;
use crate::report::{read_run, write_report};

/// `ftbench cost`: the cost model of a config, optionally calibrated by measured runs.
#[derive(Debug, Clone, clap::Args)]
pub struct CostArgs {
    /// Cost config (TOML), e.g. configs/cost/article.toml.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Run folder (results/RUN_ID) whose measured training compute and serving
    /// throughput replace the config's assumptions; repeatable.
    #[arg(long, value_name = "RUN_DIR")]
    pub calibrate: Vec<PathBuf>,
    /// Horizon in months for crossovers and decisions (default: the config's).
    #[arg(long, value_name = "MONTHS")]
    pub horizon: Option<f64>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `ftbench report`: a Markdown report with SVG charts.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Run folders (results/RUN_ID).
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// Cost config to add a cost section with the crossover chart.
    #[arg(long, value_name = "FILE")]
    pub cost: Option<PathBuf>,
    /// Keep every cost input assumed instead of calibrating it with the runs.
    #[arg(long)]
    pub assumed_only: bool,
    /// Horizon in months for the cost section (default: the config's).
    #[arg(long, value_name = "MONTHS")]
    pub horizon: Option<f64>,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

fn check_horizon(h: Option<f64>) -> Result<()> {
    match h {
        Some(h) if !(h > 0.0 && h.is_finite()) => Err(Error::Option {
            option: "--horizon".into(),
            msg: format!("expected a horizon of more than 0 months, found {h}"),
        }),
        _ => Ok(()),
    }
}

/// Builds the cost report `ftbench cost` prints.
pub fn cost_report(args: &CostArgs) -> Result<CostReport> {
    check_horizon(args.horizon)?;
    let cfg = CostConfig::load(&args.config)?;
    let calibration = if args.calibrate.is_empty() {
        None
    } else {
        Some(Calibration::from_runs(&cfg, &args.config, &args.calibrate)?)
    };
    Ok(CostReport::build(
        &cfg,
        &args.config,
        calibration,
        args.horizon,
    ))
}

/// Runs `ftbench cost`: prints tables, or JSON with `--json`.
pub fn run_cost(args: &CostArgs) -> Result<()> {
    let report = cost_report(args)?;
    if args.json {
        let text = serde_json::to_string_pretty(&report).expect("a cost report serialises");
        println!("{text}");
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

/// Runs `ftbench report`; returns the path of `report.md`.
pub fn run_report(args: &ReportArgs) -> Result<PathBuf> {
    check_horizon(args.horizon)?;
    let runs = args
        .runs
        .iter()
        .map(|r| read_run(r))
        .collect::<Result<Vec<_>>>()?;
    let cost = match &args.cost {
        Some(path) => {
            let cfg = CostConfig::load(path)?;
            let calibration = if args.assumed_only {
                None
            } else {
                Some(Calibration::from_runs_lenient(&cfg, path, &args.runs)?)
            };
            Some(CostReport::build(&cfg, path, calibration, args.horizon))
        }
        None => None,
    };
    let path = write_report(&runs, cost.as_ref(), &args.out)?;
    println!("report written to {}", path.display());
    Ok(path)
}
