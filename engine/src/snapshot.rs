//! Consistent read snapshots and the table providers that serve them.
//!
//! A [`Snapshot`] holds the evaluated contents of every materialized view
//! and `late_events` at one engine epoch. A query pins one snapshot for its
//! whole execution by putting it in the session config (see
//! [`crate::EngineHandle::query`]); [`ViewStateTable`] and
//! [`SnapshotRowsTable`] read from the pinned snapshot, or from the latest
//! published one when none is pinned.
//!
//! [`BatchSlot`] is the other direction: the engine places a micro-batch in
//! a stream's slot and re-executes each view's partial-aggregate plan, whose
//! scan ([`SlotPartition`], a DataFusion `PartitionStream`) yields the
//! slot's batches as a `SendableRecordBatchStream`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
};

use async_trait::async_trait;
use datafusion::{
    arrow::{array::RecordBatch, datatypes::SchemaRef},
    catalog::{Session, TableProvider},
    common::Result,
    datasource::{memory::MemorySourceConfig, TableType},
    execution::TaskContext,
    logical_expr::Expr,
    physical_plan::{
        stream::RecordBatchStreamAdapter, streaming::PartitionStream, ExecutionPlan,
        SendableRecordBatchStream,
    },
};

/// Evaluated view contents at one engine epoch.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Engine epoch (number of batches applied) the snapshot reflects.
    pub epoch: u64,
    /// View name → its aggregate rows.
    pub views: HashMap<String, Arc<Vec<RecordBatch>>>,
    /// Rows of `late_events`.
    pub late_events: Arc<Vec<RecordBatch>>,
    /// Rows of `store_duplicates`.
    pub duplicates: Arc<Vec<RecordBatch>>,
    /// The event time the views are "as of" (`engine_clock.as_of`).
    pub as_of: Option<i64>,
}

/// The latest published snapshot, shared by the engine and the providers.
#[derive(Debug, Default, Clone)]
pub struct SnapshotCell(Arc<RwLock<Arc<Snapshot>>>);

impl SnapshotCell {
    /// The latest snapshot.
    pub fn load(&self) -> Arc<Snapshot> {
        self.0.read().expect("snapshot lock").clone()
    }
    /// Publishes a new snapshot.
    pub fn store(&self, s: Arc<Snapshot>) {
        *self.0.write().expect("snapshot lock") = s;
    }
}

/// Pins a snapshot for one query (a DataFusion config extension).
#[derive(Debug, Clone, Default)]
pub struct PinnedSnapshot(pub Option<Arc<Snapshot>>);

fn pinned_or_latest(state: &dyn Session, cell: &SnapshotCell) -> Arc<Snapshot> {
    state
        .config()
        .get_extension::<PinnedSnapshot>()
        .and_then(|p| p.0.clone())
        .unwrap_or_else(|| cell.load())
}

/// Rows per slice handed to the query engine: a view is evaluated into one
/// large batch, which DataFusion cannot spread over cores; zero-copy slices
/// dealt round-robin into `partitions` partitions can be.
const SLICE_ROWS: usize = 8192;

pub(crate) fn memory_exec(
    batches: &[RecordBatch],
    schema: SchemaRef,
    projection: Option<&Vec<usize>>,
    partitions: usize,
) -> Result<Arc<dyn ExecutionPlan>> {
    let n = partitions.max(1);
    let mut parts: Vec<Vec<RecordBatch>> = vec![Vec::new(); n];
    let mut i = 0;
    for b in batches {
        let mut off = 0;
        while off < b.num_rows() {
            let len = SLICE_ROWS.min(b.num_rows() - off);
            parts[i % n].push(b.slice(off, len));
            off += len;
            i += 1;
        }
    }
    if i < parts.len() {
        parts.truncate(i.max(1));
    }
    let exec = MemorySourceConfig::try_new_exec(&parts, schema, projection.cloned())?;
    Ok(exec)
}

/// The aggregate rows of one materialized view (an internal table the
/// view's query-time plan reads from).
#[derive(Debug)]
pub struct ViewStateTable {
    /// View name (key in [`Snapshot::views`]).
    pub view: String,
    /// Aggregate schema.
    pub schema: SchemaRef,
    /// Latest snapshot, used when the query did not pin one.
    pub cell: SnapshotCell,
}

#[async_trait]
impl TableProvider for ViewStateTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn table_type(&self) -> TableType {
        TableType::Base
    }
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let snap = pinned_or_latest(state, &self.cell);
        let batches = snap.views.get(&self.view).cloned().unwrap_or_default();
        memory_exec(
            &batches,
            self.schema.clone(),
            projection,
            state.config().target_partitions(),
        )
    }
}

/// The schema of `store_duplicates`: per store and stream, the duplicate
/// events dropped (a re-upload of what was already received) and the event
/// time of the latest.
pub fn duplicates_schema() -> SchemaRef {
    use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    Arc::new(Schema::new(vec![
        Field::new("store_id", DataType::Utf8, false),
        Field::new("stream", DataType::Utf8, false),
        Field::new("duplicates", DataType::Int64, false),
        Field::new(
            "last_duplicate_ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
    ]))
}

/// The rows of `store_duplicates` from `(stream, store, count, latest event
/// time)`.
pub fn duplicates_batch(rows: &[(&str, &str, u64, i64)]) -> Result<RecordBatch> {
    use datafusion::arrow::array::{Int64Array, StringArray, TimestampMillisecondArray};
    Ok(RecordBatch::try_new(
        duplicates_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.2 as i64),
            )),
            Arc::new(
                TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.3))
                    .with_timezone("UTC"),
            ),
        ],
    )?)
}

/// Which rows of the snapshot a [`SnapshotRowsTable`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotRows {
    /// `late_events`: the rows later than the allowed lateness.
    LateEvents,
    /// `store_duplicates`: duplicates dropped per store and stream.
    Duplicates,
}

impl SnapshotRows {
    fn schema(self) -> SchemaRef {
        match self {
            Self::LateEvents => crate::late::late_events_schema(),
            Self::Duplicates => duplicates_schema(),
        }
    }
    fn of(self, s: &Snapshot) -> &Arc<Vec<RecordBatch>> {
        match self {
            Self::LateEvents => &s.late_events,
            Self::Duplicates => &s.duplicates,
        }
    }
}

/// A system table whose rows the snapshot carries (`late_events`,
/// `store_duplicates`), read from the query's pinned snapshot.
#[derive(Debug)]
pub struct SnapshotRowsTable {
    /// Latest snapshot, used when the query did not pin one.
    pub cell: SnapshotCell,
    /// Which rows.
    pub rows: SnapshotRows,
}

#[async_trait]
impl TableProvider for SnapshotRowsTable {
    fn schema(&self) -> SchemaRef {
        self.rows.schema()
    }
    fn table_type(&self) -> TableType {
        TableType::Base
    }
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let snap = pinned_or_latest(state, &self.cell);
        memory_exec(
            self.rows.of(&snap),
            self.schema(),
            projection,
            state.config().target_partitions(),
        )
    }
}

/// `engine_clock(as_of)`: one row, the snapshot's event time — the largest
/// stream watermark (once a stream is final, its largest event time). The
/// retail views measure recency, velocity and cover at this instant.
#[derive(Debug)]
pub struct ClockTable {
    /// Latest snapshot, used when the query did not pin one.
    pub cell: SnapshotCell,
}

impl ClockTable {
    /// The table's schema.
    pub fn table_schema() -> SchemaRef {
        Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
            datafusion::arrow::datatypes::Field::new(
                "as_of",
                datafusion::arrow::datatypes::DataType::Timestamp(
                    datafusion::arrow::datatypes::TimeUnit::Millisecond,
                    Some("UTC".into()),
                ),
                true,
            ),
        ]))
    }

    /// The one-row batch for `as_of`.
    pub fn batch(as_of: Option<i64>) -> Result<RecordBatch> {
        let a = datafusion::arrow::array::TimestampMillisecondArray::from(vec![as_of])
            .with_timezone("UTC");
        Ok(RecordBatch::try_new(
            Self::table_schema(),
            vec![Arc::new(a)],
        )?)
    }
}

#[async_trait]
impl TableProvider for ClockTable {
    fn schema(&self) -> SchemaRef {
        Self::table_schema()
    }
    fn table_type(&self) -> TableType {
        // A one-row system table, not a view: snapshots and the view
        // listings leave it out.
        TableType::Base
    }
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let snap = pinned_or_latest(state, &self.cell);
        memory_exec(&[Self::batch(snap.as_of)?], self.schema(), projection, 1)
    }
}

/// Where the engine places the micro-batch a stream's views apply next.
#[derive(Debug, Default)]
pub struct BatchSlot(Mutex<Vec<RecordBatch>>);

impl BatchSlot {
    /// Replaces the slot's contents.
    pub fn set(&self, batches: Vec<RecordBatch>) {
        *self.0.lock().expect("slot lock") = batches;
    }
    fn get(&self) -> Vec<RecordBatch> {
        self.0.lock().expect("slot lock").clone()
    }
}

/// A `PartitionStream` over a [`BatchSlot`]: each execution yields the
/// slot's current batches.
#[derive(Debug)]
pub struct SlotPartition {
    /// The stream's schema.
    pub schema: SchemaRef,
    /// The slot.
    pub slot: Arc<BatchSlot>,
}

impl PartitionStream for SlotPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }
    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batches = self.slot.get();
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::iter(batches.into_iter().map(Ok)),
        ))
    }
}

/// A stream's name in the serving context: it has the stream's schema (so
/// `DESCRIBE sales` works) but scanning it explains what to do instead.
#[derive(Debug)]
pub struct StreamStub {
    /// The stream.
    pub stream: storepulse_ingest::StreamKind,
}

#[async_trait]
impl TableProvider for StreamStub {
    fn schema(&self) -> SchemaRef {
        self.stream.schema()
    }
    fn table_type(&self) -> TableType {
        TableType::Temporary
    }
    async fn scan(
        &self,
        _state: &dyn Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        datafusion::common::plan_err!(
            "'{}' is a stream, not a table: streams are not kept; query a materialized view \
             over it (CREATE MATERIALIZED VIEW ... FROM {} GROUP BY ...), or late_events",
            self.stream,
            self.stream
        )
    }
}
