//! Energy counters: CPU package energy through Linux powercap/RAPL and, with the `nvml`
//! cargo feature, NVIDIA GPU energy through NVML's total-energy counter.
//!
//! A source that cannot be read is recorded as absent (`joules: null` with a note saying
//! why), never as zero joules.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Where Linux exposes powercap zones.
pub const DEFAULT_POWERCAP_ROOT: &str = "/sys/class/powercap";

/// Energy used by one source over a metered interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnergyReading {
    /// `rapl:<zone name>` (for example `rapl:package-0`), `nvml:gpu<i>`, or the bare
    /// source kind (`rapl`, `nvml`) when it is absent as a whole.
    pub source: String,
    /// Joules used over the interval; `None` when the source is absent or unreadable.
    pub joules: Option<f64>,
    /// Why the source is absent, or a caveat about the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl EnergyReading {
    fn absent(source: impl Into<String>, note: impl Into<String>) -> Self {
        EnergyReading {
            source: source.into(),
            joules: None,
            note: Some(note.into()),
        }
    }
}

/// Sum of the joules of all present readings, or `None` when none is present.
pub fn total_joules(readings: &[EnergyReading]) -> Option<f64> {
    let present: Vec<f64> = readings.iter().filter_map(|r| r.joules).collect();
    if present.is_empty() {
        None
    } else {
        Some(present.iter().sum())
    }
}

#[derive(Debug)]
struct RaplZone {
    name: String,
    energy_path: PathBuf,
    /// The counter wraps to zero after this many microjoules.
    max_range_uj: u64,
    last_uj: u64,
    accumulated_uj: u128,
    error: Option<String>,
}

/// Snapshots energy counters at [`EnergyMeter::start`] and reports the energy used at
/// [`EnergyMeter::finish`].
///
/// RAPL counters wrap around; one wrap between two reads is handled. For phases longer
/// than the wrap period (minutes to hours, depending on the CPU and its power draw) call
/// [`EnergyMeter::sample`] regularly; [`crate::PhaseMeter`] does so from `add_tokens`.
#[derive(Debug)]
pub struct EnergyMeter {
    rapl: Vec<RaplZone>,
    rapl_absent: Option<String>,
    #[cfg(feature = "nvml")]
    nvml: nvml_source::NvmlSource,
    last_sample: Instant,
}

impl EnergyMeter {
    /// Starts metering every source this machine exposes.
    pub fn start() -> Self {
        Self::start_with_powercap_root(Path::new(DEFAULT_POWERCAP_ROOT))
    }

    /// Starts metering with RAPL zones read under `root` instead of `/sys/class/powercap`
    /// (tests point this at a fake tree).
    pub fn start_with_powercap_root(root: &Path) -> Self {
        let (rapl, rapl_absent) = open_rapl(root);
        EnergyMeter {
            rapl,
            rapl_absent,
            #[cfg(feature = "nvml")]
            nvml: nvml_source::NvmlSource::start(),
            last_sample: Instant::now(),
        }
    }

    /// Reads every counter and adds the energy since the previous read. Cheap (a few
    /// small file reads); call it at least once per counter wrap period.
    pub fn sample(&mut self) {
        for zone in &mut self.rapl {
            if zone.error.is_some() {
                continue;
            }
            match read_u64(&zone.energy_path) {
                Ok(now) => {
                    zone.accumulated_uj += rapl_delta(zone.last_uj, now, zone.max_range_uj) as u128;
                    zone.last_uj = now;
                }
                Err(e) => zone.error = Some(e),
            }
        }
        #[cfg(feature = "nvml")]
        self.nvml.sample();
        self.last_sample = Instant::now();
    }

    /// Samples only when more than `interval` has passed since the last sample.
    pub fn sample_if_older_than(&mut self, interval: Duration) {
        if self.last_sample.elapsed() > interval {
            self.sample();
        }
    }

    /// Takes a final sample and returns one reading per source, absent ones included.
    pub fn finish(mut self) -> Vec<EnergyReading> {
        self.sample();
        let mut out = Vec::new();
        if let Some(note) = &self.rapl_absent {
            out.push(EnergyReading::absent("rapl", note.clone()));
        }
        for zone in &self.rapl {
            let source = format!("rapl:{}", zone.name);
            match &zone.error {
                Some(e) => out.push(EnergyReading::absent(source, e.clone())),
                None => out.push(EnergyReading {
                    source,
                    joules: Some(zone.accumulated_uj as f64 * 1e-6),
                    note: None,
                }),
            }
        }
        #[cfg(feature = "nvml")]
        out.extend(self.nvml.finish());
        #[cfg(not(feature = "nvml"))]
        out.push(EnergyReading::absent(
            "nvml",
            "built without the `nvml` cargo feature",
        ));
        out
    }
}

/// Microjoules between two reads of a counter that wraps to zero after `max_range_uj`.
pub(crate) fn rapl_delta(before: u64, after: u64, max_range_uj: u64) -> u64 {
    if after >= before {
        after - before
    } else {
        // One wrap: from `before` up to the top of the range, then from zero to `after`.
        max_range_uj.saturating_sub(before) + after
    }
}

fn read_u64(path: &Path) -> std::result::Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.trim().parse().map_err(|_| {
        format!(
            "{}: expected an integer, found {:?}",
            path.display(),
            text.trim()
        )
    })
}

/// Top-level RAPL zones (`intel-rapl:0`, `intel-rapl:1`, ...): one per CPU package.
/// Sub-zones (`intel-rapl:0:0`, core and uncore) are skipped because the package zone
/// already includes them.
fn open_rapl(root: &Path) -> (Vec<RaplZone>, Option<String>) {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(_) => {
            return (
                Vec::new(),
                Some(format!("no powercap zones under {}", root.display())),
            )
        }
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.strip_prefix("intel-rapl:")
                .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit()))
        })
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        return (
            Vec::new(),
            Some(format!(
                "no intel-rapl package zones under {}",
                root.display()
            )),
        );
    }
    let zones = dirs
        .into_iter()
        .map(|dir| {
            let dir_name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let name = std::fs::read_to_string(dir.join("name"))
                .map(|s| s.trim().to_string())
                .unwrap_or(dir_name);
            let energy_path = dir.join("energy_uj");
            let first = read_u64(&energy_path);
            let max = read_u64(&dir.join("max_energy_range_uj"));
            match (first, max) {
                (Ok(last_uj), Ok(max_range_uj)) => RaplZone {
                    name,
                    energy_path,
                    max_range_uj,
                    last_uj,
                    accumulated_uj: 0,
                    error: None,
                },
                (Err(e), _) | (_, Err(e)) => RaplZone {
                    name,
                    energy_path,
                    max_range_uj: 0,
                    last_uj: 0,
                    accumulated_uj: 0,
                    error: Some(e),
                },
            }
        })
        .collect();
    (zones, None)
}

#[cfg(feature = "nvml")]
mod nvml_source {
    use super::EnergyReading;
    use nvml_wrapper::Nvml;

    #[derive(Debug)]
    struct Gpu {
        index: u32,
        last_mj: u64,
        accumulated_mj: u64,
        error: Option<String>,
    }

    /// NVML's total-energy counter (millijoules since the driver was loaded), per GPU.
    pub(super) struct NvmlSource {
        nvml: Option<Nvml>,
        gpus: Vec<Gpu>,
        absent: Option<String>,
    }

    impl std::fmt::Debug for NvmlSource {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("NvmlSource")
                .field("gpus", &self.gpus)
                .field("absent", &self.absent)
                .finish()
        }
    }

    impl NvmlSource {
        pub(super) fn start() -> Self {
            let nvml = match Nvml::init() {
                Ok(n) => n,
                Err(e) => {
                    return NvmlSource {
                        nvml: None,
                        gpus: Vec::new(),
                        absent: Some(format!("nvml init: {e}")),
                    }
                }
            };
            let count = nvml.device_count().unwrap_or(0);
            let gpus = (0..count)
                .map(|index| {
                    let first = nvml
                        .device_by_index(index)
                        .and_then(|d| d.total_energy_consumption())
                        .map_err(|e| format!("total energy counter: {e}"));
                    match first {
                        Ok(last_mj) => Gpu {
                            index,
                            last_mj,
                            accumulated_mj: 0,
                            error: None,
                        },
                        Err(e) => Gpu {
                            index,
                            last_mj: 0,
                            accumulated_mj: 0,
                            error: Some(e),
                        },
                    }
                })
                .collect::<Vec<_>>();
            let absent = gpus.is_empty().then(|| "nvml reports no gpu".to_string());
            NvmlSource {
                nvml: Some(nvml),
                gpus,
                absent,
            }
        }

        pub(super) fn sample(&mut self) {
            let Some(nvml) = &self.nvml else { return };
            for gpu in &mut self.gpus {
                if gpu.error.is_some() {
                    continue;
                }
                match nvml
                    .device_by_index(gpu.index)
                    .and_then(|d| d.total_energy_consumption())
                {
                    Ok(now) => {
                        // The counter is 64-bit and only resets with the driver.
                        gpu.accumulated_mj += now.saturating_sub(gpu.last_mj);
                        gpu.last_mj = now;
                    }
                    Err(e) => gpu.error = Some(format!("total energy counter: {e}")),
                }
            }
        }

        pub(super) fn finish(&self) -> Vec<EnergyReading> {
            if let Some(note) = &self.absent {
                return vec![EnergyReading::absent("nvml", note.clone())];
            }
            self.gpus
                .iter()
                .map(|g| {
                    let source = format!("nvml:gpu{}", g.index);
                    match &g.error {
                        Some(e) => EnergyReading::absent(source, e.clone()),
                        None => EnergyReading {
                            source,
                            joules: Some(g.accumulated_mj as f64 * 1e-3),
                            note: None,
                        },
                    }
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(root: &Path, dir: &str, name: &str, energy: u64, max: u64) {
        let d = root.join(dir);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
        std::fs::write(d.join("energy_uj"), format!("{energy}\n")).unwrap();
        std::fs::write(d.join("max_energy_range_uj"), format!("{max}\n")).unwrap();
    }

    #[test]
    fn delta_handles_one_wrap() {
        assert_eq!(rapl_delta(100, 250, 1000), 150);
        // 900 -> top of range 1000 is 100 uJ, then 0 -> 50 is 50 uJ: 150 in all.
        assert_eq!(rapl_delta(900, 50, 1000), 150);
    }

    #[test]
    fn fake_powercap_tree_with_wraparound() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        zone(
            root,
            "intel-rapl:0",
            "package-0",
            262_000_000_000,
            262_143_328_850,
        );
        zone(root, "intel-rapl:0:0", "core", 5, 1_000); // sub-zone: must be skipped
        zone(
            root,
            "intel-rapl:1",
            "package-1",
            1_000_000,
            262_143_328_850,
        );
        let mut meter = EnergyMeter::start_with_powercap_root(root);
        // package-0 wraps: 262_143_328_850 - 262_000_000_000 = 143_328_850 uJ, plus 1_671_150
        // after the wrap = 145_000_000 uJ = 145 J. package-1: 3_000_000 - 1_000_000 = 2 J.
        std::fs::write(root.join("intel-rapl:0/energy_uj"), "1671150\n").unwrap();
        std::fs::write(root.join("intel-rapl:1/energy_uj"), "3000000\n").unwrap();
        meter.sample();
        // Another 5 J on package-0 after the sample.
        std::fs::write(root.join("intel-rapl:0/energy_uj"), "6671150\n").unwrap();
        let readings = meter.finish();
        let get = |s: &str| readings.iter().find(|r| r.source == s).cloned();
        let p0 = get("rapl:package-0").unwrap().joules.unwrap();
        assert!((p0 - 150.0).abs() < 1e-9, "{p0}");
        assert_eq!(get("rapl:package-1").unwrap().joules, Some(2.0));
        assert!(get("rapl:core").is_none());
        assert!((total_joules(&readings[..2]).unwrap() - 152.0).abs() < 1e-9);
    }

    #[test]
    fn missing_and_unreadable_sources_are_absent_not_zero() {
        let tmp = tempfile::tempdir().unwrap();
        let readings = EnergyMeter::start_with_powercap_root(&tmp.path().join("nope")).finish();
        let rapl = readings.iter().find(|r| r.source == "rapl").unwrap();
        assert_eq!(rapl.joules, None);
        assert!(rapl.note.as_deref().unwrap().contains("no powercap zones"));

        let root = tmp.path();
        zone(root, "intel-rapl:0", "package-0", 10, 1000);
        std::fs::write(root.join("intel-rapl:0/energy_uj"), "garbage").unwrap();
        let readings = EnergyMeter::start_with_powercap_root(root).finish();
        let p0 = readings
            .iter()
            .find(|r| r.source == "rapl:package-0")
            .unwrap();
        assert_eq!(p0.joules, None);
        assert!(p0.note.as_deref().unwrap().contains("expected an integer"));
        #[cfg(not(feature = "nvml"))]
        assert!(readings
            .iter()
            .any(|r| r.source == "nvml" && r.joules.is_none()));
        assert_eq!(total_joules(&readings), None);
    }
}
