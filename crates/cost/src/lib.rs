//! ftbench's cost model: prompt engineering, RAG, LoRA, QLoRA, full fine-tuning and
//! distillation priced from a config (`configs/cost/*.toml`), calibrated with measured
//! run records, checked against published claims, and reported as tables, JSON, and
//! Markdown with SVG charts.
//!
//! The `ftbench cost` and `ftbench report` subcommands call [`cli::run_cost`] and
//! [`cli::run_report`].

#![warn(missing_docs)]

pub mod calibrate;
pub mod chart;
pub mod claims;
pub mod cli;
pub mod config;
pub mod error;
pub mod model;
pub mod output;
pub mod report;

pub use calibrate::Calibration;
pub use claims::{check_claims, ClaimResult};
pub use config::CostConfig;
pub use error::{Error, Result};
pub use model::{Crossover, Model, Payback, Strategy};
pub use output::CostReport;
