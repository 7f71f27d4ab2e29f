//! The metric names storepulse-lake records, in one place (each is recorded
//! where its comment says; `/metrics` renders them in the Prometheus
//! text format). Names follow `storepulse_<component>_<name>_<unit>`.

/// `storepulse_checkpoint_damaged_total` (counter), recorded in `checkpoint.rs`.
pub const CHECKPOINT_DAMAGED_TOTAL: &str = "storepulse_checkpoint_damaged_total";
/// `storepulse_lake_archive_backpressure_total` (counter), recorded in `archive.rs`.
pub const LAKE_ARCHIVE_BACKPRESSURE_TOTAL: &str = "storepulse_lake_archive_backpressure_total";
/// `storepulse_lake_archive_buffered_bytes` (gauge), recorded in `archive.rs`.
pub const LAKE_ARCHIVE_BUFFERED_BYTES: &str = "storepulse_lake_archive_buffered_bytes";
/// `storepulse_lake_archive_bytes_total` (counter), recorded in `archive.rs`.
pub const LAKE_ARCHIVE_BYTES_TOTAL: &str = "storepulse_lake_archive_bytes_total";
/// `storepulse_lake_archive_errors_total` (counter), recorded in `archive.rs`.
pub const LAKE_ARCHIVE_ERRORS_TOTAL: &str = "storepulse_lake_archive_errors_total";
/// `storepulse_lake_archive_files_total` (counter), recorded in `archive.rs`.
pub const LAKE_ARCHIVE_FILES_TOTAL: &str = "storepulse_lake_archive_files_total";
/// `storepulse_lake_archive_put_seconds` (histogram), recorded in `archive.rs`.
pub const LAKE_ARCHIVE_PUT_SECONDS: &str = "storepulse_lake_archive_put_seconds";
/// `storepulse_lake_archive_rows_total` (counter), recorded in `archive.rs`.
pub const LAKE_ARCHIVE_ROWS_TOTAL: &str = "storepulse_lake_archive_rows_total";
/// `storepulse_lake_errors_total` (counter), recorded in `status.rs`, `store.rs`.
pub const LAKE_ERRORS_TOTAL: &str = "storepulse_lake_errors_total";
/// `storepulse_lake_report_errors_total` (counter), recorded in `report.rs`.
pub const LAKE_REPORT_ERRORS_TOTAL: &str = "storepulse_lake_report_errors_total";
/// `storepulse_lake_reports_total` (counter), recorded in `report.rs`.
pub const LAKE_REPORTS_TOTAL: &str = "storepulse_lake_reports_total";
/// `storepulse_lake_retention_deleted_objects_total` (counter), recorded in `retention.rs`.
pub const LAKE_RETENTION_DELETED_OBJECTS_TOTAL: &str =
    "storepulse_lake_retention_deleted_objects_total";
/// `storepulse_lake_snapshot_errors_total` (counter), recorded in `snapshot.rs`.
pub const LAKE_SNAPSHOT_ERRORS_TOTAL: &str = "storepulse_lake_snapshot_errors_total";
/// `storepulse_lake_snapshot_seconds` (histogram), recorded in `snapshot.rs`.
pub const LAKE_SNAPSHOT_SECONDS: &str = "storepulse_lake_snapshot_seconds";
/// `storepulse_lake_snapshots_total` (counter), recorded in `snapshot.rs`.
pub const LAKE_SNAPSHOTS_TOTAL: &str = "storepulse_lake_snapshots_total";
