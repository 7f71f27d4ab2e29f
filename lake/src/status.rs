//! What the lake is doing, for `/api/v1/health`: archive backlog, files
//! written, the last snapshot, and the last object-store error (cleared by
//! the next successful write).

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex,
};

use serde::Serialize;

/// Shared lake status.
#[derive(Debug, Default)]
pub struct LakeStatus {
    /// Arrow bytes of events accepted but not yet durably archived.
    pub archive_buffered_bytes: AtomicU64,
    /// Callers waiting for archive buffer space (ingest held back).
    pub archive_waiting: AtomicU64,
    /// Closed archive files waiting for their PUT.
    pub archive_pending_files: AtomicU64,
    /// Archive files written.
    pub archive_files: AtomicU64,
    /// Archive bytes written (Parquet).
    pub archive_bytes: AtomicU64,
    /// Rows archived durably (one per event; sales: one per receipt
    /// line, as in the `sales` stream table).
    pub archive_rows: AtomicU64,
    /// Snapshots committed.
    pub snapshots: AtomicU64,
    /// Reports written.
    pub reports: AtomicU64,
    /// Object-store operations that failed (each retry counts).
    pub errors: AtomicU64,
    last_error: Mutex<Option<LastError>>,
    last_snapshot: Mutex<Option<serde_json::Value>>,
}

/// The last object-store failure.
#[derive(Debug, Clone, Serialize)]
pub struct LastError {
    /// Operation.
    pub op: &'static str,
    /// The error, with the URL.
    pub message: String,
    /// When (ms since the epoch).
    pub at_ms: i64,
}

impl LakeStatus {
    pub(crate) fn error(&self, op: &'static str, e: &dyn std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metric_names::LAKE_ERRORS_TOTAL, "op" => op).increment(1);
        *self.last_error.lock().expect("status lock") = Some(LastError {
            op,
            message: e.to_string(),
            at_ms: chrono::Utc::now().timestamp_millis(),
        });
    }

    pub(crate) fn ok(&self) {
        let mut last = self.last_error.lock().expect("status lock");
        if let Some(e) = last.take() {
            tracing::info!(failed_op = e.op, "lake writes succeed again");
        }
    }

    pub(crate) fn set_last_snapshot(&self, v: serde_json::Value) {
        *self.last_snapshot.lock().expect("status lock") = Some(v);
    }

    /// The current fault, if writes are failing.
    pub fn last_error(&self) -> Option<LastError> {
        self.last_error.lock().expect("status lock").clone()
    }

    /// JSON for `/api/v1/health`.
    pub fn to_json(&self, url: &str) -> serde_json::Value {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let err = self.last_error();
        serde_json::json!({
            "url": url,
            "healthy": err.is_none(),
            "last_error": err,
            "errors": n(&self.errors),
            "archive": {
                "buffered_bytes": n(&self.archive_buffered_bytes),
                "ingest_waiting": n(&self.archive_waiting) > 0,
                "pending_files": n(&self.archive_pending_files),
                "files": n(&self.archive_files),
                "bytes": n(&self.archive_bytes),
                "rows": n(&self.archive_rows),
            },
            "snapshots": n(&self.snapshots),
            "last_snapshot": self.last_snapshot.lock().expect("status lock").clone(),
            "reports": n(&self.reports),
        })
    }
}
