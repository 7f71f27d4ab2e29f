//! `late_events`: rows that arrived later than the allowed lateness.
//!
//! Late rows are never dropped silently: each is appended to
//! `late_events.jsonl` under the data dir (when one is set), counted in
//! `storepulse_engine_late_events_total`, and kept in memory (up to a
//! capacity, oldest first out) as the queryable `late_events` table.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    path::PathBuf,
    sync::Arc,
};

use datafusion::arrow::{
    array::{
        Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
    },
    datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType},
};
use storepulse_ingest::StreamKind;

use crate::error::{EngineError, Result};

/// Schema of the `late_events` table.
pub fn late_events_schema() -> SchemaRef {
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("stream", DataType::Utf8, false),
        Field::new("partition", DataType::Utf8, false),
        Field::new("event_id", DataType::Utf8, false),
        Field::new("ts", ts(), false),
        Field::new("store_id", DataType::Utf8, false),
        Field::new("watermark", ts(), false),
        Field::new("lateness_ms", DataType::Int64, false),
        Field::new("received_at", ts(), false),
        Field::new("record", DataType::Utf8, false),
    ]))
}

/// The late-events store.
#[derive(Debug)]
pub struct LateEvents {
    capacity: usize,
    rows: usize,
    batches: VecDeque<RecordBatch>,
    log: Option<(PathBuf, BufWriter<File>)>,
    total: u64,
}

impl LateEvents {
    /// A store keeping `capacity` rows in memory and logging to
    /// `<data_dir>/late_events.jsonl` if a data dir is given.
    pub fn new(capacity: usize, data_dir: Option<&std::path::Path>) -> Result<Self> {
        let log = match data_dir {
            Some(dir) => {
                let path = dir.join("late_events.jsonl");
                let io = |source| EngineError::Io {
                    path: path.clone(),
                    source,
                };
                std::fs::create_dir_all(dir).map_err(io)?;
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(io)?;
                Some((path, BufWriter::new(f)))
            }
            None => None,
        };
        Ok(Self {
            capacity,
            rows: 0,
            batches: VecDeque::new(),
            log,
            total: 0,
        })
    }

    /// Late rows recorded since start.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Records late `rows` of `stream` from `partition` that missed
    /// `watermark_ms`; returns them as `late_events` rows.
    pub fn record(
        &mut self,
        stream: StreamKind,
        partition: &str,
        rows: &RecordBatch,
        watermark_ms: i64,
        now_ms: i64,
    ) -> Result<RecordBatch> {
        let n = rows.num_rows();
        let records = rows_as_json(rows)?;
        let ts = rows.column(1).as_primitive::<TimestampMillisecondType>();
        let tz: Arc<str> = "UTC".into();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![stream.name(); n])),
            Arc::new(StringArray::from(vec![partition; n])),
            rows.column(0).clone(),
            rows.column(1).clone(),
            rows.column(2).clone(),
            Arc::new(
                TimestampMillisecondArray::from(vec![watermark_ms; n]).with_timezone(tz.clone()),
            ),
            Arc::new(Int64Array::from_iter_values(
                ts.values().iter().map(|t| watermark_ms - t),
            )),
            Arc::new(TimestampMillisecondArray::from(vec![now_ms; n]).with_timezone(tz)),
            Arc::new(StringArray::from(records)),
        ];
        let batch = RecordBatch::try_new(late_events_schema(), cols)?;
        if let Some((path, f)) = &mut self.log {
            let io = |source| EngineError::Io {
                path: path.clone(),
                source,
            };
            let mut w = datafusion::arrow::json::LineDelimitedWriter::new(&mut *f);
            w.write(&batch)?;
            w.finish()?;
            f.flush().map_err(io)?;
        }
        self.total += n as u64;
        self.rows += n;
        self.batches.push_back(batch.clone());
        while self.rows > self.capacity {
            let Some(old) = self.batches.pop_front() else {
                break;
            };
            self.rows -= old.num_rows();
        }
        Ok(batch)
    }

    /// Restores rows and the total from a checkpoint (not logged again:
    /// the log already has them).
    pub fn import(&mut self, batches: Vec<RecordBatch>, total: u64) {
        for b in batches {
            self.rows += b.num_rows();
            self.batches.push_back(b);
        }
        while self.rows > self.capacity {
            let Some(old) = self.batches.pop_front() else {
                break;
            };
            self.rows -= old.num_rows();
        }
        self.total = total;
    }

    /// The rows kept in memory.
    pub fn batches(&self) -> Vec<RecordBatch> {
        self.batches.iter().cloned().collect()
    }
}

/// Each row of `batch` as one JSON object string.
fn rows_as_json(batch: &RecordBatch) -> Result<Vec<String>> {
    let mut buf = Vec::new();
    {
        let mut w = datafusion::arrow::json::LineDelimitedWriter::new(&mut buf);
        w.write(batch)?;
        w.finish()?;
    }
    let text = String::from_utf8(buf).map_err(|e| EngineError::User(e.to_string()))?;
    let out: Vec<String> = text.lines().map(str::to_string).collect();
    debug_assert_eq!(out.len(), batch.num_rows());
    let _ = batch.column(0).len();
    Ok(out)
}
