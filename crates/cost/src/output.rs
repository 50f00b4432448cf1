//! The cost model's result for a config, as a serialisable report and as terminal text.

use std::path::Path;

use serde::Serialize;

use crate::calibrate::Calibration;
use crate::claims::{check_claims, fmt_num, ClaimResult};
use crate::config::CostConfig;
use crate::model::{Crossover, Model, Origin, Payback, Strategy};

/// A cost of one strategy.
#[derive(Debug, Clone, Serialize)]
pub struct Cost {
    /// Strategy name.
    pub strategy: String,
    /// Amount.
    pub usd: f64,
}

/// Costs at one daily volume.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeRow {
    /// Daily calls.
    pub daily_calls: f64,
    /// Monthly cost (maintenance included, upfront not).
    pub monthly: Vec<Cost>,
    /// Upfront plus monthly cost over the horizon.
    pub cumulative: Vec<Cost>,
}

/// One band of the decision table.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRow {
    /// Band label.
    pub band: String,
    /// Lowest daily volume.
    pub from: f64,
    /// Highest daily volume.
    pub to: f64,
    /// Cheapest strategy over the horizon at `from`, at the geometric middle and at `to`.
    pub cheapest: [String; 3],
    /// Ranking at the geometric middle, cheapest first.
    pub ranking_at_middle: Vec<Cost>,
}

/// Everything `ftbench cost` prints.
#[derive(Debug, Clone, Serialize)]
pub struct CostReport {
    /// The config file.
    pub config: String,
    /// Scenario name.
    pub name: String,
    /// Source of the assumptions.
    pub source: String,
    /// Currency.
    pub currency: String,
    /// Date the prices were taken.
    pub prices_taken: String,
    /// Days per month.
    pub days_per_month: f64,
    /// Horizon, months.
    pub horizon_months: f64,
    /// The resolved strategies.
    pub strategies: Vec<Strategy>,
    /// Costs by daily volume.
    pub volumes: Vec<VolumeRow>,
    /// Crossovers of every pair over the horizon.
    pub crossovers: Vec<Crossover>,
    /// The strategy paybacks are measured against.
    pub baseline: String,
    /// Payback of every strategy against the baseline at each volume.
    pub paybacks: Vec<Payback>,
    /// Decision table over volume bands.
    pub decision: Vec<DecisionRow>,
    /// Claims checked against the config's own (uncalibrated) numbers.
    pub claims: Vec<ClaimResult>,
    /// What was measured, when calibrated.
    pub calibration: Option<Calibration>,
}

impl CostReport {
    /// Builds the report of `cfg` (read from `path`), calibrated when `calibration` is given.
    pub fn build(
        cfg: &CostConfig,
        path: &Path,
        calibration: Option<Calibration>,
        horizon: Option<f64>,
    ) -> Self {
        let mut model = match &calibration {
            Some(c) => c.model(cfg),
            None => Model::new(cfg),
        };
        if let Some(h) = horizon {
            model.horizon_months = h;
        }
        let h = model.horizon_months;
        let d = model.days_per_month;
        let volumes = cfg
            .volumes()
            .into_iter()
            .map(|v| VolumeRow {
                daily_calls: v,
                monthly: model
                    .strategies
                    .iter()
                    .map(|s| Cost {
                        strategy: s.name.clone(),
                        usd: s.monthly(v, d, true),
                    })
                    .collect(),
                cumulative: model
                    .strategies
                    .iter()
                    .map(|s| Cost {
                        strategy: s.name.clone(),
                        usd: s.cumulative(v, h, d, true),
                    })
                    .collect(),
            })
            .collect();
        let mut crossovers = Vec::new();
        for (i, a) in model.strategies.iter().enumerate() {
            for b in &model.strategies[i + 1..] {
                crossovers.push(model.crossover(a, b, h, true));
            }
        }
        let baseline = cfg
            .baseline
            .clone()
            .unwrap_or_else(|| model.strategies[0].name.clone());
        let mut paybacks = Vec::new();
        if let Some(base) = model.get(&baseline) {
            for s in model.strategies.iter().filter(|s| s.name != baseline) {
                for v in cfg.volumes() {
                    paybacks.push(model.payback(s, base, v, true));
                }
            }
        }
        let decision = cfg
            .bands()
            .into_iter()
            .map(|b| {
                let mid = (b.from * b.to).sqrt();
                let first = |v: f64| {
                    model
                        .ranking(&[], v, h, true)
                        .first()
                        .map(|x| x.0.clone())
                        .unwrap_or_default()
                };
                DecisionRow {
                    band: b.label.clone(),
                    from: b.from,
                    to: b.to,
                    cheapest: [first(b.from), first(mid), first(b.to)],
                    ranking_at_middle: model
                        .ranking(&[], mid, h, true)
                        .into_iter()
                        .map(|(strategy, usd)| Cost { strategy, usd })
                        .collect(),
                }
            })
            .collect();
        // Claims are about the source's own numbers: never calibrated, never re-horizoned.
        let claims = check_claims(cfg, &Model::new(cfg));
        CostReport {
            config: path.display().to_string(),
            name: cfg.name.clone(),
            source: cfg.source.clone(),
            currency: cfg.currency.clone(),
            prices_taken: cfg.prices.taken.clone().unwrap_or_default(),
            days_per_month: d,
            horizon_months: h,
            strategies: model.strategies,
            volumes,
            crossovers,
            baseline,
            paybacks,
            decision,
            claims,
            calibration,
        }
    }

    /// The label of a strategy.
    pub fn label(&self, name: &str) -> String {
        self.strategies
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.label.clone())
            .unwrap_or_else(|| name.into())
    }

    /// The report as terminal text: aligned tables.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let c = &self.currency;
        out.push_str(&format!(
            "cost model `{}` ({}), prices taken {}, {} days a month, horizon {} months, amounts in {c}\n",
            self.name, self.config, self.prices_taken, self.days_per_month, self.horizon_months
        ));
        if !self.source.is_empty() {
            out.push_str(&format!("source: {}\n", self.source));
        }

        out.push_str("\nstrategies\n");
        let rows: Vec<Vec<String>> = self
            .strategies
            .iter()
            .map(|s| {
                strategy_row(s, &s.name, " ", |o| match o {
                    Origin::Assumed => "assumed".to_string(),
                    Origin::Measured(r) => format!("measured: {r}"),
                })
            })
            .collect();
        out.push_str(&table(
            &[
                "strategy",
                "upfront",
                "monthly fixed",
                "per call",
                "maintenance/yr",
                "inputs",
            ],
            &rows,
        ));

        let names: Vec<String> = self.strategies.iter().map(|s| s.name.clone()).collect();
        let mut head = vec!["calls/day".to_string()];
        head.extend(names.iter().cloned());
        let head: Vec<&str> = head.iter().map(String::as_str).collect();
        out.push_str("\nmonthly cost by daily calls (maintenance included, upfront not)\n");
        let rows: Vec<Vec<String>> = self
            .volumes
            .iter()
            .map(|r| {
                std::iter::once(fmt_num(r.daily_calls))
                    .chain(r.monthly.iter().map(|x| fmt_num(x.usd)))
                    .collect()
            })
            .collect();
        out.push_str(&table(&head, &rows));
        out.push_str(&format!(
            "\ncumulative cost over {} months (upfront + months x monthly)\n",
            self.horizon_months
        ));
        let rows: Vec<Vec<String>> = self
            .volumes
            .iter()
            .map(|r| {
                std::iter::once(fmt_num(r.daily_calls))
                    .chain(r.cumulative.iter().map(|x| fmt_num(x.usd)))
                    .collect()
            })
            .collect();
        out.push_str(&table(&head, &rows));

        out.push_str(&format!(
            "\ncrossovers over {} months\n",
            self.horizon_months
        ));
        let rows: Vec<Vec<String>> = self
            .crossovers
            .iter()
            .map(|x| {
                let (v, what) = match (&x.daily_calls, &x.cheaper_above, &x.always_cheaper) {
                    (Some(v), Some(a), _) => (fmt_num(v.round()), format!("{a} cheaper above")),
                    (None, _, Some(a)) => ("none".into(), format!("{a} cheaper at every volume")),
                    _ => ("none".into(), "never equal".into()),
                };
                vec![format!("{} vs {}", x.a, x.b), v, what]
            })
            .collect();
        out.push_str(&table(&["pair", "calls/day", ""], &rows));

        if !self.paybacks.is_empty() {
            out.push_str(&format!(
                "\npayback against {} (months of saving to recover the upfront)\n",
                self.paybacks[0].against
            ));
            let rows: Vec<Vec<String>> = self
                .paybacks
                .iter()
                .map(|p| {
                    vec![
                        p.strategy.clone(),
                        fmt_num(p.daily_calls),
                        fmt_num(p.monthly_saving_usd),
                        p.months
                            .map(|m| format!("{m:.2}"))
                            .unwrap_or_else(|| "never".into()),
                    ]
                })
                .collect();
            out.push_str(&table(
                &["strategy", "calls/day", "saving/month", "months"],
                &rows,
            ));
        }

        out.push_str(&format!(
            "\ndecision by daily volume (cheapest over {} months)\n",
            self.horizon_months
        ));
        let rows: Vec<Vec<String>> = self
            .decision
            .iter()
            .map(|d| {
                vec![
                    d.band.clone(),
                    format!(
                        "{} / {} / {}",
                        fmt_num(d.from),
                        fmt_num((d.from * d.to).sqrt().round()),
                        fmt_num(d.to)
                    ),
                    d.cheapest.join(" / "),
                    d.ranking_at_middle
                        .iter()
                        .map(|c| c.strategy.clone())
                        .collect::<Vec<_>>()
                        .join(" < "),
                ]
            })
            .collect();
        out.push_str(&table(
            &["band", "at calls/day", "cheapest", "ranking at middle"],
            &rows,
        ));

        if !self.claims.is_empty() {
            let (ok, bad): (Vec<_>, Vec<_>) = self.claims.iter().partition(|c| c.follows);
            out.push_str(&format!(
                "\nclaims that follow from the source's own numbers ({})\n",
                ok.len()
            ));
            for c in ok {
                out.push_str(&claim_text(c));
            }
            out.push_str(&format!(
                "\nclaims that do not follow from the source's own numbers ({})\n",
                bad.len()
            ));
            for c in bad {
                out.push_str(&claim_text(c));
            }
        }

        if let Some(cal) = &self.calibration {
            out.push_str("\ncalibration\n");
            for r in &cal.runs {
                out.push_str(&format!(
                    "  {}: {} on {} (priced as `{}` at {}/h): train {} tokens/s, {} device-h; generate {} tokens/s; energy {}\n",
                    r.run,
                    r.model,
                    r.device,
                    r.device_key,
                    fmt_num(r.device_usd_per_hour),
                    opt(r.train_tokens_per_s),
                    r.train_device_hours.map(|h| format!("{h:.4}")).unwrap_or_else(|| "-".into()),
                    opt(r.generate_tokens_per_s),
                    match (r.train_energy_joules, &r.energy_note) {
                        (Some(j), _) => format!("{} J", fmt_num(j)),
                        (None, Some(n)) => format!("absent ({n})"),
                        _ => "absent".into(),
                    }
                ));
            }
            for a in &cal.applied {
                out.push_str(&format!("  measured: {a}\n"));
            }
            for a in &cal.not_applied {
                out.push_str(&format!("  assumed:  {a}\n"));
            }
        }
        out
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into())
}

fn claim_text(c: &ClaimResult) -> String {
    let unit = if c.unit.is_empty() {
        String::new()
    } else {
        format!(" {}", c.unit)
    };
    let mut s = format!(
        "  [{}] {} {}\n      stated {}{unit}; computed {}{unit}\n      {}\n",
        c.id,
        section(&c.section),
        c.text,
        c.stated,
        c.computed,
        c.arithmetic
    );
    if let Some(n) = &c.note {
        s.push_str(&format!("      note: {n}\n"));
    }
    s
}

/// Left-aligned first column, right-aligned others, two spaces apart, indented by two.
pub fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let n = head.len();
    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(n) {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::from(" ");
        for (i, c) in cells.iter().enumerate() {
            let pad = w[i].saturating_sub(c.chars().count());
            s.push(' ');
            if i == 0 || i == n - 1 && !c.chars().next().is_some_and(|ch| ch.is_ascii_digit()) {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            }
            s.push(' ');
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(head.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

/// `§2.1` for numbered sections, the name otherwise (`abstract`).
pub fn section(s: &str) -> String {
    if s.chars().next().is_some_and(|c| c.is_ascii_digit()) {
        format!("§{s}")
    } else {
        s.to_string()
    }
}

/// One row of the strategies table: name, upfront, monthly fixed, per call, maintenance a
/// year, and the inputs with where each came from (`origin` renders that for the medium).
pub(crate) fn strategy_row(
    s: &Strategy,
    name: &str,
    eq: &str,
    origin: impl Fn(&Origin) -> String,
) -> Vec<String> {
    let inputs = s
        .inputs
        .iter()
        .filter(|i| i.name != "engineering_hours")
        .map(|i| {
            format!(
                "{}{eq}{} {} ({})",
                i.name,
                fmt_num(i.value),
                i.unit,
                origin(&i.origin)
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    vec![
        name.to_string(),
        fmt_num(s.upfront.total_usd),
        fmt_num(s.monthly_fixed_usd),
        fmt_num(s.per_call_usd),
        fmt_num(s.maintenance_per_year_usd),
        inputs,
    ]
}
