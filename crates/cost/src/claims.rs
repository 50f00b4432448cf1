//! Checking published claims against the model built from the same publication's own
//! numbers: each claim gets the computed value, the arithmetic, and a verdict.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{Claim, CostConfig};
use crate::model::Model;

/// The outcome of checking one claim.
#[derive(Debug, Clone, Serialize)]
pub struct ClaimResult {
    /// Claim id.
    pub id: String,
    /// Section of the source.
    pub section: String,
    /// The claim.
    pub text: String,
    /// The stated value, as text.
    pub stated: String,
    /// The computed value, as text.
    pub computed: String,
    /// The computed value(s): a number, `[low, high]` or a name.
    pub computed_value: serde_json::Value,
    /// Unit.
    pub unit: String,
    /// How the computed value was obtained.
    pub arithmetic: String,
    /// True when the computed value agrees with the stated one within the tolerance.
    pub follows: bool,
    /// Free text from the config.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Num(f64),
    Range(f64, f64),
    Name(String),
    Names(Vec<String>),
}

impl Value {
    fn from_toml(v: &toml::Value) -> Option<Value> {
        let num = |v: &toml::Value| v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
        match v {
            toml::Value::String(s) => Some(Value::Name(s.clone())),
            toml::Value::Array(a) if a.len() == 2 && a.iter().all(|x| num(x).is_some()) => {
                Some(Value::Range(num(&a[0])?, num(&a[1])?))
            }
            toml::Value::Array(a) if a.iter().all(|x| x.is_str()) => Some(Value::Names(
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect(),
            )),
            other => num(other).map(Value::Num),
        }
    }

    fn show(&self) -> String {
        match self {
            Value::Num(x) => fmt_num(*x),
            Value::Range(a, b) => format!("{} to {}", fmt_num(*a), fmt_num(*b)),
            Value::Name(s) => s.clone(),
            Value::Names(v) => v.join(" or "),
        }
    }

    fn json(&self) -> serde_json::Value {
        match self {
            Value::Num(x) => serde_json::json!(x),
            Value::Range(a, b) => serde_json::json!([a, b]),
            Value::Name(s) => serde_json::json!(s),
            Value::Names(v) => serde_json::json!(v),
        }
    }
}

/// A number with thousands separators and at most 2 decimals (3 significant digits
/// for small values).
pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    if x != 0.0 && x.abs() < 0.1 {
        // Three significant digits: 0.0015, 0.000733.
        let decimals = ((-x.abs().log10()).floor() as usize + 3).min(12);
        let s = format!("{x:.decimals$}");
        return s.trim_end_matches('0').to_string();
    }
    let s = format!("{:.2}", x.abs());
    let (int, frac) = s.split_once('.').unwrap();
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let frac = frac.trim_end_matches('0');
    let sign = if x < 0.0 { "-" } else { "" };
    if frac.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{frac}")
    }
}

fn within(x: f64, lo: f64, hi: f64, tol: f64) -> bool {
    x >= lo - tol * lo.abs() && x <= hi + tol * hi.abs()
}

fn agrees(stated: &Value, computed: &Value, tol: f64) -> bool {
    match (stated, computed) {
        (Value::Num(s), Value::Num(c)) => within(*c, *s, *s, tol),
        (Value::Range(lo, hi), Value::Num(c)) => within(*c, *lo, *hi, tol),
        (Value::Num(s), Value::Range(lo, hi)) => within(*s, *lo, *hi, tol),
        (Value::Range(slo, shi), Value::Range(clo, chi)) => {
            within(*clo, *slo, *shi, tol) && within(*chi, *slo, *shi, tol)
        }
        (Value::Name(s), Value::Name(c)) => s == c,
        (Value::Names(v), Value::Name(c)) => v.contains(c),
        _ => false,
    }
}

/// The names a formula may use, with their values.
pub fn formula_variables(cfg: &CostConfig, model: &Model) -> BTreeMap<String, f64> {
    let mut v = BTreeMap::new();
    let p = &cfg.prices;
    v.insert(
        "engineer_usd_per_hour".into(),
        p.engineer_usd_per_hour.unwrap_or(0.0),
    );
    v.insert(
        "api_input_usd_per_mtok".into(),
        p.api_input_usd_per_mtok.unwrap_or(0.0),
    );
    v.insert(
        "api_output_usd_per_mtok".into(),
        p.api_output_usd_per_mtok.unwrap_or(0.0),
    );
    v.insert("days_per_month".into(), model.days_per_month);
    v.insert("horizon_months".into(), model.horizon_months);
    for s in &model.strategies {
        v.insert(format!("upfront.{}", s.name), s.upfront.total_usd);
        v.insert(format!("per_call.{}", s.name), s.per_call_usd);
        v.insert(format!("monthly_fixed.{}", s.name), s.monthly_fixed_usd);
        v.insert(
            format!("maintenance.{}", s.name),
            s.maintenance_per_year_usd,
        );
    }
    v
}

/// Checks every claim of the config against the model.
pub fn check_claims(cfg: &CostConfig, model: &Model) -> Vec<ClaimResult> {
    let vars = formula_variables(cfg, model);
    cfg.claims.iter().map(|c| check(c, model, &vars)).collect()
}

fn check(c: &Claim, model: &Model, vars: &BTreeMap<String, f64>) -> ClaimResult {
    let tol = c.tolerance.unwrap_or(0.05);
    let maint = c.include_maintenance.unwrap_or(true);
    let horizon = c.horizon_months.unwrap_or(model.horizon_months);
    let weeks = c.unit == "weeks";
    let to_unit = |months: f64| {
        if weeks {
            months * model.days_per_month / 7.0
        } else {
            months
        }
    };
    let stated = Value::from_toml(&c.stated);
    let get = |name: &Option<String>| name.as_deref().and_then(|n| model.get(n));
    let scope = if maint {
        "maintenance included"
    } else {
        "maintenance left out"
    };

    let (computed, arithmetic): (Option<Value>, String) = match c.check.as_str() {
        "formula" => {
            let eval = |e: &str| -> (Option<f64>, String) {
                match eval_expr(e, vars) {
                    Ok((x, shown)) => (Some(x), format!("{shown} = {}", fmt_num(x))),
                    Err(msg) => (None, format!("{e}: {msg}")),
                }
            };
            match (&c.expr, &c.expr_low, &c.expr_high) {
                (_, Some(lo), Some(hi)) => {
                    let (a, sa) = eval(lo);
                    let (b, sb) = eval(hi);
                    let v = a.zip(b).map(|(a, b)| Value::Range(a, b));
                    (v, format!("low: {sa}; high: {sb}"))
                }
                (Some(e), _, _) => {
                    let (a, s) = eval(e);
                    (a.map(Value::Num), s)
                }
                _ => (None, "no expression".into()),
            }
        }
        "payback" => match (get(&c.strategy), get(&c.against), c.daily_calls) {
            (Some(a), Some(b), Some(v)) => {
                let p = model.payback(a, b, v, maint);
                match p.months {
                    Some(m) => {
                        let unit_note = if weeks {
                            format!(
                                " = {:.2} months x {} / 7 = {:.2} weeks",
                                m,
                                model.days_per_month,
                                to_unit(m)
                            )
                        } else {
                            format!(" = {m:.3} months")
                        };
                        (
                            Some(Value::Num(to_unit(m))),
                            format!("{}{unit_note} ({scope})", p.arithmetic),
                        )
                    }
                    None => (
                        None,
                        format!(
                            "{}: no monthly saving, never pays back ({scope})",
                            p.arithmetic
                        ),
                    ),
                }
            }
            _ => (None, "unknown strategy".into()),
        },
        "crossover" => match (get(&c.strategy), get(&c.against)) {
            (Some(a), Some(b)) => {
                let x = model.crossover(a, b, horizon, maint);
                match x.daily_calls {
                    Some(v) => (
                        Some(Value::Num(v)),
                        format!("{} = {} calls a day ({scope})", x.arithmetic, fmt_num(v)),
                    ),
                    None => (
                        None,
                        format!(
                            "{}: no crossing{} ({scope})",
                            x.arithmetic,
                            x.always_cheaper
                                .map(|s| format!(", {s} is cheaper at every volume"))
                                .unwrap_or_default()
                        ),
                    ),
                }
            }
            _ => (None, "unknown strategy".into()),
        },
        _ => {
            // cheapest
            let v = c.daily_calls.unwrap_or(0.0);
            let r = model.ranking(&c.among, v, horizon, maint);
            let shown = r
                .iter()
                .map(|(n, x)| format!("{n} {}", fmt_num(*x)))
                .collect::<Vec<_>>()
                .join(" < ");
            (
                r.first().map(|(n, _)| Value::Name(n.clone())),
                format!(
                    "cumulative cost over {horizon} months at {} calls a day: {shown} ({scope})",
                    fmt_num(v)
                ),
            )
        }
    };

    let follows = match (&stated, &computed) {
        (Some(s), Some(v)) => agrees(s, v, tol),
        _ => false,
    };
    ClaimResult {
        id: c.id.clone(),
        section: c.section.clone(),
        text: c.text.clone(),
        stated: stated
            .as_ref()
            .map(Value::show)
            .unwrap_or_else(|| c.stated.to_string()),
        computed: computed
            .as_ref()
            .map(Value::show)
            .unwrap_or_else(|| "none".into()),
        computed_value: computed
            .as_ref()
            .map(Value::json)
            .unwrap_or(serde_json::Value::Null),
        unit: c.unit.clone(),
        arithmetic,
        follows,
        note: c.note.clone(),
    }
}

/// Evaluates `+ - * /` with parentheses over numbers and named variables; returns the
/// value and the expression with each name replaced by its value.
pub fn eval_expr(
    expr: &str,
    vars: &BTreeMap<String, f64>,
) -> std::result::Result<(f64, String), String> {
    let tokens = tokenize(expr)?;
    let mut p = Parser {
        tokens: &tokens,
        pos: 0,
        vars,
        shown: String::new(),
    };
    let v = p.sum()?;
    if p.pos != tokens.len() {
        return Err(format!("unexpected `{}`", tokens[p.pos].text()));
    }
    Ok((v, p.shown.trim().to_string()))
}

#[derive(Debug, Clone)]
enum Tok {
    Num(f64, String),
    Name(String),
    Op(char),
}

impl Tok {
    fn text(&self) -> String {
        match self {
            Tok::Num(_, s) | Tok::Name(s) => s.clone(),
            Tok::Op(c) => c.to_string(),
        }
    }
}

fn tokenize(s: &str) -> std::result::Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if "+-*/()".contains(c) {
            out.push(Tok::Op(c));
            i += 1;
        } else if c.is_ascii_digit() || c == '.' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_digit()
                    || chars[i] == '.'
                    || chars[i] == '_'
                    || chars[i] == 'e')
            {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            let v: f64 = text
                .replace('_', "")
                .parse()
                .map_err(|_| format!("bad number `{text}`"))?;
            out.push(Tok::Num(v, text));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                i += 1;
            }
            out.push(Tok::Name(chars[start..i].iter().collect()));
        } else {
            return Err(format!("unexpected character `{c}`"));
        }
    }
    Ok(out)
}

struct Parser<'a> {
    tokens: &'a [Tok],
    pos: usize,
    vars: &'a BTreeMap<String, f64>,
    shown: String,
}

impl Parser<'_> {
    fn peek_op(&self) -> Option<char> {
        match self.tokens.get(self.pos) {
            Some(Tok::Op(c)) => Some(*c),
            _ => None,
        }
    }

    fn sum(&mut self) -> std::result::Result<f64, String> {
        let mut v = self.product()?;
        while let Some(op @ ('+' | '-')) = self.peek_op() {
            self.pos += 1;
            self.shown.push_str(&format!(" {op} "));
            let r = self.product()?;
            v = if op == '+' { v + r } else { v - r };
        }
        Ok(v)
    }

    fn product(&mut self) -> std::result::Result<f64, String> {
        let mut v = self.atom()?;
        while let Some(op @ ('*' | '/')) = self.peek_op() {
            self.pos += 1;
            self.shown.push_str(if op == '*' { " x " } else { " / " });
            let r = self.atom()?;
            v = if op == '*' { v * r } else { v / r };
        }
        Ok(v)
    }

    fn atom(&mut self) -> std::result::Result<f64, String> {
        let tok = self
            .tokens
            .get(self.pos)
            .cloned()
            .ok_or("expression ends early")?;
        self.pos += 1;
        match tok {
            Tok::Num(v, _) => {
                self.shown.push_str(&fmt_num(v));
                Ok(v)
            }
            Tok::Name(n) => {
                let v = *self
                    .vars
                    .get(&n)
                    .ok_or_else(|| format!("unknown name `{n}`"))?;
                self.shown.push_str(&fmt_num(v));
                Ok(v)
            }
            Tok::Op('(') => {
                self.shown.push('(');
                let v = self.sum()?;
                if self.peek_op() != Some(')') {
                    return Err("missing `)`".into());
                }
                self.pos += 1;
                self.shown.push(')');
                Ok(v)
            }
            Tok::Op('-') => {
                self.shown.push('-');
                Ok(-self.atom()?)
            }
            Tok::Op(c) => Err(format!("unexpected `{c}`")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions() {
        let mut v = BTreeMap::new();
        v.insert("upfront.lora".to_string(), 8000.0);
        let (x, shown) = eval_expr("upfront.lora / (4500 - 1800)", &v).unwrap();
        assert!((x - 2.962962).abs() < 1e-5);
        assert_eq!(shown, "8,000 / (4,500 - 1,800)");
        assert!(eval_expr("nope * 2", &v)
            .unwrap_err()
            .contains("unknown name `nope`"));
        assert!(eval_expr("(1 + 2", &v).is_err());
        assert_eq!(fmt_num(4562.5), "4,562.5");
        assert_eq!(fmt_num(18250.0), "18,250");
        assert_eq!(fmt_num(0.0015), "0.0015");
        assert_eq!(fmt_num(0.000733333), "0.000733");
        assert_eq!(fmt_num(-1234567.891), "-1,234,567.89");
    }
}
