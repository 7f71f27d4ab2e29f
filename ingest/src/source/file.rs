//! [`FileSource`]: a bounded file per stream, JSONL (the event contract),
//! CSV or Parquet (already-flat rows of the stream's schema, mapped by
//! column name by [`conform`]).
//! column name by [`conform`]).
//!
//! Size: ~560 lines of code (one reader per format) and ~210 of tests.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc as std_mpsc, Arc,
    },
};

use arrow::{
    array::{new_null_array, Array, ArrayRef, AsArray, Int32Builder, RecordBatch},
    compute::cast,
    datatypes::{DataType, Field, Schema, SchemaRef},
};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};

use super::{Position, Source, SourceBatch, SourceContext, SourceError, SourceMessage};
use crate::decode::MAX_RECORD_BYTES;
use crate::{
    dead_letter::{record_dead_letters, DeadLetterSink},
    decode::{DecodeOutput, EventDecoder, RawRecord},
    error::{IngestError, Result},
    schema::StreamKind,
};

/// File formats a [`FileSource`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// One JSON event per line (the event contract).
    Jsonl,
    /// Flat rows with a header line.
    Csv,
    /// Flat rows.
    Parquet,
}

impl FileFormat {
    /// Infers the format from the file extension.
    pub fn from_path(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl") | Some("json") | Some("ndjson") => Ok(Self::Jsonl),
            Some("csv") => Ok(Self::Csv),
            Some("parquet") => Ok(Self::Parquet),
            _ => Err(IngestError::Format {
                path: path.to_path_buf(),
                message: "cannot infer the format from the extension; set `format` to jsonl, csv or parquet".into(),
            }),
        }
    }
}

/// A bounded source reading one file of one stream.
#[derive(Debug, Clone)]
pub struct FileSource {
    /// The stream the file holds.
    pub stream: StreamKind,
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: FileFormat,
    /// Events per batch.
    pub batch_size: usize,
    /// Threads decoding JSONL chunks in parallel (at least one; the rows
    /// still leave in file order). CSV and Parquet ignore it.
    pub decode_threads: usize,
    /// Position to resume from (a restored checkpoint's `next_offset` for
    /// this file; 0 reads it whole). Records before it were applied
    /// before the restart and are skipped.
    pub resume_from: u64,
    /// Event-time alignment with the other files of the run (`None`: read
    /// as fast as the file allows).
    pub align: Option<crate::align::AlignSlot>,
}

/// What a format's reader is handed by [`FileSource::run_blocking`].
struct Reader<'a> {
    file: File,
    partition: &'a Arc<str>,
    dead_letters: &'a dyn DeadLetterSink,
    shutdown: &'a watch::Receiver<bool>,
    send: &'a dyn Fn(SourceMessage) -> Result<()>,
}

impl FileSource {
    /// Reads the whole file, sending batches to `tx` and dead letters to
    /// `dead_letters`, then an [`SourceMessage::EndOfPartition`]. Runs on a
    /// blocking thread; stops early when `shutdown` turns true.
    pub async fn run(
        self,
        tx: mpsc::Sender<SourceMessage>,
        dead_letters: Arc<dyn DeadLetterSink>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        tokio::task::spawn_blocking(move || self.run_blocking(&tx, &*dead_letters, &shutdown))
            .await
            .map_err(|e| IngestError::DeadLetter(format!("file source task failed: {e}")))?
    }

    fn partition(&self) -> Arc<str> {
        self.path.display().to_string().into()
    }

    fn run_blocking(
        &self,
        tx: &mpsc::Sender<SourceMessage>,
        dead_letters: &dyn DeadLetterSink,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<()> {
        // However this ends, the other aligned files stop waiting for it.
        struct Done<'a>(Option<&'a crate::align::AlignSlot>);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                if let Some(a) = self.0 {
                    a.alignment.finished(a.member);
                }
            }
        }
        let _done = Done(self.align.as_ref());
        let file = File::open(&self.path).map_err(|e| self.io(e))?;
        let partition = self.partition();
        let last_position = std::cell::Cell::new(self.resume_from);
        let send = |msg: SourceMessage| self.send(tx, shutdown, &last_position, msg);
        let reader = Reader {
            file,
            partition: &partition,
            dead_letters,
            shutdown,
            send: &send,
        };
        let finished = match self.format {
            FileFormat::Jsonl => self.read_jsonl(reader)?,
            FileFormat::Csv => self.read_csv(reader)?,
            FileFormat::Parquet => self.read_parquet(reader)?,
        };
        if !finished {
            return Ok(()); // shut down before the end
        }
        send(SourceMessage::EndOfPartition {
            stream: self.stream,
            partition,
        })
    }

    fn io(&self, source: std::io::Error) -> IngestError {
        IngestError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Sends `msg`. Aligned: a batch is cut into runs no longer than the
    /// drift in event time, and each run waits for its turn. Every run but
    /// the last carries the position before the batch (a restart re-reads
    /// the batch; de-duplication drops what was applied).
    fn send(
        &self,
        tx: &mpsc::Sender<SourceMessage>,
        shutdown: &watch::Receiver<bool>,
        last_position: &std::cell::Cell<u64>,
        msg: SourceMessage,
    ) -> Result<()> {
        let (Some(a), SourceMessage::Batch(b)) = (&self.align, &msg) else {
            return tx.blocking_send(msg).map_err(|_| IngestError::Closed);
        };
        let runs = crate::align::split_by_event_time(&b.batch, a.alignment.max_drift_ms());
        let n = runs.len();
        for (i, run) in runs.into_iter().enumerate() {
            let Some((first, last)) = ts_span(&run) else {
                continue;
            };
            a.alignment
                .wait_turn(a.member, first, || *shutdown.borrow());
            let position = if i + 1 == n {
                b.position.clone()
            } else {
                Position {
                    partition: b.position.partition.clone(),
                    next_offset: last_position.get(),
                }
            };
            let part = SourceBatch {
                events: events_in(b.stream, &run, b.events, b.batch.num_rows()),
                bytes: b.bytes * run.num_rows() / b.batch.num_rows().max(1),
                batch: run,
                stream: b.stream,
                position,
            };
            tx.blocking_send(SourceMessage::Batch(part))
                .map_err(|_| IngestError::Closed)?;
            a.alignment.sent(a.member, last);
        }
        last_position.set(b.position.next_offset);
        Ok(())
    }

    /// JSONL: lines cut into chunks of `batch_size` by a reader thread,
    /// decoded by `decode_threads` workers, and sent in file order by this
    /// thread (positions, dead letters and batches stay in line order). A
    /// line over the record limit is dead-lettered without being read
    /// whole. `false` if stopped by `shutdown`.
    fn read_jsonl(&self, r: Reader<'_>) -> Result<bool> {
        let Reader {
            file,
            partition,
            dead_letters,
            shutdown,
            send,
        } = r;
        let workers = self.decode_threads.max(1);
        // Chunks in flight: one per worker queued, one per worker decoding,
        // two per worker decoded and waiting for their turn.
        let (work_tx, work_rx) = std_mpsc::sync_channel::<Chunk>(workers);
        let (done_tx, done_rx) =
            std_mpsc::sync_channel::<(Chunk, Result<DecodeOutput>)>(2 * workers);
        let (free_tx, free_rx) = std_mpsc::channel::<Vec<u8>>();
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let reader = {
                let stop = &stop;
                std::thread::Builder::new()
                    .name("jsonl-read".into())
                    .spawn_scoped(scope, move || {
                        self.cut_chunks(file, partition, work_tx, free_rx, shutdown, stop)
                    })
                    .map_err(|e| self.io(e))?
            };
            let work_rx = Arc::new(std::sync::Mutex::new(work_rx));
            for i in 0..workers {
                let (work_rx, done_tx) = (work_rx.clone(), done_tx.clone());
                let mut decoder = EventDecoder::new(self.stream, partition.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("jsonl-decode-{i}"))
                    .spawn_scoped(scope, move || loop {
                        // The lock is held only while waiting for a chunk.
                        let next = work_rx.lock().map(|rx| rx.recv());
                        let Ok(Ok(chunk)) = next else { break };
                        let records: Vec<RawRecord<'_>> = chunk
                            .spans
                            .iter()
                            .map(|&(s, e, l)| RawRecord {
                                bytes: &chunk.buf[s..e],
                                position: l,
                            })
                            .collect();
                        let out = decoder.decode(&records);
                        drop(records);
                        if done_tx.send((chunk, out)).is_err() {
                            break; // the sender stopped
                        }
                    });
                if let Err(e) = spawned {
                    stop.store(true, Ordering::Relaxed);
                    return Err(self.io(e));
                }
            }
            drop((work_rx, done_tx));
            // Decoded chunks arrive in any order; they leave in file order.
            let sent = (|| -> Result<bool> {
                let mut pending = BTreeMap::new();
                let mut next = 0u64;
                for (chunk, out) in done_rx.iter() {
                    pending.insert(chunk.seq, (chunk, out));
                    while let Some((chunk, out)) = pending.remove(&next) {
                        next += 1;
                        if *shutdown.borrow() {
                            return Ok(false);
                        }
                        record_dead_letters(dead_letters, &chunk.oversized)?;
                        let out = out?;
                        record_dead_letters(dead_letters, &out.dead_letters)?;
                        if let Some(batch) = out.batch {
                            send(SourceMessage::Batch(SourceBatch {
                                stream: self.stream,
                                batch,
                                events: out.events,
                                bytes: chunk.buf.len(),
                                position: Position {
                                    partition: partition.clone(),
                                    next_offset: chunk.next_line,
                                },
                            }))?;
                        }
                        let _ = free_tx.send(chunk.buf); // the reader may be done
                    }
                }
                Ok(true)
            })();
            // However it ended, the reader and the workers stop: the reader
            // sees `stop`, the workers see the closed channels.
            stop.store(true, Ordering::Relaxed);
            drop(done_rx);
            let read = reader.join().unwrap_or_else(|_| {
                Err(self.io(std::io::Error::other("the JSONL reader thread panicked")))
            });
            Ok(sent? && read?)
        })
    }

    /// The reader thread of [`read_jsonl`](Self::read_jsonl): cuts the file
    /// into chunks of `batch_size` lines (reusing the buffers handed back
    /// on `free`). `false` if stopped.
    fn cut_chunks(
        &self,
        file: File,
        partition: &Arc<str>,
        work: std_mpsc::SyncSender<Chunk>,
        free: std_mpsc::Receiver<Vec<u8>>,
        shutdown: &watch::Receiver<bool>,
        stop: &AtomicBool,
    ) -> Result<bool> {
        let io = |e| self.io(e);
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut line_no = 0u64;
        // Lines before the resume position were applied before a
        // restart (positions name the next line to read).
        let mut skipped = Vec::new();
        while line_no + 1 < self.resume_from {
            skipped.clear();
            if reader.read_until(b'\n', &mut skipped).map_err(io)? == 0 {
                break;
            }
            line_no += 1;
        }
        drop(skipped);
        for seq in 0u64.. {
            if stop.load(Ordering::Relaxed) || *shutdown.borrow() {
                return Ok(false);
            }
            let mut buf = free
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(1 << 20));
            buf.clear();
            let mut spans = Vec::with_capacity(self.batch_size);
            let mut oversized = Vec::new();
            while spans.len() < self.batch_size {
                let start = buf.len();
                let (n, truncated) =
                    read_line_capped(&mut reader, &mut buf, MAX_RECORD_BYTES).map_err(io)?;
                if n == 0 {
                    break;
                }
                line_no += 1;
                if truncated {
                    oversized.push(crate::DeadLetter::new(
                        self.stream.name(),
                        partition.clone(),
                        line_no,
                        format!("line is {n} bytes, over the {MAX_RECORD_BYTES}-byte record limit"),
                        &buf[start..],
                    ));
                    buf.truncate(start);
                    continue;
                }
                let mut end = buf.len();
                while end > start && matches!(buf[end - 1], b'\n' | b'\r') {
                    end -= 1;
                }
                if buf[start..end].iter().all(u8::is_ascii_whitespace) {
                    continue; // blank lines carry no event
                }
                spans.push((start, end, line_no));
            }
            if spans.is_empty() && oversized.is_empty() {
                return Ok(true); // the end of the file
            }
            let chunk = Chunk {
                seq,
                buf,
                spans,
                oversized,
                next_line: line_no + 1,
            };
            if work.send(chunk).is_err() {
                return Ok(false); // the decoders stopped
            }
        }
        Ok(true)
    }

    /// CSV with a header: columns mapped by name ([`conform`]).
    fn read_csv(&self, r: Reader<'_>) -> Result<bool> {
        let Reader {
            file,
            partition,
            shutdown,
            send,
            ..
        } = r;
        let io = |e| self.io(e);
        let mut header = String::new();
        BufReader::new(File::open(&self.path).map_err(io)?)
            .read_line(&mut header)
            .map_err(io)?;
        let target = self.stream.schema();
        let names: Vec<&str> = header.trim_end().split(',').map(str::trim).collect();
        let file_schema = Arc::new(Schema::new(
            names
                .iter()
                .map(|n| match target.field_with_name(n) {
                    // Money is read at 18 decimals and checked in
                    // `conform` (never truncated to the kept six).
                    Ok(f) if f.data_type() == &crate::schema::MONEY => {
                        Field::new(*n, crate::schema::JSON_MONEY, true)
                    }
                    Ok(f) => Field::new(*n, f.data_type().clone(), true),
                    Err(_) => Field::new(*n, DataType::Utf8, true),
                })
                .collect::<Vec<_>>(),
        ));
        let reader = arrow_csv::ReaderBuilder::new(file_schema)
            .with_header(true)
            .with_batch_size(self.batch_size)
            .build(file)?;
        let batches = reader.map(|batch| {
            batch.map_err(|e| IngestError::Format {
                path: self.path.clone(),
                message: e.to_string(),
            })
        });
        // Data row j is line 2 + j (after the header).
        self.send_flat(batches, 2, partition, shutdown, send)
    }

    /// Parquet: row groups read in batches, columns mapped by name.
    fn read_parquet(&self, r: Reader<'_>) -> Result<bool> {
        let Reader {
            file,
            partition,
            shutdown,
            send,
            ..
        } = r;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.with_batch_size(self.batch_size).build())
            .map_err(|source| IngestError::Parquet {
                path: self.path.clone(),
                source,
            })?;
        let batches = reader.map(|batch| batch.map_err(IngestError::from));
        // Row j is row j of the file.
        self.send_flat(batches, 0, partition, shutdown, send)
    }

    /// Sends already-flat `batches` (mapped by name, [`conform`]); the
    /// position of data row j is `base + j`, so rows before `resume_from`
    /// are skipped. `false` if stopped by `shutdown`.
    fn send_flat(
        &self,
        batches: impl Iterator<Item = Result<RecordBatch>>,
        base: u64,
        partition: &Arc<str>,
        shutdown: &watch::Receiver<bool>,
        send: &dyn Fn(SourceMessage) -> Result<()>,
    ) -> Result<bool> {
        let mut rows = 0u64;
        for batch in batches {
            let batch = batch?;
            let skip = self.resume_from.saturating_sub(base + rows);
            rows += batch.num_rows() as u64;
            if *shutdown.borrow() {
                return Ok(false);
            }
            let Some(batch) = skip_rows(batch, skip) else {
                continue;
            };
            let batch = conform(&self.path, self.stream, &batch)?;
            send(self.flat_batch(batch, partition, base + rows))?;
        }
        Ok(true)
    }

    fn flat_batch(&self, batch: RecordBatch, partition: &Arc<str>, next: u64) -> SourceMessage {
        let events = match self.stream {
            StreamKind::Sales => {
                let lines = batch.column_by_name("line_no").expect("flat sales schema");
                let lines = lines.as_primitive::<arrow::datatypes::Int32Type>();
                lines.iter().filter(|l| *l == Some(0)).count()
            }
            _ => batch.num_rows(),
        };
        SourceMessage::Batch(SourceBatch {
            stream: self.stream,
            bytes: batch.get_array_memory_size(),
            events,
            batch,
            position: Position {
                partition: partition.clone(),
                next_offset: next,
            },
        })
    }
}

/// Events in `run`, a slice of a batch of `rows` rows holding `events`
/// events: receipts count once (their line 0), other streams per row.
fn events_in(stream: StreamKind, run: &RecordBatch, events: usize, rows: usize) -> usize {
    if run.num_rows() == rows {
        return events;
    }
    match run
        .column_by_name("line_no")
        .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int32Type>())
    {
        Some(l) if stream == StreamKind::Sales => l.iter().filter(|v| *v == Some(0)).count(),
        _ => run.num_rows(),
    }
}

/// The smallest and largest event time of a batch.
fn ts_span(batch: &RecordBatch) -> Option<(i64, i64)> {
    let ts = batch
        .column_by_name("ts")?
        .as_primitive_opt::<arrow::datatypes::TimestampMillisecondType>()?;
    Some((arrow::compute::min(ts)?, arrow::compute::max(ts)?))
}

/// Appends one line (through `\n`) of `reader` to `buf`, keeping at most
/// `cap` bytes of it and discarding the rest, so a hostile file with a
/// giant line cannot make us allocate it (the kept prefix goes into the
/// caller's dead letter). Returns the bytes consumed (0 at the end) and
/// whether the line was longer than `cap`.
fn read_line_capped<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<(usize, bool)> {
    let mut consumed = 0;
    let mut kept = 0;
    let mut content = 0; // line bytes without the newline
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok((consumed, content > cap));
        }
        let (line, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (&chunk[..=i], true),
            None => (chunk, false),
        };
        let take = line.len().min((cap + 2).saturating_sub(kept));
        buf.extend_from_slice(&line[..take]);
        kept += take;
        let n = line.len();
        content += n - usize::from(done);
        reader.consume(n);
        consumed += n;
        if done {
            return Ok((
                consumed,
                content.saturating_sub(usize::from(line_ends_cr(buf))) > cap,
            ));
        }
    }
}

fn line_ends_cr(buf: &[u8]) -> bool {
    buf.ends_with(b"\r\n")
}

/// Lines of a JSONL file cut by the reader thread for a decoder.
struct Chunk {
    /// Order in the file (chunks are sent in this order).
    seq: u64,
    /// The lines' bytes.
    buf: Vec<u8>,
    /// Each line's start, end (newline excluded) and number.
    spans: Vec<(usize, usize, u64)>,
    /// Lines over the record limit, dead-lettered before the chunk's rows.
    oversized: Vec<crate::DeadLetter>,
    /// The number of the line after the chunk's last (its position).
    next_line: u64,
}

/// `batch` without its first `skip` rows (`None` if nothing is left).
fn skip_rows(batch: RecordBatch, skip: u64) -> Option<RecordBatch> {
    let skip = usize::try_from(skip).unwrap_or(usize::MAX);
    match skip {
        0 => Some(batch),
        s if s >= batch.num_rows() => None,
        s => Some(batch.slice(s, batch.num_rows() - s)),
    }
}

/// Maps an already-flat batch (CSV, Parquet) onto the stream's schema by
/// column name: casts types, fills absent nullable columns with nulls,
/// numbers `sales.line_no` per receipt when absent, and names a missing
/// required column.
pub fn conform(path: &Path, stream: StreamKind, batch: &RecordBatch) -> Result<RecordBatch> {
    let target: SchemaRef = stream.schema();
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(target.fields().len());
    for f in target.fields() {
        match batch.column_by_name(f.name()) {
            Some(c) => {
                let format_err = |message: String| IngestError::Format {
                    path: path.to_path_buf(),
                    message,
                };
                let c: ArrayRef =
                    if f.data_type() == &crate::schema::MONEY && !c.data_type().is_floating() {
                        // Exact or refused: read at 18 decimals, then checked.
                        let wide = cast(c, &crate::schema::JSON_MONEY)
                            .map_err(|e| format_err(format!("column '{}': {e}", f.name())))?;
                        Arc::new(crate::decode::rescale_money(wide.as_primitive()).map_err(
                            |(row, why)| {
                                format_err(format!(
                                    "column '{}', data row {} of this batch: {why}",
                                    f.name(),
                                    row + 1
                                ))
                            },
                        )?)
                    } else {
                        cast(c, f.data_type())
                            .map_err(|e| format_err(format!("column '{}': {e}", f.name())))?
                    };
                if !f.is_nullable() && c.null_count() > 0 {
                    let row = (0..c.len()).find(|i| c.is_null(*i)).unwrap_or(0);
                    return Err(format_err(format!(
                        "column '{}' is required but empty in data row {} of this batch",
                        f.name(),
                        row + 1
                    )));
                }
                cols.push(c);
            }
            None if f.name() == "line_no" => {
                let ids = batch
                    .column_by_name("receipt_id")
                    .or_else(|| batch.column_by_name("event_id"))
                    .ok_or_else(|| IngestError::Format {
                        path: path.to_path_buf(),
                        message: "missing required column 'event_id'".into(),
                    })?;
                let ids = cast(ids, &DataType::Utf8)?;
                let ids = ids.as_string::<i32>();
                let mut b = Int32Builder::with_capacity(ids.len());
                let mut n = 0;
                for i in 0..ids.len() {
                    n = if i > 0 && ids.value(i) == ids.value(i - 1) {
                        n + 1
                    } else {
                        0
                    };
                    b.append_value(n);
                }
                cols.push(Arc::new(b.finish()));
            }
            None if f.is_nullable() => cols.push(new_null_array(f.data_type(), batch.num_rows())),
            None => {
                return Err(IngestError::Format {
                    path: path.to_path_buf(),
                    message: format!("missing required column '{}' for stream {stream}", f.name()),
                })
            }
        }
    }
    Ok(RecordBatch::try_new(target, cols)?)
}

impl Source for FileSource {
    fn describe(&self) -> String {
        format!("source {}", self.path.display())
    }

    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            FileSource::run(*self, ctx.tx, ctx.dead_letters, ctx.shutdown)
                .await
                .map_err(SourceError::from)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dead_letter::MemoryDeadLetterSink;

    fn read_all(src: FileSource) -> Result<Vec<SourceMessage>> {
        let (tx, mut rx) = mpsc::channel(64);
        let (_stop, shutdown) = watch::channel(false);
        src.run_blocking(&tx, &MemoryDeadLetterSink::default(), &shutdown)?;
        drop(tx);
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push(m);
        }
        Ok(out)
    }

    #[test]
    fn csv_rows_are_mapped_by_column_name_and_lines_numbered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sales.csv");
        // Columns in another order, no line_no, no discount, an extra column.
        std::fs::write(
            &path,
            "ts,event_id,store_id,receipt_id,sku,qty,unit_price,member_id,channel,note\n\
             2026-01-05T10:00:00Z,e1,S1,r1,A,2,1.50,m1,pos,x\n\
             2026-01-05T10:00:00Z,e1,S1,r1,B,1,2.00,m1,pos,y\n\
             2026-01-05T11:00:00Z,e2,S1,r2,A,1,1.50,,,z\n",
        )
        .unwrap();
        let msgs = read_all(FileSource {
            stream: StreamKind::Sales,
            path,
            format: FileFormat::Csv,
            batch_size: 100,
            decode_threads: 1,
            resume_from: 0,
            align: None,
        })
        .unwrap();
        let SourceMessage::Batch(b) = &msgs[0] else {
            panic!("{msgs:?}")
        };
        assert_eq!(b.events, 2);
        assert_eq!(b.batch.schema(), StreamKind::Sales.schema());
        let line_no = b.batch.column_by_name("line_no").unwrap();
        let line_no = line_no.as_primitive::<arrow::datatypes::Int32Type>();
        assert_eq!(line_no.values().to_vec(), vec![0, 1, 0]);
        assert!(matches!(
            msgs.last(),
            Some(SourceMessage::EndOfPartition { .. })
        ));
    }

    #[test]
    fn a_missing_required_column_names_file_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("counts.csv");
        std::fs::write(
            &path,
            "event_id,ts,store_id,sku\ne,2026-01-05T10:00:00Z,S1,A\n",
        )
        .unwrap();
        let err = read_all(FileSource {
            stream: StreamKind::StockCounts,
            path,
            format: FileFormat::Csv,
            batch_size: 100,
            decode_threads: 1,
            resume_from: 0,
            align: None,
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("counts.csv") && err.contains("missing required column 'on_hand'"),
            "{err}"
        );
    }

    /// Reads an IoT JSONL file: its dead letters and the messages sent.
    fn read_iot_jsonl(
        path: PathBuf,
        batch_size: usize,
    ) -> (Vec<crate::DeadLetter>, mpsc::Receiver<SourceMessage>) {
        let sink = MemoryDeadLetterSink::default();
        let (tx, rx) = mpsc::channel(8);
        let (_stop, shutdown) = watch::channel(false);
        FileSource {
            stream: StreamKind::IotReadings,
            path,
            format: FileFormat::Jsonl,
            batch_size,
            decode_threads: 2,
            resume_from: 0,
            align: None,
        }
        .run_blocking(&tx, &sink, &shutdown)
        .unwrap();
        (sink.letters(), rx)
    }

    #[test]
    fn jsonl_positions_are_line_numbers_and_blank_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("iot.jsonl");
        let rec =
            r#"{"event_id":"a","ts":1,"store_id":"S","device_id":"d","metric":"m","value":1}"#;
        std::fs::write(&path, format!("{rec}\n\n{}\n{rec}\n", "{bad")).unwrap();
        let (dead, mut rx) = read_iot_jsonl(path, 2);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].position, 3);
        let SourceMessage::Batch(b) = rx.try_recv().unwrap() else {
            panic!()
        };
        assert_eq!(b.batch.num_rows(), 1);
        assert_eq!(b.position.next_offset, 4);
    }

    #[test]
    fn a_resumed_file_continues_at_its_position() {
        // After a restart from a checkpoint, a file source resumes at the
        // checkpoint's position: the rest equals the tail of a whole read.
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("iot.jsonl");
        let csv = dir.path().join("iot.csv");
        let mut j = String::new();
        let mut c = String::from("event_id,ts,store_id,device_id,metric,value\n");
        for i in 0..7 {
            j.push_str(&format!(
                r#"{{"event_id":"e{i}","ts":{i},"store_id":"S","device_id":"d","metric":"m","value":{i}}}"#
            ));
            j.push('\n');
            c.push_str(&format!("e{i},1970-01-01T00:00:0{i}Z,S,d,m,{i}\n"));
        }
        std::fs::write(&jsonl, j).unwrap();
        std::fs::write(&csv, c).unwrap();
        for (path, format) in [(jsonl, FileFormat::Jsonl), (csv, FileFormat::Csv)] {
            let src = |resume_from| FileSource {
                stream: StreamKind::IotReadings,
                path: path.clone(),
                format,
                batch_size: 3,
                decode_threads: 3,
                resume_from,
                align: None,
            };
            let batches = |msgs: Vec<SourceMessage>| -> Vec<(Vec<String>, u64)> {
                msgs.into_iter()
                    .filter_map(|m| match m {
                        SourceMessage::Batch(b) => Some((
                            b.batch
                                .column(0)
                                .as_string::<i32>()
                                .iter()
                                .map(|s| s.unwrap().to_string())
                                .collect(),
                            b.position.next_offset,
                        )),
                        _ => None,
                    })
                    .collect()
            };
            let whole = batches(read_all(src(0)).unwrap());
            let ids: Vec<String> = whole.iter().flat_map(|(ids, _)| ids.clone()).collect();
            assert_eq!(ids.len(), 7, "{format:?}");
            // Resume at each batch boundary: the rest is exactly what followed.
            for (k, (_, pos)) in whole.iter().enumerate() {
                let rest = batches(read_all(src(*pos)).unwrap());
                let want: Vec<String> =
                    whole[k + 1..].iter().flat_map(|(i, _)| i.clone()).collect();
                let got: Vec<String> = rest.iter().flat_map(|(i, _)| i.clone()).collect();
                assert_eq!(got, want, "{format:?} resumed at {pos}");
                assert_eq!(
                    rest.last().map(|r| r.1),
                    whole.last().filter(|_| k + 1 < whole.len()).map(|w| w.1)
                );
            }
        }
    }

    #[test]
    fn a_giant_line_is_dead_lettered_without_reading_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("iot.jsonl");
        let rec =
            r#"{"event_id":"a","ts":1,"store_id":"S","device_id":"d","metric":"m","value":1}"#;
        let giant = format!(r#"{{"event_id":"{}"}}"#, "x".repeat(3 << 20));
        std::fs::write(
            &path,
            format!("{rec}\n{giant}\r\n{}\n", rec.replace("\"a\"", "\"b\"")),
        )
        .unwrap();
        let (dead, mut rx) = read_iot_jsonl(path, 10);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].position, 2);
        assert!(
            dead[0]
                .reason
                .contains("over the 1048576-byte record limit"),
            "{}",
            dead[0].reason
        );
        assert!(dead[0].raw.len() < 20 << 10, "raw kept short");
        let SourceMessage::Batch(b) = rx.try_recv().unwrap() else {
            panic!()
        };
        assert_eq!(b.batch.num_rows(), 2, "both good lines decoded");
        assert_eq!(b.position.next_offset, 4);
    }

    #[test]
    fn parallel_decoding_keeps_file_order_for_rows_positions_and_dead_letters() {
        // Chunks of 4 lines decoded by 1 and by 3 threads: the same
        // batches, positions and dead letters, in line order.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("iot.jsonl");
        let mut text = String::new();
        for i in 0..500 {
            if i % 7 == 3 {
                text.push_str(&format!("{{\"event_id\":\"bad{i}\"\n"));
            } else {
                text.push_str(&format!(
                    r#"{{"event_id":"e{i}","ts":{i},"store_id":"S","device_id":"d","metric":"m","value":{i}}}"#
                ));
                text.push('\n');
            }
        }
        std::fs::write(&path, text).unwrap();
        let read = |threads| {
            let sink = MemoryDeadLetterSink::default();
            let (tx, mut rx) = mpsc::channel(1024);
            let (_stop, shutdown) = watch::channel(false);
            FileSource {
                stream: StreamKind::IotReadings,
                path: path.clone(),
                format: FileFormat::Jsonl,
                batch_size: 4,
                decode_threads: threads,
                resume_from: 0,
                align: None,
            }
            .run_blocking(&tx, &sink, &shutdown)
            .unwrap();
            drop(tx);
            let mut batches = Vec::new();
            while let Ok(m) = rx.try_recv() {
                if let SourceMessage::Batch(b) = m {
                    let ids: Vec<String> = b
                        .batch
                        .column(0)
                        .as_string::<i32>()
                        .iter()
                        .map(|s| s.unwrap().to_string())
                        .collect();
                    batches.push((ids, b.position.next_offset));
                }
            }
            let dead: Vec<u64> = sink.letters().iter().map(|d| d.position).collect();
            (batches, dead)
        };
        let (one, dead_one) = read(1);
        let (three, dead_three) = read(3);
        assert_eq!(one, three);
        assert_eq!(dead_one, dead_three);
        let want_dead: Vec<u64> = (0..500u64).filter(|i| i % 7 == 3).map(|i| i + 1).collect();
        assert_eq!(dead_three, want_dead);
        let ids: Vec<String> = three.iter().flat_map(|(ids, _)| ids.clone()).collect();
        let want: Vec<String> = (0..500)
            .filter(|i| i % 7 != 3)
            .map(|i| format!("e{i}"))
            .collect();
        assert_eq!(ids, want);
        let positions: Vec<u64> = three.iter().map(|b| b.1).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        assert_eq!(positions.last(), Some(&501));
    }
}
