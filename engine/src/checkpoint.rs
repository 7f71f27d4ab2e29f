//! Engine checkpoints: one consistent image of everything the engine must
//! not lose — every materialized view's keyed state, each stream's
//! de-duplication set, watermarks and counters, the in-memory
//! `late_events` rows, and the source positions the image reflects.
//!
//! [`Engine::checkpoint`](crate::Engine::checkpoint) takes the image
//! between two micro-batches (the engine is locked), so the positions and
//! the state agree: restoring it and reading each source from its
//! position gives the same views as a run that never stopped. A view's
//! state is written as its *partial-aggregate* rows (group columns, then
//! each aggregate's state columns: the same rows a micro-batch merges), so
//! a restore is one `merge_batch` per aggregate and the format follows
//! DataFusion's own state definitions rather than a private one.
//!
//! [`EngineCheckpoint::encode`] lays the image out as files (Arrow IPC for
//! rows, JSON for the rest); `storepulse-checkpoint` stores them with a
//! manifest written last.

use std::{collections::HashMap, io::Cursor, sync::Arc};

use datafusion::arrow::{
    array::{AsArray, Int64Array, RecordBatch, UInt64Array},
    datatypes::{DataType, Field, Int64Type, Schema, UInt64Type},
    ipc::{reader::FileReader, writer::FileWriter},
};
use serde::{Deserialize, Serialize};

use crate::{
    error::{EngineError, Result},
    watermark::Watermark,
};

/// Version of the layout [`EngineCheckpoint::encode`] writes.
pub const FORMAT_VERSION: u32 = 1;

/// The engine's state at one epoch (see the module docs).
#[derive(Debug, Clone)]
pub struct EngineCheckpoint {
    /// Everything but rows.
    pub meta: CheckpointMeta,
    /// Each view's partial-aggregate rows, by view name.
    pub views: Vec<(String, RecordBatch)>,
    /// Each stream's de-duplication set (`hash_hi`, `hash_lo`, `ts`), by
    /// stream name.
    pub dedup: Vec<(String, RecordBatch)>,
    /// The `late_events` rows held in memory.
    pub late: Vec<RecordBatch>,
}

/// The non-row part of a checkpoint (`engine.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMeta {
    /// Layout version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Engine epoch (micro-batches applied since start) when taken.
    pub epoch: u64,
    /// Views: name, defining SQL, rows applied, groups.
    pub views: Vec<ViewMeta>,
    /// Streams: watermark, partitions, counters.
    pub streams: Vec<StreamMeta>,
    /// Late rows recorded in total.
    pub late_total: u64,
    /// Source positions (partition → next offset) the state reflects.
    pub positions: Vec<(String, u64)>,
}

/// One view in a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ViewMeta {
    /// View name.
    pub name: String,
    /// The `CREATE MATERIALIZED VIEW` statement it was defined by.
    pub sql: String,
    /// Rows applied to it.
    pub rows_applied: u64,
    /// Groups held.
    pub groups: u64,
    /// The view's `state_ttl` bookkeeping, if it has a TTL (older
    /// checkpoints have none: a restore then treats every group as touched
    /// at the restore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<TtlMeta>,
}

/// A view's `state_ttl` bookkeeping in a checkpoint. The per-group stamps
/// (the batch that last touched each group) are the state file's last
/// column, [`TTL_TOUCHED_COLUMN`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TtlMeta {
    /// The view's batch counter (the stamps' clock).
    pub batch_no: u64,
    /// Hop views: the `upto` of the last eviction (windows whose panes were
    /// all last touched at or before it are not shown).
    pub hop_floor: Option<u64>,
    /// `(batch number, the view's event-time clock after it)`, oldest
    /// first: how eviction maps event time to stamps.
    pub marks: Vec<(u64, i64)>,
}

/// The state-file column holding a TTL view's per-group stamps.
pub const TTL_TOUCHED_COLUMN: &str = "__ttl_touched";

/// One stream in a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StreamMeta {
    /// Stream name.
    pub stream: String,
    /// Stream watermark (epoch ms; `None`: none yet; `Final` is stored as
    /// the largest event time).
    pub watermark: Option<i64>,
    /// True if the watermark was final.
    pub watermark_final: bool,
    /// `(partition, largest event time)`.
    pub partitions: Vec<(String, i64)>,
    /// Events accepted.
    pub accepted_events: u64,
    /// Duplicates dropped.
    pub duplicate_events: u64,
    /// Late events.
    pub late_events: u64,
}

impl StreamMeta {
    /// The stored watermark.
    pub fn watermark(&self) -> Watermark {
        match (self.watermark_final, self.watermark) {
            (true, _) => Watermark::Final,
            (false, Some(t)) => Watermark::At(t),
            (false, None) => Watermark::None,
        }
    }
}

/// Name of the metadata file.
pub const META_FILE: &str = "engine.json";
/// Name of the late-events file.
pub const LATE_FILE: &str = "late_events.arrow";

/// The schema of a de-duplication file.
pub fn dedup_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("hash_hi", DataType::UInt64, false),
        Field::new("hash_lo", DataType::UInt64, false),
        Field::new("ts", DataType::Int64, false),
    ]))
}

/// A de-duplication set as a batch.
pub fn dedup_batch(hi: Vec<u64>, lo: Vec<u64>, ts: Vec<i64>) -> Result<RecordBatch> {
    Ok(RecordBatch::try_new(
        dedup_schema(),
        vec![
            Arc::new(UInt64Array::from(hi)),
            Arc::new(UInt64Array::from(lo)),
            Arc::new(Int64Array::from(ts)),
        ],
    )?)
}

/// A view's state batch with its TTL stamps appended as
/// [`TTL_TOUCHED_COLUMN`] (one per group, in group order).
pub fn with_ttl_column(state: RecordBatch, touched: Vec<u64>) -> Result<RecordBatch> {
    let mut fields: Vec<Arc<Field>> = state.schema().fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new(
        TTL_TOUCHED_COLUMN,
        DataType::UInt64,
        false,
    )));
    let mut columns = state.columns().to_vec();
    columns.push(Arc::new(UInt64Array::from(touched)));
    let options =
        datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(state.num_rows()));
    Ok(RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        columns,
        &options,
    )?)
}

/// The columns of a de-duplication batch.
pub fn dedup_columns(b: &RecordBatch) -> Result<(&[u64], &[u64], &[i64])> {
    if b.schema().fields() != dedup_schema().fields() {
        return Err(corrupt("de-duplication file has an unexpected schema"));
    }
    Ok((
        b.column(0).as_primitive::<UInt64Type>().values(),
        b.column(1).as_primitive::<UInt64Type>().values(),
        b.column(2).as_primitive::<Int64Type>().values(),
    ))
}

fn corrupt(msg: impl Into<String>) -> EngineError {
    EngineError::Checkpoint(msg.into())
}

fn ipc(schema: &Schema, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    // Sized up front: growing a buffer of hundreds of MB by doubling copies
    // it several times and faults in fresh pages for every copy.
    let size: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum();
    let mut buf = Vec::with_capacity(size + 64 * 1024);
    let mut w = FileWriter::try_new(&mut buf, schema)?;
    for b in batches {
        w.write(b)?;
    }
    w.finish()?;
    drop(w);
    Ok(buf)
}

fn read_ipc(name: &str, bytes: &[u8]) -> Result<Vec<RecordBatch>> {
    let r = FileReader::try_new(Cursor::new(bytes), None)
        .map_err(|e| corrupt(format!("{name}: {e}")))?;
    r.collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| corrupt(format!("{name}: {e}")))
}

/// File name of a view's state.
pub fn view_file(name: &str) -> String {
    format!("views/{name}.arrow")
}

/// File name of a stream's de-duplication set.
pub fn dedup_file(stream: &str) -> String {
    format!("dedup/{stream}.arrow")
}

impl EngineCheckpoint {
    /// The checkpoint as `(relative path, bytes)` files; [`META_FILE`]
    /// first.
    pub fn encode(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::with_capacity(self.views.len() + self.dedup.len() + 2);
        let meta = serde_json::to_vec_pretty(&self.meta)
            .map_err(|e| corrupt(format!("encoding {META_FILE}: {e}")))?;
        out.push((META_FILE.to_string(), meta));
        for (name, batch) in &self.views {
            out.push((
                view_file(name),
                ipc(&batch.schema(), std::slice::from_ref(batch))?,
            ));
        }
        for (stream, batch) in &self.dedup {
            out.push((
                dedup_file(stream),
                ipc(&batch.schema(), std::slice::from_ref(batch))?,
            ));
        }
        out.push((
            LATE_FILE.to_string(),
            ipc(&crate::late::late_events_schema(), &self.late)?,
        ));
        Ok(out)
    }

    /// Reads a checkpoint back from the files [`Self::encode`] wrote.
    pub fn decode(files: &HashMap<String, bytes::Bytes>) -> Result<Self> {
        let get = |name: &str| {
            files
                .get(name)
                .ok_or_else(|| corrupt(format!("file {name} is missing")))
        };
        let meta: CheckpointMeta = serde_json::from_slice(get(META_FILE)?)
            .map_err(|e| corrupt(format!("{META_FILE}: {e}")))?;
        if meta.format_version != FORMAT_VERSION {
            return Err(corrupt(format!(
                "{META_FILE}: format version {} (this build reads {FORMAT_VERSION})",
                meta.format_version
            )));
        }
        let one = |name: String| -> Result<RecordBatch> {
            let mut batches = read_ipc(&name, get(&name)?)?;
            match batches.len() {
                1 => Ok(batches.remove(0)),
                n => Err(corrupt(format!("{name}: {n} batches, expected 1"))),
            }
        };
        let views = meta
            .views
            .iter()
            .map(|v| Ok((v.name.clone(), one(view_file(&v.name))?)))
            .collect::<Result<_>>()?;
        let dedup = meta
            .streams
            .iter()
            .map(|s| Ok((s.stream.clone(), one(dedup_file(&s.stream))?)))
            .collect::<Result<_>>()?;
        let late = read_ipc(LATE_FILE, get(LATE_FILE)?)?;
        Ok(Self {
            meta,
            views,
            dedup,
            late,
        })
    }

    /// Total rows (view groups and remembered ids): the checkpoint's size
    /// in keys.
    pub fn keys(&self) -> usize {
        self.views.iter().map(|(_, b)| b.num_rows()).sum::<usize>()
            + self.dedup.iter().map(|(_, b)| b.num_rows()).sum::<usize>()
    }
}

/// Checks that a restored view batch fits the view's current partial
/// schema (same columns and types; session views carry two more).
pub(crate) fn check_view_schema(name: &str, batch: &RecordBatch, want: &Schema) -> Result<()> {
    let got = batch.schema();
    let n = want.fields().len();
    let fits = got.fields().len() >= n
        && got
            .fields()
            .iter()
            .zip(want.fields())
            .all(|(g, w)| g.data_type() == w.data_type());
    if fits {
        return Ok(());
    }
    Err(EngineError::Checkpoint(format!(
        "view {name}: the checkpoint's state has columns ({}) but the view now needs ({}); the \
         view's definition changed since the checkpoint",
        got.fields()
            .iter()
            .map(|f| format!("{} {}", f.name(), f.data_type()))
            .collect::<Vec<_>>()
            .join(", "),
        want.fields()
            .iter()
            .map(|f| format!("{} {}", f.name(), f.data_type()))
            .collect::<Vec<_>>()
            .join(", "),
    )))
}
