//! `[lake]` and `[[reports]]`: where the lake lives and what goes into it.
//!
//! Every struct denies unknown keys; durations are humantime strings
//! (`"10m"`), sizes are bytes or strings with a unit (`"128 MiB"`).

use std::{collections::BTreeSet, time::Duration};

use bytesize::ByteSize;
use serde::Deserialize;

use crate::{
    error::{LakeError, Result},
    schedule::Schedule,
};

/// `[lake]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LakeConfig {
    /// Write the lake at all (archive, snapshots, reports, retention).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Lake root: a path, `file:///path`, or `s3://bucket/prefix` (S3 and
    /// S3-compatible stores such as MinIO). Default: `<data_dir>/lake`.
    #[serde(default)]
    pub url: Option<String>,
    /// S3 settings; anything not set here comes from the standard AWS
    /// environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION`, `AWS_ENDPOINT_URL`, ...).
    #[serde(default)]
    pub s3: S3Config,
    /// The raw-event archive (`events/<stream>/date=/part-*.parquet`).
    #[serde(default)]
    pub archive: ArchiveConfig,
    /// Periodic Parquet snapshots of views (`views/<view>/date=/<ts>.parquet`).
    #[serde(default)]
    pub snapshots: SnapshotConfig,
    /// Retention per prefix: date partitions older than `keep` are deleted.
    #[serde(default)]
    pub retention: Vec<RetentionRule>,
    /// How often retention runs (also once at start).
    #[serde(default = "default_retention_interval", with = "humantime_serde")]
    pub retention_interval: Duration,
    /// Longest wait between retries of a failed object-store write. Writes
    /// are retried until they succeed; the data is kept meanwhile.
    #[serde(default = "default_retry_max_delay", with = "humantime_serde")]
    pub retry_max_delay: Duration,
}

fn default_retention_interval() -> Duration {
    Duration::from_secs(3600)
}

fn default_retry_max_delay() -> Duration {
    Duration::from_secs(30)
}

impl Default for LakeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            url: None,
            s3: S3Config::default(),
            archive: ArchiveConfig::default(),
            snapshots: SnapshotConfig::default(),
            retention: Vec::new(),
            retention_interval: default_retention_interval(),
            retry_max_delay: default_retry_max_delay(),
        }
    }
}

/// `[lake.s3]`: overrides of the AWS environment.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL, e.g. `http://127.0.0.1:9000` for MinIO.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region (default from `AWS_REGION`, else `us-east-1`).
    #[serde(default)]
    pub region: Option<String>,
    /// Access key id, or `env:NAME` to read it from a variable.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Secret access key, or `env:NAME`.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Session token, or `env:NAME`.
    #[serde(default)]
    pub session_token: Option<String>,
    /// Allow plain `http://` endpoints (MinIO on a private network).
    #[serde(default)]
    pub allow_http: bool,
    /// Use virtual-hosted-style requests (`bucket.host`) instead of paths.
    #[serde(default)]
    pub virtual_hosted_style: bool,
}

/// `[lake.archive]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    /// Archive accepted events (and late events, as `late_events`).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A file is closed when its Parquet size reaches this.
    #[serde(default = "default_target_file_size")]
    pub target_file_size: ByteSize,
    /// ... or when it has been open this long (bounds how far the archive
    /// trails ingest; at low rates this, not size, closes files).
    #[serde(default = "default_max_file_age", with = "humantime_serde")]
    pub max_file_age: Duration,
    /// Bound on events accepted but not yet durably archived (Arrow size).
    /// When reached the pipeline waits, which pauses the sources; the
    /// largest open file is closed early once half of it is used.
    #[serde(default = "default_max_buffer")]
    pub max_buffer: ByteSize,
    /// Rows per Parquet row group.
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
    /// Parquet codec of the archive: `lz4_raw` (default), `zstd(N)`,
    /// `snappy` or `uncompressed`. The encoder runs on the ingest machine's
    /// cores, so the default is the cheap codec: `zstd(1)` writes half the
    /// bytes (15 vs 32 per receipt line) for ~50 % more encoder CPU
    /// (BENCHMARKS.md).
    #[serde(
        default = "default_archive_compression",
        deserialize_with = "de_compression"
    )]
    pub compression: parquet::basic::Compression,
}

fn default_archive_compression() -> parquet::basic::Compression {
    parquet::basic::Compression::LZ4_RAW
}

fn de_compression<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<parquet::basic::Compression, D::Error> {
    use parquet::basic::Compression as C;
    let s = String::deserialize(d)?;
    let expected = "expected zstd(N), lz4_raw, snappy or uncompressed";
    match s.parse::<C>() {
        Ok(c @ (C::ZSTD(_) | C::LZ4_RAW | C::SNAPPY | C::UNCOMPRESSED)) => Ok(c),
        Ok(_) => Err(serde::de::Error::custom(format!(
            "compression {s:?}: not built in ({expected})"
        ))),
        Err(e) => Err(serde::de::Error::custom(format!(
            "compression {s:?}: {e} ({expected})"
        ))),
    }
}

fn yes() -> bool {
    true
}
fn default_target_file_size() -> ByteSize {
    ByteSize::mib(128)
}
fn default_max_file_age() -> Duration {
    Duration::from_secs(600)
}
fn default_max_buffer() -> ByteSize {
    ByteSize::gib(1)
}
fn default_row_group_rows() -> usize {
    128 * 1024
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            target_file_size: default_target_file_size(),
            max_file_age: default_max_file_age(),
            max_buffer: default_max_buffer(),
            row_group_rows: default_row_group_rows(),
            compression: default_archive_compression(),
        }
    }
}

/// `[lake.snapshots]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Interval between snapshots; `"0s"` takes them only on demand
    /// (`POST /api/v1/snapshots`).
    #[serde(default = "default_snapshot_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Views to snapshot; empty = every materialized and query-time view.
    #[serde(default)]
    pub views: Vec<String>,
}

fn default_snapshot_interval() -> Duration {
    Duration::from_secs(3600)
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            interval: default_snapshot_interval(),
            views: Vec::new(),
        }
    }
}

/// `[[lake.retention]]`: keep `prefix`'s date partitions for `keep`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    /// Prefix under the lake root: `events/`, `events/sales/`, `views/`,
    /// `reports/daily_stock/`, ...
    pub prefix: String,
    /// Age after which a `date=YYYY-MM-DD` partition (the whole day) is
    /// deleted.
    #[serde(with = "humantime_serde")]
    pub keep: Duration,
}

/// `[[reports]]`: a query written to the lake on a schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// Name: `reports/<name>/date=YYYY-MM-DD/<name>-<local time>.<ext>`.
    pub name: String,
    /// The query (read-only SQL over views, dimensions, history, snapshots).
    pub sql: String,
    /// Cron schedule (`"0 6 * * *"` = daily at 06:00), in `timezone`.
    #[serde(default)]
    pub schedule: Option<String>,
    /// ... or a fixed interval (`"15m"`). Exactly one of the two.
    #[serde(default, with = "humantime_serde")]
    pub every: Option<Duration>,
    /// IANA time zone of the schedule and the file names (`Europe/Berlin`).
    #[serde(default = "default_tz")]
    pub timezone: String,
    /// `csv`, `parquet` or `xlsx`.
    #[serde(default)]
    pub format: ReportFormat,
}

fn default_tz() -> String {
    "UTC".to_string()
}

/// A report's file format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportFormat {
    /// CSV with a header.
    #[default]
    Csv,
    /// Parquet (zstd).
    Parquet,
    /// An Excel workbook (one sheet, header row frozen).
    Xlsx,
}

impl ReportFormat {
    /// File extension.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Parquet => "parquet",
            Self::Xlsx => "xlsx",
        }
    }
}

impl ReportConfig {
    /// The report's schedule (`schedule` or `every`, in `timezone`); the
    /// error names the key.
    pub fn schedule(&self) -> std::result::Result<Schedule, String> {
        Schedule::parse(self.schedule.as_deref(), self.every, &self.timezone)
    }
}

impl LakeConfig {
    /// Checks what can be checked without the store.
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(LakeError::Config(m));
        if self.archive.target_file_size.as_u64() < 1024 {
            return err("lake.archive.target_file_size: must be at least 1 KiB".into());
        }
        if self.archive.max_file_age.is_zero() {
            return err("lake.archive.max_file_age: must be positive".into());
        }
        if self.archive.max_buffer.as_u64() < 1024 * 1024 {
            return err("lake.archive.max_buffer: must be at least 1 MiB".into());
        }
        if self.archive.row_group_rows == 0 {
            return err("lake.archive.row_group_rows: must be positive".into());
        }
        if self.retention_interval.is_zero() {
            return err("lake.retention_interval: must be positive".into());
        }
        for (i, r) in self.retention.iter().enumerate() {
            if r.prefix.trim_matches('/').is_empty() {
                return err(format!(
                    "lake.retention[{i}].prefix: must name a prefix (events/, views/, reports/...), not the lake root"
                ));
            }
            if r.keep < Duration::from_secs(86_400) {
                return err(format!(
                    "lake.retention[{i}].keep: at least 1 day (partitions are whole days)"
                ));
            }
        }
        Ok(())
    }
}

/// Checks `[[reports]]` without the engine: unique names, one schedule,
/// parsable cron, known time zone. Returns each report's schedule.
pub fn validate_reports(reports: &[ReportConfig]) -> Result<Vec<Schedule>> {
    let mut names = BTreeSet::new();
    let mut schedules = Vec::with_capacity(reports.len());
    for (i, r) in reports.iter().enumerate() {
        let at = format!("reports[{i}] ({})", r.name);
        if r.name.is_empty()
            || !r
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(LakeError::Config(format!(
                "{at}.name: use letters, digits, '_' and '-' (it names a folder)"
            )));
        }
        if !names.insert(r.name.as_str()) {
            return Err(LakeError::Config(format!(
                "{at}.name: duplicate report name"
            )));
        }
        schedules.push(
            r.schedule()
                .map_err(|m| LakeError::Config(format!("{at}.{m}")))?,
        );
    }
    Ok(schedules)
}
