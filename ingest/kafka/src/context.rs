//! The consumer's librdkafka context: logs and errors into `tracing`,
//! per-partition lag from librdkafka's statistics, and the rebalance
//! protocol that keeps a partition's events from being counted twice when it
//! moves to another process (drain what was sent, commit, then let go).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use rdkafka::{
    client::{Client, ClientContext},
    config::RDKafkaLogLevel,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance},
    error::KafkaError,
    metadata::Metadata,
    statistics::Statistics,
    Offset, TopicPartitionList,
};
use storepulse_ingest::AppliedPositions;

use crate::error::{KafkaSourceError, Result};

/// `topic/partition`: the partition's name in positions, watermarks and
/// dead letters.
pub(crate) fn partition_name(topic: &str, partition: i32) -> Arc<str> {
    format!("{topic}/{partition}").into()
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared between the poll loop and the rebalance callbacks (which
/// librdkafka runs on the polling thread, inside `poll`).
#[derive(Debug)]
pub(crate) struct Shared {
    /// What the engine has applied (written by the engine).
    pub(crate) applied: Arc<AppliedPositions>,
    /// Next offset handed to the engine, per partition.
    pub(crate) sent: Mutex<HashMap<Arc<str>, u64>>,
    /// Last committed next-offset, per partition.
    pub(crate) committed: Mutex<HashMap<Arc<str>, u64>>,
    /// Partitions currently assigned.
    pub(crate) assigned: Mutex<HashSet<(String, i32)>>,
    /// Partitions revoked since the loop last looked (their buffers and
    /// unsent batches must be dropped: the new owner re-reads them).
    pub(crate) revoked: Mutex<Vec<(String, i32)>>,
    /// Bumped on every assignment change.
    pub(crate) generation: AtomicU64,
    /// How long a revoke waits for in-flight batches to be applied.
    pub(crate) drain_timeout: Duration,
    /// Whether the loop has paused the assignment (backpressure).
    pub(crate) paused: std::sync::atomic::AtomicBool,
    /// Decoded batches waiting for the engine.
    pub(crate) pending: std::sync::atomic::AtomicUsize,
    /// Messages behind the high watermarks, from the last statistics
    /// (-1 until known).
    pub(crate) lag: std::sync::atomic::AtomicI64,
    /// Per partition (topic, partition): messages between the last one
    /// delivered to storepulse and the high watermark, from the last
    /// statistics.
    pub(crate) partition_lag: Mutex<std::collections::HashMap<(String, i32), i64>>,
    /// Brokers in state `UP` and brokers known, from the last statistics
    /// (-1 until known).
    pub(crate) brokers_up: std::sync::atomic::AtomicI64,
    pub(crate) brokers_known: std::sync::atomic::AtomicI64,
    /// The last client error: wall clock (Unix ms) and message.
    pub(crate) last_error: Mutex<Option<(i64, String)>>,
}

impl Shared {
    pub(crate) fn new(applied: Arc<AppliedPositions>, drain_timeout: Duration) -> Self {
        Self {
            applied,
            sent: Mutex::default(),
            committed: Mutex::default(),
            assigned: Mutex::default(),
            revoked: Mutex::default(),
            generation: AtomicU64::new(0),
            drain_timeout,
            paused: Default::default(),
            pending: Default::default(),
            lag: std::sync::atomic::AtomicI64::new(-1),
            partition_lag: Mutex::default(),
            brokers_up: std::sync::atomic::AtomicI64::new(-1),
            brokers_known: std::sync::atomic::AtomicI64::new(-1),
            last_error: Mutex::default(),
        }
    }

    pub(crate) fn assigned(&self) -> Vec<(String, i32)> {
        let mut v: Vec<_> = lock(&self.assigned).iter().cloned().collect();
        v.sort();
        v
    }

    pub(crate) fn take_revoked(&self) -> Vec<(String, i32)> {
        std::mem::take(&mut *lock(&self.revoked))
    }

    pub(crate) fn mark_sent(&self, partition: &Arc<str>, next_offset: u64) {
        lock(&self.sent).insert(partition.clone(), next_offset);
    }

    /// Waits until everything sent for `partitions` is applied.
    pub(crate) fn drain(&self, partitions: &[(String, i32)], timeout: Duration) -> bool {
        let targets: Vec<(Arc<str>, u64)> = {
            let sent = lock(&self.sent);
            partitions
                .iter()
                .filter_map(|(t, p)| {
                    let name = partition_name(t, *p);
                    sent.get(&name).map(|o| (name, *o))
                })
                .collect()
        };
        self.applied.wait_for(&targets, timeout)
    }

    /// Commits the applied offsets of `partitions` that moved since the last
    /// commit. Returns how many partitions were committed.
    pub(crate) fn commit<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partitions: &[(String, i32)],
        mode: CommitMode,
    ) -> usize {
        let mut tpl = TopicPartitionList::new();
        let mut moved = Vec::new();
        {
            let committed = lock(&self.committed);
            for (t, p) in partitions {
                let name = partition_name(t, *p);
                if let Some(applied) = self.applied.get(&name) {
                    if committed.get(&name) != Some(&applied) {
                        let _ = tpl.add_partition_offset(t, *p, Offset::Offset(applied as i64));
                        moved.push((name, applied));
                    }
                }
            }
        }
        if moved.is_empty() {
            return 0;
        }
        match consumer.commit(&tpl, mode) {
            Ok(()) => {
                let mut committed = lock(&self.committed);
                for (name, o) in &moved {
                    committed.insert(name.clone(), *o);
                }
                metrics::counter!(crate::metric_names::KAFKA_COMMITS_TOTAL).increment(1);
                moved.len()
            }
            Err(e) => {
                // Not fatal: the next commit carries the same offsets.
                metrics::counter!(crate::metric_names::KAFKA_COMMIT_ERRORS_TOTAL).increment(1);
                tracing::warn!(error = %e, partitions = moved.len(), "offset commit failed; retrying at the next commit");
                0
            }
        }
    }
}

/// The consumer's context.
#[derive(Debug)]
pub(crate) struct SourceContext {
    pub(crate) shared: Arc<Shared>,
}

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_to_tracing(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        {
            return; // an end of partition is not an error
        }
        metrics::counter!(crate::metric_names::KAFKA_CLIENT_ERRORS_TOTAL).increment(1);
        tracing::warn!(error = %error, reason, "Kafka client error (librdkafka retries)");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        *lock(&self.shared.last_error) = Some((now, format!("{error}: {reason}")));
    }

    fn stats(&self, stats: Statistics) {
        // Real brokers only (bootstrap entries have node id -1).
        let brokers = stats.brokers.values().filter(|b| b.nodeid >= 0);
        let (up, known) = brokers.fold((0i64, 0i64), |(u, k), b| {
            (u + i64::from(b.state == "UP"), k + 1)
        });
        metrics::gauge!(crate::metric_names::KAFKA_BROKERS_UP).set(up as f64);
        self.shared.brokers_up.store(up, Ordering::Relaxed);
        self.shared.brokers_known.store(known, Ordering::Relaxed);
        let mut total = 0i64;
        let mut per_partition = std::collections::HashMap::new();
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                // -1 is librdkafka's internal UA partition.
                if *p < 0 {
                    continue;
                }
                // Messages not yet delivered to storepulse: what watermark
                // alignment asks (`consumer_lag` counts from the committed
                // offset, which waits for the engine to apply).
                if part.hi_offset >= 0 && part.app_offset >= 0 {
                    per_partition.insert((topic.clone(), *p), part.hi_offset - part.app_offset);
                }
                // Lag -1: unknown (nothing committed yet).
                if part.consumer_lag < 0 {
                    continue;
                }
                total += part.consumer_lag;
                metrics::gauge!(
                    crate::metric_names::KAFKA_CONSUMER_LAG_MESSAGES,
                    "topic" => topic.clone(), "partition" => p.to_string()
                )
                .set(part.consumer_lag as f64);
            }
        }
        metrics::gauge!(crate::metric_names::KAFKA_CONSUMER_LAG_TOTAL_MESSAGES).set(total as f64);
        self.shared.lag.store(total, Ordering::Relaxed);
        *lock(&self.shared.partition_lag) = per_partition;
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        metrics::counter!(crate::metric_names::KAFKA_REBALANCES_TOTAL).increment(1);
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let parts = topic_partitions(tpl);
                // Everything already handed to the engine is applied and
                // committed before the partition moves, so the next owner
                // starts exactly after it.
                if !self.shared.drain(&parts, self.shared.drain_timeout) {
                    tracing::warn!(
                        partitions = parts.len(),
                        "revoked partitions not drained in time; the next owner may re-read some events"
                    );
                }
                if !consumer.assignment_lost() {
                    self.shared.commit(consumer, &parts, CommitMode::Sync);
                }
                let mut assigned = lock(&self.shared.assigned);
                for p in &parts {
                    assigned.remove(p);
                }
                drop(assigned);
                {
                    let mut sent = lock(&self.shared.sent);
                    for (t, p) in &parts {
                        sent.remove(&partition_name(t, *p));
                    }
                }
                lock(&self.shared.revoked).extend(parts.iter().cloned());
                self.shared.generation.fetch_add(1, Ordering::SeqCst);
                tracing::info!(partitions = ?parts, "Kafka partitions revoked");
            }
            Rebalance::Assign(tpl) => {
                let parts = topic_partitions(tpl);
                lock(&self.shared.assigned).extend(parts.iter().cloned());
                self.shared.generation.fetch_add(1, Ordering::SeqCst);
                tracing::info!(partitions = ?parts, "Kafka partitions assigned");
            }
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "Kafka rebalance error");
            }
        }
    }
}

fn topic_partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

/// Fetches the cluster metadata within `timeout`: the bounded check, at
/// start, that the brokers answer (the error names them).
pub(crate) fn reach_brokers<C: ClientContext>(
    client: &Client<C>,
    brokers: &str,
    timeout: Duration,
) -> Result<Metadata> {
    client
        .fetch_metadata(None, timeout)
        .map_err(|source| KafkaSourceError::Unreachable {
            brokers: brokers.to_string(),
            timeout,
            source,
        })
}

/// Routes librdkafka's log lines into `tracing`.
pub(crate) fn log_to_tracing(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", fac, "{message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

/// A producer context that logs like the consumer's.
#[derive(Debug, Default, Clone)]
pub(crate) struct LoggingContext;

impl ClientContext for LoggingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_to_tracing(level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        metrics::counter!(crate::metric_names::KAFKA_CLIENT_ERRORS_TOTAL).increment(1);
        tracing::warn!(error = %error, reason, "Kafka producer error (librdkafka retries)");
    }
}
