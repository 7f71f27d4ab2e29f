//! `storepulse replay`: publish event-contract files to Kafka.
//!
//! Each stream's JSONL file goes to its topic, one message per line, keyed
//! by the record's `store_id` (so a store's events stay in order on one
//! partition), through an idempotent producer (no duplicates from producer
//! retries). Streams are merged by event time (each file in its own order),
//! so a paced replay looks like live stores rather than one stream after
//! the other, and no topic runs days ahead of another. Lines are published
//! as they are: a malformed line is the consumer's to dead-letter.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use rdkafka::{
    client::ClientContext,
    config::RDKafkaLogLevel,
    error::{KafkaError, RDKafkaErrorCode},
    producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext},
};
use storepulse_ingest::StreamKind;

use crate::{
    config::{producer_config, topic_name},
    context::{log_to_tracing, reach_brokers},
    error::{KafkaSourceError, Result},
};

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Bootstrap brokers.
    pub brokers: String,
    /// Topic name prefix (`<prefix><stream>`).
    pub topic_prefix: String,
    /// Events per second over all streams; `None` = as fast as possible.
    pub rate: Option<f64>,
    /// librdkafka producer properties (TLS, SASL, compression...).
    pub properties: BTreeMap<String, String>,
    /// Bound on reaching the brokers and on the final flush.
    pub timeout: Duration,
    /// Draw a progress bar on stderr (hidden when it is not a terminal).
    pub progress: bool,
}

/// What a replay published.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    /// Messages acknowledged by the brokers, per stream.
    pub per_stream: BTreeMap<StreamKind, u64>,
    /// All messages acknowledged.
    pub events: u64,
    /// Value bytes published.
    pub bytes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The `<stream>.jsonl` files of a dataset directory.
pub fn dataset_inputs(dir: &Path) -> Result<Vec<(StreamKind, PathBuf)>> {
    let mut out = Vec::new();
    for k in StreamKind::ALL {
        let p = dir.join(format!("{}.jsonl", k.name()));
        if p.is_file() {
            out.push((k, p));
        }
    }
    if out.is_empty() {
        return Err(KafkaSourceError::Config(format!(
            "{} holds no <stream>.jsonl file (expected e.g. sales.jsonl)",
            dir.display()
        )));
    }
    Ok(out)
}

#[derive(Default)]
struct Deliveries {
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

struct ReplayContext(Deliveries);

impl ClientContext for ReplayContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_to_tracing(level, fac, message);
    }
}

impl ProducerContext for ReplayContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.0.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.0.first_error.lock().unwrap_or_else(|e| e.into_inner());
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// What the replay reads of a line: the key and the event time.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    store_id: Option<Cow<'a, str>>,
    #[serde(default)]
    ts: Option<TsField>,
}

/// An event time as the contract allows it: Unix ms or RFC 3339.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum TsField {
    Ms(i64),
    Text(String),
}

impl TsField {
    fn millis(&self) -> Option<i64> {
        match self {
            TsField::Ms(ms) => Some(*ms),
            TsField::Text(t) => chrono::DateTime::parse_from_rfc3339(t)
                .ok()
                .map(|d| d.timestamp_millis()),
        }
    }
}

struct Input {
    stream: StreamKind,
    topic: String,
    reader: BufReader<File>,
    path: PathBuf,
    /// The next line to publish (trimmed, not blank), its key and event
    /// time (`i64::MIN` when it has none: published at once, the
    /// consumer dead-letters it).
    head: Option<Vec<u8>>,
    head_key: Option<String>,
    head_ts: i64,
}

impl Input {
    /// Reads the next non-blank line into `head` (`None` at the end);
    /// returns the bytes read.
    fn advance(&mut self) -> Result<u64> {
        let mut line = self.head.take().unwrap_or_default();
        let mut read = 0u64;
        loop {
            line.clear();
            let n = self.reader.read_until(b'\n', &mut line).map_err(|source| {
                KafkaSourceError::Io {
                    path: self.path.clone(),
                    source,
                }
            })?;
            if n == 0 {
                return Ok(read);
            }
            read += n as u64;
            while matches!(line.last(), Some(b'\n' | b'\r')) {
                line.pop();
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let head = serde_json::from_slice::<Head<'_>>(&line).ok();
            self.head_key = head
                .as_ref()
                .and_then(|h| h.store_id.as_deref())
                .map(str::to_string);
            self.head_ts = head
                .and_then(|h| h.ts)
                .and_then(|t| t.millis())
                .unwrap_or(i64::MIN);
            self.head = Some(line);
            return Ok(read);
        }
    }
}

/// Publishes `inputs` and waits until every message is acknowledged.
/// Blocking: call from a blocking context.
pub fn replay(inputs: &[(StreamKind, PathBuf)], opts: &ReplayOptions) -> Result<ReplayReport> {
    let producer: BaseProducer<ReplayContext> =
        producer_config(&opts.brokers, &opts.properties, opts.timeout)
            .set("linger.ms", "20")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .create_with_context(ReplayContext(Deliveries::default()))
            .map_err(|e| KafkaSourceError::Config(format!("producer: {e}")))?;
    reach_brokers(producer.client(), &opts.brokers, opts.timeout)?;
    let mut files = Vec::new();
    let mut total = 0u64;
    for (stream, path) in inputs {
        let io = |source| KafkaSourceError::Io {
            path: path.clone(),
            source,
        };
        let f = File::open(path).map_err(io)?;
        total += f.metadata().map_err(io)?.len();
        files.push(Input {
            stream: *stream,
            topic: topic_name(&opts.topic_prefix, *stream),
            reader: BufReader::with_capacity(1 << 20, f),
            path: path.clone(),
            head: None,
            head_key: None,
            head_ts: i64::MIN,
        });
    }
    let bar = if opts.progress {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} replay [{bar:40}] {bytes}/{total_bytes} {msg} ({eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut report = ReplayReport::default();
    let mut sent = 0u64;
    for f in &mut files {
        bar.inc(f.advance()?);
    }
    // Streams are merged by event time (each file keeps its own order:
    // offline uploads stay where the file has them), so every topic
    // advances through the chain's time together, as live stores would.
    while let Some(f) = files
        .iter_mut()
        .filter(|f| f.head.is_some())
        .min_by_key(|f| f.head_ts)
    {
        let line = f.head.as_deref().expect("a head");
        let mut record = BaseRecord::<str, [u8]>::to(&f.topic).payload(line);
        if let Some(k) = f.head_key.as_deref() {
            record = record.key(k);
        }
        let mut record = Some(record);
        while let Some(r) = record.take() {
            match producer.send(r) {
                Ok(()) => {}
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    producer.poll(Duration::from_millis(50));
                    record = Some(r);
                }
                Err((e, _)) => {
                    return Err(KafkaSourceError::Client {
                        operation: "produce",
                        source: e,
                    })
                }
            }
        }
        sent += 1;
        report.bytes += line.len() as u64;
        *report.per_stream.entry(f.stream).or_default() += 1;
        bar.inc(f.advance()?);
        if let Some(rate) = opts.rate {
            let due = started + Duration::from_secs_f64(sent as f64 / rate);
            let now = Instant::now();
            if due > now + Duration::from_millis(2) {
                producer.poll(Duration::ZERO);
                // Pacing, not synchronisation: publish like live stores.
                std::thread::sleep(due - now);
            }
        }
        if sent.is_multiple_of(256) {
            producer.poll(Duration::ZERO);
            bar.set_message(format!("{sent} events"));
        }
    }
    producer
        .flush(opts.timeout.max(Duration::from_secs(30)))
        .map_err(KafkaSourceError::client("flush"))?;
    bar.finish_and_clear();
    let d = &producer.context().0;
    let failed = d.failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first = d
            .first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default();
        return Err(KafkaSourceError::Delivery {
            failed,
            total: sent,
            first,
        });
    }
    report.events = d.ok.load(Ordering::Relaxed);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
