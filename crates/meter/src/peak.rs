//! Peak FLOP/s per device and dtype, and model FLOPs utilisation (MFU).
//!
//! The built-in table holds vendors' published dense (no structured sparsity) peaks for
//! one device. MFU never hard-codes a peak: it looks the device up in a table, and a
//! caller's table (for example from a cost config) takes precedence over the built-in one.
//!
//! CPUs are not in the built-in table: a CPU's peak depends on the core count in use,
//! the sustained clock under vector load and the SIMD/matrix units, none of which the
//! model name fixes. [`cpu_peak_tflops`] computes one from those facts, to be put in an
//! override table.

use serde::{Deserialize, Serialize};

/// One peak: a device name pattern, a dtype and a dense peak in TFLOP/s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeakEntry {
    /// Matched case-insensitively as a substring of the device name; the longest
    /// matching pattern wins (so `h100 pcie` beats `h100`).
    pub device: String,
    /// `bf16`, `f16`, `tf32`, `f32` or `f8` (aliases such as `bfloat16`, `fp32`,
    /// `float32` are normalised).
    pub dtype: String,
    /// Dense peak, TFLOP/s.
    pub tflops: f64,
    /// Where the number comes from.
    #[serde(default)]
    pub source: String,
}

/// A table of peaks, searched by device name and dtype.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeakTable {
    /// The entries.
    pub entries: Vec<PeakEntry>,
}

const NVIDIA_DATASHEET: &str = "NVIDIA datasheet, dense";

/// (device pattern, dtype, TFLOP/s).
const BUILTIN: &[(&str, &str, f64)] = &[
    // Hopper SXM (H200 has the H100 SXM compute with more and faster memory).
    ("h200", "f8", 1978.9),
    ("h200", "bf16", 989.4),
    ("h200", "f16", 989.4),
    ("h200", "tf32", 494.7),
    ("h200", "f32", 66.9),
    ("h100", "f8", 1978.9),
    ("h100", "bf16", 989.4),
    ("h100", "f16", 989.4),
    ("h100", "tf32", 494.7),
    ("h100", "f32", 66.9),
    ("h100 pcie", "f8", 1513.0),
    ("h100 pcie", "bf16", 756.0),
    ("h100 pcie", "f16", 756.0),
    ("h100 pcie", "tf32", 378.0),
    ("h100 pcie", "f32", 51.2),
    // Ampere.
    ("a100", "bf16", 312.0),
    ("a100", "f16", 312.0),
    ("a100", "tf32", 156.0),
    ("a100", "f32", 19.5),
    ("a10", "bf16", 125.0),
    ("a10", "f16", 125.0),
    ("a10", "tf32", 62.5),
    ("a10", "f32", 31.2),
    // Ada.
    ("l4", "f8", 242.5),
    ("l4", "bf16", 121.0),
    ("l4", "f16", 121.0),
    ("l4", "tf32", 60.0),
    ("l4", "f32", 30.3),
    ("l40s", "f8", 733.0),
    ("l40s", "bf16", 362.05),
    ("l40s", "f16", 362.05),
    ("l40s", "tf32", 183.0),
    ("l40s", "f32", 91.6),
    // GeForce RTX 4090: tensor cores with f32 accumulation.
    ("rtx 4090", "bf16", 165.2),
    ("rtx 4090", "f16", 165.2),
    ("rtx 4090", "tf32", 82.6),
    ("rtx 4090", "f32", 82.6),
    // Older data-centre parts.
    ("v100", "f16", 125.0),
    ("v100", "f32", 15.7),
    ("t4", "f16", 65.0),
    ("t4", "f32", 8.1),
];

impl PeakTable {
    /// The built-in table of published dense peaks.
    pub fn builtin() -> Self {
        PeakTable {
            entries: BUILTIN
                .iter()
                .map(|(d, t, f)| PeakEntry {
                    device: d.to_string(),
                    dtype: t.to_string(),
                    tflops: *f,
                    source: NVIDIA_DATASHEET.to_string(),
                })
                .collect(),
        }
    }

    /// The peak in TFLOP/s for `device_name` and `dtype`, from the longest matching
    /// device pattern with that dtype.
    pub fn lookup(&self, device_name: &str, dtype: &str) -> Option<&PeakEntry> {
        let name = device_name.to_lowercase();
        let dtype = normalize_dtype(dtype);
        self.entries
            .iter()
            .filter(|e| e.tflops > 0.0 && normalize_dtype(&e.dtype) == dtype)
            .filter(|e| contains_word(&name, &e.device.to_lowercase()))
            .max_by_key(|e| e.device.len())
    }
}

/// True when `pattern` occurs in `name` and is not glued to further letters or digits:
/// `a10` matches `nvidia a10` but neither `nvidia a100` nor `nvidia a10g` (a different
/// part), and `l4` does not match `l40s`.
fn contains_word(name: &str, pattern: &str) -> bool {
    name.match_indices(pattern).any(|(i, _)| {
        let before = name[..i].chars().next_back();
        let after = name[i + pattern.len()..].chars().next();
        let boundary = |c: Option<char>| c.is_none_or(|c| !c.is_ascii_alphanumeric());
        boundary(before) && boundary(after)
    })
}

/// Canonical dtype names: `bf16`, `f16`, `tf32`, `f32`, `f8`; anything else lower-cased.
pub fn normalize_dtype(dtype: &str) -> String {
    match dtype.to_lowercase().as_str() {
        "bf16" | "bfloat16" => "bf16".into(),
        "f16" | "fp16" | "float16" | "half" => "f16".into(),
        "tf32" => "tf32".into(),
        "f32" | "fp32" | "float32" | "float" => "f32".into(),
        "f8" | "fp8" | "float8" | "e4m3" => "f8".into(),
        other => other.into(),
    }
}

/// MFU: achieved FLOP/s over the device's peak for `dtype`. The peak comes from
/// `overrides` when it has an entry for the device, otherwise from the built-in table;
/// `None` when neither knows the device.
pub fn mfu(
    achieved_flops_per_s: f64,
    device_name: &str,
    dtype: &str,
    overrides: Option<&PeakTable>,
) -> Option<f64> {
    let peak = peak_tflops(device_name, dtype, overrides)?;
    Some(achieved_flops_per_s / (peak * 1e12))
}

/// The peak TFLOP/s used by [`mfu`].
pub fn peak_tflops(device_name: &str, dtype: &str, overrides: Option<&PeakTable>) -> Option<f64> {
    if let Some(e) = overrides.and_then(|t| t.lookup(device_name, dtype)) {
        return Some(e.tflops);
    }
    PeakTable::builtin()
        .lookup(device_name, dtype)
        .map(|e| e.tflops)
}

/// A CPU's peak TFLOP/s: `cores x GHz x FLOPs per cycle per core / 1000`. FLOPs per cycle
/// per core: f32 with AVX-512 and two FMA units is 16 lanes x 2 (multiply-add) x 2 = 64;
/// with AVX2 and two FMA units 32; bf16 on AMX is 1024 (Intel's figure for Sapphire Rapids).
pub fn cpu_peak_tflops(cores: usize, ghz: f64, flops_per_cycle_per_core: f64) -> f64 {
    cores as f64 * ghz * flops_per_cycle_per_core / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_by_device_name() {
        let t = PeakTable::builtin();
        assert_eq!(t.lookup("NVIDIA H200", "bfloat16").unwrap().tflops, 989.4);
        assert_eq!(
            t.lookup("cuda:0 (NVIDIA H100 PCIe)", "bf16")
                .unwrap()
                .tflops,
            756.0
        );
        assert_eq!(
            t.lookup("NVIDIA H100 80GB HBM3", "fp32").unwrap().tflops,
            66.9
        );
        assert_eq!(
            t.lookup("NVIDIA A100-SXM4-80GB", "bf16").unwrap().tflops,
            312.0
        );
        assert_eq!(t.lookup("NVIDIA A10", "f32").unwrap().tflops, 31.2);
        assert!(t.lookup("NVIDIA A10G", "f32").is_none());
        assert_eq!(t.lookup("NVIDIA L4", "bf16").unwrap().tflops, 121.0);
        assert_eq!(t.lookup("NVIDIA L40S", "bf16").unwrap().tflops, 362.05);
        assert_eq!(
            t.lookup("NVIDIA GeForce RTX 4090", "f16").unwrap().tflops,
            165.2
        );
        assert!(t.lookup("cpu", "f32").is_none());
        assert!(t.lookup("NVIDIA T4", "bf16").is_none());
    }

    #[test]
    fn mfu_uses_table_and_overrides() {
        // 98.94 TFLOP/s achieved on an H200 in bf16: 98.94 / 989.4 = 0.1.
        let m = mfu(98.94e12, "NVIDIA H200", "bf16", None).unwrap();
        assert!((m - 0.1).abs() < 1e-12);
        assert_eq!(mfu(1e12, "cpu", "f32", None), None);
        // 2 cores x 2.0 GHz x 64 FLOPs/cycle = 0.256 TFLOP/s; 25.6 GFLOP/s is 10% of it.
        let cpu = PeakTable {
            entries: vec![PeakEntry {
                device: "cpu".into(),
                dtype: "f32".into(),
                tflops: cpu_peak_tflops(2, 2.0, 64.0),
                source: "2 cores x 2.0 GHz x 64".into(),
            }],
        };
        let m = mfu(25.6e9, "cpu", "f32", Some(&cpu)).unwrap();
        assert!((m - 0.1).abs() < 1e-12);
        // An override for a device the built-in table knows wins.
        let o = PeakTable {
            entries: vec![PeakEntry {
                device: "h200".into(),
                dtype: "bf16".into(),
                tflops: 500.0,
                source: String::new(),
            }],
        };
        assert_eq!(peak_tflops("NVIDIA H200", "bf16", Some(&o)), Some(500.0));
    }
}
