//! The `[alerts]` configuration: outbox and delivery settings, the sinks,
//! the rules declared in the configuration, how bounded runs evaluate, and
//! the event-time clock of an evaluation ([`rule_clock`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

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
/// options as `CREATE ALERT ... WITH (...)`, unset ones take the defaults.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Rule name.
    pub name: String,
    /// The condition query (`SELECT ...`).
    pub query: String,
    /// Key columns, comma separated.
    #[serde(default)]
    pub key: Option<String>,
    /// Evaluation interval, e.g. `"10s"`.
    #[serde(default)]
    pub every: Option<String>,
    /// How long the condition must hold, e.g. `"1m"`.
    #[serde(default, rename = "for")]
    pub for_: Option<String>,
    /// Flap damping, e.g. `"5m"`.
    #[serde(default)]
    pub keep_firing_for: Option<String>,
    /// Re-notification interval, e.g. `"6h"`.
    #[serde(default)]
    pub renotify: Option<String>,
    /// `info`, `warning` or `critical`.
    #[serde(default)]
    pub severity: Option<String>,
    /// Sink names, comma separated.
    #[serde(default)]
    pub sinks: Option<String>,
    /// Group columns, comma separated (one notification per group).
    #[serde(default)]
    pub group_by: Option<String>,
    /// How long a new group waits before its first notification, e.g. `"30s"`.
    #[serde(default)]
    pub group_wait: Option<String>,
    /// Smallest gap between two notifications of a group, e.g. `"5m"`.
    #[serde(default)]
    pub group_interval: Option<String>,
    /// Alert changes one evaluation notifies at most (default 10000).
    #[serde(default)]
    pub max_notifications_per_evaluation: Option<u64>,
}

impl RuleConfig {
    /// The equivalent `CREATE ALERT` statement.
    pub fn to_sql(&self) -> String {
        let quote = |v: &str| format!("'{}'", v.replace('\'', "''"));
        let options: Vec<String> = [
            ("key", &self.key),
            ("every", &self.every),
            ("for", &self.for_),
            ("keep_firing_for", &self.keep_firing_for),
            ("renotify", &self.renotify),
            ("severity", &self.severity),
            ("sinks", &self.sinks),
            ("group_by", &self.group_by),
            ("group_wait", &self.group_wait),
            ("group_interval", &self.group_interval),
            (
                "max_notifications_per_evaluation",
                &self.max_notifications_per_evaluation.map(|n| n.to_string()),
            ),
        ]
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k} = {}", quote(v))))
        .collect();
        let with = if options.is_empty() {
            String::new()
        } else {
            format!("\nWITH ({})", options.join(", "))
        };
        format!(
            "CREATE ALERT {} AS\n{}{with}",
            self.name,
            self.query.trim().trim_end_matches(';')
        )
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
    fn config_rules_become_statements() {
        let r = RuleConfig {
            name: "hot".into(),
            query: "SELECT store_id FROM t WHERE note = 'it''s hot';".into(),
            key: Some("store_id".into()),
            every: None,
            for_: Some("5m".into()),
            keep_firing_for: None,
            renotify: None,
            severity: Some("critical".into()),
            sinks: None,
            group_by: None,
            group_wait: None,
            group_interval: None,
            max_notifications_per_evaluation: None,
        };
        let sql = r.to_sql();
        assert_eq!(
            sql,
            "CREATE ALERT hot AS\nSELECT store_id FROM t WHERE note = 'it''s hot'\nWITH (key = 'store_id', for = '5m', severity = 'critical')"
        );
        let parsed = storepulse_sql::parse_script(&sql).unwrap();
        let storepulse_sql::Statement::CreateAlert(a) = &parsed[0] else {
            panic!("{parsed:?}");
        };
        assert_eq!(a.options.len(), 3);
        assert_eq!(
            a.query_sql,
            "SELECT store_id FROM t WHERE note = 'it''s hot'"
        );
    }
}
