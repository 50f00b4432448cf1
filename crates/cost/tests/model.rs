//! The cost model's arithmetic on a small hand-checked config.

mod common;

use ftbench_cost::{CostConfig, Model};

#[test]
fn upfront_per_call_crossover_and_payback_by_hand() {
    let tmp = tempfile::tempdir().unwrap();
    let path = common::write_config(tmp.path(), "m.toml", common::MINIMAL);
    let cfg = CostConfig::load(&path).unwrap();
    let m = Model::new(&cfg);
    let prompt = m.get("prompt").unwrap();
    let lora = m.get("lora").unwrap();

    // prompt: upfront 10 h x $100 = $1,000; per call 1,000 tokens x $2.5 / 1e6 = $0.0025.
    assert_eq!(prompt.upfront.total_usd, 1000.0);
    assert!((prompt.per_call_usd - 0.0025).abs() < 1e-12);
    // lora: upfront $2,000 data + 10 device-h x $0.10 = $2,001.
    // per call: (50 / 10 + 200 / 100) = 7 device-s x $0.10 / 3600 = $0.000194444...
    assert!((lora.upfront.total_usd - 2001.0).abs() < 1e-9);
    assert!((lora.per_call_usd - 7.0 * 0.10 / 3600.0).abs() < 1e-12);

    // Crossover over 12 months of 30 days:
    // (2,001 - 1,000) / (12 x 30 x (0.0025 - 0.000194444)) = 1,001 / 0.83 = 1,206.02 calls a day.
    let x = m.crossover(prompt, lora, 12.0, true);
    let v = x.daily_calls.unwrap();
    assert!(
        (v - 1001.0 / (360.0 * (0.0025 - 0.7 / 3600.0))).abs() < 1e-6,
        "{v}"
    );
    assert!((v - 1206.02).abs() < 0.01, "{v}");
    assert_eq!(x.cheaper_above.as_deref(), Some("lora"));

    // Payback of lora against prompt at 10,000 calls a day:
    // saving = (0.0025 - 0.000194444) x 10,000 x 30 = $691.67 a month; 2,001 / 691.67 = 2.893 months.
    let p = m.payback(lora, prompt, 10_000.0, true);
    assert!((p.monthly_saving_usd - 691.6667).abs() < 1e-3);
    assert!((p.months.unwrap() - 2.8930).abs() < 1e-3);
    // Incremental: (2,001 - 1,000) / 691.67 = 1.447 months.
    assert!((p.incremental_months.unwrap() - 1.4472).abs() < 1e-3);
    // At 100 calls a day prompt is cheaper every month: no payback.
    assert!(m.payback(lora, prompt, 100.0, true).months.is_some());
    assert!(m.payback(prompt, lora, 100.0, true).months.is_none());
}

#[test]
fn maintenance_and_retraining_count() {
    let tmp = tempfile::tempdir().unwrap();
    let text = common::MINIMAL.replace(
        "training = { device = \"cpu\", device_hours = 10 }",
        "training = { device = \"cpu\", device_hours = 10 }\nmaintenance = { cycles_per_year = 3, hours_per_cycle = 20, retrain = true, other_usd_per_year = 500 }",
    );
    let path = common::write_config(tmp.path(), "m.toml", &text);
    let m = Model::new(&CostConfig::load(&path).unwrap());
    // 3 x (20 h x $100 + $1 retraining compute) + $500 = $6,503 a year.
    let lora = m.get("lora").unwrap();
    assert!((lora.maintenance_per_year_usd - 6503.0).abs() < 1e-9);
    // monthly at 0 calls: 6,503 / 12.
    assert!((lora.monthly(0.0, 30.0, true) - 6503.0 / 12.0).abs() < 1e-9);
    assert_eq!(lora.monthly(0.0, 30.0, false), 0.0);
}
