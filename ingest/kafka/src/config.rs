//! `[[sources]] type = "kafka"`: the Kafka source's configuration.

use std::{collections::BTreeMap, time::Duration};

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use storepulse_ingest::StreamKind;

use crate::error::{KafkaSourceError, Result};

/// Where a consumer group with no committed position starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// The oldest retained message (replays history; the default).
    #[default]
    Earliest,
    /// Only messages produced after the group first joins.
    Latest,
}

/// A Kafka source: one consumer in a consumer group, reading one topic per
/// stream of the event contract (JSON values, key = store_id).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Consumer group. Processes sharing it split the partitions.
    #[serde(default = "default_group")]
    pub group_id: String,
    /// Streams to consume. Unset: every stream of the contract whose topic exists (a missing
    /// topic is skipped with a warning, so a stream added to the contract
    /// later does not stop a running deployment); a listed stream's topic
    /// must exist.
    #[serde(default)]
    pub streams: Option<Vec<StreamKind>>,
    /// Prefix of the default topic names (`<prefix><stream>`).
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// Per-stream topic names overriding `<prefix><stream>`, e.g.
    /// `topics = { sales = "pos.receipts" }`.
    #[serde(default)]
    pub topics: BTreeMap<String, String>,
    /// Where to start when the group has no committed position.
    #[serde(default)]
    pub start_from: StartFrom,
    /// Topic receiving malformed messages (original bytes, headers naming
    /// source topic, partition, offset and reason).
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Micro-batch size bound: a partition's batch is handed to the engine
    /// once it holds this many messages...
    #[serde(default = "default_batch_max")]
    pub batch_max_messages: usize,
    /// ...or once its first message has waited this long (low latency at
    /// low rates).
    #[serde(default = "default_linger", with = "humantime_serde")]
    pub batch_linger: Duration,
    /// Decoded batches held while the engine is busy; beyond this the
    /// assigned partitions are paused (bounded memory).
    #[serde(default = "default_max_pending")]
    pub max_pending_batches: usize,
    /// Bound on reaching the brokers at start; past it start fails naming
    /// the brokers.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How often applied offsets are committed (also on rebalance and stop).
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Watermark alignment (off unless set, e.g. `"1h"`): a partition whose
    /// newest event time runs more than this ahead of the slowest partition
    /// that still has messages to read is paused until that one catches
    /// up. Partitions are fetched at about the same message rate, so when
    /// the consumer is behind (a catch-up after an outage, more load than
    /// it keeps up with) a partition dense in events (more stores) falls
    /// days behind in event time, and every view that waits for the
    /// slowest partition (the retail ledgers fold below the watermark)
    /// holds those days. A partition with nothing left to read never holds
    /// the others.
    #[serde(default, with = "humantime_serde")]
    pub max_watermark_drift: Option<Duration>,
    /// librdkafka properties passed through to the consumer and the
    /// dead-letter producer (TLS, SASL, fetch tuning), e.g.
    /// `"security.protocol" = "SASL_SSL"`. They override storepulse's
    /// defaults.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_group() -> String {
    "storepulse".into()
}
fn default_prefix() -> String {
    "storepulse.".into()
}
/// The default dead-letter topic.
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = "storepulse.dead_letter";
fn default_dead_letter_topic() -> String {
    DEFAULT_DEAD_LETTER_TOPIC.into()
}
fn default_batch_max() -> usize {
    8192
}
fn default_linger() -> Duration {
    Duration::from_millis(50)
}
fn default_max_pending() -> usize {
    8
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}

impl KafkaSourceConfig {
    /// A config with every default, for `brokers`.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: default_group(),
            streams: None,
            topic_prefix: default_prefix(),
            topics: BTreeMap::new(),
            start_from: StartFrom::default(),
            dead_letter_topic: default_dead_letter_topic(),
            batch_max_messages: default_batch_max(),
            batch_linger: default_linger(),
            max_watermark_drift: None,
            max_pending_batches: default_max_pending(),
            connect_timeout: default_connect_timeout(),
            commit_interval: default_commit_interval(),
            properties: BTreeMap::new(),
        }
    }

    /// The topic of each configured stream.
    pub fn stream_topics(&self) -> Result<Vec<(StreamKind, String)>> {
        for key in self.topics.keys() {
            if !StreamKind::ALL.iter().any(|k| k.name() == key) {
                return Err(KafkaSourceError::Config(format!(
                    "topics.{key}: not a stream of the event contract (expected one of: {})",
                    StreamKind::ALL.map(|k| k.name()).join(", ")
                )));
            }
        }
        let streams = self.streams.as_deref().unwrap_or(&StreamKind::ALL);
        if streams.is_empty() {
            return Err(KafkaSourceError::Config("streams: empty list".into()));
        }
        if self.batch_max_messages == 0 || self.max_pending_batches == 0 {
            return Err(KafkaSourceError::Config(
                "batch_max_messages and max_pending_batches must be at least 1".into(),
            ));
        }
        Ok(streams
            .iter()
            .map(|k| {
                let topic = self
                    .topics
                    .get(k.name())
                    .cloned()
                    .unwrap_or_else(|| topic_name(&self.topic_prefix, *k));
                (*k, topic)
            })
            .collect())
    }

    /// The consumer's librdkafka configuration: storepulse's defaults, then
    /// the user's `properties`.
    pub fn consumer_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("client.id", "storepulse")
            // Offsets are committed by storepulse, only once applied.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match self.start_from {
                    StartFrom::Earliest => "earliest",
                    StartFrom::Latest => "latest",
                },
            )
            .set("enable.partition.eof", "false")
            // Watermark alignment reads each partition's lag from them.
            .set(
                "statistics.interval.ms",
                if self.max_watermark_drift.is_some() {
                    "1000"
                } else {
                    "5000"
                },
            )
            // Larger fetches for throughput at high rates; a fetch waits at
            // most 50 ms for them, which bounds the added latency at low
            // rates (see BENCHMARKS.md).
            .set("fetch.min.bytes", "1048576")
            .set("fetch.wait.max.ms", "50")
            .set("max.partition.fetch.bytes", "4194304")
            .set("queued.min.messages", "200000")
            .set(
                "socket.connection.setup.timeout.ms",
                ms(self.connect_timeout),
            );
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// The dead-letter producer's configuration (idempotent; the user's
    /// `properties` minus consumer-only keys).
    pub fn dead_letter_producer_config(&self) -> ClientConfig {
        producer_config(&self.brokers, &self.properties, self.connect_timeout)
    }
}

/// `<prefix><stream>`.
pub fn topic_name(prefix: &str, stream: StreamKind) -> String {
    format!("{prefix}{}", stream.name())
}

fn ms(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

/// Properties only a consumer understands; librdkafka warns when a producer
/// is given them.
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "auto.offset.reset",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.partition.eof",
    "fetch.min.bytes",
    "fetch.max.bytes",
    "fetch.wait.max.ms",
    "max.partition.fetch.bytes",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "partition.assignment.strategy",
    "isolation.level",
];

/// An idempotent producer's configuration with pass-through `properties`.
pub fn producer_config(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    connect_timeout: Duration,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", "storepulse")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("socket.connection.setup.timeout.ms", ms(connect_timeout));
    for (k, v) in properties {
        if !CONSUMER_ONLY.contains(&k.as_str()) {
            c.set(k, v);
        }
    }
    c
}
