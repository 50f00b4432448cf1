//! ftbench's meter: per-phase time, tokens, memory and energy; LoRA-aware FLOP counts
//! and MFU; the machine fingerprint; and the versioned run record (`run.json`) and
//! per-step metrics (`metrics.jsonl`) that every run writes and the cost model reads.
//!
//! The record format is documented in `docs/run-record.md`.

#![warn(missing_docs)]

pub mod energy;
pub mod error;
pub mod fingerprint;
pub mod flops;
pub mod memory;
pub mod metrics;
pub mod peak;
pub mod phase;
pub mod record;

pub use energy::{total_joules, EnergyMeter, EnergyReading};
pub use error::{Error, Result};
pub use fingerprint::Fingerprint;
pub use flops::{
    inference_flops_per_token, training_flops_per_token, FlopCount, LoraShape, ModelShape,
    Trainable,
};
pub use memory::{current_rss_bytes, peak_rss_bytes};
pub use metrics::{read_metrics, MetricsLine, MetricsWriter};
pub use peak::{mfu, peak_tflops, PeakEntry, PeakTable};
pub use phase::{PhaseMeter, PhaseRecord};
pub use record::{write_atomic, RunKind, RunRecord, RECORD_FORMAT_VERSION};
