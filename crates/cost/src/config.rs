//! The cost config (`configs/cost/*.toml`): prices with the date they were taken, the
//! strategies, and optionally published claims to check against the model.
//!
//! Unknown keys are errors. Values are checked after parsing so that each problem is
//! reported on one line naming the file and the key.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The strategy kinds the model knows.
pub const STRATEGY_KINDS: [&str; 6] = ["prompt", "rag", "lora", "qlora", "full", "distill"];

/// Per-call cost modes.
pub const PER_CALL_MODES: [&str; 4] = ["api", "self_hosted", "fixed", "table"];

/// Claim checks.
pub const CLAIM_CHECKS: [&str; 4] = ["formula", "payback", "crossover", "cheapest"];

/// A whole cost config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostConfig {
    /// Short name of the scenario.
    pub name: String,
    /// Where the assumptions come from.
    #[serde(default)]
    pub source: String,
    /// Currency of every amount (amounts keys end in `_usd` for readability; only the
    /// label changes).
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Days in a month, for daily volumes to monthly costs (default 365/12).
    #[serde(default)]
    pub days_per_month: Option<f64>,
    /// Horizon in months over which upfront costs are weighed (crossovers, decisions).
    pub horizon_months: Option<f64>,
    /// Daily call volumes for the cost table (default 1K, 10K, 50K, 100K, 500K, 1M).
    #[serde(default)]
    pub volumes: Vec<f64>,
    /// Volume bands for the decision table (default below 10K, 10K-100K, above 100K).
    #[serde(default)]
    pub bands: Vec<Band>,
    /// The strategy other strategies' payback is measured against (default: the first).
    #[serde(default)]
    pub baseline: Option<String>,
    /// Prices.
    pub prices: Prices,
    /// The strategies, in display order.
    #[serde(default, rename = "strategy")]
    pub strategies: Vec<StrategyConfig>,
    /// Published claims to check against the model.
    #[serde(default, rename = "claim")]
    pub claims: Vec<Claim>,
}

fn default_currency() -> String {
    "USD".into()
}

/// A band of daily call volumes for the decision table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Band {
    /// Label, e.g. `< 10K`.
    pub label: String,
    /// Lowest daily volume of the band.
    pub from: f64,
    /// Highest daily volume of the band.
    pub to: f64,
}

/// Prices, with the date they were taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// The date the prices were taken (`YYYY-MM-DD` or `YYYY-MM`). Required.
    pub taken: Option<String>,
    /// Where they were taken from.
    #[serde(default)]
    pub source: String,
    /// Engineer time, per hour. Required.
    pub engineer_usd_per_hour: Option<f64>,
    /// API input (prompt) tokens, per million. Required.
    pub api_input_usd_per_mtok: Option<f64>,
    /// API output (completion) tokens, per million; required when a call has completion
    /// tokens billed through an API.
    pub api_output_usd_per_mtok: Option<f64>,
    /// Price of one device-hour, by device key (`cpu`, `h200`, `a100`, ...). A run's
    /// device matches the longest key contained in its device or GPU name.
    #[serde(default)]
    pub device_usd_per_hour: BTreeMap<String, f64>,
    /// Electricity per kWh, used to price measured energy when given.
    #[serde(default)]
    pub electricity_usd_per_kwh: Option<f64>,
}

/// One adaptation strategy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategyConfig {
    /// Unique name, used by claims and the command line.
    pub name: String,
    /// One of [`STRATEGY_KINDS`].
    pub kind: String,
    /// Display label.
    #[serde(default)]
    pub label: Option<String>,
    /// Upfront engineering hours (priced at `prices.engineer_usd_per_hour`).
    #[serde(default)]
    pub engineering_hours: f64,
    /// Upfront data preparation.
    #[serde(default)]
    pub data_prep_usd: f64,
    /// Other upfront costs (setup, teacher inference, evaluation).
    #[serde(default)]
    pub other_upfront_usd: f64,
    /// Training compute, when the strategy trains.
    #[serde(default)]
    pub training: Option<Training>,
    /// Monthly fixed cost: hosting, vector database, reserved devices.
    #[serde(default)]
    pub monthly_fixed_usd: f64,
    /// Cost per call.
    pub per_call: PerCall,
    /// Maintenance.
    #[serde(default)]
    pub maintenance: Option<Maintenance>,
    /// Free text: where the figures come from.
    #[serde(default)]
    pub note: Option<String>,
}

/// Training compute: either an assumed amount (`usd`) or device-hours on a priced device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Training {
    /// Assumed training compute cost.
    #[serde(default)]
    pub usd: Option<f64>,
    /// Device key in `prices.device_usd_per_hour`.
    #[serde(default)]
    pub device: Option<String>,
    /// Device-hours of one training run.
    #[serde(default)]
    pub device_hours: Option<f64>,
    /// Tokens of one training run (epochs x dataset tokens). With `--calibrate`, the
    /// device-hours become these tokens over the measured training tokens/s; without it,
    /// the run's own device-hours are used.
    #[serde(default)]
    pub tokens: Option<f64>,
}

/// How much one call costs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerCall {
    /// One of [`PER_CALL_MODES`]: `api` (tokens x API prices), `self_hosted`
    /// (device-seconds per call x device-hour price, or tokens x `usd_per_mtok`), `fixed`
    /// (`usd_per_call`), `table` (`monthly_usd` at `at_daily_calls`, the way published
    /// tables state it).
    pub mode: String,
    /// Prompt tokens per call.
    #[serde(default)]
    pub prompt_tokens: f64,
    /// Completion tokens per call.
    #[serde(default)]
    pub completion_tokens: f64,
    /// `fixed`: cost per call.
    #[serde(default)]
    pub usd_per_call: Option<f64>,
    /// `table`: monthly variable cost at `at_daily_calls`.
    #[serde(default)]
    pub monthly_usd: Option<f64>,
    /// `table`: the daily volume `monthly_usd` is stated at.
    #[serde(default)]
    pub at_daily_calls: Option<f64>,
    /// `self_hosted`: device key in `prices.device_usd_per_hour`.
    #[serde(default)]
    pub device: Option<String>,
    /// `self_hosted`: generated tokens per second per device (batched serving).
    #[serde(default)]
    pub generate_tokens_per_s: Option<f64>,
    /// `self_hosted`: prompt tokens per second per device (prefill); without it prompt
    /// tokens are charged at the generation rate (an upper bound).
    #[serde(default)]
    pub prefill_tokens_per_s: Option<f64>,
    /// `self_hosted`, when throughput is not known: an assumed price per million tokens.
    #[serde(default)]
    pub usd_per_mtok: Option<f64>,
}

/// Maintenance: retraining or re-prompting cycles per year.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Maintenance {
    /// Cycles per year.
    #[serde(default)]
    pub cycles_per_year: f64,
    /// Engineering hours per cycle.
    #[serde(default)]
    pub hours_per_cycle: f64,
    /// Whether each cycle pays the training compute again.
    #[serde(default)]
    pub retrain: bool,
    /// Other maintenance per year.
    #[serde(default)]
    pub other_usd_per_year: f64,
}

/// A published claim and how to check it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    /// Short id.
    pub id: String,
    /// Section of the source.
    #[serde(default)]
    pub section: String,
    /// The claim, paraphrased.
    pub text: String,
    /// One of [`CLAIM_CHECKS`].
    pub check: String,
    /// The stated value: a number, `[low, high]`, a strategy name or a list of names.
    pub stated: toml::Value,
    /// Unit of the stated and computed values (`usd`, `months`, `weeks`, `calls/day`,
    /// `ratio`, ...); `weeks` converts the model's months.
    #[serde(default)]
    pub unit: String,
    /// Relative tolerance for "follows" (default 0.05).
    #[serde(default)]
    pub tolerance: Option<f64>,
    /// `formula`: an arithmetic expression (`+ - * /`, parentheses, numbers, names).
    #[serde(default)]
    pub expr: Option<String>,
    /// `formula`: the low end of a computed range.
    #[serde(default)]
    pub expr_low: Option<String>,
    /// `formula`: the high end of a computed range.
    #[serde(default)]
    pub expr_high: Option<String>,
    /// `payback`/`crossover`: the strategy.
    #[serde(default)]
    pub strategy: Option<String>,
    /// `payback`/`crossover`: the strategy compared against.
    #[serde(default)]
    pub against: Option<String>,
    /// `payback`/`cheapest`: daily calls.
    #[serde(default)]
    pub daily_calls: Option<f64>,
    /// `crossover`/`cheapest`: horizon in months (default: the config's).
    #[serde(default)]
    pub horizon_months: Option<f64>,
    /// `cheapest`: the strategies to compare (default: all).
    #[serde(default)]
    pub among: Vec<String>,
    /// Whether maintenance is counted (default true; published tables often leave it out).
    #[serde(default)]
    pub include_maintenance: Option<bool>,
    /// Free text shown with the result.
    #[serde(default)]
    pub note: Option<String>,
}

impl CostConfig {
    /// Reads and validates a config.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, path)
    }

    /// Parses and validates config text; `path` names the file in errors.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self> {
        let cfg: CostConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(0);
            let msg = e.message().trim().replace('\n', " ");
            Error::Parse {
                path: path.into(),
                line,
                msg,
            }
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Days per month used by the model.
    pub fn days_per_month(&self) -> f64 {
        self.days_per_month.unwrap_or(365.0 / 12.0)
    }

    /// The horizon in months (validated to be positive).
    pub fn horizon_months(&self) -> f64 {
        self.horizon_months.unwrap_or(12.0)
    }

    /// The volumes of the cost table.
    pub fn volumes(&self) -> Vec<f64> {
        if self.volumes.is_empty() {
            vec![1e3, 1e4, 5e4, 1e5, 5e5, 1e6]
        } else {
            self.volumes.clone()
        }
    }

    /// The bands of the decision table.
    pub fn bands(&self) -> Vec<Band> {
        if !self.bands.is_empty() {
            return self.bands.clone();
        }
        let b = |label: &str, from: f64, to: f64| Band {
            label: label.into(),
            from,
            to,
        };
        vec![
            b("< 10K", 1e3, 1e4),
            b("10K-100K", 1e4, 1e5),
            b("> 100K", 1e5, 1e6),
        ]
    }

    /// The strategy with this name.
    pub fn strategy(&self, name: &str) -> Option<&StrategyConfig> {
        self.strategies.iter().find(|s| s.name == name)
    }

    /// The names of all strategies, comma-separated (for error messages).
    pub fn strategy_names(&self) -> String {
        self.strategies
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The price per hour of a device key, by the longest key found in `device` as a
    /// whole word (case-insensitive): `cpu` matches `cpu`, `h200` matches `NVIDIA H200`,
    /// `l4` does not match `NVIDIA L40S`.
    pub fn device_price(&self, device: &str) -> Option<(&str, f64)> {
        let d = device.to_lowercase();
        self.prices
            .device_usd_per_hour
            .iter()
            .filter(|(k, _)| contains_word(&d, &k.to_lowercase()))
            .max_by_key(|(k, _)| k.len())
            .map(|(k, v)| (k.as_str(), *v))
    }

    /// Checks every value; the first problem is returned as one line.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |key: String, msg: String| Err(Error::key(path, key, msg));
        let p = &self.prices;
        if p.taken.as_deref().is_none_or(|t| t.trim().is_empty()) {
            return err(
                "prices.taken".into(),
                "missing: the date the prices were taken, e.g. \"2026-03-01\"".into(),
            );
        }
        price(
            path,
            "prices.engineer_usd_per_hour",
            p.engineer_usd_per_hour,
            true,
        )?;
        price(
            path,
            "prices.api_input_usd_per_mtok",
            p.api_input_usd_per_mtok,
            true,
        )?;
        price(
            path,
            "prices.api_output_usd_per_mtok",
            p.api_output_usd_per_mtok,
            false,
        )?;
        price(
            path,
            "prices.electricity_usd_per_kwh",
            p.electricity_usd_per_kwh,
            false,
        )?;
        for (k, v) in &p.device_usd_per_hour {
            price(
                path,
                &format!("prices.device_usd_per_hour.{k}"),
                Some(*v),
                true,
            )?;
        }
        match self.horizon_months {
            Some(h) if !(h > 0.0 && h.is_finite()) => {
                return err(
                    "horizon_months".into(),
                    format!("expected a horizon of more than 0 months, found {h}"),
                )
            }
            _ => {}
        }
        if let Some(d) = self.days_per_month {
            if !(d > 0.0 && d <= 31.0) {
                return err(
                    "days_per_month".into(),
                    format!("expected a number of days in (0, 31], found {d}"),
                );
            }
        }
        for (i, v) in self.volumes.iter().enumerate() {
            if !(v.is_finite() && *v > 0.0) {
                return err(
                    format!("volumes[{i}]"),
                    format!("expected a daily volume above 0, found {v}"),
                );
            }
        }
        for (i, b) in self.bands.iter().enumerate() {
            if !(b.from > 0.0 && b.to > b.from) {
                return err(
                    format!("bands[{i}]"),
                    format!("expected 0 < from < to, found from {} to {}", b.from, b.to),
                );
            }
        }
        if self.strategies.is_empty() {
            return err(
                "strategy".into(),
                "expected at least one [[strategy]], found none".into(),
            );
        }
        for (i, s) in self.strategies.iter().enumerate() {
            let key = |k: &str| format!("strategy[{i}].{k}");
            if self.strategies[..i].iter().any(|o| o.name == s.name) {
                return err(
                    key("name"),
                    format!("expected a unique name, found `{}` twice", s.name),
                );
            }
            if !STRATEGY_KINDS.contains(&s.kind.as_str()) {
                return err(
                    key("kind"),
                    format!(
                        "unknown strategy `{}`, expected one of {}",
                        s.kind,
                        STRATEGY_KINDS.join(", ")
                    ),
                );
            }
            for (k, v) in [
                ("engineering_hours", s.engineering_hours),
                ("data_prep_usd", s.data_prep_usd),
                ("other_upfront_usd", s.other_upfront_usd),
                ("monthly_fixed_usd", s.monthly_fixed_usd),
            ] {
                nonneg(path, &key(k), v)?;
            }
            if let Some(t) = &s.training {
                match (t.usd, &t.device, t.device_hours) {
                    (Some(u), None, None) => price(path, &key("training.usd"), Some(u), true)?,
                    (None, Some(d), Some(h)) => {
                        nonneg(path, &key("training.device_hours"), h)?;
                        self.need_device(path, &key("training.device"), d)?;
                    }
                    _ => {
                        return err(
                            key("training"),
                            "expected either `usd` or both `device` and `device_hours`".into(),
                        )
                    }
                }
                if let Some(tok) = t.tokens {
                    nonneg(path, &key("training.tokens"), tok)?;
                }
            }
            if let Some(m) = &s.maintenance {
                nonneg(path, &key("maintenance.cycles_per_year"), m.cycles_per_year)?;
                nonneg(path, &key("maintenance.hours_per_cycle"), m.hours_per_cycle)?;
                nonneg(
                    path,
                    &key("maintenance.other_usd_per_year"),
                    m.other_usd_per_year,
                )?;
            }
            self.validate_per_call(path, &key("per_call"), &s.per_call)?;
        }
        if let Some(b) = &self.baseline {
            self.need_strategy(path, "baseline", b)?;
        }
        for (i, c) in self.claims.iter().enumerate() {
            self.validate_claim(path, i, c)?;
        }
        Ok(())
    }

    fn validate_per_call(&self, path: &Path, key: &str, pc: &PerCall) -> Result<()> {
        let k = |s: &str| format!("{key}.{s}");
        nonneg(path, &k("prompt_tokens"), pc.prompt_tokens)?;
        nonneg(path, &k("completion_tokens"), pc.completion_tokens)?;
        match pc.mode.as_str() {
            "api" => {
                if pc.completion_tokens > 0.0 && self.prices.api_output_usd_per_mtok.is_none() {
                    return Err(Error::key(
                        path,
                        "prices.api_output_usd_per_mtok",
                        format!("missing price: {key} bills completion tokens through the api"),
                    ));
                }
            }
            "fixed" => price(path, &k("usd_per_call"), pc.usd_per_call, true)?,
            "table" => {
                price(path, &k("monthly_usd"), pc.monthly_usd, true)?;
                match pc.at_daily_calls {
                    Some(v) if v > 0.0 => {}
                    other => {
                        return Err(Error::key(
                            path,
                            k("at_daily_calls"),
                            format!("expected a daily volume above 0, found {}", show(other)),
                        ))
                    }
                }
            }
            "self_hosted" => {
                if pc.usd_per_mtok.is_some() {
                    price(path, &k("usd_per_mtok"), pc.usd_per_mtok, true)?;
                } else {
                    let d = pc.device.as_deref().ok_or_else(|| {
                        Error::key(
                            path,
                            k("device"),
                            "missing: self_hosted needs `device` and throughput, or `usd_per_mtok`",
                        )
                    })?;
                    self.need_device(path, &k("device"), d)?;
                    rate(
                        path,
                        &k("generate_tokens_per_s"),
                        pc.generate_tokens_per_s,
                        true,
                    )?;
                    rate(
                        path,
                        &k("prefill_tokens_per_s"),
                        pc.prefill_tokens_per_s,
                        false,
                    )?;
                }
            }
            other => {
                return Err(Error::key(
                    path,
                    k("mode"),
                    format!(
                        "unknown mode `{other}`, expected one of {}",
                        PER_CALL_MODES.join(", ")
                    ),
                ))
            }
        }
        Ok(())
    }

    fn validate_claim(&self, path: &Path, i: usize, c: &Claim) -> Result<()> {
        let key = |s: &str| format!("claim[{i}].{s}");
        if !CLAIM_CHECKS.contains(&c.check.as_str()) {
            return Err(Error::key(
                path,
                key("check"),
                format!(
                    "unknown check `{}`, expected one of {}",
                    c.check,
                    CLAIM_CHECKS.join(", ")
                ),
            ));
        }
        for (k, v) in [("strategy", &c.strategy), ("against", &c.against)] {
            if let Some(name) = v {
                self.need_strategy(path, &key(k), name)?;
            }
        }
        for (j, name) in c.among.iter().enumerate() {
            self.need_strategy(path, &key(&format!("among[{j}]")), name)?;
        }
        if let Some(h) = c.horizon_months {
            if !(h.is_finite() && h > 0.0) {
                return Err(Error::key(
                    path,
                    key("horizon_months"),
                    format!("expected a horizon of more than 0 months, found {h}"),
                ));
            }
        }
        let need = |k: &str, present: bool| {
            if present {
                Ok(())
            } else {
                Err(Error::key(
                    path,
                    key(k),
                    format!("missing: check `{}` needs it", c.check),
                ))
            }
        };
        match c.check.as_str() {
            "formula" => need(
                "expr",
                c.expr.is_some() || (c.expr_low.is_some() && c.expr_high.is_some()),
            )?,
            "payback" => {
                need("strategy", c.strategy.is_some())?;
                need("against", c.against.is_some())?;
                need("daily_calls", c.daily_calls.is_some())?;
            }
            "crossover" => {
                need("strategy", c.strategy.is_some())?;
                need("against", c.against.is_some())?;
            }
            _ => need("daily_calls", c.daily_calls.is_some())?,
        }
        Ok(())
    }

    fn need_strategy(&self, path: &Path, key: &str, name: &str) -> Result<()> {
        if self.strategy(name).is_some() {
            Ok(())
        } else {
            Err(Error::key(
                path,
                key,
                format!(
                    "unknown strategy `{name}`, expected one of {}",
                    self.strategy_names()
                ),
            ))
        }
    }

    fn need_device(&self, path: &Path, key: &str, device: &str) -> Result<()> {
        if self.prices.device_usd_per_hour.contains_key(device) {
            Ok(())
        } else {
            Err(Error::key(
                path,
                key,
                format!(
                    "missing price: no `prices.device_usd_per_hour.{device}` for device `{device}`"
                ),
            ))
        }
    }
}

/// `pattern` in `text`, not glued to further letters or digits on either side.
fn contains_word(text: &str, pattern: &str) -> bool {
    !pattern.is_empty()
        && text.match_indices(pattern).any(|(i, _)| {
            let before = text[..i].chars().next_back();
            let after = text[i + pattern.len()..].chars().next();
            let edge = |c: Option<char>| c.is_none_or(|c| !c.is_ascii_alphanumeric());
            edge(before) && edge(after)
        })
}

fn show(v: Option<f64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "nothing".into())
}

/// A price: present when `required`, and never negative or not finite.
fn price(path: &Path, key: &str, v: Option<f64>, required: bool) -> Result<()> {
    match v {
        None if required => Err(Error::key(path, key, "missing price")),
        Some(v) if !(v >= 0.0 && v.is_finite()) => Err(Error::key(
            path,
            key,
            format!("expected a price >= 0, found {v}"),
        )),
        _ => Ok(()),
    }
}

fn nonneg(path: &Path, key: &str, v: f64) -> Result<()> {
    if v >= 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(Error::key(
            path,
            key,
            format!("expected a number >= 0, found {v}"),
        ))
    }
}

fn rate(path: &Path, key: &str, v: Option<f64>, required: bool) -> Result<()> {
    match v {
        None if required => Err(Error::key(
            path,
            key,
            "missing: expected tokens per second above 0",
        )),
        Some(v) if !(v > 0.0 && v.is_finite()) => Err(Error::key(
            path,
            key,
            format!("expected tokens per second above 0, found {v}"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_keys_match_whole_words() {
        let text = "name = \"t\"\n[prices]\ntaken = \"2026\"\nengineer_usd_per_hour = 1\napi_input_usd_per_mtok = 1\n\
                    [prices.device_usd_per_hour]\nl4 = 0.8\nl40s = 2.0\nh100 = 3.0\n\
                    [[strategy]]\nname = \"p\"\nkind = \"prompt\"\nper_call = { mode = \"api\" }\n";
        let cfg = CostConfig::from_toml_str(text, Path::new("t.toml")).unwrap();
        assert_eq!(cfg.device_price("NVIDIA L4"), Some(("l4", 0.8)));
        assert_eq!(cfg.device_price("NVIDIA L40S"), Some(("l40s", 2.0)));
        assert_eq!(
            cfg.device_price("NVIDIA H100 80GB HBM3"),
            Some(("h100", 3.0))
        );
        assert_eq!(cfg.device_price("cpu"), None);
    }
}
