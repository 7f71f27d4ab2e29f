//! Hopping windows kept as panes of the slide: a window of several panes
//! is assembled when the view is read, and eviction keeps the panes a
//! live window still needs.

use std::sync::Arc;

use datafusion::{
    arrow::{
        array::ArrayRef,
        row::{RowConverter, SortField},
    },
    common::Result,
    logical_expr::EmitTo,
    physical_expr::aggregate::AggregateFunctionExpr,
};

use super::*;

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

impl GroupState {
    /// True for a hop window view (kept as panes).
    pub fn is_hop(&self) -> bool {
        self.hop.is_some()
    }

    /// Keeps hopping windows as panes (see [`HopPanes`]).
    pub fn set_hop(&mut self, hop: HopPanes) {
        self.hop = Some(hop);
    }
}

/// Builds every hopping window from its panes: pane `p` contributes to the
/// windows starting at `p`, `p - slide`, ... (`windows` of them). Pane
/// states are merged into one scratch accumulator per aggregate.
pub(super) fn assemble_hop_windows(
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
pub(super) fn hop_panes_to_keep(
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
