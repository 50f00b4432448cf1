//! Errors of the meter crate. Messages are lower-case and name the file or key involved
//! together with the expected and the found value.

use std::path::PathBuf;

/// Everything that can go wrong while writing or reading run records and metrics files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read, written, synced or renamed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A file (or one line of a JSON Lines file; `line` 0 means the whole file) that is
    /// not the JSON it should be.
    #[error("{}{}: {msg}", path.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    Json {
        /// The file involved.
        path: PathBuf,
        /// 1-based line number, 0 for the whole file.
        line: usize,
        /// What is wrong.
        msg: String,
    },

    /// A run record written in another version of the record format.
    #[error(
        "{}: key `format_version`: expected run record format {expected}, found {found}",
        path.display()
    )]
    FormatVersion {
        /// The record file.
        path: PathBuf,
        /// The version this build reads.
        expected: u32,
        /// The version found in the file.
        found: String,
    },

    /// A required key is absent from a record.
    #[error("{}: missing key `{key}`", path.display())]
    MissingKey {
        /// The record file.
        path: PathBuf,
        /// The missing key.
        key: String,
    },

    /// A peak-FLOPs table entry that cannot be used.
    #[error("peak table entry `{key}`: {msg}")]
    PeakTable {
        /// The entry's device and dtype.
        key: String,
        /// What is wrong.
        msg: String,
    },
}

/// Result with the meter's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
