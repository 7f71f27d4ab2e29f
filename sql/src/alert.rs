//! The typed options of an alert rule, whichever way the rule is written:
//! `CREATE ALERT ... WITH (every = '10s', ...)` ([`RuleOptions::from_sql`],
//! each value parsed once, errors at its line and column) or a
//! `[[alerts.rules]]` table of the config file (deserialised straight into
//! the same types, errors at the TOML line). Unset options take the
//! defaults when the rule is built.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// For information.
    Info,
    /// Act soon.
    Warning,
    /// Act now.
    Critical,
}

impl Severity {
    /// The name used in payloads and SQL.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

/// Options `CREATE ALERT ... WITH (...)` accepts.
pub const OPTIONS: [&str; 11] = [
    "key",
    "every",
    "for",
    "keep_firing_for",
    "renotify",
    "severity",
    "sinks",
    "group_by",
    "group_wait",
    "group_interval",
    "max_notifications_per_evaluation",
];

/// An alert rule's options as given (`None`: not given, the default
/// applies). Lists are column or sink names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleOptions {
    /// Key columns: one alert per distinct key (default: every column).
    pub key: Option<Vec<String>>,
    /// Evaluation interval.
    pub every: Option<Duration>,
    /// How long the condition must hold before the alert fires.
    pub for_: Option<Duration>,
    /// How long a firing alert stays firing after its condition stopped.
    pub keep_firing_for: Option<Duration>,
    /// Re-notification interval (`0s`: never).
    pub renotify: Option<Duration>,
    /// Severity.
    pub severity: Option<Severity>,
    /// Sink names (default: every configured sink).
    pub sinks: Option<Vec<String>>,
    /// Group columns (one notification per group).
    pub group_by: Option<Vec<String>>,
    /// How long a new group waits before its first notification.
    pub group_wait: Option<Duration>,
    /// Smallest gap between two notifications of a group.
    pub group_interval: Option<Duration>,
    /// Alert changes one evaluation notifies at most (at least 1).
    pub max_notifications: Option<usize>,
}

/// An option of `CREATE ALERT ... WITH (...)` that is unknown, repeated or
/// malformed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("alert '{rule}': option '{option}' at line {line}, column {column}: {message}")]
pub struct OptionError {
    /// Rule name.
    pub rule: String,
    /// Option name as written.
    pub option: String,
    /// 1-based line.
    pub line: u64,
    /// 1-based column.
    pub column: u64,
    /// What is wrong.
    pub message: String,
}

/// `"a, b"` → `["a", "b"]`.
pub fn name_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

impl RuleOptions {
    /// Parses the `WITH (...)` options of rule `rule`: `(name, value,
    /// line, column)` as the parser found them.
    pub fn from_sql(
        rule: &str,
        options: &[(String, String, u64, u64)],
    ) -> Result<Self, OptionError> {
        let mut out = RuleOptions::default();
        let mut seen: Vec<&str> = Vec::new();
        for (name, value, line, column) in options {
            let err = |message: String| OptionError {
                rule: rule.to_string(),
                option: name.clone(),
                line: *line,
                column: *column,
                message,
            };
            if seen.contains(&name.as_str()) {
                return Err(err("given twice".into()));
            }
            seen.push(name);
            let duration = || {
                humantime::parse_duration(value.trim())
                    .map(Some)
                    .map_err(|e| {
                        err(format!(
                            "'{value}' is not a duration ({e}); e.g. '30s', '5m', '6h'"
                        ))
                    })
            };
            match name.as_str() {
                "key" => out.key = Some(name_list(value)),
                "every" => out.every = duration()?,
                "for" => out.for_ = duration()?,
                "keep_firing_for" => out.keep_firing_for = duration()?,
                "renotify" => out.renotify = duration()?,
                "severity" => {
                    out.severity = Some(match value.trim().to_ascii_lowercase().as_str() {
                        "info" => Severity::Info,
                        "warning" => Severity::Warning,
                        "critical" => Severity::Critical,
                        _ => {
                            return Err(err(format!(
                                "'{value}' is not a severity (info, warning, critical)"
                            )))
                        }
                    })
                }
                "sinks" => out.sinks = Some(name_list(value)),
                "group_by" => out.group_by = Some(name_list(value)),
                "group_wait" => out.group_wait = duration()?,
                "group_interval" => out.group_interval = duration()?,
                "max_notifications_per_evaluation" => {
                    out.max_notifications = match value.trim().parse::<usize>() {
                        Ok(n) if n >= 1 => Some(n),
                        _ => return Err(err(format!("'{value}' is not a positive whole number"))),
                    }
                }
                _ => {
                    return Err(err(format!(
                        "unknown option (known: {})",
                        OPTIONS.join(", ")
                    )))
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(name: &str, value: &str) -> (String, String, u64, u64) {
        (name.into(), value.into(), 1, 1)
    }

    #[test]
    fn sql_options_are_typed_once() {
        let o = RuleOptions::from_sql(
            "r",
            &[
                opt("key", "store_id, sku"),
                opt("every", "10s"),
                opt("severity", "Critical"),
                opt("max_notifications_per_evaluation", "500"),
            ],
        )
        .unwrap();
        assert_eq!(o.key, Some(vec!["store_id".into(), "sku".into()]));
        assert_eq!(o.every, Some(Duration::from_secs(10)));
        assert_eq!(o.severity, Some(Severity::Critical));
        assert_eq!(o.max_notifications, Some(500));
        assert_eq!(o.for_, None);
        let e = RuleOptions::from_sql("r", &[opt("severity", "huge")]).unwrap_err();
        assert!(e.to_string().contains("not a severity"), "{e}");
    }
}
