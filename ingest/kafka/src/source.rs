//! The Kafka source: one consumer in a consumer group, per-partition
//! micro-batches, dead letters to a topic, offsets committed only once the
//! engine has applied a batch.
//!
//! The poll loop runs on a blocking thread and owns the consumer:
//!
//! 1. Each message is appended to its partition's buffer. A buffer becomes a
//!    micro-batch when it holds `batch_max_messages` or its oldest message
//!    has waited `batch_linger`.
//! 2. A micro-batch is decoded (the shared [`EventDecoder`]); malformed
//!    records are produced to the dead-letter topic with their original
//!    bytes and headers. The batch is handed to the engine only once every
//!    dead letter of it is acknowledged by the broker; a dead-letter topic
//!    that cannot be written holds the source (retried with backoff).
//! 3. Batches go to the engine over a bounded channel; when it is full,
//!    decoded batches wait here, and past `max_pending_batches` every
//!    assigned partition is paused (bounded memory) until the engine
//!    catches up.
//! 4. The engine records each applied batch's position in
//!    [`AppliedPositions`]; the loop commits those (never further) every
//!    `commit_interval`, on rebalance and at stop. A crash re-delivers at
//!    most what was applied but not committed, which `event_id`
//!    de-duplication drops.
//! 5. With `until_eof`, each partition's end is its high watermark when it
//!    is assigned; a partition that reaches it is flushed, paused and
//!    reported as finished; the source ends when every assigned partition
//!    has.
//!
//! Size: ~1,100 lines, most of them the poll loop's one type (`PollLoop`:
//! buffers, dead letters, backpressure, alignment, offsets), whose state
//! librdkafka's callbacks and the loop share; the rebalance and statistics
//! callbacks are in `context.rs`.

use std::{
    collections::VecDeque,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use futures::FutureExt;
use rdkafka::{
    consumer::{BaseConsumer, CommitMode, Consumer},
    error::KafkaError,
    message::{Header, OwnedHeaders},
    producer::{DeliveryFuture, FutureProducer, FutureRecord},
    Message, Offset, TopicPartitionList,
};
use storepulse_ingest::{
    AppliedPositions, EventDecoder, Position, RawRecord, SourceBatch, SourceMessage, StreamKind,
};
use tokio::sync::{mpsc, watch};

use crate::{
    config::KafkaSourceConfig,
    context::{partition_name, reach_brokers, LoggingContext, Shared, SourceContext},
    error::{KafkaSourceError, Result},
};

/// Dead-letter headers (values are UTF-8).
pub mod headers {
    /// The topic the message was read from.
    pub const SOURCE_TOPIC: &str = "storepulse.source.topic";
    /// Its partition.
    pub const SOURCE_PARTITION: &str = "storepulse.source.partition";
    /// Its offset.
    pub const SOURCE_OFFSET: &str = "storepulse.source.offset";
    /// The stream it was meant for.
    pub const STREAM: &str = "storepulse.stream";
    /// Why it was rejected, naming the field where possible.
    pub const REASON: &str = "storepulse.reason";
}

/// A live view of a Kafka source for `/api/v1/health`.
#[derive(Debug, Clone)]
pub struct KafkaStatus {
    /// Bootstrap brokers.
    pub brokers: String,
    /// Consumer group.
    pub group_id: String,
    shared: Arc<Shared>,
}

impl KafkaStatus {
    /// Partitions currently assigned to this process, as `topic/partition`.
    pub fn assigned(&self) -> Vec<String> {
        self.shared
            .assigned()
            .into_iter()
            .map(|(t, p)| format!("{t}/{p}"))
            .collect()
    }

    /// Whether consumption is paused because the engine is behind.
    pub fn paused(&self) -> bool {
        self.shared.paused.load(Ordering::Relaxed)
    }

    /// Messages behind the high watermarks of the assigned partitions, from
    /// librdkafka's last statistics (`None` until known).
    pub fn lag_messages(&self) -> Option<i64> {
        Some(self.shared.lag.load(Ordering::Relaxed)).filter(|l| *l >= 0)
    }

    /// Brokers up and brokers known, from librdkafka's last statistics
    /// (`None` until the first statistics arrive).
    pub fn brokers_up(&self) -> Option<(u64, u64)> {
        let up = self.shared.brokers_up.load(Ordering::Relaxed);
        let known = self.shared.brokers_known.load(Ordering::Relaxed);
        (up >= 0 && known >= 0).then_some((up as u64, known as u64))
    }

    /// The last client error (wall clock in Unix ms, message); librdkafka
    /// retries on its own, so this is a report, not a stop.
    pub fn last_error(&self) -> Option<(i64, String)> {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Decoded batches waiting for the engine (bounded by
    /// `max_pending_batches` plus what was already fetched when the pause
    /// took effect).
    pub fn pending_batches(&self) -> usize {
        self.shared.pending.load(Ordering::Relaxed)
    }
}

/// A connected Kafka source, ready to [`run`](KafkaSource::run).
pub struct KafkaSource {
    cfg: KafkaSourceConfig,
    until_eof: bool,
    consumer: BaseConsumer<SourceContext>,
    producer: FutureProducer<LoggingContext>,
    shared: Arc<Shared>,
    /// Topic → stream, in configuration order.
    topics: Vec<(String, StreamKind)>,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("brokers", &self.cfg.brokers)
            .field("group_id", &self.cfg.group_id)
            .field("topics", &self.topics)
            .finish()
    }
}

impl KafkaSource {
    /// Creates the consumer and the dead-letter producer, checks (within
    /// `connect_timeout`) that the brokers answer and every topic exists,
    /// and subscribes. Blocking: call from a blocking context.
    ///
    /// `applied` is the engine's [`AppliedPositions`]: offsets are committed
    /// from it. With `until_eof` the source ends at the end of its
    /// partitions.
    pub fn connect(
        cfg: KafkaSourceConfig,
        until_eof: bool,
        applied: Arc<AppliedPositions>,
    ) -> Result<Self> {
        let stream_topics = cfg.stream_topics()?;
        let shared = Arc::new(Shared::new(applied, Duration::from_secs(30)));
        let consumer: BaseConsumer<SourceContext> = cfg
            .consumer_config()
            .create_with_context(SourceContext {
                shared: shared.clone(),
            })
            .map_err(|e| KafkaSourceError::Config(format!("consumer: {e}")))?;
        let producer: FutureProducer<LoggingContext> = cfg
            .dead_letter_producer_config()
            .set("message.timeout.ms", "30000")
            .create_with_context(LoggingContext)
            .map_err(|e| KafkaSourceError::Config(format!("dead-letter producer: {e}")))?;
        let metadata = reach_brokers(consumer.client(), &cfg.brokers, cfg.connect_timeout)?;
        let exists = |topic: &str| {
            metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        };
        // A stream left entirely to the defaults (no `streams` list, no
        // `topics` entry) is consumed where its topic exists, so a stream
        // added to the contract does not stop a deployment; a stream the
        // config names must have its topic, and one topic must exist.
        let optional = |k: &StreamKind| cfg.streams.is_none() && !cfg.topics.contains_key(k.name());
        let unknown = |topic: String, what: String| KafkaSourceError::UnknownTopic {
            topic,
            what,
            brokers: cfg.brokers.clone(),
        };
        let mut consumed = Vec::with_capacity(stream_topics.len());
        let mut first_missing = None;
        for (stream, topic) in stream_topics {
            if exists(&topic) {
                consumed.push((stream, topic));
            } else if optional(&stream) {
                tracing::warn!(
                    stream = stream.name(), %topic, brokers = %cfg.brokers,
                    "no such topic: the stream is not consumed (create the topic and restart)"
                );
                first_missing.get_or_insert((stream, topic));
            } else {
                return Err(unknown(topic, format!("stream {}", stream.name())));
            }
        }
        if consumed.is_empty() {
            if let Some((stream, topic)) = first_missing {
                return Err(unknown(topic, format!("stream {}", stream.name())));
            }
        }
        let stream_topics = consumed;
        if !exists(&cfg.dead_letter_topic) {
            return Err(unknown(
                cfg.dead_letter_topic.clone(),
                "dead letters".into(),
            ));
        }
        let names: Vec<&str> = stream_topics.iter().map(|(_, t)| t.as_str()).collect();
        consumer
            .subscribe(&names)
            .map_err(KafkaSourceError::client("subscribe"))?;
        tracing::info!(
            brokers = %cfg.brokers, group = %cfg.group_id, topics = ?names,
            dead_letter_topic = %cfg.dead_letter_topic, "Kafka source connected"
        );
        Ok(Self {
            topics: stream_topics.into_iter().map(|(k, t)| (t, k)).collect(),
            cfg,
            until_eof,
            consumer,
            producer,
            shared,
        })
    }

    /// A handle showing the assignment and backpressure state.
    pub fn status(&self) -> KafkaStatus {
        KafkaStatus {
            brokers: self.cfg.brokers.clone(),
            group_id: self.cfg.group_id.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Consumes until `shutdown` turns true (or, with `until_eof`, until
    /// every assigned partition has reached its end), then commits what the
    /// engine applied and leaves the group.
    pub async fn run(
        self,
        tx: mpsc::Sender<SourceMessage>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        tokio::task::spawn_blocking(move || {
            let mut lp = PollLoop::new(self, tx, shutdown);
            let result = lp.run();
            lp.close();
            result
        })
        .await
        .map_err(|e| KafkaSourceError::Config(format!("Kafka source task failed: {e}")))?
    }
}

impl storepulse_ingest::source::Source for KafkaSource {
    fn describe(&self) -> String {
        format!(
            "Kafka source {} (group {})",
            self.cfg.brokers, self.cfg.group_id
        )
    }

    /// Dead letters go to the source's own dead-letter topic, not to
    /// `ctx.dead_letters`.
    fn run(
        self: Box<Self>,
        ctx: storepulse_ingest::source::SourceContext,
    ) -> futures::future::BoxFuture<'static, Result<(), storepulse_ingest::source::SourceError>>
    {
        Box::pin(async move {
            KafkaSource::run(*self, ctx.tx, ctx.shutdown)
                .await
                .map_err(storepulse_ingest::source::SourceError::from)
        })
    }
}

/// One dead letter on its way to the dead-letter topic.
struct DlqRecord {
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    topic: String,
    partition: i32,
    offset: i64,
    stream: StreamKind,
    reason: String,
    inflight: Option<DeliveryFuture>,
    delivered: bool,
    attempts: u32,
    retry_at: Instant,
}

impl DlqRecord {
    fn headers(&self) -> OwnedHeaders {
        let partition = self.partition.to_string();
        let offset = self.offset.to_string();
        OwnedHeaders::new_with_capacity(5)
            .insert(Header {
                key: headers::SOURCE_TOPIC,
                value: Some(self.topic.as_bytes()),
            })
            .insert(Header {
                key: headers::SOURCE_PARTITION,
                value: Some(partition.as_bytes()),
            })
            .insert(Header {
                key: headers::SOURCE_OFFSET,
                value: Some(offset.as_bytes()),
            })
            .insert(Header {
                key: headers::STREAM,
                value: Some(self.stream.name().as_bytes()),
            })
            .insert(Header {
                key: headers::REASON,
                value: Some(self.reason.as_bytes()),
            })
    }

    /// Moves the delivery on; true once the broker has acknowledged it.
    fn progress(&mut self, producer: &FutureProducer<LoggingContext>, dlq_topic: &str) -> bool {
        if self.delivered {
            return true;
        }
        if let Some(fut) = self.inflight.as_mut() {
            match fut.now_or_never() {
                None => return false,
                Some(Ok(Ok(_))) => {
                    self.delivered = true;
                    self.inflight = None;
                    return true;
                }
                Some(Ok(Err((e, _)))) => self.failed(&e.to_string()),
                Some(Err(_)) => self.failed("delivery cancelled"),
            }
        }
        if Instant::now() < self.retry_at {
            return false;
        }
        let headers = self.headers();
        let mut record = FutureRecord::<[u8], [u8]>::to(dlq_topic)
            .payload(&self.payload)
            .headers(headers);
        if let Some(k) = &self.key {
            record = record.key(k.as_slice());
        }
        match producer.send_result(record) {
            Ok(fut) => self.inflight = Some(fut),
            Err((e, _)) => self.failed(&e.to_string()),
        }
        false
    }

    fn failed(&mut self, error: &str) {
        self.inflight = None;
        self.attempts += 1;
        let backoff = Duration::from_millis(100 << self.attempts.min(7)); // ≤ 12.8 s
        self.retry_at = Instant::now() + backoff;
        metrics::counter!(crate::metric_names::KAFKA_DEAD_LETTER_ERRORS_TOTAL).increment(1);
        tracing::error!(
            error, topic = %self.topic, partition = self.partition, offset = self.offset,
            attempts = self.attempts, retry_in = ?backoff,
            "cannot write to the dead-letter topic; the source holds until it can"
        );
    }
}

/// A decoded micro-batch waiting for its dead letters and channel space.
struct Pending {
    msg: Option<SourceMessage>,
    partition: Arc<str>,
    key: (String, i32),
    next_offset: u64,
    dlq: Vec<DlqRecord>,
}

impl Pending {
    /// A message about partition `b` that carries no offsets.
    fn control(b: &PartitionBuf, msg: SourceMessage) -> Self {
        Self {
            msg: Some(msg),
            partition: b.name.clone(),
            key: b.key.clone(),
            next_offset: 0,
            dlq: Vec::new(),
        }
    }
}

/// Per-partition buffer of raw messages.
struct PartitionBuf {
    key: (String, i32),
    name: Arc<str>,
    stream: StreamKind,
    decoder: EventDecoder,
    data: Vec<u8>,
    /// (value start, value end, key start, key end (start if none), offset,
    /// has key)
    spans: Vec<Span>,
    first_at: Option<Instant>,
    eof: bool,
    /// With `until_eof`: the offset this partition ends at.
    end: Option<i64>,
    /// The engine has been told about this partition.
    announced: bool,
    /// The newest event time (ms) this partition delivered.
    max_ts: Option<i64>,
    /// When it last delivered messages (flushed a micro-batch).
    last_message_at: Option<Instant>,
    /// Paused by watermark alignment (`max_watermark_drift`).
    aligned_pause: bool,
    messages: metrics::Counter,
    bytes: metrics::Counter,
    dead_letters: metrics::Counter,
}

#[derive(Clone, Copy)]
struct Span {
    value: (u32, u32),
    key: Option<(u32, u32)>,
    offset: i64,
}

/// The poll loop's state around the source it runs.
struct PollLoop {
    src: KafkaSource,
    tx: mpsc::Sender<SourceMessage>,
    shutdown: watch::Receiver<bool>,
    bufs: Vec<PartitionBuf>,
    pending: VecDeque<Pending>,
    paused: bool,
    paused_generation: u64,
    ends_generation: u64,
    /// The consumer generation the alignment pauses were made in.
    aligned_generation: u64,
    last_align: Instant,
    /// A flush moved a partition's event time: re-align now.
    align_due: bool,
    /// When the current assignment was first seen by the alignment.
    assigned_at: Instant,
    last_commit: Instant,
    last_report: Instant,
    report_messages: u64,
    report_bytes: u64,
}

impl PollLoop {
    fn new(
        src: KafkaSource,
        tx: mpsc::Sender<SourceMessage>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            src,
            tx,
            shutdown,
            bufs: Vec::new(),
            pending: VecDeque::new(),
            paused: false,
            paused_generation: 0,
            ends_generation: 0,
            aligned_generation: 0,
            last_align: Instant::now(),
            align_due: false,
            assigned_at: Instant::now(),
            last_commit: Instant::now(),
            last_report: Instant::now(),
            report_messages: 0,
            report_bytes: 0,
        }
    }

    fn run(&mut self) -> Result<()> {
        loop {
            if *self.shutdown.borrow() {
                return Ok(());
            }
            self.drop_revoked();
            self.refresh_ends()?;
            let blocked = self.send_pending()?;
            self.update_pause(blocked);
            self.src
                .shared
                .pending
                .store(self.pending.len(), Ordering::Relaxed);
            let timeout = if blocked {
                Duration::from_millis(5)
            } else {
                self.next_linger_deadline()
                    .unwrap_or(Duration::from_millis(100))
            };
            match self.src.consumer.poll(timeout) {
                None => {}
                Some(Ok(m)) => {
                    let idx = buf_index(
                        &mut self.bufs,
                        &self.src.topics,
                        self.src.cfg.batch_max_messages,
                        m.topic(),
                        m.partition(),
                    );
                    let b = &mut self.bufs[idx];
                    if b.eof {
                        // Fetched before the pause took effect: past this
                        // run's end, left for the next run (not committed).
                        continue;
                    }
                    let value = m.payload().unwrap_or_default();
                    let vstart = b.data.len() as u32;
                    b.data.extend_from_slice(value);
                    let vend = b.data.len() as u32;
                    let key = m.key().map(|k| {
                        b.data.extend_from_slice(k);
                        (vend, b.data.len() as u32)
                    });
                    b.spans.push(Span {
                        value: (vstart, vend),
                        key,
                        offset: m.offset(),
                    });
                    b.first_at.get_or_insert_with(Instant::now);
                    b.messages.increment(1);
                    b.bytes.increment(value.len() as u64);
                    self.report_messages += 1;
                    self.report_bytes += value.len() as u64;
                    let full = b.spans.len() >= self.src.cfg.batch_max_messages;
                    let at_end = self.src.until_eof && b.end.is_some_and(|e| m.offset() + 1 >= e);
                    drop(m);
                    if at_end {
                        self.finish_partition(idx)?;
                    } else if full {
                        self.flush(idx)?;
                    }
                }
                // End of partition is decided from the offsets fixed at
                // assignment (the event does not name the topic).
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => {
                    metrics::counter!(crate::metric_names::KAFKA_CONSUME_ERRORS_TOTAL).increment(1);
                    tracing::warn!(error = %e, "Kafka consume error (librdkafka retries)");
                }
            }
            // One clock read per poll for every time-based check.
            let now = Instant::now();
            self.flush_lingering(now)?;
            if self.align_due || now.duration_since(self.last_align) >= ALIGN_EVERY {
                self.align(now);
                self.last_align = now;
                self.align_due = false;
            }
            if now.duration_since(self.last_commit) >= self.src.cfg.commit_interval {
                self.commit(CommitMode::Async);
            }
            self.report(now);
            if self.until_eof_done() {
                tracing::info!("every assigned Kafka partition reached its end");
                return Ok(());
            }
        }
    }

    /// On stop: wait (bounded) for what was sent to be applied, commit it,
    /// leave the group.
    fn close(&mut self) {
        let assigned = self.src.shared.assigned();
        if !self.src.shared.drain(&assigned, Duration::from_secs(10)) {
            tracing::warn!(
                "stopping before every sent batch was applied; those events will be re-read"
            );
        }
        self.commit(CommitMode::Sync);
        // Dropping the consumer closes it: the revoke callback runs (nothing
        // left to drain) and the group is left at once.
        let _ = rdkafka::producer::Producer::flush(&self.src.producer, Duration::from_secs(5));
    }

    fn commit(&mut self, mode: CommitMode) {
        let assigned = self.src.shared.assigned();
        self.src.shared.commit(&self.src.consumer, &assigned, mode);
        self.last_commit = Instant::now();
    }

    fn next_linger_deadline(&self) -> Option<Duration> {
        self.bufs
            .iter()
            .filter_map(|b| b.first_at)
            .min()
            .map(|t| self.src.cfg.batch_linger.saturating_sub(t.elapsed()))
    }

    fn flush_lingering(&mut self, now: Instant) -> Result<()> {
        for i in 0..self.bufs.len() {
            if self.bufs[i]
                .first_at
                .is_some_and(|t| now.duration_since(t) >= self.src.cfg.batch_linger)
            {
                self.flush(i)?;
            }
        }
        Ok(())
    }

    /// Decodes partition `idx`'s buffer into a pending micro-batch.
    fn flush(&mut self, idx: usize) -> Result<()> {
        let b = &mut self.bufs[idx];
        b.first_at = None;
        if b.spans.is_empty() {
            return Ok(());
        }
        let records: Vec<RawRecord<'_>> = b
            .spans
            .iter()
            .map(|s| RawRecord {
                bytes: &b.data[s.value.0 as usize..s.value.1 as usize],
                position: s.offset as u64,
            })
            .collect();
        let out = b.decoder.decode(&records)?;
        // Only watermark alignment reads a partition's newest event time.
        let newest = self
            .src
            .cfg
            .max_watermark_drift
            .and(out.batch.as_ref())
            .and_then(newest_event);
        if let Some(t) = newest {
            if b.max_ts.is_none_or(|m| t > m) {
                b.max_ts = Some(t);
                self.align_due = true;
            }
        }
        let last = b.spans.last().expect("non-empty").offset;
        let now = Instant::now();
        b.last_message_at = Some(now);
        let position = Position {
            partition: b.name.clone(),
            next_offset: last as u64 + 1,
        };
        let mut dlq = Vec::with_capacity(out.dead_letters.len());
        for dl in &out.dead_letters {
            let Ok(i) = b
                .spans
                .binary_search_by_key(&(dl.position as i64), |s| s.offset)
            else {
                continue;
            };
            let s = b.spans[i];
            b.dead_letters.increment(1);
            metrics::counter!(crate::metric_names::INGEST_DEAD_LETTERS_TOTAL, "stream" => b.stream.name())
                .increment(1);
            tracing::warn!(
                stream = b.stream.name(), topic = %b.key.0, partition = b.key.1,
                offset = s.offset, reason = %dl.reason, "message sent to the dead-letter topic"
            );
            dlq.push(DlqRecord {
                key: s.key.map(|(a, z)| b.data[a as usize..z as usize].to_vec()),
                payload: b.data[s.value.0 as usize..s.value.1 as usize].to_vec(),
                topic: b.key.0.clone(),
                partition: b.key.1,
                offset: s.offset,
                stream: b.stream,
                reason: dl.reason.clone(),
                inflight: None,
                delivered: false,
                attempts: 0,
                retry_at: now,
            });
        }
        let msg = match out.batch {
            Some(batch) => SourceMessage::Batch(SourceBatch {
                stream: b.stream,
                batch,
                events: out.events,
                bytes: b.data.len(),
                position,
            }),
            None => SourceMessage::Advance {
                stream: b.stream,
                position,
            },
        };
        self.pending.push_back(Pending {
            msg: Some(msg),
            partition: b.name.clone(),
            key: b.key.clone(),
            next_offset: last as u64 + 1,
            dlq,
        });
        b.data.clear();
        b.spans.clear();
        Ok(())
    }

    /// Hands ready batches to the engine in order; true when the head is
    /// blocked (channel full or dead letters unacknowledged).
    fn send_pending(&mut self) -> Result<bool> {
        let dlq_topic = self.src.cfg.dead_letter_topic.clone();
        for p in self.pending.iter_mut() {
            for d in p.dlq.iter_mut() {
                d.progress(&self.src.producer, &dlq_topic);
            }
        }
        while let Some(front) = self.pending.front_mut() {
            if !front.dlq.iter().all(|d| d.delivered) {
                return Ok(true);
            }
            let msg = front.msg.take().expect("unsent message");
            match self.tx.try_send(msg) {
                Ok(()) => {
                    if front.next_offset > 0 {
                        self.src
                            .shared
                            .mark_sent(&front.partition, front.next_offset);
                    }
                    self.pending.pop_front();
                }
                Err(mpsc::error::TrySendError::Full(msg)) => {
                    front.msg = Some(msg);
                    return Ok(true);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Err(storepulse_ingest::IngestError::Closed.into())
                }
            }
        }
        Ok(false)
    }

    /// Pauses every assigned partition while the engine is behind; resumes
    /// (all but the finished ones) when it has caught up.
    fn update_pause(&mut self, blocked: bool) {
        let want = blocked && self.pending.len() >= self.src.cfg.max_pending_batches;
        let generation = self.src.shared.generation.load(Ordering::SeqCst);
        if want == self.paused && (!want || generation == self.paused_generation) {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (t, p) in self.src.shared.assigned() {
            let held = self
                .bufs
                .iter()
                .any(|b| b.key.0 == t && b.key.1 == p && (b.eof || b.aligned_pause));
            if want || !held {
                tpl.add_partition(&t, p);
            }
        }
        let result = if want {
            self.src.consumer.pause(&tpl)
        } else {
            self.src.consumer.resume(&tpl)
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot pause/resume Kafka partitions");
            return;
        }
        self.paused = want;
        self.paused_generation = generation;
        self.src.shared.paused.store(want, Ordering::Relaxed);
        metrics::gauge!(crate::metric_names::KAFKA_PAUSED).set(if want { 1.0 } else { 0.0 });
        tracing::debug!(
            paused = want,
            pending = self.pending.len(),
            "Kafka backpressure"
        );
    }

    /// On an assignment change: announces newly assigned partitions to the
    /// engine (they hold the watermark until they deliver or go idle) and,
    /// with `until_eof`, fixes each one's end offset (its high watermark)
    /// and where the group starts in it; one that starts at its end is
    /// finished at once.
    fn refresh_ends(&mut self) -> Result<()> {
        let generation = self.src.shared.generation.load(Ordering::SeqCst);
        if generation == self.ends_generation {
            return Ok(());
        }
        self.ends_generation = generation;
        let mut fresh = TopicPartitionList::new();
        let mut todo = Vec::new();
        for (topic, p) in self.src.shared.assigned() {
            let idx = buf_index(
                &mut self.bufs,
                &self.src.topics,
                self.src.cfg.batch_max_messages,
                &topic,
                p,
            );
            let b = &mut self.bufs[idx];
            if !b.announced {
                b.announced = true;
                let msg = SourceMessage::Assigned {
                    stream: b.stream,
                    partition: b.name.clone(),
                };
                self.pending.push_back(Pending::control(b, msg));
            }
            if self.src.until_eof && b.end.is_none() {
                fresh.add_partition(&topic, p);
                todo.push((idx, topic, p));
            }
        }
        if todo.is_empty() {
            return Ok(());
        }
        let committed = self
            .src
            .consumer
            .committed_offsets(fresh, self.src.cfg.connect_timeout)
            .map_err(KafkaSourceError::client("fetch committed offsets"))?;
        for (idx, topic, p) in todo {
            let (low, high) = self
                .src
                .consumer
                .fetch_watermarks(&topic, p, self.src.cfg.connect_timeout)
                .map_err(KafkaSourceError::client("fetch watermarks"))?;
            let start = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => match self.src.cfg.start_from {
                    crate::StartFrom::Earliest => low,
                    crate::StartFrom::Latest => high,
                },
            };
            let b = &mut self.bufs[idx];
            b.end = Some(high);
            tracing::debug!(topic = %topic, partition = p, start, end = high, "Kafka partition bounds");
            if start >= high {
                self.finish_partition(idx)?;
            }
        }
        Ok(())
    }

    /// Partition `idx` reached its end (`until_eof`): flush it, stop
    /// reading it and report it finished.
    fn finish_partition(&mut self, idx: usize) -> Result<()> {
        self.flush(idx)?;
        let b = &mut self.bufs[idx];
        if b.eof {
            return Ok(());
        }
        b.eof = true;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&b.key.0, b.key.1);
        let _ = self.src.consumer.pause(&tpl);
        tracing::info!(topic = %b.key.0, partition = b.key.1, end = ?b.end, "Kafka partition reached its end");
        let msg = SourceMessage::EndOfPartition {
            stream: b.stream,
            partition: b.name.clone(),
        };
        self.pending.push_back(Pending::control(b, msg));
        Ok(())
    }

    /// With `until_eof`: every assigned partition has finished and nothing
    /// waits for the engine. Checked after every poll, so it allocates
    /// nothing: once [`Self::refresh_ends`] has seen the current assignment
    /// (same generation), the buffers are exactly the assigned partitions.
    fn until_eof_done(&self) -> bool {
        self.src.until_eof
            && self.pending.is_empty()
            && self.src.shared.generation.load(Ordering::SeqCst) == self.ends_generation
            && !self.bufs.is_empty()
            && self.bufs.iter().all(|b| b.eof && b.spans.is_empty())
    }

    /// Watermark alignment (`max_watermark_drift`): pauses the partitions
    /// whose newest event time is more than the drift ahead of the slowest
    /// partition that still has messages to read (it delivered within
    /// [`ALIGN_IDLE`] or is itself held), and resumes them once they are
    /// within half the drift of it. A just-assigned partition that has
    /// delivered nothing holds every other for up to [`ALIGN_GRACE`]
    /// (unless the statistics show it empty). Pausing makes librdkafka
    /// drop what it prefetched for the partition and fetch again from the
    /// last message delivered, so nothing is skipped.
    fn align(&mut self, now: Instant) {
        let Some(drift) = self.src.cfg.max_watermark_drift else {
            return;
        };
        if self.paused {
            return; // backpressure holds everything already
        }
        let generation = self.src.shared.generation.load(Ordering::SeqCst);
        if generation != self.aligned_generation {
            self.resume_after_rebalance();
            self.aligned_generation = generation;
            self.assigned_at = now;
        }
        let slowest = self.slowest_reading(now);
        let drift_ms = drift.as_millis().min(i64::MAX as u128) as i64;
        let (pause, resume) = self.alignment_changes(slowest, drift_ms);
        if pause.count() == 0 && resume.count() == 0 {
            return;
        }
        self.apply_alignment(&pause, &resume, now);
        let held = self.bufs.iter().filter(|b| b.aligned_pause).count();
        metrics::gauge!(crate::metric_names::KAFKA_ALIGNED_PAUSED_PARTITIONS).set(held as f64);
        tracing::debug!(
            held,
            slowest_ms = slowest,
            paused = pause.count(),
            resumed = resume.count(),
            "watermark alignment"
        );
    }

    /// After a new assignment: resumes every assigned partition that has
    /// not finished.
    fn resume_after_rebalance(&mut self) {
        // A new assignment: resume every assigned partition that has
        // not finished (librdkafka may keep a partition's pause across a
        // revoke and re-assign, and the revoked buffers that knew are
        // gone), so that nothing stays paused that no one will resume.
        let mut tpl = TopicPartitionList::new();
        for key in self.src.shared.assigned() {
            if !self.bufs.iter().any(|b| b.key == key && b.eof) {
                tpl.add_partition(&key.0, key.1);
            }
        }
        for b in &mut self.bufs {
            b.aligned_pause = false;
        }
        if tpl.count() > 0 {
            if let Err(e) = self.src.consumer.resume(&tpl) {
                tracing::warn!(error = %e, "cannot resume Kafka partitions after a rebalance");
            }
        }
    }

    /// The slowest event time among partitions with messages to read; one
    /// with messages but no event time yet holds every other (`i64::MIN`).
    fn slowest_reading(&self, now: Instant) -> Option<i64> {
        let mut slowest: Option<i64> = None;
        {
            let lag = crate::context::lock(&self.src.shared.partition_lag);
            for key in self.src.shared.assigned() {
                let buf = self.bufs.iter().find(|b| b.key == key);
                if buf.is_some_and(|b| b.eof) {
                    continue;
                }
                match buf.and_then(|b| b.max_ts.map(|t| (b, t))) {
                    // Reading: it delivered lately (an unpaused partition
                    // with messages delivers within ALIGN_IDLE once the
                    // others wait), or it is held itself.
                    Some((b, t)) => {
                        let reading = b.aligned_pause
                            || b.last_message_at
                                .is_some_and(|at| now.duration_since(at) < ALIGN_IDLE);
                        if reading {
                            slowest = Some(slowest.map_or(t, |s| s.min(t)));
                        }
                    }
                    // Nothing delivered yet: it holds the others for the
                    // grace after the assignment unless the statistics
                    // already show it has nothing to read.
                    None => {
                        let empty = lag.get(&key).is_some_and(|l| *l <= 0);
                        if !empty && now.duration_since(self.assigned_at) < ALIGN_GRACE {
                            slowest = Some(i64::MIN);
                        }
                    }
                }
            }
        }
        slowest
    }

    /// The partitions to pause (more than the drift ahead of `slowest`)
    /// and to resume (back within half the drift: hysteresis).
    fn alignment_changes(
        &mut self,
        slowest: Option<i64>,
        drift_ms: i64,
    ) -> (TopicPartitionList, TopicPartitionList) {
        let (mut pause, mut resume) = (TopicPartitionList::new(), TopicPartitionList::new());
        for b in &mut self.bufs {
            if b.eof {
                // Finished (`until_eof`): paused for good by its finish.
                b.aligned_pause = false;
                continue;
            }
            // Hysteresis: a held partition resumes at half the drift, so
            // it is not paused again at once (every pause makes librdkafka
            // drop the partition's prefetched messages and fetch them
            // again).
            let limit = if b.aligned_pause {
                drift_ms / 2
            } else {
                drift_ms
            };
            let want = match (slowest, b.max_ts) {
                (Some(s), Some(t)) => t.saturating_sub(s) > limit,
                _ => false,
            };
            if want != b.aligned_pause {
                let list = if want { &mut pause } else { &mut resume };
                list.add_partition(&b.key.0, b.key.1);
            }
        }
        (pause, resume)
    }

    /// Pauses and resumes the chosen partitions and records which are held.
    fn apply_alignment(
        &mut self,
        pause: &TopicPartitionList,
        resume: &TopicPartitionList,
        now: Instant,
    ) {
        for (list, paused) in [(pause, true), (resume, false)] {
            if list.count() == 0 {
                continue;
            }
            let result = if paused {
                self.src.consumer.pause(list)
            } else {
                self.src.consumer.resume(list)
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "cannot pause/resume Kafka partitions for watermark alignment");
                continue;
            }
            for e in list.elements() {
                if let Some(b) = self
                    .bufs
                    .iter_mut()
                    .find(|b| b.key.0 == e.topic() && b.key.1 == e.partition())
                {
                    b.aligned_pause = paused;
                    // A resumed partition gets a fresh chance to deliver.
                    if !paused {
                        b.last_message_at = Some(now);
                    }
                }
            }
        }
    }

    /// Forgets buffers and unsent batches of revoked partitions: they were
    /// not committed, the next owner reads them.
    fn drop_revoked(&mut self) {
        let revoked = self.src.shared.take_revoked();
        if revoked.is_empty() {
            return;
        }
        self.bufs.retain(|b| !revoked.contains(&b.key));
        let before = self.pending.len();
        self.pending.retain(|p| !revoked.contains(&p.key));
        tracing::debug!(
            dropped = before - self.pending.len(),
            "unsent batches of revoked partitions dropped"
        );
    }

    fn report(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.last_report);
        if elapsed < Duration::from_secs(10) {
            return;
        }
        let secs = elapsed.as_secs_f64();
        tracing::info!(
            messages_per_sec = (self.report_messages as f64 / secs) as u64,
            bytes_per_sec = (self.report_bytes as f64 / secs) as u64,
            lag_messages = self.src.shared.lag.load(Ordering::Relaxed),
            pending_batches = self.pending.len(),
            paused = self.paused,
            assigned = self.src.shared.assigned().len(),
            "Kafka source"
        );
        self.report_messages = 0;
        self.report_bytes = 0;
        self.last_report = now;
    }
}

/// How often watermark alignment is re-evaluated when no flush moved an
/// event time (a partition going quiet releases the others).
const ALIGN_EVERY: Duration = Duration::from_millis(50);
/// A partition that delivered nothing for this long has nothing to read
/// and does not hold the others.
const ALIGN_IDLE: Duration = Duration::from_secs(1);
/// After an assignment, a partition that has delivered nothing holds the
/// others until the statistics (every second with alignment on) say
/// whether it has messages, at most this long.
const ALIGN_GRACE: Duration = Duration::from_secs(3);

/// The newest event time (ms) in a decoded batch.
fn newest_event(batch: &arrow::array::RecordBatch) -> Option<i64> {
    use arrow::array::AsArray;
    let ts = batch
        .column_by_name("ts")?
        .as_primitive_opt::<arrow::datatypes::TimestampMillisecondType>()?;
    arrow::compute::max(ts)
}

/// The buffer of `topic/partition`, created on first use.
fn buf_index(
    bufs: &mut Vec<PartitionBuf>,
    topics: &[(String, StreamKind)],
    batch_max: usize,
    topic: &str,
    partition: i32,
) -> usize {
    if let Some(i) = bufs
        .iter()
        .position(|b| b.key.1 == partition && b.key.0 == topic)
    {
        return i;
    }
    let stream = topics
        .iter()
        .find(|(t, _)| t == topic)
        .map(|(_, k)| *k)
        .unwrap_or(StreamKind::ALL[0]);
    let name = partition_name(topic, partition);
    let labels = [
        ("topic", topic.to_string()),
        ("partition", partition.to_string()),
    ];
    bufs.push(PartitionBuf {
        key: (topic.to_string(), partition),
        name: name.clone(),
        stream,
        decoder: EventDecoder::new(stream, name),
        data: Vec::with_capacity(1 << 20),
        spans: Vec::with_capacity(batch_max),
        first_at: None,
        eof: false,
        end: None,
        announced: false,
        max_ts: None,
        last_message_at: None,
        aligned_pause: false,
        messages: metrics::counter!(crate::metric_names::KAFKA_MESSAGES_TOTAL, &labels),
        bytes: metrics::counter!(crate::metric_names::KAFKA_BYTES_TOTAL, &labels),
        dead_letters: metrics::counter!(crate::metric_names::KAFKA_DEAD_LETTERS_TOTAL, &labels),
    });
    bufs.len() - 1
}
