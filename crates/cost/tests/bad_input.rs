//! Bad input stops with one clear line naming the file and the key.

mod common;

use std::path::Path;

use ftbench_cost::cli::{cost_report, run_report, CostArgs, ReportArgs};

fn cost_err(config: &Path, calibrate: Vec<std::path::PathBuf>, horizon: Option<f64>) -> String {
    let e = cost_report(&CostArgs {
        config: config.into(),
        calibrate,
        horizon,
        json: false,
    })
    .unwrap_err()
    .to_string();
    assert!(!e.contains('\n'), "one line: {e}");
    e
}

fn with(dir: &Path, from: &str, to: &str) -> std::path::PathBuf {
    assert!(common::MINIMAL.contains(from), "fixture lacks {from}");
    common::write_config(dir, "bad.toml", &common::MINIMAL.replace(from, to))
}

#[test]
fn unknown_strategy_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let p = with(tmp.path(), "kind = \"lora\"", "kind = \"lroa\"");
    assert_eq!(
        cost_err(&p, vec![], None),
        format!(
            "{}: key `strategy[1].kind`: unknown strategy `lroa`, expected one of prompt, rag, lora, qlora, full, distill",
            p.display()
        )
    );
}

#[test]
fn unknown_strategy_named_by_a_claim() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n[[claim]]\nid = \"x\"\ntext = \"t\"\ncheck = \"payback\"\nstrategy = \"lora\"\nagainst = \"promt\"\ndaily_calls = 1\nstated = 1\n",
        common::MINIMAL
    );
    let p = common::write_config(tmp.path(), "bad.toml", &text);
    assert_eq!(
        cost_err(&p, vec![], None),
        format!(
            "{}: key `claim[0].against`: unknown strategy `promt`, expected one of prompt, lora",
            p.display()
        )
    );
}

#[test]
fn negative_price() {
    let tmp = tempfile::tempdir().unwrap();
    let p = with(
        tmp.path(),
        "engineer_usd_per_hour = 100.0",
        "engineer_usd_per_hour = -100.0",
    );
    assert_eq!(
        cost_err(&p, vec![], None),
        format!(
            "{}: key `prices.engineer_usd_per_hour`: expected a price >= 0, found -100",
            p.display()
        )
    );
    let p = with(tmp.path(), "cpu = 0.10", "cpu = -0.5");
    assert_eq!(
        cost_err(&p, vec![], None),
        format!(
            "{}: key `prices.device_usd_per_hour.cpu`: expected a price >= 0, found -0.5",
            p.display()
        )
    );
}

#[test]
fn missing_price() {
    let tmp = tempfile::tempdir().unwrap();
    let p = with(tmp.path(), "api_input_usd_per_mtok = 2.5\n", "");
    assert_eq!(
        cost_err(&p, vec![], None),
        format!(
            "{}: key `prices.api_input_usd_per_mtok`: missing price",
            p.display()
        )
    );
    // Completion tokens billed through the api need an output price.
    let p = with(
        tmp.path(),
        "prompt_tokens = 1000 }",
        "prompt_tokens = 1000, completion_tokens = 10 }",
    );
    assert_eq!(
        cost_err(&p, vec![], None),
        format!(
            "{}: key `prices.api_output_usd_per_mtok`: missing price: strategy[0].per_call bills completion tokens through the api",
            p.display()
        )
    );
    // A device without a price.
    let p = with(
        tmp.path(),
        "training = { device = \"cpu\"",
        "training = { device = \"h100\"",
    );
    assert_eq!(
        cost_err(&p, vec![], None),
        format!(
            "{}: key `strategy[1].training.device`: missing price: no `prices.device_usd_per_hour.h100` for device `h100`",
            p.display()
        )
    );
    // The date prices were taken is required.
    let p = with(tmp.path(), "taken = \"2026-01-01\"\n", "");
    assert!(cost_err(&p, vec![], None).ends_with(
        "key `prices.taken`: missing: the date the prices were taken, e.g. \"2026-03-01\""
    ));
}

#[test]
fn horizon_of_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let p = with(tmp.path(), "horizon_months = 12", "horizon_months = 0");
    assert_eq!(
        cost_err(&p, vec![], None),
        format!(
            "{}: key `horizon_months`: expected a horizon of more than 0 months, found 0",
            p.display()
        )
    );
    let good = common::write_config(tmp.path(), "good.toml", common::MINIMAL);
    assert_eq!(
        cost_err(&good, vec![], Some(0.0)),
        "option `--horizon`: expected a horizon of more than 0 months, found 0"
    );
}

#[test]
fn unknown_key_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = with(tmp.path(), "horizon_months = 12", "horizon_month = 12");
    let e = cost_err(&p, vec![], None);
    assert!(
        e.starts_with(&format!("{}:2: unknown field `horizon_month`", p.display())),
        "{e}"
    );
}

#[test]
fn record_of_another_format_version() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::write_fixture_run(tmp.path(), "old-run");
    let rec = run.join("run.json");
    let text = std::fs::read_to_string(&rec)
        .unwrap()
        .replace("\"format_version\": 1", "\"format_version\": 2");
    std::fs::write(&rec, text).unwrap();
    let cfg = common::write_config(tmp.path(), "good.toml", common::MINIMAL);
    assert_eq!(
        cost_err(&cfg, vec![run.clone()], None),
        format!(
            "{}: key `format_version`: expected run record format 1, found 2",
            rec.display()
        )
    );
    let e = run_report(&ReportArgs {
        runs: vec![run],
        cost: None,
        assumed_only: false,
        horizon: None,
        out: tmp.path().join("out"),
    })
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        format!(
            "{}: key `format_version`: expected run record format 1, found 2",
            rec.display()
        )
    );
}

#[test]
fn calibrating_with_an_unpriced_device() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::write_fixture_run(tmp.path(), "run");
    // Train on a priced device key that is not the run's.
    let text = common::MINIMAL
        .replace("cpu = 0.10", "a100 = 1.8")
        .replace("device = \"cpu\"", "device = \"a100\"");
    let cfg = common::write_config(tmp.path(), "c.toml", &text);
    assert_eq!(
        cost_err(&cfg, vec![run.clone()], None),
        format!(
            "{}: key `prices.device_usd_per_hour`: missing price for device `cpu` of run {}",
            cfg.display(),
            run.display()
        )
    );
}
