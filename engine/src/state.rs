//! Keyed aggregate state of one continuous view.
//!
//! Group keys are encoded with arrow's row format and interned in a
//! `hashbrown::HashTable` (key bytes live in one contiguous buffer); each
//! aggregate keeps all groups in one DataFusion `GroupsAccumulator`. A
//! micro-batch's *partial* aggregate (group columns followed by each
//! aggregate's state columns) is merged with `merge_batch`, so the cost is
//! proportional to the batch.
//!
//! Reading is non-destructive and incremental. storepulse's own aggregates
//! ([`ReadableGroups`]) are read in place; DataFusion's are drained with
//! `state(EmitTo::All)`, the drained state is merged straight back, and a
//! scratch accumulator merged from the needed rows produces the values.
//! Groups touched since the last evaluation are marked dirty; the next
//! evaluation computes only those and patches the previous output (kept as
//! a few segments: clean rows filtered from the old ones, plus the fresh
//! rows), so reading a view under a steady trickle of updates costs the
//! touched groups, not the whole key space. Hopping and session views are
//! evaluated whole (their output rows are assembled from several groups).

use std::{ops::Range, sync::Arc};

use datafusion::{
    arrow::{
        array::{ArrayRef, RecordBatch},
        datatypes::SchemaRef,
        row::{RowConverter, SortField},
    },
    common::Result,
    logical_expr::{EmitTo, GroupsAccumulator},
    physical_expr::{aggregate::AggregateFunctionExpr, GroupsAccumulatorAdapter},
};
use hashbrown::HashTable;
use storepulse_sql::ReadableGroups;
use xxhash_rust::xxh3::xxh3_64;

/// Creates the accumulator that holds every group of one aggregate.
pub fn new_groups_accumulator(
    expr: &Arc<AggregateFunctionExpr>,
) -> Result<Box<dyn GroupsAccumulator>> {
    if expr.groups_accumulator_supported() {
        expr.create_groups_accumulator()
    } else {
        let expr = Arc::clone(expr);
        Ok(Box::new(GroupsAccumulatorAdapter::new(move || {
            expr.create_accumulator()
        })))
    }
}

/// One aggregate's accumulator of all groups.
enum Acc {
    /// storepulse's kernel aggregates: read in place.
    Readable(Box<dyn ReadableGroups>),
    /// DataFusion's aggregates: read by draining and merging back.
    Plain(Box<dyn GroupsAccumulator>),
}

impl Acc {
    fn new(expr: &Arc<AggregateFunctionExpr>) -> Result<Self> {
        match storepulse_sql::readable_groups_accumulator(expr) {
            Some(acc) => Ok(Self::Readable(acc?)),
            None => Ok(Self::Plain(new_groups_accumulator(expr)?)),
        }
    }

    fn get(&mut self) -> &mut dyn GroupsAccumulator {
        match self {
            Self::Readable(a) => a.as_mut(),
            Self::Plain(a) => a.as_mut(),
        }
    }

    fn size(&self) -> usize {
        match self {
            Self::Readable(a) => a.size(),
            Self::Plain(a) => a.size(),
        }
    }

    /// The current values of `groups` (ascending indices; all `total`
    /// groups when `groups` is `None`), the state unchanged.
    fn values(
        &mut self,
        expr: &Arc<AggregateFunctionExpr>,
        groups: Option<&[usize]>,
        total: usize,
    ) -> Result<ArrayRef> {
        let all: Vec<usize>;
        let groups = match groups {
            Some(g) => g,
            None => {
                all = (0..total).collect();
                &all
            }
        };
        match self {
            Self::Readable(a) => a.evaluate_groups(groups),
            Self::Plain(acc) => {
                let state = acc.state(EmitTo::All)?;
                let every: Vec<usize> = (0..total).collect();
                acc.merge_batch(&state, &every, total)?;
                let state = if groups.len() == total {
                    state
                } else {
                    let idx = datafusion::arrow::array::UInt32Array::from_iter_values(
                        groups.iter().map(|g| *g as u32),
                    );
                    state
                        .iter()
                        .map(|c| datafusion::arrow::compute::take(c, &idx, None))
                        .collect::<std::result::Result<Vec<_>, _>>()?
                };
                let mut scratch = new_groups_accumulator(expr)?;
                let rows: Vec<usize> = (0..groups.len()).collect();
                scratch.merge_batch(&state, &rows, groups.len())?;
                scratch.evaluate(EmitTo::All)
            }
        }
    }
}

/// Rows of the last evaluation, with the group of each row.
struct Segment {
    batch: RecordBatch,
    groups: Vec<u32>,
}

/// Groups touched since the last evaluation, and that evaluation.
#[derive(Default)]
struct Incremental {
    mark: Vec<bool>,
    dirty: Vec<u32>,
    segments: Option<Vec<Segment>>,
}

/// Output segments kept before they are concatenated into one.
const MAX_SEGMENTS: usize = 8;

/// The state of one view: group keys and one accumulator per aggregate.
pub struct GroupState {
    converter: Option<RowConverter>,
    keys: Vec<u8>,
    key_offsets: Vec<usize>,
    table: HashTable<(u64, u32)>,
    aggs: Vec<Arc<AggregateFunctionExpr>>,
    accs: Vec<Acc>,
    inc: Incremental,
    /// Column range of each aggregate's state in a partial batch.
    layout: Vec<Range<usize>>,
    num_group_cols: usize,
    scratch: Vec<usize>,
    hop: Option<HopPanes>,
    sessions: Option<Sessions>,
    /// With a state TTL: per group, the batch number of its last merge.
    touched: Option<Vec<u64>>,
    /// The number merges stamp into `touched` (see [`Self::next_batch`]).
    batch_no: u64,
    /// Hop views with a TTL: the `upto` of the last eviction. A window
    /// whose panes were all last touched at or before it is gone from the
    /// rows (its panes may stay while a neighbouring window needs them).
    hop_floor: Option<u64>,
}

/// Session windows: group column `col` is `session(ts, gap)`.
#[derive(Debug, Clone, Copy)]
pub struct SessionSpec {
    /// Index of the session group column.
    pub col: usize,
    /// Largest gap between two rows of one session.
    pub gap_ms: i64,
}

/// Session bookkeeping. Each session is an accumulator group; when a row
/// bridges two sessions they merge (union-find), and merged groups are
/// combined when the view is read.
struct Sessions {
    spec: SessionSpec,
    /// Row converter for the other group columns (`None` if there are none).
    others: Option<RowConverter>,
    /// Other-key bytes → (key id, live root sessions).
    by_key: hashbrown::HashMap<Box<[u8]>, (u32, Vec<u32>)>,
    key_bytes: Vec<Box<[u8]>>,
    group_key: Vec<u32>,
    start: Vec<i64>,
    end: Vec<i64>,
    parent: Vec<u32>,
}

impl Sessions {
    /// Row-format keys of the group columns other than the session column
    /// (`None` if there are none).
    fn other_keys(&self, groups: &[ArrayRef]) -> Result<Option<datafusion::arrow::row::Rows>> {
        let Some(conv) = &self.others else {
            return Ok(None);
        };
        let other: Vec<ArrayRef> = groups
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != self.spec.col)
            .map(|(_, c)| c.clone())
            .collect();
        Ok(Some(conv.convert_columns(&other)?))
    }

    fn root(&self, mut g: u32) -> u32 {
        while self.parent[g as usize] != g {
            g = self.parent[g as usize];
        }
        g
    }

    /// The session group of a row with other-key `key` at time `t`.
    fn assign(&mut self, key: &[u8], t: i64) -> u32 {
        let gap = self.spec.gap_ms;
        let next_key = self.key_bytes.len() as u32;
        let (key_id, roots) = self
            .by_key
            .entry_ref(key)
            .or_insert_with(|| (next_key, Vec::new()));
        if *key_id == next_key {
            self.key_bytes.push(key.into());
        }
        let (start, end) = (&mut self.start, &mut self.end);
        let hits: Vec<u32> = roots
            .iter()
            .copied()
            .filter(|g| start[*g as usize] - gap <= t && t <= end[*g as usize] + gap)
            .collect();
        let Some(&first) = hits.first() else {
            let g = start.len() as u32;
            start.push(t);
            end.push(t);
            self.parent.push(g);
            self.group_key.push(*key_id);
            roots.push(g);
            return g;
        };
        let f = first as usize;
        start[f] = start[f].min(t);
        end[f] = end[f].max(t);
        for &h in &hits[1..] {
            self.parent[h as usize] = first;
            start[f] = start[f].min(start[h as usize]);
            end[f] = end[f].max(end[h as usize]);
        }
        if hits.len() > 1 {
            roots.retain(|r| !hits[1..].contains(r));
        }
        first
    }
}

/// Hopping windows kept as panes: group column `col` holds the start of a
/// `slide_ms` pane; a window of `windows` panes is assembled on read.
#[derive(Debug, Clone, Copy)]
pub struct HopPanes {
    /// Index of the window-start group column.
    pub col: usize,
    /// Pane length (the hop's slide).
    pub slide_ms: i64,
    /// Panes per window (size / slide).
    pub windows: i64,
}

impl std::fmt::Debug for GroupState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupState")
            .field("groups", &self.num_groups())
            .field("bytes", &self.size())
            .finish()
    }
}

impl GroupState {
    /// State for a partial-aggregate schema whose first `num_group_cols`
    /// columns are the group key, followed by the aggregates' states.
    pub fn try_new(
        partial_schema: &SchemaRef,
        num_group_cols: usize,
        aggs: Vec<Arc<AggregateFunctionExpr>>,
    ) -> Result<Self> {
        let converter = if num_group_cols == 0 {
            None
        } else {
            Some(RowConverter::new(
                partial_schema.fields()[..num_group_cols]
                    .iter()
                    .map(|f| SortField::new(f.data_type().clone()))
                    .collect(),
            )?)
        };
        let mut layout = Vec::with_capacity(aggs.len());
        let mut at = num_group_cols;
        for a in &aggs {
            let n = a.state_fields()?.len();
            layout.push(at..at + n);
            at += n;
        }
        let accs = aggs.iter().map(Acc::new).collect::<Result<_>>()?;
        Ok(Self {
            converter,
            keys: Vec::new(),
            key_offsets: vec![0],
            table: HashTable::new(),
            aggs,
            accs,
            inc: Incremental::default(),
            layout,
            num_group_cols,
            scratch: Vec::new(),
            hop: None,
            sessions: None,
            touched: None,
            batch_no: 0,
            hop_floor: None,
        })
    }

    /// Tracks, per group, the batch that last touched it, so that idle
    /// groups can be evicted ([`Self::evict_touched_up_to`]). Plain,
    /// tumbling and hop window views (for hop views a group is a pane; a
    /// window row is idle when all its panes are); session windows keep
    /// bookkeeping across groups and are refused.
    pub fn enable_ttl(&mut self) -> Result<()> {
        if self.sessions.is_some() {
            return datafusion::common::plan_err!(
                "a state TTL is not supported on session() window views"
            );
        }
        self.touched = Some(vec![self.batch_no; self.num_groups()]);
        Ok(())
    }

    /// The TTL bookkeeping for a checkpoint (`None` without a TTL): per
    /// group the batch that last touched it, the batch counter and a hop
    /// view's floor.
    pub fn ttl_export(&self) -> Option<(&[u64], u64, Option<u64>)> {
        self.touched
            .as_deref()
            .map(|t| (t, self.batch_no, self.hop_floor))
    }

    /// Restores [`Self::ttl_export`] after [`Self::import`] (one stamp per
    /// group, in group order). Without a TTL (removed since the
    /// checkpoint) it is ignored.
    pub fn ttl_import(
        &mut self,
        touched: Vec<u64>,
        batch_no: u64,
        hop_floor: Option<u64>,
    ) -> Result<()> {
        if self.touched.is_none() {
            return Ok(());
        }
        if touched.len() != self.num_groups() {
            return datafusion::common::internal_err!(
                "{} TTL stamps for {} groups",
                touched.len(),
                self.num_groups()
            );
        }
        self.touched = Some(touched);
        self.batch_no = batch_no;
        if self.hop.is_some() {
            self.hop_floor = hop_floor;
        }
        Ok(())
    }

    /// Starts a new batch: the groups the next merges touch are stamped
    /// with the returned number.
    pub fn next_batch(&mut self) -> u64 {
        self.batch_no += 1;
        self.batch_no
    }

    /// Drops every group last touched in batch `upto` or before (with
    /// [`Self::enable_ttl`]); returns how many. The kept groups are
    /// exported, filtered and imported into a fresh state (the memory of
    /// the accumulators is released; the kept state is briefly held
    /// twice), and the next evaluation is a full one.
    pub fn evict_touched_up_to(&mut self, upto: u64, partial_schema: &SchemaRef) -> Result<usize> {
        use datafusion::arrow::{array::BooleanArray, compute::filter_record_batch};
        if self.hop.is_some() && self.touched.is_some() {
            // Windows go when all their panes are idle: from now on the
            // rows leave them out, whether or not their panes stay.
            self.hop_floor = Some(upto);
        }
        let Some(touched) = &self.touched else {
            return Ok(0);
        };
        let keep: Vec<bool> = match (self.hop, &self.converter) {
            (Some(hop), Some(conv)) => {
                let parser = conv.parser();
                let keys =
                    conv.convert_rows((0..self.num_groups()).map(|g| parser.parse(self.key(g))))?;
                hop_panes_to_keep(&keys, hop, touched, upto)?
            }
            _ => touched.iter().map(|t| *t > upto).collect(),
        };
        let evicted = keep.iter().filter(|k| !**k).count();
        if evicted == 0 {
            return Ok(0);
        }
        let kept_touched: Vec<u64> = touched
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(t, _)| *t)
            .collect();
        let all = self.export(partial_schema)?;
        let kept = filter_record_batch(&all, &BooleanArray::from(keep))?;
        drop(all);
        let mut fresh =
            GroupState::try_new(partial_schema, self.num_group_cols, self.aggs.clone())?;
        fresh.batch_no = self.batch_no;
        fresh.hop = self.hop;
        fresh.hop_floor = self.hop_floor;
        fresh.import(&kept)?;
        debug_assert_eq!(fresh.num_groups(), kept_touched.len());
        fresh.touched = Some(kept_touched);
        *self = fresh;
        Ok(evicted)
    }

    /// Maintains group column `spec.col` as session windows.
    pub fn set_session(&mut self, spec: SessionSpec, partial_schema: &SchemaRef) -> Result<()> {
        let fields: Vec<SortField> = partial_schema.fields()[..self.num_group_cols]
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != spec.col)
            .map(|(_, f)| SortField::new(f.data_type().clone()))
            .collect();
        let others = if fields.is_empty() {
            None
        } else {
            Some(RowConverter::new(fields)?)
        };
        self.sessions = Some(Sessions {
            spec,
            others,
            by_key: Default::default(),
            key_bytes: Vec::new(),
            group_key: Vec::new(),
            start: Vec::new(),
            end: Vec::new(),
            parent: Vec::new(),
        });
        Ok(())
    }

    /// True for a hop window view (kept as panes).
    pub fn is_hop(&self) -> bool {
        self.hop.is_some()
    }

    /// Keeps hopping windows as panes (see [`HopPanes`]).
    pub fn set_hop(&mut self, hop: HopPanes) {
        self.hop = Some(hop);
    }

    /// Number of groups held.
    pub fn num_groups(&self) -> usize {
        if let Some(s) = &self.sessions {
            return s.start.len();
        }
        if self.converter.is_none() {
            return usize::from(self.key_offsets.len() > 1);
        }
        self.key_offsets.len() - 1
    }

    /// Approximate memory held, in bytes.
    pub fn size(&self) -> usize {
        self.keys.capacity()
            + self.key_offsets.capacity() * 8
            + self.table.capacity() * 16
            + self.accs.iter().map(Acc::size).sum::<usize>()
            + self.touched.as_ref().map_or(0, |t| t.capacity() * 8)
    }

    fn key(&self, g: usize) -> &[u8] {
        &self.keys[self.key_offsets[g]..self.key_offsets[g + 1]]
    }

    /// Merges one partial-aggregate batch into the state.
    pub fn merge(&mut self, partial: &RecordBatch) -> Result<()> {
        let n = partial.num_rows();
        if n == 0 {
            return Ok(());
        }
        let mut indices = std::mem::take(&mut self.scratch);
        indices.clear();
        if let Some(sess) = &mut self.sessions {
            use datafusion::arrow::{array::AsArray, datatypes::TimestampMillisecondType};
            let groups = &partial.columns()[..self.num_group_cols];
            let ts = groups[sess.spec.col].as_primitive::<TimestampMillisecondType>();
            let rows = sess.other_keys(groups)?;
            for i in 0..n {
                let key: &[u8] = rows.as_ref().map_or(&[], |r| r.row(i).data());
                indices.push(sess.assign(key, ts.value(i)) as usize);
            }
            let total = sess.start.len();
            for (acc, range) in self.accs.iter_mut().zip(&self.layout) {
                acc.get()
                    .merge_batch(&partial.columns()[range.clone()], &indices, total)?;
            }
            self.scratch = indices;
            return Ok(());
        }
        match &self.converter {
            None => {
                if self.key_offsets.len() == 1 {
                    self.key_offsets.push(0);
                }
                indices.resize(n, 0);
            }
            Some(conv) => {
                let rows = conv.convert_columns(&partial.columns()[..self.num_group_cols])?;
                for row in rows.iter() {
                    let bytes = row.as_ref();
                    let h = xxh3_64(bytes);
                    let keys = &self.keys;
                    let offs = &self.key_offsets;
                    let found = self.table.find(h, |(eh, g)| {
                        *eh == h && &keys[offs[*g as usize]..offs[*g as usize + 1]] == bytes
                    });
                    let g = match found {
                        Some((_, g)) => *g as usize,
                        None => {
                            let g = self.key_offsets.len() - 1;
                            self.keys.extend_from_slice(bytes);
                            self.key_offsets.push(self.keys.len());
                            self.table.insert_unique(h, (h, g as u32), |(eh, _)| *eh);
                            g
                        }
                    };
                    indices.push(g);
                }
            }
        }
        let total = self.num_groups();
        for (acc, range) in self.accs.iter_mut().zip(&self.layout) {
            acc.get()
                .merge_batch(&partial.columns()[range.clone()], &indices, total)?;
        }
        if let Some(t) = &mut self.touched {
            t.resize(total, self.batch_no);
            for &g in &indices {
                t[g] = self.batch_no;
            }
        }
        if self.hop.is_none() {
            let inc = &mut self.inc;
            inc.mark.resize(total, false);
            for &g in &indices {
                if !inc.mark[g] {
                    inc.mark[g] = true;
                    inc.dirty.push(g as u32);
                }
            }
        }
        self.scratch = indices;
        Ok(())
    }

    /// The whole state as partial-aggregate columns (`partial_schema`:
    /// group columns, then each aggregate's state columns), one row per
    /// group in group order, for a checkpoint. Session views append two
    /// columns (`__session_end`, `__session_parent`) that [`Self::import`]
    /// needs to rebuild the session bookkeeping. Aggregates are drained
    /// with `state(EmitTo::All)` and merged straight back, so the state is
    /// unchanged.
    pub fn export(&mut self, partial_schema: &SchemaRef) -> Result<RecordBatch> {
        use datafusion::arrow::{
            array::{Int64Array, TimestampMillisecondArray, UInt32Array},
            datatypes::{DataType, Field, Schema},
        };
        let total = self.num_groups();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(partial_schema.fields().len() + 2);
        let mut fields: Vec<Arc<Field>> = partial_schema.fields().iter().cloned().collect();
        if self.sessions.is_some() {
            fields.push(Arc::new(Field::new(
                "__session_end",
                DataType::Int64,
                false,
            )));
            fields.push(Arc::new(Field::new(
                "__session_parent",
                DataType::UInt32,
                false,
            )));
        }
        if total == 0 {
            // Accumulators cannot emit an empty state.
            return Ok(RecordBatch::new_empty(Arc::new(Schema::new(fields))));
        }
        if let Some(sess) = &self.sessions {
            let others = match &sess.others {
                Some(conv) => {
                    let parser = conv.parser();
                    conv.convert_rows(
                        sess.group_key
                            .iter()
                            .map(|k| parser.parse(&sess.key_bytes[*k as usize])),
                    )?
                }
                None => Vec::new(),
            };
            let mut others = others.into_iter();
            for i in 0..self.num_group_cols {
                if i == sess.spec.col {
                    let start = TimestampMillisecondArray::from(sess.start.clone());
                    let dt = partial_schema.field(i).data_type();
                    columns.push(datafusion::arrow::compute::cast(&start, dt)?);
                } else {
                    columns.push(others.next().expect("one column per other key"));
                }
            }
        } else if let Some(conv) = &self.converter {
            let parser = conv.parser();
            columns.extend(conv.convert_rows((0..total).map(|g| parser.parse(self.key(g))))?);
        }
        let all: Vec<usize> = (0..total).collect();
        for acc in self.accs.iter_mut() {
            let acc = acc.get();
            let state = acc.state(EmitTo::All)?;
            acc.merge_batch(&state, &all, total)?;
            columns.extend(state);
        }
        if let Some(sess) = &self.sessions {
            columns.push(Arc::new(Int64Array::from(sess.end.clone())));
            columns.push(Arc::new(UInt32Array::from(sess.parent.clone())));
        }
        let options =
            datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(total));
        Ok(RecordBatch::try_new_with_options(
            Arc::new(Schema::new(fields)),
            columns,
            &options,
        )?)
    }

    /// Loads a state written by [`Self::export`] into this (empty) state.
    pub fn import(&mut self, batch: &RecordBatch) -> Result<()> {
        use datafusion::arrow::{
            array::AsArray,
            datatypes::{Int64Type, TimestampMillisecondType, UInt32Type},
        };
        if self.num_groups() != 0 {
            return datafusion::common::internal_err!("import into a non-empty view state");
        }
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let Some(sess) = &mut self.sessions else {
            return self.merge(batch);
        };
        let n = batch.num_rows();
        let cols = batch.columns();
        let ts = datafusion::arrow::compute::cast(
            &cols[sess.spec.col],
            &datafusion::arrow::datatypes::DataType::Timestamp(
                datafusion::arrow::datatypes::TimeUnit::Millisecond,
                None,
            ),
        )?;
        let ts = ts.as_primitive::<TimestampMillisecondType>();
        let end = cols[cols.len() - 2].as_primitive::<Int64Type>();
        let parent = cols[cols.len() - 1].as_primitive::<UInt32Type>();
        let rows = sess.other_keys(&cols[..self.num_group_cols])?;
        for g in 0..n {
            let key: &[u8] = rows.as_ref().map_or(&[], |r| r.row(g).data());
            let next_key = sess.key_bytes.len() as u32;
            let (key_id, roots) = sess
                .by_key
                .entry_ref(key)
                .or_insert_with(|| (next_key, Vec::new()));
            if *key_id == next_key {
                sess.key_bytes.push(key.into());
            }
            if parent.value(g) == g as u32 {
                roots.push(g as u32);
            }
            sess.group_key.push(*key_id);
            sess.start.push(ts.value(g));
            sess.end.push(end.value(g));
            sess.parent.push(parent.value(g));
        }
        let all: Vec<usize> = (0..n).collect();
        for (acc, range) in self.accs.iter_mut().zip(&self.layout) {
            acc.get().merge_batch(&cols[range.clone()], &all, n)?;
        }
        Ok(())
    }

    /// Evaluates every group: group columns followed by each aggregate's
    /// final value, in `schema` (the view's aggregate schema), as one or
    /// more batches.
    pub fn evaluate(&mut self, schema: &SchemaRef) -> Result<Vec<RecordBatch>> {
        let total = self.num_groups();
        if total == 0 {
            return Ok(vec![RecordBatch::new_empty(schema.clone())]);
        }
        if let Some(sess) = &self.sessions {
            let mut accs: Vec<&mut dyn GroupsAccumulator> =
                self.accs.iter_mut().map(Acc::get).collect();
            return Ok(vec![evaluate_sessions(
                sess,
                &mut accs,
                &self.aggs,
                schema,
                self.num_group_cols,
            )?]);
        }
        if let (Some(hop), Some(conv)) = (self.hop, &self.converter) {
            let parser = conv.parser();
            let keys = conv.convert_rows((0..total).map(|g| parser.parse(self.key(g))))?;
            let all: Vec<usize> = (0..total).collect();
            let mut states = Vec::with_capacity(self.accs.len());
            for acc in self.accs.iter_mut() {
                let acc = acc.get();
                let state = acc.state(EmitTo::All)?;
                acc.merge_batch(&state, &all, total)?;
                states.push(state);
            }
            let live = self.touched.as_deref().zip(self.hop_floor);
            let columns = assemble_hop_windows(conv, &keys, &states, &self.aggs, hop, live)?;
            return Ok(vec![finish(columns, schema)?]);
        }
        self.evaluate_incremental(schema, total)
    }

    /// Evaluates the dirty groups and patches the previous output (or
    /// evaluates everything when most groups changed).
    fn evaluate_incremental(
        &mut self,
        schema: &SchemaRef,
        total: usize,
    ) -> Result<Vec<RecordBatch>> {
        if self.inc.dirty.is_empty() {
            if let Some(segments) = &self.inc.segments {
                return Ok(segments.iter().map(|s| s.batch.clone()).collect());
            }
        }
        let mut dirty = std::mem::take(&mut self.inc.dirty);
        let whole = self.inc.segments.is_none() || dirty.len() * 2 >= total;
        if whole {
            dirty.clear();
            dirty.extend(0..total as u32);
        } else {
            dirty.sort_unstable();
        }
        let groups: Vec<usize> = dirty.iter().map(|g| *g as usize).collect();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        if let Some(conv) = &self.converter {
            let parser = conv.parser();
            let rows = groups.iter().map(|&g| parser.parse(self.key(g)));
            columns.extend(conv.convert_rows(rows)?);
        }
        let subset = (!whole).then_some(groups.as_slice());
        for (acc, expr) in self.accs.iter_mut().zip(&self.aggs) {
            columns.push(acc.values(expr, subset, total)?);
        }
        let fresh = Segment {
            batch: finish(columns, schema)?,
            groups: dirty,
        };
        let mut segments = match self.inc.segments.take() {
            Some(old) if !whole => {
                let mark = &self.inc.mark;
                let mut kept = Vec::with_capacity(old.len() + 1);
                for seg in old {
                    if !seg.groups.iter().any(|g| mark[*g as usize]) {
                        kept.push(seg);
                        continue;
                    }
                    let keep = datafusion::arrow::array::BooleanArray::from_iter(
                        seg.groups.iter().map(|g| Some(!mark[*g as usize])),
                    );
                    let batch = datafusion::arrow::compute::filter_record_batch(&seg.batch, &keep)?;
                    if batch.num_rows() > 0 {
                        let groups = seg
                            .groups
                            .iter()
                            .copied()
                            .filter(|g| !mark[*g as usize])
                            .collect();
                        kept.push(Segment { batch, groups });
                    }
                }
                kept
            }
            _ => Vec::new(),
        };
        for g in &fresh.groups {
            self.inc.mark[*g as usize] = false;
        }
        segments.push(fresh);
        if segments.len() > MAX_SEGMENTS {
            let batches: Vec<&RecordBatch> = segments.iter().map(|s| &s.batch).collect();
            let batch = datafusion::arrow::compute::concat_batches(schema, batches)?;
            let groups = segments
                .iter()
                .flat_map(|s| s.groups.iter().copied())
                .collect();
            segments = vec![Segment { batch, groups }];
        }
        let out = segments.iter().map(|s| s.batch.clone()).collect();
        self.inc.segments = Some(segments);
        Ok(out)
    }
}

/// Combines merged sessions and evaluates one row per live session.
fn evaluate_sessions(
    sess: &Sessions,
    accs: &mut [&mut dyn GroupsAccumulator],
    aggs: &[Arc<AggregateFunctionExpr>],
    schema: &SchemaRef,
    num_group_cols: usize,
) -> Result<RecordBatch> {
    use datafusion::arrow::array::TimestampMillisecondArray;
    let total = sess.start.len();
    let mut out_of_root = vec![u32::MAX; total];
    let mut roots = Vec::new();
    let mut remap = Vec::with_capacity(total);
    for g in 0..total as u32 {
        let r = sess.root(g) as usize;
        if out_of_root[r] == u32::MAX {
            out_of_root[r] = roots.len() as u32;
            roots.push(r);
        }
        remap.push(out_of_root[r] as usize);
    }
    let all: Vec<usize> = (0..total).collect();
    let mut values = Vec::with_capacity(accs.len());
    for (acc, expr) in accs.iter_mut().zip(aggs) {
        let state = acc.state(EmitTo::All)?;
        acc.merge_batch(&state, &all, total)?;
        let mut scratch = new_groups_accumulator(expr)?;
        scratch.merge_batch(&state, &remap, roots.len())?;
        values.push(scratch.evaluate(EmitTo::All)?);
    }
    let mut others = match &sess.others {
        Some(conv) => {
            let parser = conv.parser();
            conv.convert_rows(
                roots
                    .iter()
                    .map(|r| parser.parse(&sess.key_bytes[sess.group_key[*r] as usize])),
            )?
        }
        None => Vec::new(),
    }
    .into_iter();
    let starts =
        TimestampMillisecondArray::from(roots.iter().map(|r| sess.start[*r]).collect::<Vec<_>>());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for i in 0..num_group_cols {
        if i == sess.spec.col {
            columns.push(Arc::new(starts.clone()));
        } else {
            columns.push(others.next().expect("one column per other key"));
        }
    }
    columns.extend(values);
    finish(columns, schema)
}

/// Casts evaluated columns to the view's aggregate schema.
fn finish(columns: Vec<ArrayRef>, schema: &SchemaRef) -> Result<RecordBatch> {
    let columns = columns
        .into_iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            if c.data_type() == f.data_type() {
                Ok(c)
            } else {
                datafusion::arrow::compute::cast(&c, f.data_type()).map_err(Into::into)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// Builds every hopping window from its panes: pane `p` contributes to the
/// windows starting at `p`, `p - slide`, ... (`windows` of them). Pane
/// states are merged into one scratch accumulator per aggregate.
fn assemble_hop_windows(
    conv: &RowConverter,
    pane_keys: &[ArrayRef],
    states: &[Vec<ArrayRef>],
    aggs: &[Arc<AggregateFunctionExpr>],
    hop: HopPanes,
    live: Option<(&[u64], u64)>,
) -> Result<Vec<ArrayRef>> {
    use datafusion::arrow::{
        array::{Array, AsArray},
        datatypes::TimestampMillisecondType,
    };
    let panes = pane_keys[hop.col].as_primitive::<TimestampMillisecondType>();
    let mut window_rows = conv.empty_rows(panes.len() * 2, panes.len() * 64);
    let mut table: HashTable<(u64, u32)> = HashTable::new();
    let mut scratch = aggs
        .iter()
        .map(new_groups_accumulator)
        .collect::<Result<Vec<_>>>()?;
    let mut indices = Vec::with_capacity(panes.len());
    // With a TTL: per window, the last batch that touched any of its panes.
    let mut last_touch: Vec<u64> = Vec::new();
    for k in 0..hop.windows {
        let shifted = panes.unary::<_, TimestampMillisecondType>(|p| p - k * hop.slide_ms);
        let shifted: ArrayRef = Arc::new(shifted.with_data_type(panes.data_type().clone()));
        let mut cols = pane_keys.to_vec();
        cols[hop.col] = shifted;
        let rows = conv.convert_columns(&cols)?;
        indices.clear();
        for row in rows.iter() {
            let h = xxh3_64(row.as_ref());
            let g = match table.find(h, |(eh, g)| *eh == h && window_rows.row(*g as usize) == row) {
                Some((_, g)) => *g as usize,
                None => {
                    let g = window_rows.num_rows();
                    window_rows.push(row);
                    table.insert_unique(h, (h, g as u32), |(eh, _)| *eh);
                    g
                }
            };
            indices.push(g);
        }
        let total = window_rows.num_rows();
        for (acc, state) in scratch.iter_mut().zip(states) {
            acc.merge_batch(state, &indices, total)?;
        }
        if let Some((touched, _)) = live {
            last_touch.resize(total, 0);
            for (pane, &g) in indices.iter().enumerate() {
                last_touch[g] = last_touch[g].max(touched[pane]);
            }
        }
    }
    let mut columns = conv.convert_rows(window_rows.iter())?;
    for mut acc in scratch {
        columns.push(acc.evaluate(EmitTo::All)?);
    }
    if let Some((_, floor)) = live {
        let keep = datafusion::arrow::array::BooleanArray::from(
            last_touch.iter().map(|t| *t > floor).collect::<Vec<bool>>(),
        );
        if keep.false_count() > 0 {
            columns = columns
                .iter()
                .map(|c| datafusion::arrow::compute::filter(c, &keep))
                .collect::<std::result::Result<_, _>>()?;
        }
    }
    Ok(columns)
}

/// Which panes of a hop view survive an eviction at `upto`: a pane stays
/// while some window containing it is live, i.e. while a pane of the same
/// key within `(windows - 1) * slide` of it was touched after `upto`.
fn hop_panes_to_keep(
    keys: &[ArrayRef],
    hop: HopPanes,
    touched: &[u64],
    upto: u64,
) -> Result<Vec<bool>> {
    use datafusion::arrow::{
        array::{Array, AsArray},
        datatypes::TimestampMillisecondType,
    };
    let panes = keys[hop.col].as_primitive::<TimestampMillisecondType>();
    let others: Vec<usize> = (0..keys.len()).filter(|i| *i != hop.col).collect();
    let rows = if others.is_empty() {
        None
    } else {
        let conv = RowConverter::new(
            others
                .iter()
                .map(|i| SortField::new(keys[*i].data_type().clone()))
                .collect(),
        )?;
        let cols: Vec<ArrayRef> = others.iter().map(|i| keys[*i].clone()).collect();
        Some(conv.convert_columns(&cols)?)
    };
    let key = |g: usize| rows.as_ref().map_or(&[][..], |r| r.row(g).data());
    let mut active: hashbrown::HashMap<&[u8], Vec<i64>> = hashbrown::HashMap::new();
    for (g, t) in touched.iter().enumerate() {
        if *t > upto && panes.is_valid(g) {
            active.entry(key(g)).or_default().push(panes.value(g));
        }
    }
    for starts in active.values_mut() {
        starts.sort_unstable();
    }
    let reach = (hop.windows - 1) * hop.slide_ms;
    Ok((0..panes.len())
        .map(|g| {
            if touched[g] > upto || panes.is_null(g) {
                return true;
            }
            let p = panes.value(g);
            active.get(key(g)).is_some_and(|starts| {
                let i = starts.partition_point(|q| *q < p - reach);
                i < starts.len() && starts[i] <= p + reach
            })
        })
        .collect())
}
