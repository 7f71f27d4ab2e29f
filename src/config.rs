//! `storepulse.toml`: the configuration of `storepulse run`.
//!
//! Every table is a serde struct with `deny_unknown_fields`, so a typo is an
//! error naming the key and its line. Relative paths are resolved against
//! the config file's directory. [`Config::validate`] checks what can be
//! checked before anything starts (files exist, names are known).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context};
use serde::Deserialize;
use storepulse_engine::EngineConfig;
use storepulse_ingest::{source::FileFormat, StreamKind};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// Directory for dead letters, late events and other local state.
    #[serde(default = "default_data_dir")]
    pub(crate) data_dir: PathBuf,
    /// Bounded run: when every source has reached its end, close all windows
    /// (the watermark becomes final) and report the pipeline as finished.
    /// The HTTP API keeps serving until Ctrl-C unless `--exit-when-done`.
    /// Required with `file` and `dataset` sources.
    #[serde(default)]
    pub(crate) until_eof: bool,
    /// Event-time settings (lateness, idle timeout, de-duplication).
    #[serde(default)]
    pub(crate) engine: EngineConfig,
    /// The HTTP API.
    #[serde(default)]
    pub(crate) http: storepulse_serve::HttpConfig,
    /// View definitions.
    #[serde(default)]
    pub(crate) sql: SqlConfig,
    /// Micro-batching between sources and the engine.
    #[serde(default)]
    pub(crate) pipeline: PipelineConfig,
    /// Dimension tables.
    #[serde(default)]
    pub(crate) dimensions: Vec<DimensionConfig>,
    /// Parameters of the built-in retail views.
    #[serde(default)]
    pub(crate) retail: storepulse_sql::RetailParams,
    /// Event sources.
    #[serde(default)]
    pub(crate) sources: Vec<SourceConfig>,
    /// Alert rules' delivery: outbox bounds, evaluation rate, sinks
    /// (`[[alerts.sinks]]`). Rules themselves are `CREATE ALERT` statements
    /// in the SQL files (and the built-in `sql/alerts/builtin.sql`).
    #[serde(default)]
    pub(crate) alerts: storepulse_alerts::AlertsConfig,
    /// The lake: raw-event archive, view snapshots, retention
    /// (`[lake]`, `[lake.archive]`, `[lake.snapshots]`, `[[lake.retention]]`).
    #[serde(default)]
    pub(crate) lake: storepulse_lake::LakeConfig,
    /// Periodic checkpoints of the engine's state, restored at start
    /// (`[checkpoint]`).
    #[serde(default)]
    pub(crate) checkpoint: storepulse_lake::CheckpointConfig,
    /// Scheduled reports written to the lake (`[[reports]]`).
    #[serde(default)]
    pub(crate) reports: Vec<storepulse_lake::ReportConfig>,
    /// Limits of analysts' queries over HTTP and pgwire (`[serving]`).
    #[serde(default)]
    pub(crate) serving: storepulse_serve::ServingConfig,
    /// The Postgres wire protocol listener (`[pg]`).
    #[serde(default)]
    pub(crate) pg: storepulse_serve::PgConfig,
    /// Server certificate for HTTPS and pgwire TLS (`[tls]`).
    #[serde(default)]
    pub(crate) tls: Option<storepulse_serve::TlsConfig>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}

/// The secrets `docker/compose.yaml` falls back to: refused beyond loopback
/// unless `STOREPULSE_INSECURE_DEFAULTS=1`.
const EXAMPLE_SECRETS: &[&str] = &["analyst-token", "admin-token", "storepulse"];

/// `[sql]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SqlConfig {
    /// Load the built-in starter views (`sql/views/*.sql`).
    #[serde(default = "yes")]
    pub(crate) builtin: bool,
    /// SQL scripts to run at start (`CREATE MATERIALIZED VIEW`, `CREATE VIEW`).
    #[serde(default)]
    pub(crate) files: Vec<PathBuf>,
}

fn yes() -> bool {
    true
}

impl Default for SqlConfig {
    fn default() -> Self {
        Self {
            builtin: true,
            files: Vec::new(),
        }
    }
}

/// `[pipeline]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PipelineConfig {
    /// Events per micro-batch read from a file (Kafka sources have their
    /// own `batch_max_messages` and `batch_linger`).
    #[serde(default = "default_batch_size")]
    pub(crate) batch_size: usize,
    /// Threads decoding each JSONL file's chunks of `batch_size` lines in
    /// parallel (rows, positions and dead letters still go out in line
    /// order). Default: the number of cores, at most 8.
    #[serde(default = "default_decode_threads")]
    pub(crate) decode_threads: usize,
    /// Batches buffered between sources and the engine; a full buffer pauses
    /// the sources (backpressure).
    #[serde(default = "default_channel")]
    pub(crate) channel_capacity: usize,
    /// With `[alerts] bounded_evaluation = "event_time"`, a bounded run
    /// reads its files aligned on event time: a file sends no run of rows
    /// starting more than this ahead of the slowest unfinished file, so the
    /// streams advance together as they did live and the rules see them
    /// together. At most the rules' `every` for the same alert ids as live
    /// operation; larger is faster and coarser.
    #[serde(default = "default_replay_drift", with = "humantime_serde")]
    pub(crate) replay_max_drift: Duration,
}

fn default_replay_drift() -> Duration {
    Duration::from_secs(10)
}

fn default_batch_size() -> usize {
    8192
}
fn default_decode_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(8))
}
fn default_channel() -> usize {
    16
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            batch_size: default_batch_size(),
            decode_threads: default_decode_threads(),
            channel_capacity: default_channel(),
            replay_max_drift: default_replay_drift(),
        }
    }
}

/// `[[dimensions]]`: a table loaded from CSV (with a header line) or
/// Parquet, checked at start and reloaded when the file changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DimensionConfig {
    /// Table name in SQL (`stores`, `products`, `replenishment_policy`, or
    /// any other name for a table of your own).
    pub(crate) name: String,
    /// A file path (relative to the config file) or an object-store URL
    /// (`file:///...`). `.parquet` is read as Parquet, anything else as CSV.
    pub(crate) path: String,
    /// How often the file is checked for changes (size, modification time,
    /// e-tag); a changed file is loaded and swapped in. A file that fails to
    /// load keeps the previous contents and is reported. `0s` disables.
    #[serde(default = "default_reload", with = "humantime_serde")]
    pub(crate) reload_interval: std::time::Duration,
}

fn default_reload() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}

/// `[[sources]]`: where events come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum SourceConfig {
    /// One file of one stream.
    File {
        /// Stream name (`sales`, `stock_movements`, ...).
        stream: StreamKind,
        /// The file.
        path: PathBuf,
        /// `jsonl`, `csv` or `parquet`; inferred from the extension if absent.
        #[serde(default)]
        format: Option<FileFormat>,
    },
    /// A directory written by `storepulse gen`: every `<stream>.jsonl` in it.
    Dataset {
        /// The directory.
        dir: PathBuf,
    },
    /// Kafka topics (one per stream) read by a consumer group; see
    /// `storepulse_kafka::KafkaSourceConfig` for every key.
    Kafka(Box<storepulse_kafka::KafkaSourceConfig>),
    /// The synthetic chain, live.
    Generator {
        /// Number of stores.
        #[serde(default = "default_stores")]
        stores: usize,
        /// Number of SKUs.
        #[serde(default = "default_skus")]
        skus: usize,
        /// Number of members.
        #[serde(default = "default_members")]
        members: usize,
        /// Seed.
        #[serde(default = "default_seed")]
        seed: u64,
        /// Target events per second (default: the chain's natural rate).
        #[serde(default)]
        rate: Option<f64>,
    },
}

fn default_stores() -> usize {
    20
}
fn default_skus() -> usize {
    300
}
fn default_members() -> usize {
    5000
}
fn default_seed() -> u64 {
    7
}

impl Config {
    /// Reads, parses, resolves and validates a config file.
    pub(crate) fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut cfg: Config = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve(base);
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        self.sql.files.iter_mut().for_each(fix);
        if let Some(t) = &mut self.tls {
            fix(&mut t.cert);
            fix(&mut t.key);
        }
        for sink in &mut self.alerts.sinks {
            if let storepulse_alerts::SinkConfig::Jsonl { path, .. } = sink {
                fix(path);
            }
        }
        self.http = std::mem::take(&mut self.http).with_env();
        self.pg = std::mem::take(&mut self.pg).with_env();
        if let Some(url) = &mut self.lake.url {
            if !url.contains("://") && Path::new(url.as_str()).is_relative() {
                *url = base.join(&*url).display().to_string();
            }
        }
        for d in &mut self.dimensions {
            if !d.path.contains("://") && Path::new(&d.path).is_relative() {
                d.path = base.join(&d.path).display().to_string();
            }
        }
        for s in &mut self.sources {
            match s {
                SourceConfig::File { path, .. } => fix(path),
                SourceConfig::Dataset { dir } => fix(dir),
                SourceConfig::Generator { .. } | SourceConfig::Kafka(_) => {}
            }
        }
    }

    /// Refuses the example secrets of `docker/compose.yaml` on a listener
    /// beyond loopback, unless `insecure` (`STOREPULSE_INSECURE_DEFAULTS=1`,
    /// for a local try of the stack).
    pub(crate) fn refuse_example_secrets(&self, insecure: bool) -> anyhow::Result<()> {
        if insecure {
            return Ok(());
        }
        let checks = [
            (
                "[http] token / STOREPULSE_HTTP_TOKEN",
                !self.http.listen.ip().is_loopback(),
                self.http.token.as_deref(),
            ),
            (
                "[http] admin_token / STOREPULSE_ADMIN_TOKEN",
                !self.http.listen.ip().is_loopback(),
                self.http.admin_token.as_deref(),
            ),
            (
                "[pg] password / STOREPULSE_PG_PASSWORD",
                self.pg.listen.is_some_and(|a| !a.ip().is_loopback()),
                self.pg.password.as_deref(),
            ),
        ];
        for (what, exposed, secret) in checks {
            if exposed && secret.is_some_and(|s| EXAMPLE_SECRETS.contains(&s)) {
                bail!(
                    "{what} is an example secret from docker/compose.yaml and the listener is reachable beyond \
                     loopback: set your own (e.g. in docker/.env), or set STOREPULSE_INSECURE_DEFAULTS=1 to \
                     accept it for a local try"
                );
            }
        }
        Ok(())
    }

    /// `[http]`, `[pg]`, `[tls]`, `[serving]`: credentials beyond loopback,
    /// TLS files, sane limits.
    pub(crate) fn validate_serving(&self) -> anyhow::Result<()> {
        storepulse_serve::config::check_exposure(
            "http.listen",
            self.http.listen,
            self.http.token.is_some() || self.http.admin_token.is_some(),
            "[http] token (or STOREPULSE_HTTP_TOKEN)",
        )?;
        self.refuse_example_secrets(
            std::env::var("STOREPULSE_INSECURE_DEFAULTS").as_deref() == Ok("1"),
        )?;
        if self.http.token.is_none() && self.http.admin_token.is_some() {
            bail!("http.admin_token is set but http.token is not: analysts would need no token at all; set both");
        }
        if (self.http.tls || self.pg.tls) && self.tls.is_none() {
            bail!("http.tls / pg.tls need a [tls] table with cert and key");
        }
        if let Some(t) = &self.tls {
            for (key, p) in [("tls.cert", &t.cert), ("tls.key", &t.key)] {
                if !p.is_file() {
                    bail!("{key}: no such file {}", p.display());
                }
            }
        }
        if self.serving.max_rows == 0 {
            bail!("serving.max_rows must be at least 1");
        }
        if self.serving.timeout.is_zero() {
            bail!("serving.timeout must be positive");
        }
        Ok(())
    }

    /// Checks the configuration without starting anything.
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        // Exposure and secrets first: they are refused whatever else is wrong.
        self.validate_serving()?;
        if self.sources.is_empty() {
            bail!("no [[sources]] configured: add a `file`, `dataset` or `generator` source");
        }
        for (i, f) in self.sql.files.iter().enumerate() {
            if !f.is_file() {
                bail!("sql.files[{i}]: no such file {}", f.display());
            }
        }
        for (i, d) in self.dimensions.iter().enumerate() {
            if !d.path.contains("://") && !Path::new(&d.path).is_file() {
                bail!("dimensions[{i}].path: no such file {}", d.path);
            }
            if StreamKind::ALL.iter().any(|k| k.name() == d.name) {
                bail!("dimensions[{i}].name: '{}' is a stream name", d.name);
            }
        }
        self.retail.validate().map_err(anyhow::Error::msg)?;
        self.lake.validate()?;
        storepulse_lake::config::validate_reports(&self.reports)?;
        if !self.reports.is_empty() && !self.lake.enabled {
            bail!("reports: written to the lake, but [lake] enabled = false");
        }
        for (i, s) in self.sources.iter().enumerate() {
            if !self.until_eof
                && !matches!(s, SourceConfig::Generator { .. } | SourceConfig::Kafka(_))
            {
                bail!(
                    "sources[{i}]: file sources are bounded; set `until_eof = true` \
                     (following a growing file is not supported)"
                );
            }
            match s {
                SourceConfig::File { path, format, .. } => {
                    if !path.is_file() {
                        bail!("sources[{i}].path: no such file {}", path.display());
                    }
                    if format.is_none() {
                        FileFormat::from_path(path)
                            .map_err(|e| anyhow::anyhow!("sources[{i}].format: {e}"))?;
                    }
                }
                SourceConfig::Dataset { dir } => {
                    if !dir.is_dir() {
                        bail!("sources[{i}].dir: no such directory {}", dir.display());
                    }
                }
                SourceConfig::Kafka(k) => {
                    k.stream_topics()
                        .map_err(|e| anyhow::anyhow!("sources[{i}]: {e}"))?;
                }
                SourceConfig::Generator { stores, rate, .. } => {
                    if *stores == 0 {
                        bail!("sources[{i}].stores: must be at least 1");
                    }
                    if matches!(rate, Some(r) if r.is_nan() || *r <= 0.0) {
                        bail!("sources[{i}].rate: must be positive");
                    }
                }
            }
        }
        if self.pipeline.batch_size == 0 {
            bail!("pipeline.batch_size: must be at least 1");
        }
        if self.pipeline.decode_threads == 0 {
            bail!("pipeline.decode_threads: must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        toml::from_str::<Config>(text).map_err(|e| e.to_string())
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = parse("until_eof = true\nbogus = 1\n[[sources]]\ntype='generator'\n").unwrap_err();
        assert!(e.contains("unknown field `bogus`"), "{e}");
        let e = parse(
            "[[sources]]\ntype = 'file'\nstream = 'sales'\npath = 'x.jsonl'\nformt = 'csv'\n",
        )
        .unwrap_err();
        assert!(e.contains("unknown field `formt`"), "{e}");
        let e = parse("[engine]\nallowed_latenes = '1h'\n").unwrap_err();
        assert!(e.contains("unknown field `allowed_latenes`"), "{e}");
    }

    #[test]
    fn unknown_streams_and_bad_durations_are_named() {
        let e =
            parse("[[sources]]\ntype = 'file'\nstream = 'salez'\npath = 'x.jsonl'\n").unwrap_err();
        assert!(e.contains("unknown stream 'salez'"), "{e}");
        let e = parse("[engine]\nallowed_lateness = 'soon'\n").unwrap_err();
        assert!(e.contains("allowed_lateness"), "{e}");
    }

    #[test]
    fn kafka_source_parses_with_defaults_and_names_unknown_keys() {
        let c = parse(
            r#"
[[sources]]
type = "kafka"
brokers = "127.0.0.1:9092"
group_id = "g1"
start_from = "latest"
batch_linger = "20ms"
topics = { sales = "pos.receipts" }
properties = { "security.protocol" = "SSL" }
"#,
        )
        .unwrap();
        let SourceConfig::Kafka(k) = &c.sources[0] else {
            panic!("not kafka")
        };
        assert_eq!(k.group_id, "g1");
        assert_eq!(k.batch_linger.as_millis(), 20);
        assert_eq!(k.dead_letter_topic, "storepulse.dead_letter");
        let topics = k.stream_topics().unwrap();
        assert_eq!(topics[0].1, "pos.receipts");
        assert_eq!(topics[1].1, "storepulse.stock_movements");
        let e = parse("[[sources]]\ntype = 'kafka'\nbrokers = 'x:1'\ngroup = 'g'\n").unwrap_err();
        assert!(e.contains("unknown field `group`"), "{e}");
    }

    #[test]
    fn full_config_parses() {
        let c = parse(
            r#"
data_dir = "d"
until_eof = true
[engine]
allowed_lateness = "30m"
idle_timeout = "5s"
[http]
listen = "127.0.0.1:0"
[sql]
builtin = false
files = ["views.sql"]
[[dimensions]]
name = "stores"
path = "stores.csv"
[[sources]]
type = "dataset"
dir = "gen"
[[sources]]
type = "file"
stream = "sales"
path = "sales.csv"
"#,
        )
        .unwrap();
        assert_eq!(c.engine.allowed_lateness.as_secs(), 1800);
        assert_eq!(c.sources.len(), 2);
        assert!(!c.sql.builtin);
    }

    #[test]
    fn archive_codec_parses_and_a_bad_one_is_named() {
        let c = parse("[lake.archive]\ncompression = 'zstd(1)'\n").unwrap();
        assert!(matches!(
            c.lake.archive.compression,
            parquet::basic::Compression::ZSTD(_)
        ));
        let c = parse("").unwrap();
        assert_eq!(
            c.lake.archive.compression,
            parquet::basic::Compression::LZ4_RAW
        );
        let e = parse("[lake.archive]\ncompression = 'zstd(99)'\n").unwrap_err();
        assert!(e.contains("compression \"zstd(99)\""), "{e}");
        let e = parse("[lake.archive]\ncompression = 'lzma'\n").unwrap_err();
        assert!(e.contains("expected zstd(N)"), "{e}");
    }
}
