//! The metric names storepulse (binary) records, in one place (each is recorded
//! where its comment says; `/metrics` renders them in the Prometheus
//! text format). Names follow `storepulse_<component>_<name>_<unit>`.

/// `storepulse_checkpoint_bytes` (gauge), recorded in `checkpoint.rs`.
pub(crate) const CHECKPOINT_BYTES: &str = "storepulse_checkpoint_bytes";
/// `storepulse_checkpoint_duration_seconds` (histogram), recorded in `checkpoint.rs`.
pub(crate) const CHECKPOINT_DURATION_SECONDS: &str = "storepulse_checkpoint_duration_seconds";
/// `storepulse_checkpoint_errors_total` (counter), recorded in `checkpoint.rs`.
pub(crate) const CHECKPOINT_ERRORS_TOTAL: &str = "storepulse_checkpoint_errors_total";
/// `storepulse_checkpoint_last_success_timestamp_seconds` (gauge), recorded in `checkpoint.rs`.
pub(crate) const CHECKPOINT_LAST_SUCCESS_TIMESTAMP_SECONDS: &str =
    "storepulse_checkpoint_last_success_timestamp_seconds";
/// `storepulse_checkpoint_restore_seconds` (gauge), recorded in `checkpoint.rs`.
pub(crate) const CHECKPOINT_RESTORE_SECONDS: &str = "storepulse_checkpoint_restore_seconds";
/// `storepulse_checkpoint_written_total` (counter), recorded in `checkpoint.rs`.
pub(crate) const CHECKPOINT_WRITTEN_TOTAL: &str = "storepulse_checkpoint_written_total";
/// `storepulse_dimensions_reload_errors_total` (counter), recorded in `pipeline.rs`.
pub(crate) const DIMENSIONS_RELOAD_ERRORS_TOTAL: &str = "storepulse_dimensions_reload_errors_total";
/// `storepulse_dimensions_reloads_total` (counter), recorded in `pipeline.rs`.
pub(crate) const DIMENSIONS_RELOADS_TOTAL: &str = "storepulse_dimensions_reloads_total";
/// `storepulse_engine_duplicate_events_total` (counter), recorded in `main.rs`.
pub(crate) const ENGINE_DUPLICATE_EVENTS_TOTAL: &str = "storepulse_engine_duplicate_events_total";
/// `storepulse_engine_late_events_total` (counter), recorded in `main.rs`.
pub(crate) const ENGINE_LATE_EVENTS_TOTAL: &str = "storepulse_engine_late_events_total";
/// `storepulse_engine_view_refresh_errors_total` (counter), recorded in `main.rs`, `pipeline.rs`.
pub(crate) const ENGINE_VIEW_REFRESH_ERRORS_TOTAL: &str =
    "storepulse_engine_view_refresh_errors_total";
/// `storepulse_ingest_dead_letters_total` (counter), recorded in `main.rs`.
pub(crate) const INGEST_DEAD_LETTERS_TOTAL: &str = "storepulse_ingest_dead_letters_total";
/// `storepulse_retail_stock_anomaly_gap_units` (gauge), recorded in `pipeline.rs`.
pub(crate) const RETAIL_STOCK_ANOMALY_GAP_UNITS: &str = "storepulse_retail_stock_anomaly_gap_units";
/// `storepulse_retail_stock_anomaly_pairs` (gauge), recorded in `pipeline.rs`.
pub(crate) const RETAIL_STOCK_ANOMALY_PAIRS: &str = "storepulse_retail_stock_anomaly_pairs";
/// `storepulse_retail_stock_unknown_pairs` (gauge), recorded in `pipeline.rs`.
pub(crate) const RETAIL_STOCK_UNKNOWN_PAIRS: &str = "storepulse_retail_stock_unknown_pairs";
