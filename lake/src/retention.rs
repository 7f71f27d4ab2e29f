//! Retention: per configured prefix, `date=YYYY-MM-DD` partitions whose
//! whole day is older than `keep` are deleted — their objects and nothing
//! else. Snapshot manifests of deleted days are deleted first, so a
//! committed snapshot never points at missing files.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use futures::{stream, StreamExt, TryStreamExt};
use object_store::path::Path;
use tokio::sync::watch;

use crate::{
    config::RetentionRule,
    error::{LakeError, Result},
    snapshot::{id_time, MANIFEST_DIR},
    store::Lake,
};

/// What one retention pass removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RetentionReport {
    /// Partitions (`…/date=YYYY-MM-DD/`) removed.
    pub partitions: Vec<String>,
    /// Objects deleted (data files and manifests).
    pub objects: usize,
}

/// The date of a `date=YYYY-MM-DD` path segment.
fn partition_date(segment: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(segment.strip_prefix("date=")?, "%Y-%m-%d").ok()
}

/// Whether the whole day `d` is older than `keep` at `now`.
fn expired(d: NaiveDate, keep: Duration, now: DateTime<Utc>) -> bool {
    let end = d
        .succ_opt()
        .unwrap_or(d)
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc();
    chrono::Duration::from_std(keep).is_ok_and(|keep| end + keep <= now)
}

/// Applies every rule once at `now`.
pub async fn apply(
    lake: &Lake,
    rules: &[RetentionRule],
    now: DateTime<Utc>,
) -> Result<RetentionReport> {
    let mut report = RetentionReport::default();
    for rule in rules {
        let prefix = rule.prefix.trim_matches('/').to_string();
        // Manifests of expired snapshots go first.
        if format!("{MANIFEST_DIR}/").starts_with(&format!("{prefix}/")) || prefix == "views" {
            for m in lake.list(MANIFEST_DIR).await? {
                let expired_manifest = m
                    .location
                    .filename()
                    .and_then(|f| f.strip_suffix(".json"))
                    .and_then(id_time)
                    .is_some_and(|t| expired(t.date_naive(), rule.keep, now));
                if expired_manifest {
                    lake.delete(&m.location).await?;
                    report.objects += 1;
                }
            }
        }
        // Breadth-first down to the date= partitions (≤ 4 levels: views/v/,
        // events/s/, reports/r/ and their parents).
        let mut level = vec![lake.path(&prefix)];
        for _ in 0..4 {
            let mut next = Vec::new();
            for dir in level {
                let rel = lake.relative(&dir).to_string();
                for sub in lake.list_dirs(&rel).await? {
                    let Some(seg) = sub.filename() else { continue };
                    match partition_date(seg) {
                        Some(d) if expired(d, rule.keep, now) => {
                            report.objects += delete_all(lake, &sub).await?;
                            report.partitions.push(lake.relative(&sub).to_string());
                        }
                        Some(_) => {}
                        None if seg != "_manifest" => next.push(sub),
                        None => {}
                    }
                }
            }
            level = next;
            if level.is_empty() {
                break;
            }
        }
    }
    if report.objects > 0 {
        metrics::counter!(crate::metric_names::LAKE_RETENTION_DELETED_OBJECTS_TOTAL)
            .increment(report.objects as u64);
        tracing::info!(
            partitions = report.partitions.len(),
            objects = report.objects,
            "retention removed expired partitions"
        );
    }
    Ok(report)
}

async fn delete_all(lake: &Lake, dir: &Path) -> Result<usize> {
    let rel = lake.relative(dir).to_string();
    let objects = lake.list(&rel).await?;
    let n = objects.len();
    let locations = stream::iter(objects.into_iter().map(|m| Ok(m.location))).boxed();
    lake.store()
        .delete_stream(locations)
        .try_collect::<Vec<_>>()
        .await
        .map_err(|source| LakeError::Store {
            op: "DELETE",
            url: lake.url_of(dir),
            source,
        })?;
    Ok(n)
}

/// Applies retention at start and then every `interval` until `shutdown`.
pub async fn run(
    lake: Lake,
    rules: Vec<RetentionRule>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    if rules.is_empty() {
        return;
    }
    loop {
        if let Err(e) = apply(&lake, &rules, Utc::now()).await {
            lake.status().error("DELETE", &e);
            tracing::error!(error = %e, "retention pass failed; next pass retries");
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_expires_when_all_of_it_is_older_than_keep() {
        let now = DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let day = Duration::from_secs(86_400);
        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        // The 20th ended at the 21st 00:00: + 1 day = 22nd 00:00 <= now.
        assert!(expired(d("2026-11-20"), day, now));
        // The 21st ends at the 22nd 00:00: + 1 day = 23rd: kept.
        assert!(!expired(d("2026-11-21"), day, now));
        assert_eq!(partition_date("date=2026-11-21"), Some(d("2026-11-21")));
        assert_eq!(partition_date("hour=03"), None);
        assert_eq!(partition_date("date=junk"), None);
    }
}
