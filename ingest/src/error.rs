//! Typed errors of the ingest crate.

use std::path::PathBuf;

/// Result alias for the ingest crate.
pub type Result<T, E = IngestError> = std::result::Result<T, E>;

/// Everything that can go wrong while reading or decoding events.
///
/// Record-level problems (a malformed line) are *not* errors: they become
/// [`crate::DeadLetter`]s and the batch goes on. These variants are for
/// problems that stop a source: a missing file, a broken CSV header, I/O.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A stream name that is not part of the event contract.
    #[error("unknown stream '{name}' (expected one of: {expected})")]
    UnknownStream {
        /// The name that was given.
        name: String,
        /// The names the contract knows.
        expected: String,
    },
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file's format could not be determined or is not supported.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// An Arrow error outside of record decoding (e.g. building a batch).
    #[error("arrow error: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A Parquet reading error.
    #[error("parquet error in {path}: {source}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// The dead-letter sink could not store a record; the source must stop
    /// advancing rather than lose it.
    #[error("dead-letter sink failed: {0}")]
    DeadLetter(String),
    /// The consumer of a source went away (shutdown).
    #[error("source channel closed")]
    Closed,
}
