//! One aggregate's accumulator of all groups: storepulse's kernels are
//! read in place, DataFusion's by draining their state and merging it back.

use std::sync::Arc;

use datafusion::{
    arrow::array::ArrayRef,
    common::Result,
    logical_expr::{EmitTo, GroupsAccumulator},
    physical_expr::aggregate::AggregateFunctionExpr,
};
use storepulse_sql::ReadableGroups;

use super::new_groups_accumulator;

/// One aggregate's accumulator of all groups.
pub(super) enum Acc {
    /// storepulse's kernel aggregates: read in place.
    Readable(Box<dyn ReadableGroups>),
    /// DataFusion's aggregates: read by draining and merging back.
    Plain(Box<dyn GroupsAccumulator>),
}

impl Acc {
    pub(super) fn new(expr: &Arc<AggregateFunctionExpr>) -> Result<Self> {
        match storepulse_sql::readable_groups_accumulator(expr) {
            Some(acc) => Ok(Self::Readable(acc?)),
            None => Ok(Self::Plain(new_groups_accumulator(expr)?)),
        }
    }

    pub(super) fn get(&mut self) -> &mut dyn GroupsAccumulator {
        match self {
            Self::Readable(a) => a.as_mut(),
            Self::Plain(a) => a.as_mut(),
        }
    }

    pub(super) fn size(&self) -> usize {
        match self {
            Self::Readable(a) => a.size(),
            Self::Plain(a) => a.size(),
        }
    }

    /// The partial state of `groups` (ascending indices; all `total`
    /// groups when `None`), the state unchanged: storepulse's kernels
    /// encode those groups in place; DataFusion's are drained, merged back
    /// and the asked rows taken.
    pub(super) fn state_of(
        &mut self,
        groups: Option<&[usize]>,
        total: usize,
    ) -> Result<Vec<ArrayRef>> {
        match self {
            Self::Readable(a) => match groups {
                Some(g) => a.state_groups(g),
                None => a.state_groups(&(0..total).collect::<Vec<_>>()),
            },
            Self::Plain(acc) => {
                let state = acc.state(EmitTo::All)?;
                let every: Vec<usize> = (0..total).collect();
                acc.merge_batch(&state, &every, total)?;
                match groups {
                    Some(g) if g.len() != total => take_rows(state, g),
                    _ => Ok(state),
                }
            }
        }
    }

    /// The current values of `groups` (ascending indices; all `total`
    /// groups when `groups` is `None`), the state unchanged.
    pub(super) fn values(
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
            Self::Plain(_) => {
                let state = self.state_of(Some(groups), total)?;
                let mut scratch = new_groups_accumulator(expr)?;
                let rows: Vec<usize> = (0..groups.len()).collect();
                scratch.merge_batch(&state, &rows, groups.len())?;
                scratch.evaluate(EmitTo::All)
            }
        }
    }
}

/// Rows `groups` of each column.
fn take_rows(columns: Vec<ArrayRef>, groups: &[usize]) -> Result<Vec<ArrayRef>> {
    let idx =
        datafusion::arrow::array::UInt32Array::from_iter_values(groups.iter().map(|g| *g as u32));
    Ok(columns
        .iter()
        .map(|c| datafusion::arrow::compute::take(c, &idx, None))
        .collect::<std::result::Result<Vec<_>, _>>()?)
}
