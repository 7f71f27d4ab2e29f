//! Errors of the lake. Object-store failures carry the operation and the
//! full URL of the object, so a log line says what failed where.

use thiserror::Error;

/// A lake error.
#[derive(Debug, Error)]
pub enum LakeError {
    /// The configuration is invalid (names the key).
    #[error("{0}")]
    Config(String),
    /// An object-store operation failed.
    #[error("{op} {url}: {source}")]
    Store {
        /// `PUT`, `GET`, `LIST`, `DELETE`.
        op: &'static str,
        /// The object's (or prefix's) URL.
        url: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// Encoding a file failed.
    #[error("encoding {what}: {message}")]
    Encode {
        /// What was being written (a path or report name).
        what: String,
        /// Why.
        message: String,
    },
    /// A report failed (names the report).
    #[error("report '{report}': {message}")]
    Report {
        /// The report's name.
        report: String,
        /// Why.
        message: String,
    },
    /// The engine refused a query.
    #[error(transparent)]
    Engine(#[from] storepulse_engine::EngineError),
    /// DataFusion failed.
    #[error(transparent)]
    DataFusion(#[from] datafusion::error::DataFusionError),
    /// Arrow failed.
    #[error(transparent)]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    /// Parquet failed.
    #[error(transparent)]
    Parquet(#[from] parquet::errors::ParquetError),
    /// The lake was shut down while work was pending.
    #[error("lake stopped")]
    Stopped,
}

/// Result alias.
pub type Result<T, E = LakeError> = std::result::Result<T, E>;
