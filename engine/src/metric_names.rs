//! The metric names storepulse-engine records, in one place (each is recorded
//! where its comment says; `/metrics` renders them in the Prometheus
//! text format). Names follow `storepulse_<component>_<name>_<unit>`.

/// `storepulse_engine_batch_duration_seconds` (histogram), recorded in `engine.rs`.
pub const ENGINE_BATCH_DURATION_SECONDS: &str = "storepulse_engine_batch_duration_seconds";
/// `storepulse_engine_bytes_total` (counter), recorded in `engine.rs`.
pub const ENGINE_BYTES_TOTAL: &str = "storepulse_engine_bytes_total";
/// `storepulse_engine_duplicate_events_total` (counter), recorded in `engine.rs`.
pub const ENGINE_DUPLICATE_EVENTS_TOTAL: &str = "storepulse_engine_duplicate_events_total";
/// `storepulse_engine_events_total` (counter), recorded in `engine.rs`.
pub const ENGINE_EVENTS_TOTAL: &str = "storepulse_engine_events_total";
/// `storepulse_engine_late_events_total` (counter), recorded in `engine.rs`, `late.rs`.
pub const ENGINE_LATE_EVENTS_TOTAL: &str = "storepulse_engine_late_events_total";
/// `storepulse_engine_view_evaluate_seconds` (histogram), recorded in `engine.rs`.
pub const ENGINE_VIEW_EVALUATE_SECONDS: &str = "storepulse_engine_view_evaluate_seconds";
/// `storepulse_engine_view_evicted_groups_total` (counter), recorded in `engine.rs`.
pub const ENGINE_VIEW_EVICTED_GROUPS_TOTAL: &str = "storepulse_engine_view_evicted_groups_total";
/// `storepulse_engine_view_groups` (gauge), recorded in `engine.rs`.
pub const ENGINE_VIEW_GROUPS: &str = "storepulse_engine_view_groups";
/// `storepulse_engine_view_index_lookups_total` (counter), recorded in `refresh.rs`.
pub const ENGINE_VIEW_INDEX_LOOKUPS_TOTAL: &str = "storepulse_engine_view_index_lookups_total";
/// `storepulse_engine_view_output_bytes` (gauge), recorded in `engine.rs`.
pub const ENGINE_VIEW_OUTPUT_BYTES: &str = "storepulse_engine_view_output_bytes";
/// `storepulse_engine_view_refresh_age_seconds` (gauge), recorded in `query/handle.rs`, `refresh.rs`.
pub const ENGINE_VIEW_REFRESH_AGE_SECONDS: &str = "storepulse_engine_view_refresh_age_seconds";
/// `storepulse_engine_view_refresh_seconds` (histogram), recorded in `refresh.rs`.
pub const ENGINE_VIEW_REFRESH_SECONDS: &str = "storepulse_engine_view_refresh_seconds";
/// `storepulse_engine_view_stale_reads_total` (counter), recorded in `refresh.rs`.
pub const ENGINE_VIEW_STALE_READS_TOTAL: &str = "storepulse_engine_view_stale_reads_total";
/// `storepulse_engine_view_state_bytes` (gauge), recorded in `engine.rs`.
pub const ENGINE_VIEW_STATE_BYTES: &str = "storepulse_engine_view_state_bytes";
/// `storepulse_engine_watermark_lag_seconds` (gauge), recorded in `engine.rs`.
pub const ENGINE_WATERMARK_LAG_SECONDS: &str = "storepulse_engine_watermark_lag_seconds";
