//! Errors of the cost crate. Each renders as one lower-case line naming the file and
//! the key involved, with the expected and the found value.

use std::path::PathBuf;

/// Everything that can go wrong in the cost model, calibration and reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A cost config that is not valid TOML or has an unknown key.
    #[error("{}{}: {msg}", path.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    Parse {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the problem, 0 when unknown.
        line: usize,
        /// What is wrong.
        msg: String,
    },

    /// A config key (or command-line option) with a missing or bad value.
    #[error("{}: key `{key}`: {msg}", path.display())]
    Key {
        /// The config file, or `command line` for an option.
        path: PathBuf,
        /// The key (`prices.engineer_usd_per_hour`, `strategies[2].kind`, `--horizon`).
        key: String,
        /// Expected vs found.
        msg: String,
    },

    /// A command-line option with a bad value.
    #[error("option `{option}`: {msg}")]
    Option {
        /// The option, e.g. `--horizon`.
        option: String,
        /// Expected vs found.
        msg: String,
    },

    /// A run record or metrics file that cannot be used.
    #[error(transparent)]
    Record(#[from] ftbench_meter::Error),

    /// A run record that lacks what calibration or a report needs.
    #[error("{}: {msg}", path.display())]
    Run {
        /// The run folder or record.
        path: PathBuf,
        /// What is missing.
        msg: String,
    },

    /// A chart that could not be drawn.
    #[error("{}: drawing failed: {msg}", path.display())]
    Chart {
        /// The chart file.
        path: PathBuf,
        /// The backend's message.
        msg: String,
    },
}

/// Result with the cost crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A bad or missing value of `key` in `path`.
    pub fn key(path: impl Into<PathBuf>, key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Key {
            path: path.into(),
            key: key.into(),
            msg: msg.into(),
        }
    }
}
