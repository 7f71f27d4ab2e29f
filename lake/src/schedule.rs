//! When a scheduled report runs: a cron pattern or a fixed interval, in an
//! IANA time zone.

use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// When a report runs.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// A cron pattern in a time zone.
    Cron(Box<Cron>, Tz),
    /// A fixed interval from start.
    Every(Duration, Tz),
}

impl Schedule {
    /// Parses a report's `schedule` (cron) / `every` / `timezone`; the
    /// error names the key.
    pub fn parse(
        schedule: Option<&str>,
        every: Option<Duration>,
        timezone: &str,
    ) -> std::result::Result<Self, String> {
        let tz: Tz = timezone.parse().map_err(|_| {
            format!("timezone: unknown time zone '{timezone}' (IANA names, e.g. Europe/Berlin)")
        })?;
        match (schedule, every) {
            (Some(s), None) => {
                let cron: Cron = s.parse().map_err(|e| format!("schedule: '{s}': {e}"))?;
                Ok(Self::Cron(Box::new(cron), tz))
            }
            (None, Some(d)) if !d.is_zero() => Ok(Self::Every(d, tz)),
            (None, Some(_)) => Err("every: must be positive".into()),
            (Some(_), Some(_)) => Err("schedule: give either schedule or every, not both".into()),
            (None, None) => Err(
                "schedule: missing (a cron pattern such as \"0 6 * * *\", or every = \"15m\")"
                    .into(),
            ),
        }
    }

    /// The time zone of the schedule and file names.
    pub fn tz(&self) -> Tz {
        match self {
            Self::Cron(_, tz) | Self::Every(_, tz) => *tz,
        }
    }

    /// The first run strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::Cron(c, tz) => c
                .find_next_occurrence(&t.with_timezone(tz), false)
                .ok()
                .map(|d| d.with_timezone(&Utc)),
            Self::Every(d, _) => chrono::Duration::from_std(*d).ok().map(|d| t + d),
        }
    }
}
