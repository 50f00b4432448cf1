//! The run record (`run.json`): what a run did and what it cost. Its format is described
//! in `docs/run-record.md`; the cost model reads only these records.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::flops::FlopCount;
use crate::phase::PhaseRecord;

/// Version of the run record format. Bump it on any change that an older reader would
/// misread (a renamed or removed key, a changed unit or meaning); adding an optional key
/// does not need a bump.
pub const RECORD_FORMAT_VERSION: u32 = 1;

/// What kind of run produced a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    /// A fine-tuning run (`ftbench train`).
    Train,
    /// An evaluation (`ftbench eval`).
    Eval,
    /// A benchmark (`ftbench bench`).
    Bench,
}

/// The summary of one run, written as `results/<run-id>/run.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Always [`RECORD_FORMAT_VERSION`] when written by this build.
    pub format_version: u32,
    /// The run's id (its folder name under `results/`).
    pub run_id: String,
    /// Train, eval or bench.
    pub kind: RunKind,
    /// Model id or path.
    pub model: String,
    /// Device the run computed on: `cpu`, `cuda:0`, ...
    pub device: String,
    /// Compute dtype: `f32`, `bf16`, ...
    pub dtype: String,
    /// Compute threads.
    pub threads: usize,
    /// RNG seed.
    pub seed: u64,
    /// Optimizer steps (0 for eval).
    pub steps: u64,
    /// Tokens processed over the run's main phase (training tokens for a train run).
    pub total_tokens: u64,
    /// Wall seconds of the whole run.
    pub wall_s: f64,
    /// Tokens per second of the main phase, warm-up excluded (see its phase record).
    pub tokens_per_s: f64,
    /// Peak resident memory of the process, bytes.
    pub peak_rss_bytes: Option<u64>,
    /// Held-out loss (mean per completion token) before training.
    #[serde(default)]
    pub heldout_loss_before: Option<f64>,
    /// Held-out loss after training.
    #[serde(default)]
    pub heldout_loss_after: Option<f64>,
    /// GSM8K exact match (0..1) of the base model.
    #[serde(default)]
    pub gsm8k_exact_match_before: Option<f64>,
    /// GSM8K exact match (0..1) with the adapter.
    #[serde(default)]
    pub gsm8k_exact_match_after: Option<f64>,
    /// FLOPs per training token by the conventions of [`crate::flops`].
    #[serde(default)]
    pub flops_per_token: Option<FlopCount>,
    /// `flops_per_token.total x tokens_per_s`.
    #[serde(default)]
    pub achieved_flops_per_s: Option<f64>,
    /// Achieved FLOP/s over the device's peak, when the peak is known.
    #[serde(default)]
    pub mfu: Option<f64>,
    /// Per-phase metering: `load`, `train`, `eval`, `generate`, ...
    #[serde(default)]
    pub phases: Vec<PhaseRecord>,
    /// The machine and build.
    pub fingerprint: Fingerprint,
    /// Anything else the producer wants to keep (LoRA rank, batch size, dataset, ...).
    #[serde(default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl RunRecord {
    /// A record with the identifying fields set, the current format version, a detected
    /// fingerprint and everything else zero or empty.
    pub fn new(
        run_id: &str,
        kind: RunKind,
        model: &str,
        device: &str,
        dtype: &str,
        threads: usize,
        seed: u64,
    ) -> Self {
        RunRecord {
            format_version: RECORD_FORMAT_VERSION,
            run_id: run_id.into(),
            kind,
            model: model.into(),
            device: device.into(),
            dtype: dtype.into(),
            threads,
            seed,
            steps: 0,
            total_tokens: 0,
            wall_s: 0.0,
            tokens_per_s: 0.0,
            peak_rss_bytes: None,
            heldout_loss_before: None,
            heldout_loss_after: None,
            gsm8k_exact_match_before: None,
            gsm8k_exact_match_after: None,
            flops_per_token: None,
            achieved_flops_per_s: None,
            mfu: None,
            phases: Vec::new(),
            fingerprint: Fingerprint::detect(threads, device),
            extra: serde_json::Map::new(),
        }
    }

    /// The first phase with this name.
    pub fn phase(&self, name: &str) -> Option<&PhaseRecord> {
        self.phases.iter().find(|p| p.name == name)
    }

    /// Writes the record as pretty JSON through [`write_atomic`].
    pub fn write_atomic(&self, path: &Path) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| Error::Json {
            path: path.into(),
            line: 0,
            msg: e.to_string(),
        })?;
        bytes.push(b'\n');
        write_atomic(path, &bytes).map_err(|e| Error::io(path, e))
    }

    /// Reads a record, rejecting one of another format version with an error naming the
    /// file and both versions.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses a record from JSON text; `path` is used in error messages only.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Json {
            path: path.into(),
            line: 0,
            msg: format!("not a json run record: {e}"),
        })?;
        match value.get("format_version") {
            None => {
                return Err(Error::MissingKey {
                    path: path.into(),
                    key: "format_version".into(),
                })
            }
            Some(v) if v.as_u64() != Some(RECORD_FORMAT_VERSION as u64) => {
                return Err(Error::FormatVersion {
                    path: path.into(),
                    expected: RECORD_FORMAT_VERSION,
                    found: v.to_string(),
                })
            }
            Some(_) => {}
        }
        serde_json::from_value(value).map_err(|e| Error::Json {
            path: path.into(),
            line: 0,
            msg: e.to_string(),
        })
    }
}

/// Writes `bytes` to `path` atomically: to a temporary file beside it, flushed and
/// fsynced, then renamed over `path`, then the folder fsynced. A reader sees the old
/// file or the new one, never a partial one; on error no temporary file is left.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name")
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // Make the rename itself durable; not every filesystem allows syncing a folder.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version_check() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("run.json");
        let mut r = RunRecord::new("t1", RunKind::Train, "tiny", "cpu", "f32", 2, 7);
        r.extra.insert("lora_rank".into(), 16.into());
        r.write_atomic(&path).unwrap();
        let back = RunRecord::read(&path).unwrap();
        assert_eq!(back, r);
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);

        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v["format_version"] = 99.into();
        std::fs::write(&path, v.to_string()).unwrap();
        let e = RunRecord::read(&path).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: key `format_version`: expected run record format 1, found 99",
                path.display()
            )
        );
        v.as_object_mut().unwrap().remove("format_version");
        std::fs::write(&path, v.to_string()).unwrap();
        let e = RunRecord::read(&path).unwrap_err().to_string();
        assert!(e.ends_with("missing key `format_version`"), "{e}");
    }

    #[test]
    fn write_atomic_replaces_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.txt");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        // A missing folder fails without leaving anything.
        assert!(write_atomic(&tmp.path().join("no/such/a.txt"), b"x").is_err());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}
