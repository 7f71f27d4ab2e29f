//! An alert rule: the condition query and its typed options.
//!
//! ```sql
//! CREATE ALERT low_stock AS
//!   SELECT store_id, sku, on_hand, p_stockout, suggested_order_qty
//!   FROM stockout_risk WHERE p_stockout > 0.8
//! WITH (key = 'store_id, sku', every = '10s', for = '1m', renotify = '6h',
//!       severity = 'warning', sinks = 'replenishment,ops');
//! ```
//!
//! Every row the query returns is a condition that holds for the row's key
//! (the `key` columns; default: all columns).

use std::time::Duration;

use storepulse_sql::parse::AlertStatement;

use storepulse_sql::alert::OptionError;
pub use storepulse_sql::alert::{RuleOptions, Severity, OPTIONS};

/// Why a rule is rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    /// An option is unknown, repeated or malformed.
    #[error(transparent)]
    Option(#[from] OptionError),
    /// An option's value is out of range.
    #[error("alert '{rule}': option '{option}': {message}")]
    Range {
        /// Rule name.
        rule: String,
        /// Option name.
        option: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A key column is not an output column of the query.
    #[error(
        "alert '{rule}': key column '{column}' is not a column of the query (columns: {columns})"
    )]
    KeyColumn {
        /// Rule name.
        rule: String,
        /// The missing column.
        column: String,
        /// The query's columns.
        columns: String,
    },
}

/// A validated alert rule.
#[derive(Debug, Clone)]
pub struct AlertRule {
    /// Rule name (unique).
    pub name: String,
    /// The condition query.
    pub sql: String,
    /// Key columns: one alert per distinct key.
    pub key: Vec<String>,
    /// Evaluation interval (also evaluated when a view it reads changes).
    pub every: Duration,
    /// How long the condition must hold before the alert fires.
    pub for_: Duration,
    /// How long a firing alert stays firing after its condition stopped
    /// holding (damps flapping; a return within it is the same episode).
    pub keep_firing_for: Duration,
    /// Re-notify a firing alert this often (`0s`: never).
    pub renotify: Duration,
    /// Severity.
    pub severity: Severity,
    /// Sink names (empty: every configured sink).
    pub sinks: Vec<String>,
    /// Group columns (a subset of the query's columns, e.g. `store_id`):
    /// the alerts of one group that change in one evaluation go out as one
    /// notification listing them (Alertmanager's `group_by`). Empty: one
    /// notification per alert.
    pub group_by: Vec<String>,
    /// How long a new group waits before its first notification, so the
    /// alerts that start together go out together (event time).
    pub group_wait: Duration,
    /// Smallest gap between two notifications of one group (event time);
    /// changes in between wait and go out together.
    pub group_interval: Duration,
    /// Alert changes one evaluation turns into notifications at most; the
    /// rest wait for the next evaluation (their episodes keep their start,
    /// so nothing is lost and ids do not change) and one summary
    /// notification says how many were held back.
    pub max_notifications: usize,
}

/// Default of `max_notifications_per_evaluation`: a storm (every (store,
/// SKU) turning true at once) reaches the sinks in slices of this size
/// instead of filling the outbox.
pub const DEFAULT_MAX_NOTIFICATIONS: usize = 10_000;

impl AlertRule {
    /// Validates a parsed statement against the query's output `columns`.
    pub fn from_statement(stmt: &AlertStatement, columns: &[String]) -> Result<Self, RuleError> {
        let options = RuleOptions::from_sql(&stmt.name, &stmt.options)?;
        Self::new(&stmt.name, &stmt.query_sql, &options, columns)
    }

    /// The rule `name` with condition `sql` (whose output columns are
    /// `columns`) and `options`, the unset ones at their defaults.
    pub fn new(
        name: &str,
        sql: &str,
        options: &RuleOptions,
        columns: &[String],
    ) -> Result<Self, RuleError> {
        let o = options.clone();
        let rule = AlertRule {
            name: name.to_string(),
            sql: sql.to_string(),
            key: o.key.unwrap_or_else(|| columns.to_vec()),
            every: o.every.unwrap_or(Duration::from_secs(10)),
            for_: o.for_.unwrap_or(Duration::ZERO),
            keep_firing_for: o.keep_firing_for.unwrap_or(Duration::from_secs(60)),
            renotify: o.renotify.unwrap_or(Duration::from_secs(6 * 3600)),
            severity: o.severity.unwrap_or(Severity::Warning),
            sinks: o.sinks.unwrap_or_default(),
            group_by: o.group_by.unwrap_or_default(),
            group_wait: o.group_wait.unwrap_or(Duration::from_secs(30)),
            group_interval: o.group_interval.unwrap_or(Duration::from_secs(300)),
            max_notifications: o.max_notifications.unwrap_or(DEFAULT_MAX_NOTIFICATIONS),
        };
        if rule.every < Duration::from_millis(100) {
            return Err(RuleError::Range {
                rule: rule.name,
                option: "every",
                message: "must be at least 100ms".into(),
            });
        }
        if rule.max_notifications == 0 {
            return Err(RuleError::Range {
                rule: rule.name,
                option: "max_notifications_per_evaluation",
                message: "'0' is not a positive whole number".into(),
            });
        }
        if rule.key.is_empty() {
            return Err(RuleError::KeyColumn {
                rule: rule.name,
                column: String::new(),
                columns: columns.join(", "),
            });
        }
        for k in rule.key.iter().chain(&rule.group_by) {
            if !columns.iter().any(|c| c == k) {
                return Err(RuleError::KeyColumn {
                    rule: rule.name.clone(),
                    column: k.clone(),
                    columns: columns.join(", "),
                });
            }
        }
        Ok(rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use storepulse_sql::{parse_script, Statement};

    fn parse(sql: &str) -> AlertStatement {
        match parse_script(sql).unwrap().remove(0) {
            Statement::CreateAlert(a) => a,
            other => panic!("{other:?}"),
        }
    }

    fn cols() -> Vec<String> {
        ["store_id", "sku", "p_stockout"].map(String::from).to_vec()
    }

    #[test]
    fn options_are_typed_with_defaults() {
        let s = parse(
            "CREATE ALERT low AS SELECT store_id, sku, p_stockout FROM stockout_risk \
             WITH (key = 'store_id, sku', every = '10s', for = '1m', renotify = '6h', \
             severity = 'critical', sinks = 'replenishment, ops')",
        );
        let r = AlertRule::from_statement(&s, &cols()).unwrap();
        assert_eq!(r.key, vec!["store_id", "sku"]);
        assert_eq!(r.every, Duration::from_secs(10));
        assert_eq!(r.for_, Duration::from_secs(60));
        assert_eq!(r.renotify, Duration::from_secs(6 * 3600));
        assert_eq!(r.keep_firing_for, Duration::from_secs(60));
        assert_eq!(r.severity, Severity::Critical);
        assert_eq!(r.sinks, vec!["replenishment", "ops"]);
        let d = AlertRule::from_statement(&parse("CREATE ALERT d AS SELECT 1 AS x"), &["x".into()])
            .unwrap();
        assert_eq!(d.key, vec!["x"]);
        assert_eq!(d.severity, Severity::Warning);
    }

    #[test]
    fn grouping_and_storm_options() {
        let s = parse(
            "CREATE ALERT low AS SELECT store_id, sku, p_stockout FROM stockout_risk \
             WITH (key = 'store_id, sku', group_by = 'store_id', group_wait = '1m', \
             group_interval = '10m', max_notifications_per_evaluation = '500')",
        );
        let r = AlertRule::from_statement(&s, &cols()).unwrap();
        assert_eq!(r.group_by, vec!["store_id"]);
        assert_eq!(r.group_wait, Duration::from_secs(60));
        assert_eq!(r.group_interval, Duration::from_secs(600));
        assert_eq!(r.max_notifications, 500);
        let s = parse("CREATE ALERT a AS SELECT store_id FROM t WITH (group_by = 'city')");
        let e = AlertRule::from_statement(&s, &cols())
            .unwrap_err()
            .to_string();
        assert!(e.contains("key column 'city'"), "{e}");
        let s = parse(
            "CREATE ALERT a AS SELECT store_id FROM t WITH (max_notifications_per_evaluation = '0')",
        );
        let e = AlertRule::from_statement(&s, &cols())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a positive whole number"), "{e}");
    }

    #[test]
    fn bad_options_name_the_option_and_position() {
        let s =
            parse("CREATE ALERT a AS SELECT store_id FROM t\nWITH (every = '10s', evrey = '5s')");
        let e = AlertRule::from_statement(&s, &cols())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("option 'evrey' at line 2, column 22: unknown option"),
            "{e}"
        );
        let s = parse("CREATE ALERT a AS SELECT store_id FROM t WITH (for = 'soon')");
        let e = AlertRule::from_statement(&s, &cols())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("option 'for'") && e.contains("not a duration"),
            "{e}"
        );
        let s = parse("CREATE ALERT a AS SELECT store_id FROM t WITH (severity = 'huge')");
        assert!(AlertRule::from_statement(&s, &cols()).is_err());
        let s = parse("CREATE ALERT a AS SELECT store_id FROM t WITH (key = 'store')");
        let e = AlertRule::from_statement(&s, &cols())
            .unwrap_err()
            .to_string();
        assert!(e.contains("key column 'store'"), "{e}");
        let s = parse("CREATE ALERT a AS SELECT store_id FROM t WITH (for = '1m', for = '2m')");
        let e = AlertRule::from_statement(&s, &cols())
            .unwrap_err()
            .to_string();
        assert!(e.contains("given twice"), "{e}");
    }
}
