//! `count(DISTINCT x)` for every group of a view in one hash table.
//!
//! DataFusion 55 has a grouped distinct count only for integer arguments;
//! for strings (`count(DISTINCT store_id)`) it keeps one
//! `Accumulator` per group, each with its own hash set and an 8 KiB value
//! buffer allocated up front: ~9 KB per group before the first value, and
//! reading a view drained and rebuilt every one of them. This accumulator
//! keeps every (group, value) pair of an aggregate in one
//! `hashbrown::HashTable` over one contiguous buffer of arrow row-format
//! value bytes, and a count per group, so a group costs its values
//! (~20 bytes plus the value each) and is read in place
//! ([`ReadableGroups`]).
//!
//! Its state is DataFusion's own (`List` of the argument's type, one list
//! of distinct values per group), so partial aggregates, checkpoints and
//! the batch oracle are unchanged. Floating-point arguments stay with
//! DataFusion (its NaN and signed-zero handling differs from the row
//! format's total order).

use std::sync::Arc;

use datafusion::{
    arrow::{
        array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, ListArray},
        buffer::OffsetBuffer,
        compute::cast,
        datatypes::{DataType, FieldRef},
        row::{RowConverter, Rows, SortField},
    },
    common::{internal_err, Result},
    logical_expr::{EmitTo, GroupsAccumulator},
    physical_expr::aggregate::AggregateFunctionExpr,
};
use hashbrown::HashTable;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::agg::ReadableGroups;

/// The grouped accumulator for `expr` if it is `count(DISTINCT x)` of one
/// argument of a type this accumulator handles.
pub(crate) fn for_expr(expr: &AggregateFunctionExpr) -> Option<Result<Box<dyn ReadableGroups>>> {
    if expr.fun().name() != "count" || !expr.is_distinct() || expr.expressions().len() != 1 {
        return None;
    }
    let fields = expr.state_fields().ok()?;
    let [state] = fields.as_slice() else {
        return None;
    };
    let DataType::List(item) = state.data_type() else {
        return None;
    };
    if item.data_type().is_floating()
        || !item.data_type().is_primitive() && !bytes_like(item.data_type())
    {
        return None;
    }
    Some(DistinctCountGroups::try_new(Arc::clone(item)).map(|a| Box::new(a) as _))
}

fn bytes_like(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::Boolean
    )
}

/// The value bytes of pair `p` (`pair_end` holds each pair's end in
/// `bytes`; it starts where the previous one ends).
fn pair_bytes<'a>(pair_end: &[usize], bytes: &'a [u8], p: u32) -> &'a [u8] {
    let p = p as usize;
    let start = p.checked_sub(1).map_or(0, |q| pair_end[q]);
    &bytes[start..pair_end[p]]
}

/// Every distinct (group, value) pair of one aggregate.
pub(crate) struct DistinctCountGroups {
    /// The state list's item field (the argument's type).
    item: FieldRef,
    converter: RowConverter,
    /// Pair ids, hashed by (group, value bytes).
    table: HashTable<u32>,
    /// Group of each pair.
    pair_group: Vec<u32>,
    /// End of each pair's value in `bytes` (start = previous end).
    pair_end: Vec<usize>,
    bytes: Vec<u8>,
    /// Distinct values per group.
    counts: Vec<i64>,
}

impl DistinctCountGroups {
    fn try_new(item: FieldRef) -> Result<Self> {
        let converter = RowConverter::new(vec![SortField::new(item.data_type().clone())])?;
        Ok(Self {
            item,
            converter,
            table: HashTable::new(),
            pair_group: Vec::new(),
            pair_end: Vec::new(),
            bytes: Vec::new(),
            counts: Vec::new(),
        })
    }

    fn value(&self, pair: usize) -> &[u8] {
        pair_bytes(&self.pair_end, &self.bytes, pair as u32)
    }

    /// Adds `value` to `group` unless it is there already.
    fn insert(&mut self, group: u32, value: &[u8]) -> Result<()> {
        let h = xxh3_64_with_seed(value, u64::from(group));
        let Self {
            table,
            pair_group,
            pair_end,
            bytes,
            ..
        } = self;
        let found = table
            .find(h, |&p| {
                pair_group[p as usize] == group && pair_bytes(pair_end, bytes, p) == value
            })
            .is_some();
        if found {
            return Ok(());
        }
        let Ok(id) = u32::try_from(pair_group.len()) else {
            return internal_err!("count(DISTINCT): more than 2^32 distinct (group, value) pairs");
        };
        bytes.extend_from_slice(value);
        pair_end.push(bytes.len());
        pair_group.push(group);
        table.insert_unique(h, id, |&p| {
            xxh3_64_with_seed(
                pair_bytes(pair_end, bytes, p),
                u64::from(pair_group[p as usize]),
            )
        });
        self.counts[group as usize] += 1;
        Ok(())
    }

    /// `values` in the item type (a dictionary argument is unpacked).
    fn plain(&self, values: &ArrayRef) -> Result<ArrayRef> {
        Ok(match values.data_type() {
            DataType::Dictionary(..) => cast(values, self.item.data_type())?,
            _ => Arc::clone(values),
        })
    }

    fn rows(&self, values: &ArrayRef) -> Result<Rows> {
        Ok(self.converter.convert_columns(&[self.plain(values)?])?)
    }

    fn grow(&mut self, total_num_groups: usize) {
        if self.counts.len() < total_num_groups {
            self.counts.resize(total_num_groups, 0);
        }
    }

    /// Keeps the groups from `n` on, renumbered from 0.
    fn drop_first(&mut self, n: usize) {
        if n >= self.counts.len() {
            self.table = HashTable::new();
            self.pair_group = Vec::new();
            self.pair_end = Vec::new();
            self.bytes = Vec::new();
            self.counts = Vec::new();
            return;
        }
        let old_group = std::mem::take(&mut self.pair_group);
        let old_end = std::mem::take(&mut self.pair_end);
        let old_bytes = std::mem::take(&mut self.bytes);
        self.table.clear();
        self.counts.drain(..n);
        self.counts.iter_mut().for_each(|c| *c = 0);
        let mut start = 0;
        for (g, end) in old_group.into_iter().zip(old_end) {
            if g as usize >= n {
                self.insert(g - n as u32, &old_bytes[start..end])
                    .expect("fewer pairs than before");
            }
            start = end;
        }
    }

    /// The distinct values of groups `0..n` as one list per group.
    fn lists(&self, n: usize) -> Result<ArrayRef> {
        self.lists_of(&(0..n).collect::<Vec<_>>())
    }

    /// The distinct values of `groups` (any order, each at most once) as
    /// one list per group, in that order.
    fn lists_of(&self, groups: &[usize]) -> Result<ArrayRef> {
        let count = |g: usize| self.counts.get(g).map_or(0, |&c| c as usize);
        let offsets = OffsetBuffer::from_lengths(groups.iter().map(|&g| count(g)));
        // Group -> its list's next free slot (u32::MAX: not asked for).
        let mut next = vec![u32::MAX; self.counts.len()];
        for (i, &g) in groups.iter().enumerate() {
            if let Some(n) = next.get_mut(g) {
                *n = offsets[i] as u32;
            }
        }
        let mut order = vec![0u32; offsets[groups.len()] as usize];
        for (p, &g) in self.pair_group.iter().enumerate() {
            if let Some(slot) = next.get_mut(g as usize).filter(|s| **s != u32::MAX) {
                order[*slot as usize] = p as u32;
                *slot += 1;
            }
        }
        self.list_array(offsets, &order)
    }

    /// One list per `offsets` window over the pairs `order` names.
    fn list_array(&self, offsets: OffsetBuffer<i32>, order: &[u32]) -> Result<ArrayRef> {
        let parser = self.converter.parser();
        let mut values = self
            .converter
            .convert_rows(order.iter().map(|&p| parser.parse(self.value(p as usize))))?;
        let Some(values) = values.pop() else {
            return internal_err!("count(DISTINCT): no value column");
        };
        Ok(Arc::new(ListArray::try_new(
            Arc::clone(&self.item),
            offsets,
            values,
            None,
        )?))
    }

    fn emit_count(&self, emit_to: EmitTo) -> usize {
        match emit_to {
            EmitTo::All => self.counts.len(),
            EmitTo::First(n) => n.min(self.counts.len()),
        }
    }
}

impl GroupsAccumulator for DistinctCountGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.grow(total_num_groups);
        let Some(col) = values.first() else {
            return internal_err!("count(DISTINCT): no argument");
        };
        let rows = self.rows(col)?;
        for (r, &g) in group_indices.iter().enumerate() {
            if col.is_null(r) || opt_filter.is_some_and(|f| !f.is_valid(r) || !f.value(r)) {
                continue;
            }
            self.insert(g as u32, rows.row(r).as_ref())?;
        }
        Ok(())
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.grow(total_num_groups);
        let Some(lists) = values.first().and_then(|c| c.as_list_opt::<i32>()) else {
            return internal_err!("count(DISTINCT): state is not a list");
        };
        let child = lists.values();
        let rows = self.rows(child)?;
        let offsets = lists.value_offsets();
        for (r, &g) in group_indices.iter().enumerate() {
            if lists.is_null(r) {
                continue;
            }
            for i in offsets[r] as usize..offsets[r + 1] as usize {
                if !child.is_null(i) {
                    self.insert(g as u32, rows.row(i).as_ref())?;
                }
            }
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let n = self.emit_count(emit_to);
        let out = Int64Array::from(self.counts[..n].to_vec());
        self.drop_first(n);
        Ok(Arc::new(out))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let n = self.emit_count(emit_to);
        let out = self.lists(n)?;
        self.drop_first(n);
        Ok(vec![out])
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let Some(col) = values.first() else {
            return internal_err!("count(DISTINCT): no argument");
        };
        let col = self.plain(col)?;
        // One list per row: the row's value, or empty if null or filtered.
        let keep: Vec<bool> = (0..col.len())
            .map(|r| !col.is_null(r) && opt_filter.is_none_or(|f| f.is_valid(r) && f.value(r)))
            .collect();
        let kept = datafusion::arrow::compute::filter(&col, &BooleanArray::from(keep.clone()))?;
        let offsets = OffsetBuffer::from_lengths(keep.iter().map(|&k| usize::from(k)));
        Ok(vec![Arc::new(ListArray::try_new(
            Arc::clone(&self.item),
            offsets,
            kept,
            None,
        )?)])
    }

    fn size(&self) -> usize {
        self.table.capacity() * (std::mem::size_of::<u32>() + 1)
            + self.pair_group.capacity() * std::mem::size_of::<u32>()
            + self.pair_end.capacity() * std::mem::size_of::<usize>()
            + self.bytes.capacity()
            + self.counts.capacity() * std::mem::size_of::<i64>()
            + self.converter.size()
    }
}

impl ReadableGroups for DistinctCountGroups {
    fn evaluate_groups(&self, groups: &[usize]) -> Result<ArrayRef> {
        Ok(Arc::new(Int64Array::from_iter_values(
            groups
                .iter()
                .map(|&g| self.counts.get(g).copied().unwrap_or(0)),
        )))
    }

    fn state_groups(&self, groups: &[usize]) -> Result<Vec<ArrayRef>> {
        Ok(vec![self.lists_of(groups)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::{array::StringArray, datatypes::Field};

    fn acc() -> DistinctCountGroups {
        DistinctCountGroups::try_new(Arc::new(Field::new_list_field(DataType::Utf8, true)))
            .expect("acc")
    }

    #[test]
    fn counts_distinct_values_per_group_and_round_trips_its_state() {
        let mut a = acc();
        let vals: ArrayRef = Arc::new(StringArray::from(vec![
            Some("S1"),
            Some("S2"),
            Some("S1"),
            None,
            Some("S1"),
            Some("S3"),
        ]));
        a.update_batch(&[vals], &[0, 0, 0, 0, 1, 2], None, 3)
            .expect("update");
        let counts = a.evaluate_groups(&[0, 1, 2]).expect("read");
        assert_eq!(
            counts
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .values(),
            &[2, 1, 1]
        );

        // The state of some groups, read in place, in the order asked.
        let some = a.state_groups(&[2, 0]).expect("state of groups 2 and 0");
        let mut c = acc();
        c.merge_batch(&some, &[0, 1], 2).expect("merge");
        assert_eq!(
            c.evaluate_groups(&[0, 1])
                .expect("read")
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .values(),
            &[1, 2]
        );
        assert_eq!(
            a.evaluate_groups(&[0, 1, 2])
                .expect("read: unchanged")
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .values(),
            &[2, 1, 1]
        );

        // The state merges into a fresh accumulator with the groups moved.
        let state = a.state(EmitTo::All).expect("state");
        assert_eq!(
            a.evaluate_groups(&[0])
                .expect("read")
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .value(0),
            0
        );
        let mut b = acc();
        b.merge_batch(&state, &[2, 0, 1], 3).expect("merge");
        b.merge_batch(&state, &[2, 0, 1], 3)
            .expect("merge twice: no change");
        let out = b.evaluate(EmitTo::First(2)).expect("evaluate");
        assert_eq!(
            out.as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .values(),
            &[1, 1]
        );
        // The remaining group (was 2, holds S1 and S2) is now group 0.
        assert_eq!(
            b.evaluate(EmitTo::All)
                .expect("evaluate")
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .values(),
            &[2]
        );
    }
}
