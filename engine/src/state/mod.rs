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
//!
//! By concern: `acc` (the accumulators), `incremental` (dirty groups and
//! patched output), `session` (union-find sessions), `hop` (panes and
//! window assembly), `ttl` (eviction of idle groups); this file holds the
//! key interning, merge, export/import and evaluation that tie them.

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
use xxhash_rust::xxh3::xxh3_64;

mod acc;
mod hop;
mod incremental;
mod session;
mod ttl;

use acc::Acc;
pub use hop::HopPanes;
use hop::{assemble_hop_windows, hop_panes_to_keep};
use incremental::Incremental;
pub use session::SessionSpec;
use session::{evaluate_sessions, Sessions};

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
    /// Per group: the checkpoint generation in which it last changed
    /// (see [`Self::begin_checkpoint`]; not kept for session views, which
    /// are always checkpointed whole).
    changed_in: Vec<u32>,
    /// The generation merges stamp into `changed_in`.
    ckpt_gen: u32,
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
            changed_in: Vec::new(),
            ckpt_gen: 1,
        })
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
            + self.changed_in.capacity() * 4
    }

    /// Starts a checkpoint image: returns the generation it covers (every
    /// change so far is stamped with it or an earlier one); merges from
    /// now on are stamped with the next.
    pub fn begin_checkpoint(&mut self) -> u32 {
        let g = self.ckpt_gen;
        self.ckpt_gen += 1;
        g
    }

    /// The groups changed in generation `since` or later, ascending.
    pub fn changed_since(&self, since: u32) -> Vec<usize> {
        self.changed_in
            .iter()
            .enumerate()
            .filter(|(_, c)| **c >= since)
            .map(|(g, _)| g)
            .collect()
    }

    /// Leading columns of an exported row that are the group key.
    pub fn key_columns(&self) -> usize {
        self.num_group_cols
    }

    /// True if the state can be checkpointed by changed groups: not a
    /// session view (a merge there can move groups between sessions).
    pub fn supports_delta(&self) -> bool {
        self.sessions.is_none()
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
        self.changed_in.resize(total, self.ckpt_gen);
        for &g in &indices {
            self.changed_in[g] = self.ckpt_gen;
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
    /// needs to rebuild the session bookkeeping. storepulse's aggregates
    /// encode their state in place; DataFusion's are drained with
    /// `state(EmitTo::All)` and merged straight back, so the state is
    /// unchanged.
    pub fn export(&mut self, partial_schema: &SchemaRef) -> Result<RecordBatch> {
        self.export_groups(partial_schema, None)
    }

    /// [`Self::export`] of `groups` only (ascending indices; `None`: all),
    /// one row per group in that order: an incremental checkpoint's rows.
    /// Not for session views.
    pub fn export_groups(
        &mut self,
        partial_schema: &SchemaRef,
        groups: Option<&[usize]>,
    ) -> Result<RecordBatch> {
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
        if groups.is_some() && self.sessions.is_some() {
            return datafusion::common::internal_err!(
                "session views are checkpointed whole, not by group"
            );
        }
        let rows = groups.map_or(total, <[usize]>::len);
        if total == 0 || rows == 0 {
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
            let keys = match groups {
                Some(g) => conv.convert_rows(g.iter().map(|&g| parser.parse(self.key(g)))),
                None => conv.convert_rows((0..total).map(|g| parser.parse(self.key(g)))),
            };
            columns.extend(keys?);
        }
        for acc in self.accs.iter_mut() {
            columns.extend(acc.state_of(groups, total)?);
        }
        if let Some(sess) = &self.sessions {
            columns.push(Arc::new(Int64Array::from(sess.end.clone())));
            columns.push(Arc::new(UInt32Array::from(sess.parent.clone())));
        }
        let options =
            datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(rows));
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
