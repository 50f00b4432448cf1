//! `ftbench report`: a Markdown report with SVG charts from run folders and, optionally,
//! a cost config.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use ftbench_meter::{read_metrics, MetricsLine, RunRecord};

use crate::calibrate::record_path;
use crate::chart;
use crate::claims::fmt_num;
use crate::error::{Error, Result};
use crate::model::Origin;
use crate::output::CostReport;

/// A run folder read for the report.
#[derive(Debug, Clone)]
pub struct RunData {
    /// The folder (or record path) given.
    pub path: PathBuf,
    /// Its record.
    pub record: RunRecord,
    /// Its metrics, empty when there is no `metrics.jsonl`.
    pub metrics: Vec<MetricsLine>,
}

/// Reads `run.json` and, when present, `metrics.jsonl` of a run folder.
pub fn read_run(path: &Path) -> Result<RunData> {
    let record = RunRecord::read(&record_path(path))?;
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let mpath = dir.join("metrics.jsonl");
    let metrics = if mpath.exists() {
        read_metrics(&mpath)?
    } else {
        Vec::new()
    };
    Ok(RunData {
        path: path.to_path_buf(),
        record,
        metrics,
    })
}

fn bytes(b: Option<u64>) -> String {
    match b {
        Some(b) if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        Some(b) => format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64),
        None => "-".into(),
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

fn md_table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
    let _ = writeln!(out, "| {} |", head.join(" | "));
    let _ = writeln!(
        out,
        "|{}|",
        head.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} |",
            r.iter()
                .map(|c| c.replace('|', "\\|"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    out.push('\n');
}

/// Writes `report.md` and its SVG charts into `out_dir`; returns the report's path.
pub fn write_report(
    runs: &[RunData],
    cost: Option<&CostReport>,
    out_dir: &Path,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let mut md = String::new();
    let _ = writeln!(md, "# ftbench report\n");
    let _ = writeln!(
        md,
        "{} run(s){}. Every number below is read from the run records (`run.json`, format {}) and metrics files; nothing is estimated unless marked *assumed*.\n",
        runs.len(),
        cost.map(|c| format!(" and the cost config `{}`", c.config)).unwrap_or_default(),
        ftbench_meter::RECORD_FORMAT_VERSION
    );

    // Runs.
    let _ = writeln!(md, "## Runs\n");
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let x = &r.record;
            vec![
                format!("`{}`", x.run_id),
                format!("{:?}", x.kind).to_lowercase(),
                x.model.clone(),
                format!("{} {} x{}", x.device, x.dtype, x.threads),
                x.steps.to_string(),
                fmt_num(x.total_tokens as f64),
                format!("{:.1}", x.tokens_per_s),
                format!("{:.1}", x.wall_s),
                bytes(x.peak_rss_bytes),
                format!(
                    "{} -> {}",
                    opt(x.heldout_loss_before, 4),
                    opt(x.heldout_loss_after, 4)
                ),
                format!(
                    "{} -> {}",
                    opt(x.gsm8k_exact_match_before, 3),
                    opt(x.gsm8k_exact_match_after, 3)
                ),
                x.achieved_flops_per_s
                    .map(|f| format!("{:.2}", f / 1e9))
                    .unwrap_or_else(|| "-".into()),
                x.mfu
                    .map(|m| format!("{:.1}%", m * 100.0))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    md_table(
        &mut md,
        &[
            "run",
            "kind",
            "model",
            "device",
            "steps",
            "tokens",
            "tokens/s",
            "wall s",
            "peak RSS",
            "held-out loss",
            "GSM8K EM",
            "GFLOP/s",
            "MFU",
        ],
        &rows,
    );

    // Loss.
    let with_metrics: Vec<(String, Vec<MetricsLine>)> = runs
        .iter()
        .filter(|r| !r.metrics.is_empty())
        .map(|r| (r.record.run_id.clone(), r.metrics.clone()))
        .collect();
    let _ = writeln!(md, "## Loss\n");
    if with_metrics.is_empty() {
        let _ = writeln!(md, "No run has a `metrics.jsonl`.\n");
    } else {
        chart::loss_chart(&out_dir.join("loss.svg"), &with_metrics)?;
        let _ = writeln!(md, "![training loss by step](loss.svg)\n");
    }

    // Throughput and phases.
    let _ = writeln!(md, "## Throughput per phase\n");
    let phases: Vec<(String, Vec<ftbench_meter::PhaseRecord>)> = runs
        .iter()
        .map(|r| (r.record.run_id.clone(), r.record.phases.clone()))
        .collect();
    if phases.iter().all(|p| p.1.iter().all(|x| x.tokens == 0)) {
        let _ = writeln!(md, "No phase processed tokens.\n");
    } else {
        chart::throughput_chart(&out_dir.join("throughput.svg"), &phases)?;
        let _ = writeln!(md, "![tokens per second per phase](throughput.svg)\n");
    }
    let mut rows = Vec::new();
    for r in runs {
        for p in &r.record.phases {
            let energy = match p.total_joules() {
                Some(j) => format!("{} J", fmt_num(j)),
                None if p.energy.is_empty() => "not metered".into(),
                None => "absent".into(),
            };
            rows.push(vec![
                format!("`{}`", r.record.run_id),
                p.name.clone(),
                format!("{:.2}", p.wall_s),
                format!("{:.5}", p.device_hours),
                fmt_num(p.tokens as f64),
                format!("{:.2}", p.tokens_per_s),
                if p.warmup_excluded {
                    format!("{:.2} s, {} tokens", p.warmup_s, p.warmup_tokens)
                } else {
                    "none marked".into()
                },
                bytes(p.peak_rss_bytes),
                bytes(p.cuda_peak_bytes),
                energy,
            ]);
        }
    }
    md_table(
        &mut md,
        &[
            "run",
            "phase",
            "wall s",
            "device-h",
            "tokens",
            "tokens/s",
            "warm-up excluded",
            "peak RSS",
            "CUDA peak",
            "energy",
        ],
        &rows,
    );

    // Machines.
    let _ = writeln!(md, "## Machines\n");
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let f = &r.record.fingerprint;
            vec![
                format!("`{}`", r.record.run_id),
                f.cpu_model.clone(),
                format!("{} of {}", f.threads_used, f.cpu_cores),
                f.gpu_name.clone().unwrap_or_else(|| "-".into()),
                f.gpu_driver.clone().unwrap_or_else(|| "-".into()),
                f.os.clone(),
                format!(
                    "{} {}",
                    f.ftbench_version,
                    f.git_commit
                        .as_deref()
                        .map(|c| &c[..c.len().min(10)])
                        .unwrap_or("-")
                ),
            ]
        })
        .collect();
    md_table(
        &mut md,
        &["run", "CPU", "threads", "GPU", "driver", "OS", "ftbench"],
        &rows,
    );

    if let Some(c) = cost {
        write_cost_section(&mut md, c, out_dir)?;
    }
    let path = out_dir.join("report.md");
    ftbench_meter::write_atomic(&path, md.as_bytes()).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

fn write_cost_section(md: &mut String, c: &CostReport, out_dir: &Path) -> Result<()> {
    let cur = &c.currency;
    let _ = writeln!(md, "## Cost\n");
    let _ = writeln!(
        md,
        "Config `{}` ({}), prices taken {}, {} days a month, horizon {} months, amounts in {cur}.\n",
        c.config, c.name, c.prices_taken, c.days_per_month, c.horizon_months
    );
    chart::crossover_chart(&out_dir.join("crossover.svg"), c)?;
    let _ = writeln!(
        md,
        "![monthly cost by daily calls, crossovers marked](crossover.svg)\n"
    );
    let changes = chart::envelope_changes(
        c,
        1e3,
        c.volumes.iter().map(|v| v.daily_calls).fold(1e4, f64::max),
    );
    for (k, (v, _, from, to)) in changes.iter().enumerate() {
        let _ = writeln!(
            md,
            "{}. at {} calls a day the cheapest strategy changes from {} to {}",
            k + 1,
            fmt_num(v.round()),
            c.label(from),
            c.label(to)
        );
    }
    md.push('\n');

    let rows: Vec<Vec<String>> = c
        .strategies
        .iter()
        .map(|s| {
            crate::output::strategy_row(s, &s.label, " = ", |o| match o {
                Origin::Assumed => "*assumed*".to_string(),
                Origin::Measured(r) => format!("**measured** in `{r}`"),
            })
        })
        .collect();
    md_table(
        md,
        &[
            "strategy",
            "upfront",
            "monthly fixed",
            "per call",
            "maintenance / year",
            "inputs",
        ],
        &rows,
    );

    let _ = writeln!(
        md,
        "### Decision by daily volume (cheapest over {} months)\n",
        c.horizon_months
    );
    let rows: Vec<Vec<String>> = c
        .decision
        .iter()
        .map(|d| {
            vec![
                d.band.clone(),
                format!(
                    "{} / {} / {}",
                    c.label(&d.cheapest[0]),
                    c.label(&d.cheapest[1]),
                    c.label(&d.cheapest[2])
                ),
                d.ranking_at_middle
                    .iter()
                    .map(|x| format!("{} {}", x.strategy, fmt_num(x.usd.round())))
                    .collect::<Vec<_>>()
                    .join(" < "),
            ]
        })
        .collect();
    md_table(
        md,
        &[
            "daily calls",
            "cheapest at low edge / middle / high edge",
            "cumulative cost at the middle",
        ],
        &rows,
    );

    if !c.claims.is_empty() {
        let _ = writeln!(md, "### Claims checked against the source's own numbers\n");
        let rows: Vec<Vec<String>> = c
            .claims
            .iter()
            .map(|x| {
                vec![
                    crate::output::section(&x.section),
                    x.text.clone(),
                    format!("{} {}", x.stated, x.unit),
                    format!("{} {}", x.computed, x.unit),
                    if x.follows {
                        "follows".into()
                    } else {
                        "**does not follow**".into()
                    },
                    x.arithmetic.clone(),
                ]
            })
            .collect();
        md_table(
            md,
            &[
                "section",
                "claim",
                "stated",
                "computed",
                "verdict",
                "arithmetic",
            ],
            &rows,
        );
    }
    if let Some(cal) = &c.calibration {
        let _ = writeln!(md, "### Calibration\n");
        for a in &cal.applied {
            let _ = writeln!(md, "- measured: {a}");
        }
        for a in &cal.not_applied {
            let _ = writeln!(md, "- assumed: {a}");
        }
        for r in &cal.runs {
            let e = match (r.train_energy_joules, &r.energy_note) {
                (Some(j), _) => format!("{} J over the train phase", fmt_num(j)),
                (None, Some(n)) => format!("absent ({n})"),
                _ => "absent".into(),
            };
            let _ = writeln!(md, "- energy of `{}`: {e}", r.run);
        }
        md.push('\n');
    }
    Ok(())
}
