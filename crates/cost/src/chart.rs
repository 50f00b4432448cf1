//! SVG charts drawn with plotters: loss curves, throughput per phase, and monthly cost by
//! daily calls with the crossovers marked.

use std::path::Path;

use ftbench_meter::{MetricsLine, PhaseRecord};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::claims::fmt_num;
use crate::error::{Error, Result};
use crate::output::CostReport;

const W: u32 = 960;
const H: u32 = 560;

/// Colours that stay apart for up to eight series (and in greyscale print, by lightness).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn chart_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Chart {
        path: path.into(),
        msg: e.to_string(),
    }
}

fn root(path: &Path) -> DrawingArea<SVGBackend<'_>, Shift> {
    let area = SVGBackend::new(path, (W, H)).into_drawing_area();
    area
}

/// Short form for axis labels: 1K, 10K, 1M, 2.5M.
pub fn short(v: f64) -> String {
    let (x, suffix) = if v.abs() >= 1e6 {
        (v / 1e6, "M")
    } else if v.abs() >= 1e3 {
        (v / 1e3, "K")
    } else {
        (v, "")
    };
    let s = if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round())
    } else {
        format!("{x:.1}")
    };
    format!("{s}{suffix}")
}

/// Training loss by step, one line per run; `heldout_loss` values (when a metrics line
/// carries them) as points.
pub fn loss_chart(path: &Path, runs: &[(String, Vec<MetricsLine>)]) -> Result<()> {
    let area = root(path);
    area.fill(&WHITE).map_err(|e| chart_err(path, e))?;
    let max_step = runs
        .iter()
        .flat_map(|r| r.1.iter().map(|m| m.step))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let losses: Vec<f64> = runs
        .iter()
        .flat_map(|r| {
            r.1.iter().flat_map(|m| {
                std::iter::once(m.loss).chain(m.extra.get("heldout_loss").and_then(|v| v.as_f64()))
            })
        })
        .filter(|x| x.is_finite())
        .collect();
    let lo = losses.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = losses.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo, hi)
    } else {
        (0.0, 1.0)
    };
    let pad = (hi - lo) * 0.08;
    let mut chart = ChartBuilder::on(&area)
        .caption("Training loss", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0f64..max_step, (lo - pad).max(0.0)..hi + pad)
        .map_err(|e| chart_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc("loss (nats per completion token)")
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 14))
        .x_label_formatter(&|v| format!("{}", v.round()))
        .y_label_formatter(&|v| format!("{v:.2}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| chart_err(path, e))?;
    for (i, (label, lines)) in runs.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(
                lines
                    .iter()
                    .filter(|m| m.loss.is_finite())
                    .map(|m| (m.step as f64, m.loss)),
                c.stroke_width(2),
            ))
            .map_err(|e| chart_err(path, e))?
            .label(format!("{label}: training loss"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        let held: Vec<(f64, f64)> = lines
            .iter()
            .filter_map(|m| {
                m.extra
                    .get("heldout_loss")
                    .and_then(|v| v.as_f64())
                    .map(|h| (m.step as f64, h))
            })
            .collect();
        if !held.is_empty() {
            chart
                .draw_series(held.iter().map(|p| TriangleMarker::new(*p, 7, c.filled())))
                .map_err(|e| chart_err(path, e))?
                .label(format!("{label}: held-out loss"))
                .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, c.filled()));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| chart_err(path, e))?;
    area.present().map_err(|e| chart_err(path, e))
}

/// Tokens per second per phase, one bar per (run, phase), coloured by run.
pub fn throughput_chart(path: &Path, runs: &[(String, Vec<PhaseRecord>)]) -> Result<()> {
    let bars: Vec<(usize, String, f64)> = runs
        .iter()
        .enumerate()
        .flat_map(|(i, (_, phases))| {
            phases
                .iter()
                .filter(|p| p.tokens > 0)
                .map(move |p| (i, p.name.clone(), p.tokens_per_s))
        })
        .collect();
    let area = root(path);
    area.fill(&WHITE).map_err(|e| chart_err(path, e))?;
    let n = bars.len().max(1) as i32;
    let max = bars.iter().map(|b| b.2).fold(0.0, f64::max).max(1e-9) * 1.15;
    let mut chart = ChartBuilder::on(&area)
        .caption(
            "Throughput per phase (warm-up excluded)",
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        // A segmented range of 0..k has k + 1 segments.
        .build_cartesian_2d((0..n - 1).into_segmented(), 0f64..max)
        .map_err(|e| chart_err(path, e))?;
    let names: Vec<String> = bars.iter().map(|b| b.1.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("phase")
        .y_desc("tokens per second")
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 14))
        .x_labels(bars.len().max(1))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|v| short(*v))
        .y_max_light_lines(1)
        .draw()
        .map_err(|e| chart_err(path, e))?;
    let value_style =
        TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (ri, (label, _)) in runs.iter().enumerate() {
        let c = color(ri);
        let mine: Vec<(usize, f64)> = bars
            .iter()
            .enumerate()
            .filter(|(_, b)| b.0 == ri)
            .map(|(j, b)| (j, b.2))
            .collect();
        chart
            .draw_series(mine.iter().map(|(j, v)| {
                let x0 = SegmentValue::Exact(*j as i32);
                let x1 = SegmentValue::Exact(*j as i32 + 1);
                let mut r = Rectangle::new([(x0, 0.0), (x1, *v)], c.filled());
                r.set_margin(0, 0, 12, 12);
                r
            }))
            .map_err(|e| chart_err(path, e))?
            .label(label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], c.filled()));
        chart
            .draw_series(mine.iter().map(|(j, v)| {
                Text::new(
                    short_rate(*v),
                    (SegmentValue::CenterOf(*j as i32), *v + max * 0.01),
                    value_style.clone(),
                )
            }))
            .map_err(|e| chart_err(path, e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| chart_err(path, e))?;
    area.present().map_err(|e| chart_err(path, e))
}

fn short_rate(v: f64) -> String {
    if v >= 1000.0 {
        short(v)
    } else {
        format!("{v:.1}")
    }
}

/// Tick values 1, 2 and 5 times a power of ten within `[lo, hi]`.
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v >= lo && v <= hi {
                out.push(v);
            }
        }
        decade *= 10.0;
    }
    out
}

/// Where the cheapest strategy changes as daily calls grow over `[lo, hi]`: (daily
/// calls, cost a month, from, to).
pub fn envelope_changes(report: &CostReport, lo: f64, hi: f64) -> Vec<(f64, f64, String, String)> {
    let h = report.horizon_months;
    let d = report.days_per_month;
    let cost = |s: &crate::model::Strategy, v: f64| s.upfront.total_usd / h + s.monthly(v, d, true);
    let cheapest = |v: f64| {
        report
            .strategies
            .iter()
            .min_by(|a, b| cost(a, v).total_cmp(&cost(b, v)))
            .map(|s| s.name.clone())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    let steps = 400;
    let mut prev = cheapest(lo);
    for k in 1..=steps {
        let v = lo * (hi / lo).powf(k as f64 / steps as f64);
        let now = cheapest(v);
        if now != prev {
            // The exact crossing of the two, from the model's straight lines.
            let a = report.strategies.iter().find(|s| s.name == prev).unwrap();
            let b = report.strategies.iter().find(|s| s.name == now).unwrap();
            let slope = (a.per_call_usd - b.per_call_usd) * d;
            let x = if slope != 0.0 {
                (cost(b, 0.0) - cost(a, 0.0)) / slope
            } else {
                v
            };
            out.push((x, cost(a, x), prev.clone(), now.clone()));
            prev = now;
        }
    }
    out
}

/// Monthly cost (upfront spread over the horizon, plus fixed, per-call and maintenance)
/// against daily calls on log-log axes, one line per strategy. Marked and listed in the
/// legend: the volumes where the cheapest strategy changes (numbered circles) and where
/// each strategy crosses the baseline (lettered crosses).
pub fn crossover_chart(path: &Path, report: &CostReport) -> Result<()> {
    let vols: Vec<f64> = report.volumes.iter().map(|v| v.daily_calls).collect();
    let lo = vols.iter().cloned().fold(f64::INFINITY, f64::min).min(1e3);
    let hi = vols.iter().cloned().fold(0.0, f64::max).max(lo * 10.0);
    let h = report.horizon_months;
    let d = report.days_per_month;
    let cost = |s: &crate::model::Strategy, v: f64| s.upfront.total_usd / h + s.monthly(v, d, true);
    let mut ymin = f64::INFINITY;
    let mut ymax: f64 = 0.0;
    for s in &report.strategies {
        for v in [lo, hi] {
            ymin = ymin.min(cost(s, v));
            ymax = ymax.max(cost(s, v));
        }
    }
    // Widen to the ticks just outside the data, so both ends carry a label.
    let ymin = log_ticks(ymin / 10.0, ymin * 0.9)
        .last()
        .copied()
        .unwrap_or(ymin * 0.5)
        .max(1e-6);
    let ymax = log_ticks(ymax * 1.1, ymax * 10.0)
        .first()
        .copied()
        .unwrap_or(ymax * 2.0);
    let changes = envelope_changes(report, lo, hi);

    let area = root(path);
    area.fill(&WHITE).map_err(|e| chart_err(path, e))?;
    let caption = format!(
        "Monthly cost by daily calls (upfront spread over {} months)",
        fmt_num(h)
    );
    let mut chart = ChartBuilder::on(&area)
        .caption(caption, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(84)
        .build_cartesian_2d(
            (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
            (ymin..ymax)
                .log_scale()
                .with_key_points(log_ticks(ymin, ymax)),
        )
        .map_err(|e| chart_err(path, e))?;
    let currency = report.currency.clone();
    chart
        .configure_mesh()
        .x_desc("daily calls (log scale)")
        .y_desc(format!("cost per month, {currency} (log scale)"))
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 14))
        .x_label_formatter(&|v| short(*v))
        .y_label_formatter(&|v| short(*v))
        .light_line_style(BLACK.mix(0.05))
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(|e| chart_err(path, e))?;
    for (i, s) in report.strategies.iter().enumerate() {
        let c = color(i);
        let pts: Vec<(f64, f64)> = (0..=200)
            .map(|k| {
                let v = lo * (hi / lo).powf(k as f64 / 200.0);
                (v, cost(s, v))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(3)))
            .map_err(|e| chart_err(path, e))?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
    }
    for (k, (v, y, from, to)) in changes.iter().enumerate() {
        let text = format!(
            "{}: {} calls/day, {} -> {}",
            k + 1,
            fmt_num(v.round()),
            report.label(from),
            report.label(to)
        );
        let pos = (*v, *y);
        chart
            .draw_series(std::iter::once(Circle::new(pos, 7, BLACK.stroke_width(2))))
            .map_err(|e| chart_err(path, e))?
            .label(text)
            .legend(|(x, y)| Circle::new((x + 10, y), 6, BLACK.stroke_width(2)));
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{}", k + 1),
                (*v, *y * 1.22),
                TextStyle::from(("sans-serif", 15).into_font().style(FontStyle::Bold))
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            )))
            .map_err(|e| chart_err(path, e))?;
    }
    // Where each strategy crosses the baseline, lettered below the point.
    let baseline_crossings: Vec<(f64, String)> = report
        .crossovers
        .iter()
        .filter(|x| x.a == report.baseline || x.b == report.baseline)
        .filter_map(|x| {
            let other = if x.a == report.baseline { &x.b } else { &x.a };
            x.daily_calls
                .filter(|v| *v >= lo && *v <= hi)
                .map(|v| (v, other.clone()))
        })
        .collect();
    let base = report.strategies.iter().find(|s| s.name == report.baseline);
    for (k, (v, other)) in baseline_crossings.iter().enumerate() {
        let Some(base) = base else { break };
        let letter = (b'A' + (k % 26) as u8) as char;
        let y = cost(base, *v);
        let text = format!(
            "{letter}: {} = {} at {} calls/day",
            report.label(other),
            report.label(&report.baseline),
            fmt_num(v.round())
        );
        chart
            .draw_series(std::iter::once(Cross::new(
                (*v, y),
                6,
                BLACK.stroke_width(2),
            )))
            .map_err(|e| chart_err(path, e))?
            .label(text)
            .legend(|(x, y)| Cross::new((x + 10, y), 5, BLACK.stroke_width(2)));
        chart
            .draw_series(std::iter::once(Text::new(
                letter.to_string(),
                (*v, y / 1.22),
                TextStyle::from(("sans-serif", 15).into_font().style(FontStyle::Bold))
                    .pos(Pos::new(HPos::Center, VPos::Top)),
            )))
            .map_err(|e| chart_err(path, e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.92))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| chart_err(path, e))?;
    area.present().map_err(|e| chart_err(path, e))
}
