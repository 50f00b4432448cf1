//! Weight quantization for QLoRA: bitsandbytes' 4-bit NormalFloat (NF4) codec with its
//! double quantization of the block scales, bit for bit, and its safetensors layout
//! ([`nf4`]); the quantized frozen weight the quantized linear op multiplies by, NF4 or a
//! GGUF file's own blocks ([`weight`]).

pub mod nf4;

pub use nf4::{Absmax, Nf4Weight, NESTED_BLOCK, NF4_BLOCK, NF4_CODE};

/// Errors of quantizing a weight or reading a quantized one. Each names the weight or
/// tensor key, and the expected and the found value.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// NF4 blocks of 64 values must not straddle two rows.
    #[error("{name}: in_features {in_features} is not a multiple of the nf4 block size {block}")]
    NotBlockAligned {
        name: String,
        in_features: usize,
        block: usize,
    },

    #[error(
        "{name}: expected {expected} values for [{out_features}, {in_features}], found {found}"
    )]
    Length {
        name: String,
        out_features: usize,
        in_features: usize,
        expected: usize,
        found: usize,
    },

    #[error("{key}: missing")]
    Missing { key: String },

    /// A tensor or quant_state field whose value does not fit the rest.
    #[error("{key}: {what}: expected {expected}, found {found}")]
    Mismatch {
        key: String,
        what: String,
        expected: String,
        found: String,
    },

    #[error("{key}: quant_state is not valid json: {msg}")]
    Json { key: String, msg: String },

    #[error("{key}: {source}")]
    Candle {
        key: String,
        #[source]
        source: candle_core::Error,
    },
}

impl QuantError {
    pub(crate) fn mismatch(
        key: impl Into<String>,
        what: impl Into<String>,
        expected: impl std::fmt::Display,
        found: impl std::fmt::Display,
    ) -> Self {
        QuantError::Mismatch {
            key: key.into(),
            what: what.into(),
            expected: expected.to_string(),
            found: found.to_string(),
        }
    }
}

pub mod weight;
pub use weight::{is_quantizable, QuantWeight, Quantization};
