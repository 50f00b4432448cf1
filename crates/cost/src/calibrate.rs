//! Calibration: replacing assumed training compute and self-hosted throughput with what
//! run records measured.
//!
//! - Training: the `train` phase of a train run calibrates every strategy of the run's
//!   method (`extra.method`, else `extra.mode`, else `lora`) that has a `training`
//!   section. Device-hours are the strategy's `training.tokens` over the measured
//!   training tokens/s (times devices) when the config gives those tokens, otherwise the
//!   run's own device-hours.
//! - Serving: a `generate` phase calibrates every `self_hosted` strategy: generated
//!   tokens/s per device, and prefill tokens/s from a `prefill` or else `eval` phase.
//! - The device is priced at the longest `prices.device_usd_per_hour` key contained in the
//!   run's GPU name (CUDA runs) or device string (`cpu`).

use std::path::{Path, PathBuf};

use ftbench_meter::{RunKind, RunRecord};
use serde::Serialize;

use crate::config::{CostConfig, StrategyConfig};
use crate::error::{Error, Result};
use crate::model::{Measured, Model};

/// What one run contributed.
#[derive(Debug, Clone, Serialize)]
pub struct RunCalibration {
    /// The run folder.
    pub run: String,
    /// Its id.
    pub run_id: String,
    /// Model.
    pub model: String,
    /// Device string.
    pub device: String,
    /// The price key the device matched, and its price per hour.
    pub device_key: String,
    /// Price per device-hour.
    pub device_usd_per_hour: f64,
    /// The method the run trained with (`lora`, `full`, ...), for train runs.
    pub method: Option<String>,
    /// Training tokens/s, warm-up excluded.
    pub train_tokens_per_s: Option<f64>,
    /// Training device-hours of the run.
    pub train_device_hours: Option<f64>,
    /// Devices the run held.
    pub devices: u32,
    /// Generation tokens/s.
    pub generate_tokens_per_s: Option<f64>,
    /// Prefill tokens/s.
    pub prefill_tokens_per_s: Option<f64>,
    /// Energy of the train phase, joules, when measured.
    pub train_energy_joules: Option<f64>,
    /// Why energy is absent, when it is.
    pub energy_note: Option<String>,
}

/// The calibration of a config by runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Calibration {
    /// Per run.
    pub runs: Vec<RunCalibration>,
    /// One line per replaced input: `strategy.input = value (measured: run)`.
    pub applied: Vec<String>,
    /// Inputs that stay assumed, and why.
    pub not_applied: Vec<String>,
    #[serde(skip)]
    training: Vec<(String, f64, String, String)>,
    #[serde(skip)]
    serving: Option<(f64, Option<f64>, String, String)>,
}

/// The `run.json` of a run folder (or the path itself when it is a file).
pub fn record_path(run: &Path) -> PathBuf {
    if run.is_dir() {
        run.join("run.json")
    } else {
        run.to_path_buf()
    }
}

fn price_key(
    cfg: &CostConfig,
    cfg_path: &Path,
    rec: &RunRecord,
    run: &Path,
) -> Result<(String, f64)> {
    let name = match &rec.fingerprint.gpu_name {
        Some(g) if rec.device.to_lowercase().contains("cuda") => g.clone(),
        _ => rec.device.clone(),
    };
    cfg.device_price(&name)
        .map(|(k, v)| (k.to_string(), v))
        .ok_or_else(|| {
            Error::key(
                cfg_path,
                "prices.device_usd_per_hour",
                format!("missing price for device `{name}` of run {}", run.display()),
            )
        })
}

fn method(rec: &RunRecord) -> String {
    ["method", "mode"]
        .iter()
        .find_map(|k| {
            rec.extra
                .get(*k)
                .and_then(|v| v.as_str())
                .map(str::to_lowercase)
        })
        .unwrap_or_else(|| "lora".into())
}

impl Calibration {
    /// Reads the runs and works out what they measure for `cfg`. A run with neither a
    /// `train` nor a `generate` phase is an error.
    pub fn from_runs(cfg: &CostConfig, cfg_path: &Path, runs: &[PathBuf]) -> Result<Self> {
        Self::read_runs(cfg, cfg_path, runs, true)
    }

    /// Like [`Calibration::from_runs`], but a run with nothing to calibrate from is
    /// skipped and listed in `not_applied` (reports over mixed runs use this).
    pub fn from_runs_lenient(cfg: &CostConfig, cfg_path: &Path, runs: &[PathBuf]) -> Result<Self> {
        Self::read_runs(cfg, cfg_path, runs, false)
    }

    fn read_runs(
        cfg: &CostConfig,
        cfg_path: &Path,
        runs: &[PathBuf],
        strict: bool,
    ) -> Result<Self> {
        let mut cal = Calibration::default();
        for run in runs {
            let rec = RunRecord::read(&record_path(run))?;
            let run_s = run.display().to_string();
            let train = rec
                .phase("train")
                .filter(|_| rec.kind == RunKind::Train || rec.kind == RunKind::Bench);
            let gen = rec.phase("generate").filter(|p| p.tokens_per_s > 0.0);
            let prefill = rec
                .phase("prefill")
                .or_else(|| rec.phase("eval"))
                .filter(|p| p.tokens_per_s > 0.0);
            if train.is_none() && gen.is_none() {
                let msg = "no `train` phase and no `generate` phase with tokens: nothing to calibrate from";
                if strict {
                    return Err(Error::Run {
                        path: record_path(run),
                        msg: msg.into(),
                    });
                }
                cal.not_applied.push(format!("{run_s}: {msg}"));
                continue;
            }
            let (key, price) = price_key(cfg, cfg_path, &rec, run)?;
            let devices = train.or(gen).map(|p| p.devices.max(1)).unwrap_or(1);
            let m = method(&rec);
            if let Some(t) = train {
                if t.tokens_per_s <= 0.0 {
                    return Err(Error::Run {
                        path: record_path(run),
                        msg: "phase `train`: expected tokens_per_s above 0, found 0".into(),
                    });
                }
                cal.training
                    .push((m.clone(), t.tokens_per_s, key.clone(), run_s.clone()));
            }
            if let Some(g) = gen {
                let per_dev = g.tokens_per_s / g.devices.max(1) as f64;
                let pre = prefill.map(|p| p.tokens_per_s / p.devices.max(1) as f64);
                cal.serving = Some((per_dev, pre, key.clone(), run_s.clone()));
            }
            let energy = train.and_then(|t| t.total_joules());
            let energy_note = if energy.is_some() {
                None
            } else {
                Some(
                    train
                        .map(|t| {
                            let notes: Vec<String> = t
                                .energy
                                .iter()
                                .filter(|r| r.joules.is_none())
                                .map(|r| {
                                    format!("{}: {}", r.source, r.note.clone().unwrap_or_default())
                                })
                                .collect();
                            if notes.is_empty() {
                                "no energy source recorded".to_string()
                            } else {
                                notes.join("; ")
                            }
                        })
                        .unwrap_or_else(|| "no train phase".into()),
                )
            };
            cal.runs.push(RunCalibration {
                run: run_s,
                run_id: rec.run_id.clone(),
                model: rec.model.clone(),
                device: rec.device.clone(),
                device_key: key,
                device_usd_per_hour: price,
                method: train.map(|_| m),
                train_tokens_per_s: train.map(|t| t.tokens_per_s),
                train_device_hours: train.map(|t| t.device_hours),
                devices,
                generate_tokens_per_s: gen.map(|g| g.tokens_per_s),
                prefill_tokens_per_s: prefill.map(|p| p.tokens_per_s),
                train_energy_joules: energy,
                energy_note,
            });
        }
        // What applies to which strategy, for the summary.
        for s in &cfg.strategies {
            let m = cal.measured_for(s);
            match (&m.training, &s.training) {
                (Some((h, dev, run)), Some(_)) => cal.applied.push(format!(
                    "{}.training_device_hours = {h:.4} on {dev} (measured: {run})",
                    s.name
                )),
                (None, Some(_)) => cal.not_applied.push(format!(
                    "{}.training: assumed (no train run with method `{}`)",
                    s.name, s.kind
                )),
                _ => {}
            }
            if s.per_call.mode == "self_hosted" {
                match &m.serving {
                    Some((g, _, dev, run)) => cal.applied.push(format!(
                        "{}.generate_tokens_per_s = {g:.2} on {dev} (measured: {run})",
                        s.name
                    )),
                    None => cal.not_applied.push(format!(
                        "{}.per_call: assumed (no run with a generate phase)",
                        s.name
                    )),
                }
            }
        }
        Ok(cal)
    }

    /// The measurements that apply to one strategy.
    pub fn measured_for(&self, s: &StrategyConfig) -> Measured {
        let mut m = Measured::default();
        if let Some(t) = &s.training {
            if let Some((_, tps, key, run)) = self
                .training
                .iter()
                .rev()
                .find(|(method, ..)| *method == s.kind)
            {
                let rc = self.runs.iter().find(|r| &r.run == run);
                let devices = rc.map(|r| r.devices).unwrap_or(1) as f64;
                let hours = match t.tokens {
                    Some(tokens) => tokens / tps / 3600.0 * devices,
                    None => rc.and_then(|r| r.train_device_hours).unwrap_or(0.0),
                };
                m.training = Some((hours, key.clone(), run.clone()));
            }
        }
        if s.per_call.mode == "self_hosted" {
            m.serving = self.serving.clone();
        }
        m
    }

    /// The model of `cfg` with these measurements in place of its assumptions.
    pub fn model(&self, cfg: &CostConfig) -> Model {
        Model::with_measurements(cfg, &|s| self.measured_for(s))
    }
}
