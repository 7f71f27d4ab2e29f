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
//! rows, JSON for the rest); `storepulse-lake` stores them with a manifest
//! written last.
//!
//! **Incremental images.** [`Engine::checkpoint_incremental`](crate::Engine::checkpoint_incremental)
//! writes a view as a *delta* when it can: only the groups changed since
//! the view's last stored image, whole rows (a group's full partial state,
//! not an increment), so restoring is "last row per group key wins" over
//! the chain `full image, delta, delta, ...` ([`resolve_chain`]). A view is
//! written whole when it has no stored image yet (a fresh start, a new
//! view, or a restore from a checkpoint that is not the store's newest; a
//! view restored from the newest extends its chain), after groups were
//! evicted (`state_ttl`: a delta cannot say "gone"), for session views (a merge can move groups between sessions),
//! when its chain holds [`MAX_DELTAS`] deltas, or when the deltas since its
//! last full image would add up to more rows than that image (so a restore
//! reads at most twice the state). A chain advances only once the store
//! reports the image stored ([`Engine::checkpoint_stored`](crate::Engine::checkpoint_stored));
//! a failed write leaves it where it was, so the next delta covers the
//! failed one's changes too.

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

/// Deltas a view's chain holds at most before its next image is whole.
pub const MAX_DELTAS: u32 = 16;

/// The engine's state at one epoch (see the module docs).
#[derive(Debug, Clone)]
pub struct EngineCheckpoint {
    /// Everything but rows.
    pub meta: CheckpointMeta,
    /// Each view's partial-aggregate rows, in the order of `meta.views`.
    pub views: Vec<ViewImage>,
    /// Each stream's de-duplication set (`hash_hi`, `hash_lo`, `ts`), by
    /// stream name.
    pub dedup: Vec<(String, RecordBatch)>,
    /// The `late_events` rows held in memory.
    pub late: Vec<RecordBatch>,
}

/// One view's rows in a checkpoint.
#[derive(Debug, Clone)]
pub struct ViewImage {
    /// View name.
    pub name: String,
    /// Written: one batch, the whole state or (if [`ViewMeta::delta`]) the
    /// changed groups. Read back: the chain, the whole image first and
    /// then each delta, oldest first ([`resolve_chain`] folds it).
    pub parts: Vec<RecordBatch>,
    /// The view's checkpoint generation this image covers (what
    /// [`Engine::checkpoint_stored`](crate::Engine::checkpoint_stored)
    /// hands back); 0 when read from a store.
    pub generation: u32,
}

impl ViewImage {
    /// Rows in all parts.
    pub fn rows(&self) -> usize {
        self.parts.iter().map(RecordBatch::num_rows).sum()
    }
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
    /// Groups held (for a delta: in the whole state, which the resolved
    /// chain must reproduce).
    pub groups: u64,
    /// The image holds only the groups changed since the view's previous
    /// image (`views/<name>.delta.arrow`; see the module docs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delta: bool,
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
    /// Duplicates per store: `(store_id, count, latest event time)`
    /// (absent in checkpoints written before it was kept).
    #[serde(default)]
    pub duplicates_by_store: Vec<(String, u64, i64)>,
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

/// File name of a view's state (`delta`: an incremental image).
pub fn view_file(name: &str, delta: bool) -> String {
    if delta {
        format!("views/{name}.delta.arrow")
    } else {
        format!("views/{name}.arrow")
    }
}

/// File name of a stream's de-duplication set.
pub fn dedup_file(stream: &str) -> String {
    format!("dedup/{stream}.arrow")
}

impl EngineCheckpoint {
    /// The checkpoint as `(relative path, bytes)` files; [`META_FILE`]
    /// first.
    pub fn encode(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.files().collect()
    }

    /// The files of [`Self::encode`], each encoded when the iterator
    /// reaches it: a writer that stores each before taking the next holds
    /// one file's bytes at a time, not the whole checkpoint's (at chain
    /// size a view's file is hundreds of MB).
    pub fn files(&self) -> impl Iterator<Item = Result<(String, Vec<u8>)>> + '_ {
        let meta = std::iter::once_with(|| {
            let meta = serde_json::to_vec_pretty(&self.meta)
                .map_err(|e| corrupt(format!("encoding {META_FILE}: {e}")))?;
            Ok((META_FILE.to_string(), meta))
        });
        let views = self.views.iter().zip(&self.meta.views).map(|(v, m)| {
            let [batch] = v.parts.as_slice() else {
                return Err(corrupt(format!(
                    "view {}: {} parts to write, expected 1",
                    v.name,
                    v.parts.len()
                )));
            };
            Ok((
                view_file(&v.name, m.delta),
                ipc(&batch.schema(), std::slice::from_ref(batch))?,
            ))
        });
        let dedup = self.dedup.iter().map(|(stream, batch)| {
            Ok((
                dedup_file(stream),
                ipc(&batch.schema(), std::slice::from_ref(batch))?,
            ))
        });
        let late = std::iter::once_with(|| {
            Ok((
                LATE_FILE.to_string(),
                ipc(&crate::late::late_events_schema(), &self.late)?,
            ))
        });
        meta.chain(views).chain(dedup).chain(late)
    }

    /// Reads a checkpoint back from the files [`Self::encode`] wrote. A
    /// view written as a delta needs its chain: `chains` maps its name to
    /// the keys in `files` of the chain's files, whole image first (the
    /// store knows where they are).
    pub fn decode(
        files: &HashMap<String, bytes::Bytes>,
        chains: &HashMap<String, Vec<String>>,
    ) -> Result<Self> {
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
            .map(|v| {
                let parts = if v.delta {
                    let Some(chain) = chains.get(&v.name).filter(|c| !c.is_empty()) else {
                        return Err(corrupt(format!(
                            "view {} is a delta but no earlier image of it is known",
                            v.name
                        )));
                    };
                    chain
                        .iter()
                        .map(|f| one(f.clone()))
                        .collect::<Result<_>>()?
                } else {
                    vec![one(view_file(&v.name, false))?]
                };
                Ok(ViewImage {
                    name: v.name.clone(),
                    parts,
                    generation: 0,
                })
            })
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
        self.views.iter().map(ViewImage::rows).sum::<usize>()
            + self.dedup.iter().map(|(_, b)| b.num_rows()).sum::<usize>()
    }
}

/// One view's state from its chain (whole image, then deltas, oldest
/// first): every group's row from the newest part that has it, in the
/// order the groups first appear. `key_columns` leading columns are the
/// group key.
pub fn resolve_chain(parts: Vec<RecordBatch>, key_columns: usize) -> Result<RecordBatch> {
    use datafusion::arrow::{
        array::UInt32Array,
        compute::{concat_batches, take_record_batch},
        row::{RowConverter, SortField},
    };
    if parts.len() <= 1 {
        return parts
            .into_iter()
            .next()
            .ok_or_else(|| corrupt("a view image without rows"));
    }
    let schema = parts[0].schema();
    if let Some(p) = parts
        .iter()
        .find(|p| p.schema().fields() != schema.fields())
    {
        return Err(corrupt(format!(
            "the parts of a view's chain differ in columns ({} vs {})",
            p.schema(),
            schema
        )));
    }
    let all = concat_batches(&schema, &parts)?;
    drop(parts);
    if key_columns == 0 {
        // One group: the newest row.
        let n = all.num_rows();
        return Ok(all.slice(n.saturating_sub(1), n.min(1)));
    }
    let conv = RowConverter::new(
        schema.fields()[..key_columns]
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect(),
    )?;
    let rows = conv.convert_columns(&all.columns()[..key_columns])?;
    // Key -> the newest row (the rows of a later part come later).
    let mut newest: hashbrown::HashMap<&[u8], u32> =
        hashbrown::HashMap::with_capacity(all.num_rows());
    let mut first_seen: Vec<&[u8]> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let key = r.data();
        if newest.insert(key, i as u32).is_none() {
            first_seen.push(key);
        }
    }
    let idx = UInt32Array::from_iter_values(first_seen.iter().map(|k| newest[k]));
    Ok(take_record_batch(&all, &idx)?)
}

/// Where a view stands in its chain of stored images (see the module
/// docs): decides whether its next image may be a delta.
#[derive(Debug, Default)]
pub(crate) struct ImageChain {
    /// The newest stored image; `None`: the next image is whole.
    stored: Option<Stored>,
    /// The image taken and not yet reported stored.
    pending: Option<Pending>,
}

#[derive(Debug, Clone, Copy)]
struct Stored {
    generation: u32,
    base_rows: usize,
    deltas: u32,
    delta_rows: usize,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    generation: u32,
    delta: bool,
    rows: usize,
}

impl ImageChain {
    /// The generation a delta would start from, if the next image may be
    /// one (a stored image to build on, fewer than [`MAX_DELTAS`] deltas).
    pub(crate) fn delta_since(&self) -> Option<u32> {
        self.stored
            .filter(|s| s.deltas < MAX_DELTAS)
            .map(|s| s.generation + 1)
    }

    /// True if a delta of `changed` rows keeps the deltas since the last
    /// whole image at most as many rows as it.
    pub(crate) fn delta_fits(&self, changed: usize) -> bool {
        self.stored
            .is_some_and(|s| s.delta_rows + changed <= s.base_rows)
    }

    /// An image of `rows` rows covering `generation` was taken.
    pub(crate) fn taken(&mut self, generation: u32, delta: bool, rows: usize) {
        self.pending = Some(Pending {
            generation,
            delta,
            rows,
        });
    }

    /// The image of `generation` is stored: the chain advances.
    pub(crate) fn stored(&mut self, generation: u32) {
        let Some(p) = self.pending.filter(|p| p.generation == generation) else {
            return;
        };
        self.pending = None;
        self.stored = match (p.delta, self.stored) {
            (true, Some(s)) => Some(Stored {
                generation,
                deltas: s.deltas + 1,
                delta_rows: s.delta_rows + p.rows,
                ..s
            }),
            (true, None) => None,
            (false, _) => Some(Stored {
                generation,
                base_rows: p.rows,
                deltas: 0,
                delta_rows: 0,
            }),
        };
    }

    /// The view was restored from a stored chain covering `generation`.
    pub(crate) fn adopt(
        &mut self,
        generation: u32,
        base_rows: usize,
        deltas: u32,
        delta_rows: usize,
    ) {
        self.pending = None;
        self.stored = Some(Stored {
            generation,
            base_rows,
            deltas,
            delta_rows,
        });
    }

    /// Forgets the chain: the next image is whole.
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
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

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{AsArray, StringArray};

    use super::*;

    fn part(keys: &[&str], values: &[i64]) -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("k", DataType::Utf8, false),
                Field::new("v", DataType::Int64, false),
            ])),
            vec![
                Arc::new(StringArray::from(keys.to_vec())),
                Arc::new(Int64Array::from(values.to_vec())),
            ],
        )
        .unwrap()
    }

    fn rows(b: &RecordBatch) -> Vec<(String, i64)> {
        let k = b.column(0).as_string::<i32>();
        let v = b.column(1).as_primitive::<Int64Type>();
        (0..b.num_rows())
            .map(|i| (k.value(i).to_string(), v.value(i)))
            .collect()
    }

    #[test]
    fn a_chain_resolves_to_the_newest_row_of_every_group() {
        let whole = part(&["a", "b", "c"], &[1, 2, 3]);
        let d1 = part(&["b"], &[20]);
        let d2 = part(&["d", "b"], &[4, 200]);
        let got = resolve_chain(vec![whole.clone(), d1, d2], 1).unwrap();
        let want = [("a", 1), ("b", 200), ("c", 3), ("d", 4)];
        assert_eq!(rows(&got), want.map(|(k, v)| (k.to_string(), v)).to_vec());
        assert_eq!(
            rows(&resolve_chain(vec![whole.clone()], 1).unwrap()),
            rows(&whole)
        );
        // No key columns: one group, the newest row.
        let global = resolve_chain(vec![part(&["x"], &[1]), part(&["x"], &[9])], 0).unwrap();
        assert_eq!(rows(&global), vec![("x".to_string(), 9)]);
        assert!(resolve_chain(vec![], 1).is_err());
    }

    #[test]
    fn a_chain_is_bounded_in_deltas_and_rows_and_advances_only_when_stored() {
        let mut c = ImageChain::default();
        assert_eq!(c.delta_since(), None, "nothing stored: whole");
        c.taken(1, false, 100);
        assert_eq!(c.delta_since(), None, "taken but not stored yet");
        c.stored(1);
        assert_eq!(c.delta_since(), Some(2));
        assert!(c.delta_fits(100) && !c.delta_fits(101));
        // A delta whose write failed (never reported stored) changes nothing;
        // a report for another generation is ignored.
        c.taken(2, true, 60);
        c.stored(7);
        assert_eq!(c.delta_since(), Some(2));
        c.taken(3, true, 60);
        c.stored(3);
        assert_eq!(c.delta_since(), Some(4));
        assert!(c.delta_fits(40) && !c.delta_fits(41), "60 + 40 rows of 100");
        for g in 4..4 + MAX_DELTAS - 1 {
            c.taken(g, true, 0);
            c.stored(g);
        }
        assert_eq!(c.delta_since(), None, "{MAX_DELTAS} deltas: whole");
        c.taken(40, false, 10);
        c.stored(40);
        assert_eq!(c.delta_since(), Some(41));
        c.reset();
        assert_eq!(c.delta_since(), None);
    }
}
