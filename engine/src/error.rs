//! Typed engine errors, classified so callers can tell the user's mistakes
//! from broken input and from bugs.

use datafusion::error::DataFusionError;

/// Result alias for the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The user's SQL cannot be accepted (syntax, planning, or a view that
    /// cannot be maintained incrementally). Not retryable.
    #[error("{0}")]
    User(String),
    /// SQL parse errors.
    #[error(transparent)]
    Sql(#[from] storepulse_sql::SqlError),
    /// DataFusion errors (planning errors are user errors too).
    #[error(transparent)]
    DataFusion(#[from] DataFusionError),
    /// Ingest-side errors (sources, dead letters).
    #[error(transparent)]
    Ingest(#[from] storepulse_ingest::IngestError),
    /// Arrow errors while processing batches.
    #[error(transparent)]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    /// The statement is not allowed on a read-only connection (DDL, DML,
    /// COPY, external tables): analysts' SQL only reads.
    #[error("permission denied: {0}")]
    ReadOnly(String),
    /// The query ran longer than the serving timeout and was cancelled.
    #[error("query cancelled after {}: it ran longer than the serving timeout ([serving] timeout); narrow it or raise the limit", humantime::format_duration(*.0))]
    Timeout(std::time::Duration),
    /// The result has more rows than the serving row limit.
    #[error("the result has more than {0} rows ([serving] max_rows); add a LIMIT or aggregate")]
    TooManyRows(usize),
    /// The result is larger than the serving result limit.
    #[error("the result is larger than {} ([serving] max_result_bytes); select fewer columns or rows, or aggregate", bytesize::ByteSize(*.0 as u64))]
    ResultTooLarge(usize),
    /// A failure inside storepulse (a bug), not the caller's.
    #[error("internal error: {0}")]
    Internal(String),
    /// The state grew past `[engine] max_state_bytes`.
    #[error(
        "engine state is {bytes} bytes, over [engine] max_state_bytes = {limit}; the largest view \
         is {view} ({groups} groups, {view_bytes} bytes): raise the limit, give the view fewer \
         keys, or window it"
    )]
    StateLimit {
        /// State bytes after the batch.
        bytes: usize,
        /// The configured limit.
        limit: bytesize::ByteSize,
        /// The largest view.
        view: String,
        /// Its groups.
        groups: usize,
        /// Its bytes.
        view_bytes: usize,
    },
    /// A checkpoint cannot be read or does not fit the engine (a view's
    /// definition changed since it was taken).
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// File system errors (late-events log, data dir).
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl EngineError {
    /// True when the error is the caller's (bad SQL, unsupported view): an
    /// HTTP API answers 400 for these and 500 otherwise.
    pub fn is_user_error(&self) -> bool {
        match self {
            EngineError::User(_)
            | EngineError::Sql(_)
            | EngineError::ReadOnly(_)
            | EngineError::Timeout(_)
            | EngineError::TooManyRows(_)
            | EngineError::ResultTooLarge(_) => true,
            EngineError::DataFusion(e) => {
                matches!(
                    e.find_root(),
                    DataFusionError::Plan(_)
                        | DataFusionError::SQL(..)
                        | DataFusionError::SchemaError(..)
                        | DataFusionError::NotImplemented(_)
                        | DataFusionError::Configuration(_)
                ) || matches!(e, DataFusionError::Diagnostic(..))
            }
            _ => false,
        }
    }
}

/// The class of a failed query, shared by the HTTP status, the pgwire
/// SQLSTATE and the `kind` label of `storepulse_query_errors_total`; each
/// interface maps every variant (an exhaustive `match`, no fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Not a read, on a read-only connection (42501, HTTP 403).
    ReadOnly,
    /// Past the request's deadline (57014, HTTP 408).
    Timeout,
    /// More rows than `[serving] max_rows` (54000, HTTP 413).
    RowLimit,
    /// More bytes than `[serving] max_result_bytes` (54000, HTTP 413).
    ResultLimit,
    /// Over the serving memory pool (53200, HTTP 413).
    MemoryLimit,
    /// Over the SQL limits: text size, statements, expression depth
    /// (54001, HTTP 400).
    TooComplex,
    /// The caller's SQL is wrong (42000, HTTP 400).
    User,
    /// A fault of the server (XX000, HTTP 500).
    Internal,
}

impl ErrorKind {
    /// The label: `read_only`, `timeout`, `row_limit`, `result_limit`,
    /// `memory_limit`, `too_complex`, `user_error`, `internal_error`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ReadOnly => "read_only",
            ErrorKind::Timeout => "timeout",
            ErrorKind::RowLimit => "row_limit",
            ErrorKind::ResultLimit => "result_limit",
            ErrorKind::MemoryLimit => "memory_limit",
            ErrorKind::TooComplex => "too_complex",
            ErrorKind::User => "user_error",
            ErrorKind::Internal => "internal_error",
        }
    }

    /// The Postgres SQLSTATE.
    pub fn sqlstate(self) -> &'static str {
        match self {
            ErrorKind::ReadOnly => "42501", // insufficient_privilege
            ErrorKind::Timeout => "57014",  // query_canceled
            ErrorKind::RowLimit | ErrorKind::ResultLimit => "54000", // program_limit_exceeded
            ErrorKind::MemoryLimit => "53200", // out_of_memory
            ErrorKind::TooComplex => "54001", // statement_too_complex
            ErrorKind::User => "42000",     // syntax_error_or_access_rule_violation
            ErrorKind::Internal => "XX000", // internal_error
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EngineError {
    /// The class of a failed query (see [`ErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        use storepulse_sql::SqlError;
        match self {
            EngineError::ReadOnly(_) => ErrorKind::ReadOnly,
            EngineError::Timeout(_) => ErrorKind::Timeout,
            EngineError::TooManyRows(_) => ErrorKind::RowLimit,
            EngineError::ResultTooLarge(_) => ErrorKind::ResultLimit,
            EngineError::Sql(
                SqlError::TooLarge { .. }
                | SqlError::TooManyStatements { .. }
                | SqlError::TooComplex { .. },
            ) => ErrorKind::TooComplex,
            _ if self.is_memory_limit() => ErrorKind::MemoryLimit,
            _ if self.is_user_error() => ErrorKind::User,
            _ => ErrorKind::Internal,
        }
    }

    /// True when the query hit the serving memory limit (the DataFusion
    /// memory pool of the serving context).
    pub fn is_memory_limit(&self) -> bool {
        matches!(self, EngineError::DataFusion(e) if matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)))
    }
}

impl From<EngineError> for DataFusionError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::DataFusion(e) => e,
            EngineError::User(m) => DataFusionError::Plan(m),
            other => DataFusionError::External(Box::new(other)),
        }
    }
}

/// Shorthand for a user error.
pub(crate) fn user_err<T>(msg: impl Into<String>) -> Result<T> {
    Err(EngineError::User(msg.into()))
}
