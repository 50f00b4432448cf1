//! Test fixtures: small synthetic run folders written by the tests themselves. They are
//! shaped like real run records but are not measurements.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ftbench_meter::{
    EnergyReading, Fingerprint, MetricsLine, MetricsWriter, PhaseRecord, RunKind, RunRecord,
};

pub fn article_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/cost/article.toml")
}

fn phase(name: &str, wall_s: f64, tokens: u64, tokens_per_s: f64) -> PhaseRecord {
    PhaseRecord {
        name: name.into(),
        wall_s,
        device_s: wall_s,
        device_hours: wall_s / 3600.0,
        devices: 1,
        tokens,
        tokens_per_s,
        warmup_excluded: true,
        warmup_s: 2.0,
        warmup_tokens: 1024,
        peak_rss_bytes: Some(900 << 20),
        cuda_peak_bytes: None,
        energy: vec![EnergyReading {
            source: "rapl".into(),
            joules: None,
            note: Some("no powercap zones under /sys/class/powercap".into()),
        }],
    }
}

/// A fixture train run: 40 steps of 1,024 tokens, train phase of 280 s at 150 tokens/s
/// (0.0778 device-hours), an eval phase at 600 tokens/s, a generate phase at 12.5
/// tokens/s, and a metrics file with a falling loss and two held-out points.
pub fn write_fixture_run(dir: &Path, run_id: &str) -> PathBuf {
    let run = dir.join(run_id);
    std::fs::create_dir_all(&run).unwrap();
    let mut r = RunRecord::new(
        run_id,
        RunKind::Train,
        "fixture-tiny-model",
        "cpu",
        "f32",
        2,
        1,
    );
    r.fingerprint = Fingerprint {
        cpu_model: "fixture cpu".into(),
        cpu_cores: 2,
        threads_used: 2,
        gpu_name: None,
        gpu_driver: None,
        ftbench_version: "0.1.0".into(),
        git_commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
        os: "linux".into(),
    };
    r.steps = 40;
    r.total_tokens = 40 * 1024;
    r.wall_s = 320.0;
    r.tokens_per_s = 150.0;
    r.peak_rss_bytes = Some(900 << 20);
    r.heldout_loss_before = Some(2.1);
    r.heldout_loss_after = Some(1.6);
    r.phases = vec![
        phase("load", 4.0, 0, 0.0),
        phase("train", 280.0, 40 * 1024, 150.0),
        phase("eval", 14.0, 8192, 600.0),
        phase("generate", 41.0, 512, 12.5),
    ];
    r.extra.insert("method".into(), "lora".into());
    r.write_atomic(&run.join("run.json")).unwrap();

    let mut w = MetricsWriter::create(&run.join("metrics.jsonl")).unwrap();
    for step in 1..=40u64 {
        let mut extra = serde_json::Map::new();
        if step % 20 == 0 {
            extra.insert(
                "heldout_loss".into(),
                (2.1 - 0.25 * (step / 20) as f64).into(),
            );
        }
        w.write(&MetricsLine {
            step,
            loss: 1.5 + 0.8 * (-(step as f64) / 12.0).exp() + 0.03 * ((step * 7) % 5) as f64,
            lr: 2e-4,
            tokens: step * 1024,
            tokens_per_s: 150.0,
            elapsed_s: step as f64 * 7.0,
            grad_norm: Some(1.0),
            extra,
        })
        .unwrap();
    }
    run
}

/// Writes `text` as a config file and returns its path.
pub fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A minimal valid config; tests edit it with `replace`.
pub const MINIMAL: &str = r#"name = "minimal"
horizon_months = 12
days_per_month = 30

[prices]
taken = "2026-01-01"
engineer_usd_per_hour = 100.0
api_input_usd_per_mtok = 2.5

[prices.device_usd_per_hour]
cpu = 0.10

[[strategy]]
name = "prompt"
kind = "prompt"
engineering_hours = 10
per_call = { mode = "api", prompt_tokens = 1000 }

[[strategy]]
name = "lora"
kind = "lora"
data_prep_usd = 2000
training = { device = "cpu", device_hours = 10 }
per_call = { mode = "self_hosted", device = "cpu", prompt_tokens = 200, completion_tokens = 50, generate_tokens_per_s = 10, prefill_tokens_per_s = 100 }
"#;
