//! The raw-event archive: every accepted event, per stream, as Parquet at
//! `events/<stream>/date=YYYY-MM-DD/part-<opened>-<run>-<seq>.parquet`
//! (partitioned by the UTC day of the event's `ts`). Late events are
//! archived the same way under `events/late_events/`.
//!
//! Daily partitions serve live ingest and backfill alike: live, a day's
//! file is cut by size or age (`target_file_size`, `max_file_age`); in a
//! backfill, a day of history arrives in a fraction of a second and becomes
//! one file instead of 24 (`cargo bench --bench archive` over four years:
//! the hourly layout wrote 35,040 files and cost 90 % of ingest
//! throughput, the daily one 1,460 and 17 %; BENCHMARKS.md).
//! Within a file the hour is not a directory but the `ts` column itself,
//! with min/max statistics per row group, so a query on a time range skips
//! row groups the same way it skipped hour directories.
//!
//! Three parts:
//! * [`Archiver::archive`] (the pipeline, after applying a batch) takes
//!   buffer space for the rows' Arrow size from a semaphore and hands them
//!   over. When `max_buffer` is used up it waits, so the pipeline stops
//!   reading its channel and the sources pause: nothing is dropped.
//! * An encoder thread keeps one open Parquet writer per (stream, day) and
//!   closes a file when it reaches `target_file_size`, when it has been
//!   open `max_file_age`, when more than [`MAX_OPEN_FILES`] are open (the
//!   one written least recently: a backfill moves through days, so the day
//!   it left is done), or (the largest file first) when half the buffer is
//!   in use. Encoding is CPU work, so it runs on its own thread, off the
//!   ingest path.
//! * An uploader task PUTs closed files, [`UPLOADS_IN_FLIGHT`] at a time,
//!   retrying each with backoff until it is stored; only then is its
//!   buffer space released. A flush is acknowledged once every file closed
//!   before it is stored. An object-store outage therefore fills the buffer
//!   and pauses ingest, and the archive catches up when the store is back.

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, mpsc as std_mpsc, Arc},
    time::{Duration, Instant},
};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use datafusion::arrow::{
    array::{AsArray, RecordBatch, UInt32Array},
    compute::{max, min, take_record_batch},
    datatypes::TimestampMillisecondType,
};
use futures::StreamExt;
use object_store::path::Path;
use parquet::{
    arrow::ArrowWriter,
    file::properties::{EnabledStatistics, WriterProperties},
};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::{
    config::ArchiveConfig,
    error::{LakeError, Result},
    store::Lake,
};

const DAY_MS: i64 = 86_400_000;
/// Buffer accounting unit (permits are KiB).
const UNIT: usize = 1024;
/// Open files (stream, day) at most; opening one more closes the file
/// written least recently. Live ingest has one or two days open per
/// stream; rows of a store that was offline for days open a few more.
pub const MAX_OPEN_FILES: usize = 16;
/// Closed files being stored at once (a PUT is mostly waiting: on S3 a
/// round trip, locally a write, fsync and rename).
pub const UPLOADS_IN_FLIGHT: usize = 4;

enum Cmd {
    Rows {
        stream: Arc<str>,
        batch: RecordBatch,
        permits: u32,
    },
    Flush(oneshot::Sender<()>),
}

enum Upload {
    File(ClosedFile),
    Ack(oneshot::Sender<()>),
}

struct ClosedFile {
    stream: Arc<str>,
    path: Path,
    bytes: Bytes,
    rows: u64,
    permits: u32,
}

/// Handle to the archive. Cloneable; dropping every clone closes all open
/// files and uploads them.
#[derive(Clone)]
pub struct Archiver {
    tx: std_mpsc::Sender<Cmd>,
    space: Arc<Semaphore>,
    total: u32,
    lake: Lake,
}

impl std::fmt::Debug for Archiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archiver")
            .field("lake", &self.lake.url())
            .finish_non_exhaustive()
    }
}

impl Archiver {
    /// Starts the encoder thread and the uploader task (needs a Tokio
    /// runtime).
    pub fn start(lake: Lake, cfg: ArchiveConfig) -> Self {
        let total = (cfg.max_buffer.as_u64() / UNIT as u64).clamp(1, u32::MAX as u64) as u32;
        let space = Arc::new(Semaphore::new(total as usize));
        let (tx, rx) = std_mpsc::channel();
        let (up_tx, up_rx) = mpsc::unbounded_channel();
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let encoder = Encoder {
            cfg,
            files: HashMap::new(),
            up: up_tx,
            space: space.clone(),
            total,
            lake: lake.clone(),
            run,
            seq: 0,
            writes: 0,
        };
        std::thread::Builder::new()
            .name("lake-archive".into())
            .spawn(move || encoder.run(rx))
            .expect("spawn archive encoder thread");
        tokio::spawn(upload_loop(lake.clone(), up_rx, space.clone()));
        Self {
            tx,
            space,
            total,
            lake,
        }
    }

    /// Archives `batch` of `stream` (any schema with a `ts` millisecond
    /// timestamp column). Waits while the buffer is full.
    pub async fn archive(&self, stream: &str, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let bytes = batch.get_array_memory_size();
        let permits = bytes.div_ceil(UNIT).clamp(1, self.total as usize) as u32;
        let status = self.lake.status();
        match self.space.try_acquire_many(permits) {
            Ok(p) => p.forget(),
            Err(_) => {
                // Buffer full: wait (the caller, the pipeline, stops reading
                // its channel, so the sources pause).
                metrics::counter!(crate::metric_names::LAKE_ARCHIVE_BACKPRESSURE_TOTAL)
                    .increment(1);
                status.archive_waiting.fetch_add(1, Ordering::SeqCst);
                let got = self.space.acquire_many(permits).await;
                status.archive_waiting.fetch_sub(1, Ordering::SeqCst);
                got.map_err(|_| LakeError::Stopped)?.forget();
            }
        }
        status
            .archive_buffered_bytes
            .fetch_add(permits as u64 * UNIT as u64, Ordering::Relaxed);
        metrics::gauge!(crate::metric_names::LAKE_ARCHIVE_BUFFERED_BYTES)
            .set(status.archive_buffered_bytes.load(Ordering::Relaxed) as f64);
        self.tx
            .send(Cmd::Rows {
                stream: Arc::from(stream),
                batch,
                permits,
            })
            .map_err(|_| LakeError::Stopped)
    }

    /// Closes every open file and waits until everything handed over so far
    /// is stored (or `timeout` passes: then `false`; the data stays buffered
    /// and keeps being retried).
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Cmd::Flush(ack)).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(timeout, done).await, Ok(Ok(())))
    }

    /// Arrow bytes handed over but not yet stored.
    pub fn buffered_bytes(&self) -> u64 {
        (self.total as u64 - self.space.available_permits() as u64) * UNIT as u64
    }
}

struct OpenFile {
    path: Path,
    writer: ArrowWriter<Vec<u8>>,
    opened: Instant,
    /// The encoder's write counter at the last write (least recently
    /// written = smallest).
    last_write: u64,
    rows: u64,
    permits: u32,
}

impl OpenFile {
    fn size(&self) -> usize {
        self.writer.bytes_written() + self.writer.in_progress_size()
    }
}

struct Encoder {
    cfg: ArchiveConfig,
    files: HashMap<(Arc<str>, i64), OpenFile>,
    up: mpsc::UnboundedSender<Upload>,
    space: Arc<Semaphore>,
    total: u32,
    lake: Lake,
    run: String,
    /// Files opened so far (the file name's sequence number).
    seq: u64,
    /// Writes so far (orders files by their last write).
    writes: u64,
}

impl Encoder {
    fn run(mut self, rx: std_mpsc::Receiver<Cmd>) {
        loop {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(Cmd::Rows {
                    stream,
                    batch,
                    permits,
                }) => {
                    if let Err(e) = self.add(&stream, &batch, permits) {
                        // Only a schema change or an encoder bug gets here:
                        // the rows are counted and reported, not hidden.
                        metrics::counter!(crate::metric_names::LAKE_ARCHIVE_ERRORS_TOTAL, "stream" => stream.to_string()).increment(batch.num_rows() as u64);
                        tracing::error!(stream = %stream, rows = batch.num_rows(), error = %e, "archive cannot encode rows");
                        self.release(permits);
                    }
                }
                Ok(Cmd::Flush(ack)) => {
                    let keys: Vec<_> = self.files.keys().cloned().collect();
                    for k in keys {
                        self.close(&k);
                    }
                    let _ = self.up.send(Upload::Ack(ack));
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    let keys: Vec<_> = self.files.keys().cloned().collect();
                    for k in keys {
                        self.close(&k);
                    }
                    return;
                }
            }
            self.roll();
        }
    }

    fn release(&self, permits: u32) {
        self.space.add_permits(permits as usize);
        self.lake
            .status()
            .archive_buffered_bytes
            .fetch_sub(permits as u64 * UNIT as u64, Ordering::Relaxed);
    }

    fn add(&mut self, stream: &Arc<str>, batch: &RecordBatch, permits: u32) -> Result<()> {
        let pieces = split_by_day(batch)?;
        let n = pieces.len() as u32;
        for (i, (day, piece)) in pieces.into_iter().enumerate() {
            // The batch's buffer space is spread over the files it lands in.
            let share = permits / n + u32::from((i as u32) < permits % n);
            let key = (stream.clone(), day);
            if !self.files.contains_key(&key) {
                if self.files.len() >= MAX_OPEN_FILES {
                    self.close_least_recent();
                }
                let file = self.open(stream, day, &piece)?;
                self.files.insert(key.clone(), file);
            }
            self.writes += 1;
            let file = self.files.get_mut(&key).expect("just opened");
            file.writer.write(&piece)?;
            file.last_write = self.writes;
            file.rows += piece.num_rows() as u64;
            file.permits += share;
        }
        Ok(())
    }

    fn close_least_recent(&mut self) {
        if let Some(k) = self
            .files
            .iter()
            .min_by_key(|(_, f)| f.last_write)
            .map(|(k, _)| k.clone())
        {
            self.close(&k);
        }
    }

    fn open(&mut self, stream: &str, day: i64, sample: &RecordBatch) -> Result<OpenFile> {
        let at = DateTime::<Utc>::from_timestamp_millis(day * DAY_MS).unwrap_or_default();
        self.seq += 1;
        let rel = format!(
            "events/{stream}/date={}/part-{}-{}-{:06}.parquet",
            at.format("%Y-%m-%d"),
            Utc::now().format("%Y%m%dT%H%M%S"),
            self.run,
            self.seq
        );
        // The archive is encoded on the ingest machine's cores, so it is
        // tuned for CPU (BENCHMARKS.md): no dictionaries (hashing every
        // value made encoding ~30 % slower, and zstd compresses the repeats
        // anyway: files got smaller), LZ4 by default (`compression`; zstd
        // level 1 halves the bytes for ~50 % more encoder CPU), statistics
        // per column chunk (row-group pruning on `ts`) rather than per page.
        let props = WriterProperties::builder()
            .set_compression(self.cfg.compression)
            .set_dictionary_enabled(false)
            .set_statistics_enabled(EnabledStatistics::Chunk)
            .set_max_row_group_row_count(Some(self.cfg.row_group_rows))
            .set_created_by(format!("storepulse {}", env!("CARGO_PKG_VERSION")))
            .build();
        let writer = ArrowWriter::try_new(Vec::new(), sample.schema(), Some(props))?;
        Ok(OpenFile {
            path: self.lake.path(&rel),
            writer,
            opened: Instant::now(),
            last_write: 0,
            rows: 0,
            permits: 0,
        })
    }

    /// Closes files that are big enough or old enough, and the largest one
    /// while more than half the buffer is in use.
    fn roll(&mut self) {
        let target = self.cfg.target_file_size.as_u64() as usize;
        let due: Vec<_> = self
            .files
            .iter()
            .filter(|(_, f)| f.size() >= target || f.opened.elapsed() >= self.cfg.max_file_age)
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            self.close(&k);
        }
        while (self.space.available_permits() as u64) < self.total as u64 / 2 {
            let Some(k) = self
                .files
                .iter()
                .max_by_key(|(_, f)| f.permits)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.close(&k);
        }
    }

    fn close(&mut self, key: &(Arc<str>, i64)) {
        let Some(file) = self.files.remove(key) else {
            return;
        };
        let OpenFile {
            path,
            writer,
            rows,
            permits,
            ..
        } = file;
        match writer.into_inner() {
            Ok(buf) => {
                self.lake
                    .status()
                    .archive_pending_files
                    .fetch_add(1, Ordering::Relaxed);
                let _ = self.up.send(Upload::File(ClosedFile {
                    stream: key.0.clone(),
                    path,
                    bytes: Bytes::from(buf),
                    rows,
                    permits,
                }));
            }
            Err(e) => {
                metrics::counter!(crate::metric_names::LAKE_ARCHIVE_ERRORS_TOTAL, "stream" => key.0.to_string())
                    .increment(rows);
                tracing::error!(url = %self.lake.url_of(&path), rows, error = %e, "archive cannot finish a file");
                self.release(permits);
            }
        }
    }
}

async fn upload_loop(lake: Lake, rx: mpsc::UnboundedReceiver<Upload>, space: Arc<Semaphore>) {
    let items = futures::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item, rx))
    });
    // `buffered` runs up to UPLOADS_IN_FLIGHT stores at once and yields in
    // order, so a flush's ack comes out only after every file before it.
    let done = items
        .map(|item| {
            let (lake, space) = (lake.clone(), space.clone());
            async move {
                match item {
                    Upload::Ack(ack) => Some(ack),
                    Upload::File(f) => {
                        store_file(&lake, &space, f).await;
                        None
                    }
                }
            }
        })
        .buffered(UPLOADS_IN_FLIGHT);
    let mut done = std::pin::pin!(done);
    while let Some(ack) = done.next().await {
        if let Some(ack) = ack {
            let _ = ack.send(());
        }
    }
}

/// Stores one closed file (retrying until it is stored), then releases its
/// buffer space and counts it.
async fn store_file(lake: &Lake, space: &Semaphore, f: ClosedFile) {
    let status = lake.status();
    let started = Instant::now();
    let size = f.bytes.len() as u64;
    // Retried until stored; the bytes stay in memory meanwhile.
    if lake.put_retrying(&f.path, f.bytes, None).await.is_err() {
        return;
    }
    metrics::histogram!(crate::metric_names::LAKE_ARCHIVE_PUT_SECONDS)
        .record(started.elapsed().as_secs_f64());
    let labels = [("stream", f.stream.to_string())];
    metrics::counter!(crate::metric_names::LAKE_ARCHIVE_FILES_TOTAL, &labels).increment(1);
    metrics::counter!(crate::metric_names::LAKE_ARCHIVE_BYTES_TOTAL, &labels).increment(size);
    metrics::counter!(crate::metric_names::LAKE_ARCHIVE_ROWS_TOTAL, &labels).increment(f.rows);
    status.archive_files.fetch_add(1, Ordering::Relaxed);
    status.archive_bytes.fetch_add(size, Ordering::Relaxed);
    status.archive_rows.fetch_add(f.rows, Ordering::Relaxed);
    status.archive_pending_files.fetch_sub(1, Ordering::Relaxed);
    status
        .archive_buffered_bytes
        .fetch_sub(f.permits as u64 * UNIT as u64, Ordering::Relaxed);
    metrics::gauge!(crate::metric_names::LAKE_ARCHIVE_BUFFERED_BYTES)
        .set(status.archive_buffered_bytes.load(Ordering::Relaxed) as f64);
    space.add_permits(f.permits as usize);
    tracing::debug!(url = %lake.url_of(&f.path), rows = f.rows, bytes = size, "archived");
}

/// Splits a batch by the UTC day of its `ts` column: one piece, no copy, in
/// the common case of a batch within one day; otherwise one `take` of the
/// rows ordered by day (stable: rows keep their order within a day), sliced
/// per day.
fn split_by_day(batch: &RecordBatch) -> Result<Vec<(i64, RecordBatch)>> {
    let ts = batch
        .column_by_name("ts")
        .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>())
        .ok_or_else(|| LakeError::Encode {
            what: "archive".into(),
            message: "rows have no millisecond `ts` column".into(),
        })?;
    let (Some(lo), Some(hi)) = (min(ts), max(ts)) else {
        return Ok(vec![(0, batch.clone())]);
    };
    let (lo, hi) = (lo.div_euclid(DAY_MS), hi.div_euclid(DAY_MS));
    if lo == hi {
        return Ok(vec![(lo, batch.clone())]);
    }
    let days: Vec<i64> = ts.values().iter().map(|t| t.div_euclid(DAY_MS)).collect();
    let mut order: Vec<u32> = (0..days.len() as u32).collect();
    order.sort_by_key(|&i| days[i as usize]);
    let sorted = take_record_batch(batch, &UInt32Array::from_iter_values(order.iter().copied()))?;
    let mut out = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let day = days[order[start] as usize];
        let end = start
            + order[start..]
                .iter()
                .take_while(|&&i| days[i as usize] == day)
                .count();
        out.push((day, sorted.slice(start, end - start)));
        start = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::{
        array::{Int64Array, TimestampMillisecondArray},
        datatypes::{DataType, Field, Schema, TimeUnit},
    };

    use super::*;

    fn batch(ts: Vec<i64>) -> RecordBatch {
        let n = ts.len() as i64;
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                false,
            ),
            Field::new("v", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC")),
                Arc::new(Int64Array::from_iter_values(0..n)),
            ],
        )
        .unwrap()
    }

    #[test]
    fn one_day_is_one_piece_and_others_split_in_order() {
        let b = batch(vec![DAY_MS * 5 + 1, DAY_MS * 5 + 2]);
        let p = split_by_day(&b).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, 5);
        let b = batch(vec![
            DAY_MS * 5,
            DAY_MS * 7 + 3,
            DAY_MS * 5 + 9,
            -1,
            DAY_MS * 6 - 1,
        ]);
        let p = split_by_day(&b).unwrap();
        let summary: Vec<(i64, Vec<i64>)> = p
            .iter()
            .map(|(d, b)| {
                let v = b
                    .column(1)
                    .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
                (*d, v.values().to_vec())
            })
            .collect();
        // Rows keep their order within a day (`v` is the row number).
        assert_eq!(
            summary,
            vec![(-1, vec![3]), (5, vec![0, 2, 4]), (7, vec![1])]
        );
    }
}
