//! The cost model: upfront, monthly fixed, per-call and maintenance cost per strategy;
//! monthly and cumulative cost by daily volume; crossovers, payback and decisions.
//!
//! For a strategy s at daily volume V over a horizon of H months, with D days a month:
//!
//! ```text
//! monthly(s, V)       = fixed(s) + per_call(s) x V x D + maintenance_per_year(s) / 12
//! cumulative(s, V, H) = upfront(s) + H x monthly(s, V)
//! crossover(a, b, H)  = the V where cumulative(a, V, H) = cumulative(b, V, H)
//! payback(a vs b, V)  = upfront(a) / (monthly(b, V) - monthly(a, V))   [months]
//! ```

use serde::Serialize;

use crate::claims::fmt_num;
use crate::config::{CostConfig, StrategyConfig};

/// Where an input value came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "origin", content = "from")]
pub enum Origin {
    /// Taken from the config (an assumption).
    Assumed,
    /// Derived from a measured run record (the run folder).
    Measured(String),
}

/// One input of a strategy's cost, with its origin.
#[derive(Debug, Clone, Serialize)]
pub struct Input {
    /// What it is (`training_device_hours`, `generate_tokens_per_s`, ...).
    pub name: String,
    /// Its value.
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// Measured or assumed.
    #[serde(flatten)]
    pub origin: Origin,
}

/// The upfront cost of a strategy, itemised.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Upfront {
    /// Engineering hours x rate.
    pub engineering_usd: f64,
    /// Data preparation.
    pub data_prep_usd: f64,
    /// Training compute (device-hours x price, or assumed).
    pub training_usd: f64,
    /// Other upfront.
    pub other_usd: f64,
    /// Sum.
    pub total_usd: f64,
}

/// A strategy with every cost resolved to money.
#[derive(Debug, Clone, Serialize)]
pub struct Strategy {
    /// Name from the config.
    pub name: String,
    /// Kind.
    pub kind: String,
    /// Display label.
    pub label: String,
    /// Upfront cost.
    pub upfront: Upfront,
    /// Monthly fixed cost.
    pub monthly_fixed_usd: f64,
    /// Cost per call.
    pub per_call_usd: f64,
    /// How the per-call cost was obtained.
    pub per_call_arithmetic: String,
    /// Maintenance per year.
    pub maintenance_per_year_usd: f64,
    /// Inputs with their origin.
    pub inputs: Vec<Input>,
}

impl Strategy {
    /// Monthly cost at `daily_calls`, maintenance included or not.
    pub fn monthly(&self, daily_calls: f64, days_per_month: f64, maintenance: bool) -> f64 {
        let m = if maintenance {
            self.maintenance_per_year_usd / 12.0
        } else {
            0.0
        };
        self.monthly_fixed_usd + self.per_call_usd * daily_calls * days_per_month + m
    }

    /// Upfront plus `months` of monthly cost.
    pub fn cumulative(
        &self,
        daily_calls: f64,
        months: f64,
        days_per_month: f64,
        maintenance: bool,
    ) -> f64 {
        self.upfront.total_usd + months * self.monthly(daily_calls, days_per_month, maintenance)
    }
}

/// Measured replacements for a strategy's assumptions (see [`crate::calibrate`]).
#[derive(Debug, Clone, Default)]
pub struct Measured {
    /// Training device-hours of one run, with the device key it is priced at, and the
    /// run folder.
    pub training: Option<(f64, String, String)>,
    /// Generation and prefill tokens/s per device, device key, run folder.
    pub serving: Option<(f64, Option<f64>, String, String)>,
}

/// The resolved model: every strategy in money, plus the config's conventions.
#[derive(Debug, Clone)]
pub struct Model {
    /// Strategies in config order.
    pub strategies: Vec<Strategy>,
    /// Days per month.
    pub days_per_month: f64,
    /// Default horizon, months.
    pub horizon_months: f64,
}

impl Model {
    /// Resolves a config without measurements.
    pub fn new(cfg: &CostConfig) -> Self {
        Self::with_measurements(cfg, &|_| Measured::default())
    }

    /// Resolves a config, replacing assumptions with what `measured` returns for each
    /// strategy.
    pub fn with_measurements(
        cfg: &CostConfig,
        measured: &dyn Fn(&StrategyConfig) -> Measured,
    ) -> Self {
        let strategies = cfg
            .strategies
            .iter()
            .map(|s| resolve(cfg, s, &measured(s)))
            .collect();
        Model {
            strategies,
            days_per_month: cfg.days_per_month(),
            horizon_months: cfg.horizon_months(),
        }
    }

    /// The strategy with this name.
    pub fn get(&self, name: &str) -> Option<&Strategy> {
        self.strategies.iter().find(|s| s.name == name)
    }

    /// The daily volume at which `a` and `b` cost the same over `months`.
    pub fn crossover(
        &self,
        a: &Strategy,
        b: &Strategy,
        months: f64,
        maintenance: bool,
    ) -> Crossover {
        let d = self.days_per_month;
        // cumulative = fixed_part + slope x V, with slope = months x days x per_call.
        let fixed = |s: &Strategy| s.cumulative(0.0, months, d, maintenance);
        let slope = |s: &Strategy| months * d * s.per_call_usd;
        let (fa, fb, sa, sb) = (fixed(a), fixed(b), slope(a), slope(b));
        let arithmetic = format!(
            "({} - {}) / ({} months x {} days x ({} - {}) per call)",
            fmt_num(fb),
            fmt_num(fa),
            fmt_num(months),
            fmt_num(d),
            fmt_num(a.per_call_usd),
            fmt_num(b.per_call_usd)
        );
        let daily_calls = if sa == sb {
            None
        } else {
            Some((fb - fa) / (sa - sb)).filter(|v| *v > 0.0 && v.is_finite())
        };
        let cheaper_above = daily_calls.map(|_| {
            if sa < sb {
                a.name.clone()
            } else {
                b.name.clone()
            }
        });
        let always_cheaper = if daily_calls.is_none() {
            // No positive crossing: one is cheaper at every volume (or they are equal).
            if fa <= fb && sa <= sb {
                Some(a.name.clone())
            } else if fb <= fa && sb <= sa {
                Some(b.name.clone())
            } else {
                None
            }
        } else {
            None
        };
        Crossover {
            a: a.name.clone(),
            b: b.name.clone(),
            horizon_months: months,
            daily_calls,
            cheaper_above,
            always_cheaper,
            arithmetic,
        }
    }

    /// Months until `a`'s upfront cost is recovered by its monthly saving over `b` at
    /// `daily_calls`; `None` when `a` saves nothing per month.
    pub fn payback(
        &self,
        a: &Strategy,
        b: &Strategy,
        daily_calls: f64,
        maintenance: bool,
    ) -> Payback {
        let d = self.days_per_month;
        let saving =
            b.monthly(daily_calls, d, maintenance) - a.monthly(daily_calls, d, maintenance);
        let months = (saving > 0.0).then(|| a.upfront.total_usd / saving);
        let incremental =
            (saving > 0.0).then(|| (a.upfront.total_usd - b.upfront.total_usd).max(0.0) / saving);
        Payback {
            strategy: a.name.clone(),
            against: b.name.clone(),
            daily_calls,
            monthly_saving_usd: saving,
            months,
            incremental_months: incremental,
            arithmetic: format!(
                "{} upfront / ({} - {}) a month",
                fmt_num(a.upfront.total_usd),
                fmt_num(b.monthly(daily_calls, d, maintenance)),
                fmt_num(a.monthly(daily_calls, d, maintenance))
            ),
        }
    }

    /// Strategies ranked by cumulative cost at `daily_calls` over `months`, cheapest first.
    pub fn ranking(
        &self,
        names: &[String],
        daily_calls: f64,
        months: f64,
        maintenance: bool,
    ) -> Vec<(String, f64)> {
        let mut r: Vec<(String, f64)> = self
            .strategies
            .iter()
            .filter(|s| names.is_empty() || names.contains(&s.name))
            .map(|s| {
                (
                    s.name.clone(),
                    s.cumulative(daily_calls, months, self.days_per_month, maintenance),
                )
            })
            .collect();
        r.sort_by(|x, y| x.1.total_cmp(&y.1));
        r
    }
}

/// Where two strategies cost the same.
#[derive(Debug, Clone, Serialize)]
pub struct Crossover {
    /// First strategy.
    pub a: String,
    /// Second strategy.
    pub b: String,
    /// Horizon, months.
    pub horizon_months: f64,
    /// Daily calls where cumulative costs are equal; `None` when they never cross.
    pub daily_calls: Option<f64>,
    /// The strategy cheaper above the crossover.
    pub cheaper_above: Option<String>,
    /// When they never cross: the one cheaper at every volume, if any.
    pub always_cheaper: Option<String>,
    /// The arithmetic.
    pub arithmetic: String,
}

/// Payback of one strategy against another.
#[derive(Debug, Clone, Serialize)]
pub struct Payback {
    /// The strategy paying back.
    pub strategy: String,
    /// The one it replaces.
    pub against: String,
    /// Daily calls.
    pub daily_calls: f64,
    /// Monthly saving.
    pub monthly_saving_usd: f64,
    /// `strategy`'s whole upfront over the monthly saving, months.
    pub months: Option<f64>,
    /// The upfront beyond `against`'s, over the monthly saving (both not yet spent).
    pub incremental_months: Option<f64>,
    /// The arithmetic.
    pub arithmetic: String,
}

fn resolve(cfg: &CostConfig, s: &StrategyConfig, measured: &Measured) -> Strategy {
    let p = &cfg.prices;
    let rate = p.engineer_usd_per_hour.unwrap_or(0.0);
    let mut inputs = vec![Input {
        name: "engineering_hours".into(),
        value: s.engineering_hours,
        unit: "h".into(),
        origin: Origin::Assumed,
    }];

    // Training compute: measured device-hours beat assumed ones.
    let training_usd = match (&s.training, &measured.training) {
        (Some(_), Some((hours, device, run))) => {
            let price = cfg
                .prices
                .device_usd_per_hour
                .get(device)
                .copied()
                .unwrap_or(0.0);
            inputs.push(Input {
                name: "training_device_hours".into(),
                value: *hours,
                unit: format!("device-h ({device})"),
                origin: Origin::Measured(run.clone()),
            });
            hours * price
        }
        (Some(t), None) => match (t.usd, &t.device, t.device_hours) {
            (Some(u), _, _) => {
                inputs.push(Input {
                    name: "training_usd".into(),
                    value: u,
                    unit: cfg.currency.clone(),
                    origin: Origin::Assumed,
                });
                u
            }
            (None, Some(d), Some(h)) => {
                inputs.push(Input {
                    name: "training_device_hours".into(),
                    value: h,
                    unit: format!("device-h ({d})"),
                    origin: Origin::Assumed,
                });
                h * cfg
                    .prices
                    .device_usd_per_hour
                    .get(d)
                    .copied()
                    .unwrap_or(0.0)
            }
            _ => 0.0,
        },
        (None, _) => 0.0,
    };

    let upfront = Upfront {
        engineering_usd: s.engineering_hours * rate,
        data_prep_usd: s.data_prep_usd,
        training_usd,
        other_usd: s.other_upfront_usd,
        total_usd: s.engineering_hours * rate
            + s.data_prep_usd
            + training_usd
            + s.other_upfront_usd,
    };

    let pc = &s.per_call;
    let (per_call_usd, per_call_arithmetic) = match pc.mode.as_str() {
        "api" => {
            let pin = p.api_input_usd_per_mtok.unwrap_or(0.0);
            let pout = p.api_output_usd_per_mtok.unwrap_or(0.0);
            let c = (pc.prompt_tokens * pin + pc.completion_tokens * pout) / 1e6;
            (
                c,
                format!(
                    "({} x {pin} + {} x {pout}) / 1e6",
                    pc.prompt_tokens, pc.completion_tokens
                ),
            )
        }
        "fixed" => {
            let c = pc.usd_per_call.unwrap_or(0.0);
            (c, format!("{c} per call"))
        }
        "table" => {
            let m = pc.monthly_usd.unwrap_or(0.0);
            let v = pc.at_daily_calls.unwrap_or(1.0);
            let dpm = cfg.days_per_month();
            (
                m / (v * dpm),
                format!("{m} a month / ({v} calls a day x {dpm} days)"),
            )
        }
        _ => {
            // self_hosted
            let tokens = pc.prompt_tokens + pc.completion_tokens;
            let (gen, pre, device, origin) = match &measured.serving {
                Some((g, pre, device, run)) => (
                    Some(*g),
                    pre.or(pc.prefill_tokens_per_s),
                    Some(device.clone()),
                    Origin::Measured(run.clone()),
                ),
                None => (
                    pc.generate_tokens_per_s,
                    pc.prefill_tokens_per_s,
                    pc.device.clone(),
                    Origin::Assumed,
                ),
            };
            match (device, gen) {
                (Some(device), Some(gen)) => {
                    let price = cfg
                        .prices
                        .device_usd_per_hour
                        .get(&device)
                        .copied()
                        .unwrap_or(0.0);
                    // Without a measured prefill rate, prompt tokens are charged at the
                    // generation rate: an upper bound, never a free prompt.
                    let prefill_s = if pc.prompt_tokens > 0.0 {
                        pc.prompt_tokens / pre.unwrap_or(gen)
                    } else {
                        0.0
                    };
                    let device_s = pc.completion_tokens / gen + prefill_s;
                    inputs.push(Input {
                        name: "generate_tokens_per_s".into(),
                        value: gen,
                        unit: format!("tokens/s ({device})"),
                        origin: origin.clone(),
                    });
                    if let Some(r) = pre {
                        inputs.push(Input {
                            name: "prefill_tokens_per_s".into(),
                            value: r,
                            unit: "tokens/s".into(),
                            origin,
                        });
                    }
                    (
                        device_s / 3600.0 * price,
                        format!(
                            "({} / {gen:.1} + {} / {}) device-s x {price} / 3600",
                            pc.completion_tokens,
                            pc.prompt_tokens,
                            fmt_rate(pre.unwrap_or(gen))
                        ),
                    )
                }
                _ => {
                    let m = pc.usd_per_mtok.unwrap_or(0.0);
                    (tokens * m / 1e6, format!("{tokens} tokens x {m} / 1e6"))
                }
            }
        }
    };

    if measured.serving.is_none() || pc.mode != "self_hosted" {
        inputs.push(Input {
            name: "per_call_usd".into(),
            value: per_call_usd,
            unit: format!("{} ({}: {per_call_arithmetic})", cfg.currency, pc.mode),
            origin: Origin::Assumed,
        });
    }
    let maintenance_per_year_usd = s
        .maintenance
        .as_ref()
        .map(|m| {
            m.cycles_per_year
                * (m.hours_per_cycle * rate + if m.retrain { training_usd } else { 0.0 })
                + m.other_usd_per_year
        })
        .unwrap_or(0.0);

    Strategy {
        name: s.name.clone(),
        kind: s.kind.clone(),
        label: s.label.clone().unwrap_or_else(|| s.name.clone()),
        upfront,
        monthly_fixed_usd: s.monthly_fixed_usd,
        per_call_usd,
        per_call_arithmetic,
        maintenance_per_year_usd,
        inputs,
    }
}

fn fmt_rate(r: f64) -> String {
    format!("{r:.1}")
}
