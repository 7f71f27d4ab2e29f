//! Sources: where events enter the pipeline.
//!
//! Every source decodes its records with an [`EventDecoder`](crate::EventDecoder),
//! sends bad records to the dead-letter sink *before* moving on, and hands
//! decoded [`SourceBatch`]es to the engine over a bounded channel (a full
//! channel pauses the source: backpressure, bounded memory). A batch carries
//! its source partition, used for per-partition watermarks, and the position
//! just after it, so a checkpoint can store positions with the state.
//!
//! Every kind of source implements [`Source`]; the pipeline starts a
//! `Vec<Box<dyn Source>>` without knowing which kinds it holds.
//!
//! * [`FileSource`] ([`file`]) — a bounded file per stream: JSONL (the
//!   event contract), CSV or Parquet (already-flat rows of the stream's
//!   schema).
//! * [`GeneratorSource`] ([`generator`]) — the synthetic chain in real time
//!   (`demo`).
//! * `KafkaSource` (crate `storepulse-kafka`) — consumer groups over the
//!   stream topics.

pub mod file;
pub mod generator;

use std::{sync::Arc, time::Duration};

use arrow::array::RecordBatch;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};

use crate::{dead_letter::DeadLetterSink, schema::StreamKind};

pub use file::{conform, FileFormat, FileSource};
pub use generator::GeneratorSource;

/// What a running source is given: where batches go, where bad records go,
/// and when to stop.
#[derive(Clone)]
pub struct SourceContext {
    /// Batches and end-of-partition markers, to the engine (bounded: a full
    /// channel pauses the source).
    pub tx: mpsc::Sender<SourceMessage>,
    /// Records that cannot be decoded, with the reason.
    pub dead_letters: Arc<dyn DeadLetterSink>,
    /// Turns true when the process stops.
    pub shutdown: watch::Receiver<bool>,
}

/// Why a source stopped early (the kind's own typed error, boxed).
pub type SourceError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A source of events: built from its typed config, then run once.
pub trait Source: Send + 'static {
    /// What the source reads, for logs and errors (`file data/sales.jsonl`,
    /// `kafka localhost:9092`).
    fn describe(&self) -> String;

    /// Reads until the input ends (bounded sources, or `until_eof`) or
    /// `ctx.shutdown` turns true, sending every batch to `ctx.tx` and every
    /// bad record to `ctx.dead_letters`.
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>>;
}

/// A position in a source partition: the offset of the next record to read
/// (files: next line number; Kafka: next offset; generator: next sequence).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Position {
    /// The partition (file path, topic/partition, generator).
    pub partition: Arc<str>,
    /// Next offset to read.
    pub next_offset: u64,
}

/// Decoded rows of one stream from one source partition.
#[derive(Debug, Clone)]
pub struct SourceBatch {
    /// The stream the rows belong to.
    pub stream: StreamKind,
    /// Rows in the stream's flat schema.
    pub batch: RecordBatch,
    /// Number of events (receipts count once however many lines they have).
    pub events: usize,
    /// Encoded size of the records in bytes (for metrics).
    pub bytes: usize,
    /// Where the source stands after this batch.
    pub position: Position,
}

/// What sources send to the engine.
#[derive(Debug, Clone)]
pub enum SourceMessage {
    /// Decoded rows.
    Batch(SourceBatch),
    /// Records up to `position` were consumed but produced no rows (every
    /// one was dead-lettered): the position still counts as applied, so
    /// offsets can be committed past them.
    Advance {
        /// The stream.
        stream: StreamKind,
        /// Where the source stands.
        position: Position,
    },
    /// A partition was assigned to this process (Kafka): until it delivers
    /// data or goes idle it holds its stream's watermark back, so events of
    /// a partition that starts late are not judged late against partitions
    /// that started early.
    Assigned {
        /// The stream.
        stream: StreamKind,
        /// The partition.
        partition: Arc<str>,
    },
    /// The partition has no more data (bounded sources); its watermark no
    /// longer holds the stream back.
    EndOfPartition {
        /// The stream.
        stream: StreamKind,
        /// The partition that finished.
        partition: Arc<str>,
    },
}

/// The positions whose effects the engine has applied, per source
/// partition: what a source may commit (Kafka offsets) and what a checkpoint
/// stores with the state. Shared between the engine (writer) and sources
/// (readers); [`AppliedPositions::wait_for`] lets a source wait, without
/// polling, until what it sent has been applied.
#[derive(Debug, Default)]
pub struct AppliedPositions {
    map: std::sync::Mutex<std::collections::HashMap<Arc<str>, u64>>,
    changed: std::sync::Condvar,
}

impl AppliedPositions {
    /// Records that everything before `position.next_offset` is applied.
    pub fn record(&self, position: &Position) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let slot = map.entry(position.partition.clone()).or_insert(0);
        *slot = (*slot).max(position.next_offset);
        drop(map);
        self.changed.notify_all();
    }

    /// The applied position of a partition, if any.
    pub fn get(&self, partition: &str) -> Option<u64> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(partition)
            .copied()
    }

    /// Every applied position, sorted by partition.
    pub fn snapshot(&self) -> Vec<Position> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Position> = map
            .iter()
            .map(|(p, o)| Position {
                partition: p.clone(),
                next_offset: *o,
            })
            .collect();
        out.sort_by(|a, b| a.partition.cmp(&b.partition));
        out
    }

    /// Blocks until every `(partition, next_offset)` in `targets` is applied
    /// or `timeout` passes; returns whether all were reached.
    pub fn wait_for(&self, targets: &[(Arc<str>, u64)], timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let done = targets
                .iter()
                .all(|(p, o)| map.get(p).is_some_and(|a| a >= o));
            let now = std::time::Instant::now();
            if done || now >= deadline {
                return done;
            }
            map = self
                .changed
                .wait_timeout(map, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
