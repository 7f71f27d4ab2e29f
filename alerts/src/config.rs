//! The `[alerts]` configuration: outbox and delivery settings, the sinks,
//! the rules declared in the configuration, how bounded runs evaluate, and
//! the event-time clock of an evaluation ([`rule_clock`]).

use std::{num::NonZeroUsize, time::Duration};

use serde::{Deserialize, Serialize};
use storepulse_sql::alert::{name_list, RuleOptions, Severity};

use crate::sink::SinkConfig;

/// The `[alerts]` configuration table.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Notifications not yet delivered to every sink that the outbox holds
    /// before new ones wait (an error and
    /// `storepulse_alerts_outbox_full_total`).
    pub outbox_capacity: u64,
    /// Rows kept in `alert_history`.
    pub history_capacity: u64,
    /// Smallest gap between two evaluations of one rule triggered by new
    /// data (the `every` timer runs regardless). A rule whose evaluation
    /// takes longer than a ninth of this waits nine times its last
    /// evaluation instead, so alerting stays under a tenth of a core per
    /// rule.
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
    /// Notifications per delivery (a webhook request carries this many).
    pub batch_max: usize,
    /// Longest wait between two delivery attempts of a failing sink.
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// Shipped rules (`sql/alerts/builtin.sql`) are loaded with the
    /// built-in views.
    pub builtin: bool,
    /// How a bounded run (`until_eof`) evaluates the rules: `end` (the
    /// default: as the data arrives, like live operation at full speed, and
    /// once on the final views — a backfill of history whose past alerts
    /// nobody should receive, at full ingest speed) or `event_time` (a
    /// backtest: the files are read aligned on event time and every rule is
    /// evaluated at the end of every `every` of event time the data passes
    /// through, so `for`, `renotify` and resolution happen at the event
    /// times live operation gives them, with the same ids; it costs one
    /// evaluation per rule per `every` of history).
    pub bounded_evaluation: BoundedEvaluation,
    /// The sinks.
    pub sinks: Vec<SinkConfig>,
    /// Rules declared in the configuration instead of a SQL file
    /// (`[[alerts.rules]]`); each becomes a `CREATE ALERT` statement.
    pub rules: Vec<RuleConfig>,
}

/// See [`AlertsConfig::bounded_evaluation`].
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BoundedEvaluation {
    /// Along event time: every `every` of it.
    EventTime,
    /// As the data arrives, and on the final views.
    End,
}

/// The event-time clock of an evaluation: the engine's `as_of` rounded down
/// to the rule's `every`. Live and replayed evaluations of the same events
/// see the same clock values, so episodes start (and get their ids) at the
/// same instants whether the data arrived live or from a file.
pub fn rule_clock(as_of: i64, every: Duration) -> i64 {
    let every = (every.as_millis() as i64).max(1);
    as_of.div_euclid(every) * every
}

/// An alert rule in the configuration (`[[alerts.rules]]`): the same
/// options as `CREATE ALERT ... WITH (...)`, deserialised straight into
/// their types (a bad duration or severity is an error at its TOML line);
/// unset ones take the defaults.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Rule name.
    pub name: String,
    /// The condition query (`SELECT ...`).
    pub query: String,
    /// Key columns: `"store_id, sku"` or `["store_id", "sku"]`.
    #[serde(default)]
    pub key: Option<Names>,
    /// Evaluation interval, e.g. `"10s"`.
    #[serde(default, with = "humantime_serde")]
    pub every: Option<Duration>,
    /// How long the condition must hold, e.g. `"1m"`.
    #[serde(default, rename = "for", with = "humantime_serde")]
    pub for_: Option<Duration>,
    /// Flap damping, e.g. `"5m"`.
    #[serde(default, with = "humantime_serde")]
    pub keep_firing_for: Option<Duration>,
    /// Re-notification interval, e.g. `"6h"`.
    #[serde(default, with = "humantime_serde")]
    pub renotify: Option<Duration>,
    /// `info`, `warning` or `critical`.
    #[serde(default)]
    pub severity: Option<Severity>,
    /// Sink names: `"ops, replenishment"` or a list.
    #[serde(default)]
    pub sinks: Option<Names>,
    /// Group columns (one notification per group): a string or a list.
    #[serde(default)]
    pub group_by: Option<Names>,
    /// How long a new group waits before its first notification, e.g. `"30s"`.
    #[serde(default, with = "humantime_serde")]
    pub group_wait: Option<Duration>,
    /// Smallest gap between two notifications of a group, e.g. `"5m"`.
    #[serde(default, with = "humantime_serde")]
    pub group_interval: Option<Duration>,
    /// Alert changes one evaluation notifies at most (default 10000).
    #[serde(default)]
    pub max_notifications_per_evaluation: Option<NonZeroUsize>,
}

/// Column or sink names: comma separated in one string, or a list.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Names {
    /// `"store_id, sku"`.
    Text(String),
    /// `["store_id", "sku"]`.
    List(Vec<String>),
}

impl Names {
    /// The names, trimmed, empty ones left out.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Names::Text(t) => name_list(t),
            Names::List(l) => l
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }
}

impl RuleConfig {
    /// The rule's typed options.
    pub fn options(&self) -> RuleOptions {
        RuleOptions {
            key: self.key.as_ref().map(Names::to_vec),
            every: self.every,
            for_: self.for_,
            keep_firing_for: self.keep_firing_for,
            renotify: self.renotify,
            severity: self.severity,
            sinks: self.sinks.as_ref().map(Names::to_vec),
            group_by: self.group_by.as_ref().map(Names::to_vec),
            group_wait: self.group_wait,
            group_interval: self.group_interval,
            max_notifications: self.max_notifications_per_evaluation.map(NonZeroUsize::get),
        }
    }
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            outbox_capacity: 100_000,
            history_capacity: 100_000,
            min_interval: Duration::from_millis(250),
            batch_max: 100,
            retry_max_delay: Duration::from_secs(60),
            builtin: true,
            bounded_evaluation: BoundedEvaluation::End,
            sinks: vec![SinkConfig::Log { name: "log".into() }],
            rules: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_rules_are_typed_when_read() {
        let r: RuleConfig = serde_json::from_value(serde_json::json!({
            "name": "hot",
            "query": "SELECT store_id FROM t WHERE note = 'it''s hot';",
            "key": "store_id",
            "for": "5m",
            "severity": "critical",
            "sinks": ["ops", " replenishment "],
        }))
        .unwrap();
        let o = r.options();
        assert_eq!(o.key, Some(vec!["store_id".to_string()]));
        assert_eq!(o.for_, Some(Duration::from_secs(300)));
        assert_eq!(o.severity, Some(Severity::Critical));
        assert_eq!(
            o.sinks,
            Some(vec!["ops".to_string(), "replenishment".to_string()])
        );
        assert_eq!(o.every, None);
        let bad = serde_json::from_value::<RuleConfig>(serde_json::json!({
            "name": "hot", "query": "SELECT 1", "severity": "huge",
        }))
        .unwrap_err()
        .to_string();
        assert!(bad.contains("huge"), "{bad}");
        let zero = serde_json::from_value::<RuleConfig>(serde_json::json!({
            "name": "hot", "query": "SELECT 1", "max_notifications_per_evaluation": 0,
        }));
        assert!(zero.is_err());
    }
}
