//! Session windows: each session is an accumulator group; a row that
//! bridges two sessions merges them (union-find), and merged groups are
//! combined when the view is read.

use std::sync::Arc;

use datafusion::{
    arrow::{
        array::{ArrayRef, RecordBatch},
        datatypes::SchemaRef,
        row::{RowConverter, SortField},
    },
    common::Result,
    logical_expr::{EmitTo, GroupsAccumulator},
    physical_expr::aggregate::AggregateFunctionExpr,
};

use super::*;

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
pub(super) struct Sessions {
    pub(super) spec: SessionSpec,
    /// Row converter for the other group columns (`None` if there are none).
    pub(super) others: Option<RowConverter>,
    /// Other-key bytes → (key id, live root sessions).
    pub(super) by_key: hashbrown::HashMap<Box<[u8]>, (u32, Vec<u32>)>,
    pub(super) key_bytes: Vec<Box<[u8]>>,
    pub(super) group_key: Vec<u32>,
    pub(super) start: Vec<i64>,
    pub(super) end: Vec<i64>,
    pub(super) parent: Vec<u32>,
}

impl Sessions {
    /// Row-format keys of the group columns other than the session column
    /// (`None` if there are none).
    pub(super) fn other_keys(
        &self,
        groups: &[ArrayRef],
    ) -> Result<Option<datafusion::arrow::row::Rows>> {
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

    pub(super) fn root(&self, mut g: u32) -> u32 {
        while self.parent[g as usize] != g {
            g = self.parent[g as usize];
        }
        g
    }

    /// The session group of a row with other-key `key` at time `t`.
    pub(super) fn assign(&mut self, key: &[u8], t: i64) -> u32 {
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

impl GroupState {
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
}

/// Combines merged sessions and evaluates one row per live session.
pub(super) fn evaluate_sessions(
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
