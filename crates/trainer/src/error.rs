//! Errors of the trainer crate. Messages are lower-case and name the file, key or
//! tensor involved together with the expected and the found value.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A model folder, config.json, GGUF file or hub id that cannot be used.
    #[error("{path}: {msg}")]
    Model { path: PathBuf, msg: String },

    /// A configuration key with a bad or missing value.
    #[error("config key `{key}`: {msg}")]
    Config { key: String, msg: String },

    /// A dataset line or file that cannot be used. `line` is 1-based; 0 means the whole file.
    #[error("{}{}: {msg}", path.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    Data {
        path: PathBuf,
        line: usize,
        msg: String,
    },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// An adapter folder that does not fit the base model.
    #[error("adapter {path}: {msg}")]
    Adapter { path: PathBuf, msg: String },

    /// A weight that cannot be quantized, or a quantized weight that cannot be read.
    #[error(transparent)]
    Quant(#[from] crate::quant::QuantError),
    /// A device that is unknown, not compiled in, or does not answer.
    #[error("device `{spec}`: {msg}")]
    Device { spec: String, msg: String },

    /// Training diverged or cannot continue.
    #[error("training: {0}")]
    Training(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn config(key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            msg: msg.into(),
        }
    }
    pub fn data(path: impl Into<PathBuf>, line: usize, msg: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            line,
            msg: msg.into(),
        }
    }
}
