//! Per-phase metering: wall and device time, tokens and tokens/s with warm-up excluded,
//! memory and energy.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::energy::{EnergyMeter, EnergyReading};

/// How often [`PhaseMeter::add_tokens`] samples the energy counters at most.
const ENERGY_SAMPLE_INTERVAL: Duration = Duration::from_secs(10);

/// What one phase of a run (load, train, eval, generate, ...) cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseRecord {
    /// Phase name: `load`, `train`, `eval`, `generate` or another the caller chose.
    pub name: String,
    /// Wall-clock seconds from start to finish, warm-up included.
    pub wall_s: f64,
    /// Device-seconds held: `wall_s` times the number of devices used (1 unless set).
    /// This is the quantity a cloud bills per device-hour.
    pub device_s: f64,
    /// `device_s / 3600`.
    pub device_hours: f64,
    /// Devices held during the phase (GPUs, or 1 for a CPU machine).
    pub devices: u32,
    /// Tokens processed in the phase, warm-up included.
    pub tokens: u64,
    /// Tokens per second over the measured window: `(tokens - warmup_tokens) /
    /// (wall_s - warmup_s)`; 0 when that window is empty.
    pub tokens_per_s: f64,
    /// True when [`PhaseMeter::mark_warmup_done`] was called, so `tokens_per_s` excludes
    /// the first `warmup_s` seconds and `warmup_tokens` tokens.
    pub warmup_excluded: bool,
    /// Seconds before the warm-up mark (0 without one).
    pub warmup_s: f64,
    /// Tokens before the warm-up mark (0 without one).
    pub warmup_tokens: u64,
    /// The process's peak resident memory at the end of the phase (Linux `VmHWM`; the
    /// peak since the process started, so later phases include earlier ones).
    pub peak_rss_bytes: Option<u64>,
    /// The device's peak allocated memory during the phase, on CUDA, as reported by the
    /// caller; `None` elsewhere.
    pub cuda_peak_bytes: Option<u64>,
    /// Energy per source over the phase; absent sources carry `joules: null`.
    #[serde(default)]
    pub energy: Vec<EnergyReading>,
}

impl PhaseRecord {
    /// Joules summed over the present energy sources, `None` if none was present.
    pub fn total_joules(&self) -> Option<f64> {
        crate::energy::total_joules(&self.energy)
    }
}

/// Meters one phase. Start it, feed it token counts, mark the end of warm-up, finish it.
///
/// ```
/// let mut m = ftbench_meter::PhaseMeter::start("train");
/// m.add_tokens(1024);          // first step: compiles kernels, fills caches
/// m.mark_warmup_done();        // tokens/s is measured from here on
/// m.add_tokens(1024);
/// let rec = m.finish();
/// assert_eq!(rec.tokens, 2048);
/// assert!(rec.warmup_excluded);
/// ```
#[derive(Debug)]
pub struct PhaseMeter {
    name: String,
    started: Instant,
    warmup: Option<(Instant, u64)>,
    tokens: u64,
    devices: u32,
    cuda_peak_bytes: Option<u64>,
    energy: Option<EnergyMeter>,
}

impl PhaseMeter {
    /// Starts a phase, energy metering included.
    pub fn start(name: &str) -> Self {
        PhaseMeter {
            name: name.to_string(),
            started: Instant::now(),
            warmup: None,
            tokens: 0,
            devices: 1,
            cuda_peak_bytes: None,
            energy: Some(EnergyMeter::start()),
        }
    }

    /// Starts a phase with energy read by the given meter (for example one reading a
    /// non-default powercap root), or without energy metering when `None`.
    pub fn start_with_energy(name: &str, energy: Option<EnergyMeter>) -> Self {
        let mut m = Self::start(name);
        m.energy = energy;
        m
    }

    /// Adds `n` processed tokens (training: input tokens of the step; generation: new
    /// tokens). Also samples the energy counters every few seconds.
    pub fn add_tokens(&mut self, n: u64) {
        self.tokens += n;
        if let Some(e) = &mut self.energy {
            e.sample_if_older_than(ENERGY_SAMPLE_INTERVAL);
        }
    }

    /// Ends warm-up: time and tokens up to now are excluded from `tokens_per_s`. Calling
    /// it again moves the mark.
    pub fn mark_warmup_done(&mut self) {
        self.warmup = Some((Instant::now(), self.tokens));
    }

    /// Sets the number of devices held (device-seconds = wall seconds x devices).
    pub fn set_devices(&mut self, devices: u32) {
        self.devices = devices.max(1);
    }

    /// Records the device's peak memory (bytes) for this phase, as read by the caller
    /// from its CUDA runtime.
    pub fn set_cuda_peak_bytes(&mut self, bytes: u64) {
        self.cuda_peak_bytes = Some(bytes);
    }

    /// Tokens so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Seconds since the phase started.
    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Tokens per second so far over the measured window (after warm-up if marked).
    pub fn current_tokens_per_s(&self) -> f64 {
        let (t0, tok0) = match self.warmup {
            Some((t, n)) => (t, n),
            None => (self.started, 0),
        };
        rate(self.tokens - tok0, t0.elapsed().as_secs_f64())
    }

    /// Ends the phase and returns its record.
    pub fn finish(self) -> PhaseRecord {
        let end = Instant::now();
        let wall_s = (end - self.started).as_secs_f64();
        let (warmup_s, warmup_tokens) = match self.warmup {
            Some((t, n)) => ((t - self.started).as_secs_f64(), n),
            None => (0.0, 0),
        };
        let device_s = wall_s * self.devices as f64;
        PhaseRecord {
            name: self.name,
            wall_s,
            device_s,
            device_hours: device_s / 3600.0,
            devices: self.devices,
            tokens: self.tokens,
            tokens_per_s: rate(self.tokens - warmup_tokens, wall_s - warmup_s),
            warmup_excluded: self.warmup.is_some(),
            warmup_s,
            warmup_tokens,
            peak_rss_bytes: crate::memory::peak_rss_bytes(),
            cuda_peak_bytes: self.cuda_peak_bytes,
            energy: self.energy.map(EnergyMeter::finish).unwrap_or_default(),
        }
    }
}

fn rate(tokens: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        tokens as f64 / seconds
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_is_excluded_from_tokens_per_s() {
        let mut m = PhaseMeter::start_with_energy("train", None);
        m.add_tokens(1_000_000); // a huge warm-up burst that must not count
        std::thread::sleep(Duration::from_millis(20));
        m.mark_warmup_done();
        m.add_tokens(100);
        std::thread::sleep(Duration::from_millis(50));
        let r = m.finish();
        assert_eq!(r.tokens, 1_000_100);
        assert_eq!(r.warmup_tokens, 1_000_000);
        assert!(r.warmup_excluded);
        assert!(r.warmup_s >= 0.02 && r.warmup_s < r.wall_s);
        // 100 tokens over at least 50 ms: at most 2000 tokens/s.
        assert!(
            r.tokens_per_s > 0.0 && r.tokens_per_s <= 2000.0,
            "{}",
            r.tokens_per_s
        );
        assert!((r.device_hours * 3600.0 - r.device_s).abs() < 1e-12);
        assert!(r.energy.is_empty());
    }

    #[test]
    fn devices_scale_device_seconds() {
        let mut m = PhaseMeter::start_with_energy("train", None);
        m.set_devices(8);
        m.set_cuda_peak_bytes(42);
        std::thread::sleep(Duration::from_millis(10));
        let r = m.finish();
        assert!(!r.warmup_excluded);
        assert_eq!(r.devices, 8);
        assert!((r.device_s - 8.0 * r.wall_s).abs() < 1e-12);
        assert_eq!(r.cuda_peak_bytes, Some(42));
    }
}
