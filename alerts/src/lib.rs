//! Alerting for storepulse.
//!
//! * [`rule`] — an [`AlertRule`] from a `CREATE ALERT ... WITH (...)`
//!   statement: typed, validated options (key columns, `every`, `for`,
//!   `keep_firing_for`, `renotify`, `severity`, `sinks`); an unknown or
//!   malformed option is an error naming it and its line and column.
//! * [`lifecycle`] — the Prometheus-style state machine per (rule, key):
//!   pending → firing (notify) → resolved (notify), re-notify while firing,
//!   flapping damped by `keep_firing_for`, deterministic alert ids (rule,
//!   key, episode start) on the engine's event-time clock.
//! * [`outbox`] — the durable, bounded outbox (redb) that holds
//!   notifications, the lifecycles and the history, committed together.
//! * [`sink`] — webhook (HMAC-signed, rate-limited), Kafka (idempotent),
//!   JSONL and log sinks.
//! * [`manager`] — evaluation on timers, on new data and along event time
//!   (bounded runs), storm budgets, delivery loops with retries, the
//!   active alerts; `notify` turns query rows into notifications (grouped
//!   with `group_by`).
//! * [`config`] — the `[alerts]` table and the event-time clock.
//! * [`history`] — the `alert_history` table.

pub mod config;
pub mod history;
pub mod lifecycle;
pub mod manager;
pub mod metric_names;
mod notify;
pub mod outbox;
pub mod rule;
pub mod sink;

pub use config::{rule_clock, AlertsConfig, BoundedEvaluation, RuleConfig};
pub use history::HistoryTable;
pub use lifecycle::{AlertState, Lifecycle, Notification};
pub use manager::{ActiveAlert, AlertError, AlertManager, RuleHealth, SinkHealth};
pub use outbox::{Outbox, OutboxError};
pub use rule::{AlertRule, RuleError, Severity, DEFAULT_MAX_NOTIFICATIONS};
pub use sink::{signature, verify, Sink, SinkConfig, SinkError};
