//! `metrics.jsonl`: one JSON object per optimizer step.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsLine {
    /// Optimizer step, from 1.
    pub step: u64,
    /// Training loss of the step (mean per completion token).
    pub loss: f64,
    /// Learning rate used by the step.
    pub lr: f64,
    /// Tokens processed so far, this step included.
    pub tokens: u64,
    /// Tokens per second of this step.
    pub tokens_per_s: f64,
    /// Seconds since training started.
    pub elapsed_s: f64,
    /// Global gradient norm before clipping, when computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Further per-step values (held-out loss at an eval step, peak memory, ...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Appends one JSON line per step to a metrics file and flushes each line, so a run
/// that dies keeps every step it finished.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Creates (or truncates) the file.
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(MetricsWriter {
            path: path.into(),
            file,
        })
    }

    /// Opens the file for appending, creating it if needed (resumed runs).
    pub fn append(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsWriter {
            path: path.into(),
            file,
        })
    }

    /// Writes one line and flushes it.
    pub fn write(&mut self, line: &MetricsLine) -> Result<()> {
        let mut bytes = serde_json::to_vec(line).map_err(|e| Error::Json {
            path: self.path.clone(),
            line: 0,
            msg: e.to_string(),
        })?;
        bytes.push(b'\n');
        self.file
            .write_all(&bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a metrics file; blank lines are skipped, a malformed line is an error naming
/// the file and its line number.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsLine>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let m = serde_json::from_str(&line).map_err(|e| Error::Json {
            path: path.into(),
            line: i + 1,
            msg: e.to_string(),
        })?;
        out.push(m);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("metrics.jsonl");
        let mut w = MetricsWriter::create(&path).unwrap();
        for step in 1..=3 {
            let mut extra = serde_json::Map::new();
            if step == 3 {
                extra.insert("heldout_loss".into(), 1.5.into());
            }
            w.write(&MetricsLine {
                step,
                loss: 3.0 / step as f64,
                lr: 1e-4,
                tokens: 512 * step,
                tokens_per_s: 100.0,
                elapsed_s: 5.0 * step as f64,
                grad_norm: Some(1.0),
                extra,
            })
            .unwrap();
        }
        drop(w);
        let lines = read_metrics(&path).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2].extra["heldout_loss"], 1.5);
        std::fs::write(&path, "{\"step\":1}\n").unwrap();
        let e = read_metrics(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}:1: missing field", path.display())),
            "{e}"
        );
    }
}
