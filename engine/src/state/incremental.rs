//! Incremental reads: groups touched since the last evaluation are marked
//! dirty; the next evaluation computes only those and patches the previous
//! output, kept as a few segments.

use datafusion::{
    arrow::{
        array::{ArrayRef, RecordBatch},
        datatypes::SchemaRef,
    },
    common::Result,
};

use super::*;

/// Rows of the last evaluation, with the group of each row.
pub(super) struct Segment {
    pub(super) batch: RecordBatch,
    pub(super) groups: Vec<u32>,
}

/// Groups touched since the last evaluation, and that evaluation.
#[derive(Default)]
pub(super) struct Incremental {
    pub(super) mark: Vec<bool>,
    pub(super) dirty: Vec<u32>,
    pub(super) segments: Option<Vec<Segment>>,
}

/// Output segments kept before they are concatenated into one.
pub(super) const MAX_SEGMENTS: usize = 8;

impl GroupState {
    /// Evaluates the dirty groups and patches the previous output (or
    /// evaluates everything when most groups changed).
    pub(super) fn evaluate_incremental(
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
