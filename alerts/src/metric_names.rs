//! The metric names storepulse-alerts records, in one place (each is recorded
//! where its comment says; `/metrics` renders them in the Prometheus
//! text format). Names follow `storepulse_<component>_<name>_<unit>`.

/// `storepulse_alerts_active` (gauge), recorded in `manager.rs`.
pub const ALERTS_ACTIVE: &str = "storepulse_alerts_active";
/// `storepulse_alerts_delivered_total` (counter), recorded in `manager.rs`.
pub const ALERTS_DELIVERED_TOTAL: &str = "storepulse_alerts_delivered_total";
/// `storepulse_alerts_delivery_errors_total` (counter), recorded in `manager.rs`.
pub const ALERTS_DELIVERY_ERRORS_TOTAL: &str = "storepulse_alerts_delivery_errors_total";
/// `storepulse_alerts_evaluation_errors_total` (counter), recorded in `manager.rs`.
pub const ALERTS_EVALUATION_ERRORS_TOTAL: &str = "storepulse_alerts_evaluation_errors_total";
/// `storepulse_alerts_evaluation_duration_seconds` (histogram), recorded in `manager.rs`.
pub const ALERTS_EVALUATION_DURATION_SECONDS: &str =
    "storepulse_alerts_evaluation_duration_seconds";
/// `storepulse_alerts_evaluations_deferred_total` (counter), recorded in `manager.rs`.
pub const ALERTS_EVALUATIONS_DEFERRED_TOTAL: &str = "storepulse_alerts_evaluations_deferred_total";
/// `storepulse_alerts_evaluations_total` (counter), recorded in `manager.rs`.
pub const ALERTS_EVALUATIONS_TOTAL: &str = "storepulse_alerts_evaluations_total";
/// `storepulse_alerts_event_time_evaluations_total` (counter), recorded in `manager.rs`.
pub const ALERTS_EVENT_TIME_EVALUATIONS_TOTAL: &str =
    "storepulse_alerts_event_time_evaluations_total";
/// `storepulse_alerts_held_back_notifications` (gauge), recorded in `manager.rs`.
pub const ALERTS_HELD_BACK_NOTIFICATIONS: &str = "storepulse_alerts_held_back_notifications";
/// `storepulse_alerts_held_back_total` (counter), recorded in `manager.rs`.
pub const ALERTS_HELD_BACK_TOTAL: &str = "storepulse_alerts_held_back_total";
/// `storepulse_alerts_notifications_total` (counter), recorded in `manager.rs`.
pub const ALERTS_NOTIFICATIONS_TOTAL: &str = "storepulse_alerts_notifications_total";
/// `storepulse_alerts_outbox_full_total` (counter), recorded in `config.rs`, `outbox.rs`.
pub const ALERTS_OUTBOX_FULL_TOTAL: &str = "storepulse_alerts_outbox_full_total";
/// `storepulse_alerts_outbox_pending` (gauge), recorded in `outbox.rs`.
pub const ALERTS_OUTBOX_PENDING: &str = "storepulse_alerts_outbox_pending";
/// `storepulse_alerts_sink_failing` (gauge), recorded in `manager.rs`.
pub const ALERTS_SINK_FAILING: &str = "storepulse_alerts_sink_failing";
