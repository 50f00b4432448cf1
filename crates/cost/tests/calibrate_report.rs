//! Calibration from run records and the Markdown/SVG report, on synthetic fixture runs.

mod common;

use ftbench_cost::cli::{cost_report, run_report, CostArgs, ReportArgs};
use ftbench_cost::model::Origin;

#[test]
fn calibration_replaces_assumptions_and_says_which() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::write_fixture_run(tmp.path(), "fixture-lora");
    let r = cost_report(&CostArgs {
        config: common::article_config(),
        calibrate: vec![run.clone()],
        horizon: None,
        json: true,
    })
    .unwrap();
    let lora = r.strategies.iter().find(|s| s.name == "lora").unwrap();
    // Training: the run's 280 s train phase = 0.07778 device-h x $0.10 (cpu) = $0.00778,
    // replacing the article's assumed $1,500.
    let t = lora
        .inputs
        .iter()
        .find(|i| i.name == "training_device_hours")
        .unwrap();
    assert!((t.value - 280.0 / 3600.0).abs() < 1e-12);
    assert_eq!(t.origin, Origin::Measured(run.display().to_string()));
    assert!((lora.upfront.training_usd - 280.0 / 3600.0 * 0.10).abs() < 1e-12);
    // QLoRA is not what the run trained: its training stays assumed ...
    let q = r.strategies.iter().find(|s| s.name == "qlora").unwrap();
    assert_eq!(q.upfront.training_usd, 300.0);
    // ... but its self-hosted serving is measured: 240 prompt tokens at the eval phase's
    // 600 tokens/s = 0.4 device-s x $0.10 / 3600 = $0.0000111 a call.
    assert!((q.per_call_usd - 0.4 * 0.10 / 3600.0).abs() < 1e-15);
    assert!(q.inputs.iter().any(|i| i.name == "generate_tokens_per_s"
        && i.value == 12.5
        && matches!(i.origin, Origin::Measured(_))));
    let cal = r.calibration.as_ref().unwrap();
    assert!(cal
        .applied
        .iter()
        .any(|a| a.starts_with("lora.training_device_hours = 0.0778 on cpu (measured: ")));
    assert!(cal
        .not_applied
        .iter()
        .any(|a| a.starts_with("qlora.training: assumed")));
    // Energy was absent in the fixture, and the record says why: never zero.
    assert_eq!(cal.runs[0].train_energy_joules, None);
    assert!(cal.runs[0]
        .energy_note
        .as_deref()
        .unwrap()
        .contains("no powercap zones"));
    // Claims stay about the article's own numbers: 8,000 / 2,700 months, not recalibrated.
    let c = r
        .claims
        .iter()
        .find(|c| c.id == "lora-payback-100k")
        .unwrap();
    assert!((c.computed_value.as_f64().unwrap() - 8000.0 / 2700.0).abs() < 1e-9);
    let text = r.to_text();
    assert!(text.contains("measured: lora.training_device_hours"));
    assert!(text.contains("energy absent (rapl: no powercap zones"));
}

#[test]
fn training_tokens_scale_measured_throughput() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::write_fixture_run(tmp.path(), "r");
    let text = common::MINIMAL.replace(
        "training = { device = \"cpu\", device_hours = 10 }",
        "training = { device = \"cpu\", device_hours = 10, tokens = 5400000 }",
    );
    let cfg = common::write_config(tmp.path(), "c.toml", &text);
    let r = cost_report(&CostArgs {
        config: cfg,
        calibrate: vec![run],
        horizon: None,
        json: false,
    })
    .unwrap();
    let lora = r.strategies.iter().find(|s| s.name == "lora").unwrap();
    // 5,400,000 tokens / 150 tokens/s = 36,000 s = 10 device-h x $0.10 = $1.
    assert!((lora.upfront.training_usd - 1.0).abs() < 1e-9);
    // Serving: (50 / 12.5 + 200 / 600) device-s x $0.10 / 3600.
    assert!((lora.per_call_usd - (4.0 + 1.0 / 3.0) * 0.10 / 3600.0).abs() < 1e-15);
}

#[test]
fn report_writes_markdown_and_readable_svgs() {
    let tmp = tempfile::tempdir().unwrap();
    let a = common::write_fixture_run(tmp.path(), "fixture-a");
    let b = common::write_fixture_run(tmp.path(), "fixture-b");
    let out = tmp.path().join("report");
    let md = run_report(&ReportArgs {
        runs: vec![a, b],
        cost: Some(common::article_config()),
        assumed_only: false,
        horizon: None,
        out: out.clone(),
    })
    .unwrap();
    let text = std::fs::read_to_string(&md).unwrap();
    for needle in [
        "## Runs",
        "![training loss by step](loss.svg)",
        "## Throughput per phase",
        "## Cost",
        "**measured**",
        "does not follow",
    ] {
        assert!(text.contains(needle), "report lacks {needle}");
    }
    for (svg, labels) in [
        (
            "loss.svg",
            &[
                "optimizer step",
                "loss (nats per completion token)",
                "held-out loss",
            ][..],
        ),
        (
            "throughput.svg",
            &["tokens per second", "phase", "fixture-a"][..],
        ),
        (
            "crossover.svg",
            &[
                "daily calls (log scale)",
                "cost per month, USD (log scale)",
                "Prompt engineering",
            ][..],
        ),
    ] {
        let s = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(s.starts_with("<svg"), "{svg}");
        for l in labels {
            assert!(s.contains(l), "{svg} lacks {l}");
        }
    }
}

/// Renders the crossover chart to PNG with `rsvg-convert` (librsvg2-bin) when installed,
/// so the SVG is known to be readable by a real renderer; skipped with a printed reason
/// otherwise.
#[test]
fn crossover_chart_renders_to_png() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::write_fixture_run(tmp.path(), "fixture");
    let out = tmp.path().join("report");
    run_report(&ReportArgs {
        runs: vec![run],
        cost: Some(common::article_config()),
        assumed_only: true,
        horizon: None,
        out: out.clone(),
    })
    .unwrap();
    let png = out.join("crossover.png");
    let status = std::process::Command::new("rsvg-convert")
        .arg("-o")
        .arg(&png)
        .arg(out.join("crossover.svg"))
        .status();
    match status {
        Ok(s) if s.success() => {
            let bytes = std::fs::read(&png).unwrap();
            assert_eq!(&bytes[1..4], b"PNG");
            // IHDR: width and height, big-endian, at bytes 16..24.
            let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
            let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
            assert_eq!((w, h), (960, 560));
            if let Ok(dir) = std::env::var("FTBENCH_KEEP_CHART") {
                std::fs::copy(&png, std::path::Path::new(&dir).join("crossover.png")).unwrap();
            }
        }
        Ok(s) => panic!("rsvg-convert failed on crossover.svg: {s}"),
        Err(e) => println!(
            "skipped: rsvg-convert not available ({e}); install librsvg2-bin to render the chart"
        ),
    }
}

#[test]
fn runs_without_a_generate_phase_leave_serving_assumed() {
    let tmp = tempfile::tempdir().unwrap();
    let run = common::write_fixture_run(tmp.path(), "no-generate");
    let rec_path = run.join("run.json");
    let mut rec = ftbench_meter::RunRecord::read(&rec_path).unwrap();
    rec.phases.retain(|p| p.name != "generate");
    rec.write_atomic(&rec_path).unwrap();
    let r = cost_report(&CostArgs {
        config: common::article_config(),
        calibrate: vec![run.clone()],
        horizon: None,
        json: false,
    })
    .unwrap();
    let q = r.strategies.iter().find(|s| s.name == "qlora").unwrap();
    // 240 tokens x $2.00 per million, as assumed.
    assert!((q.per_call_usd - 240.0 * 2.0 / 1e6).abs() < 1e-15);
    let cal = r.calibration.unwrap();
    assert!(cal
        .not_applied
        .contains(&"qlora.per_call: assumed (no run with a generate phase)".to_string()));

    // An eval-only record has nothing to calibrate from: an error for `cost`, skipped
    // (and said so) by `report`.
    rec.kind = ftbench_meter::RunKind::Eval;
    rec.phases.retain(|p| p.name != "train");
    rec.write_atomic(&rec_path).unwrap();
    let e = cost_report(&CostArgs {
        config: common::article_config(),
        calibrate: vec![run.clone()],
        horizon: None,
        json: false,
    })
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        format!(
            "{}: no `train` phase and no `generate` phase with tokens: nothing to calibrate from",
            rec_path.display()
        )
    );
    let md = run_report(&ReportArgs {
        runs: vec![run],
        cost: Some(common::article_config()),
        assumed_only: false,
        horizon: None,
        out: tmp.path().join("out"),
    })
    .unwrap();
    assert!(std::fs::read_to_string(md)
        .unwrap()
        .contains("nothing to calibrate from"));
}
