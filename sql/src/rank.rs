//! `quintile_score(value, tiebreak) OVER ()`: the RFM quintile of each row.
//!
//! For `n` rows ranked ascending by `(value, tiebreak)` (NULL values last,
//! as `ORDER BY value` would), the row with 1-based rank `k` scores
//! `max(1, ceil(5 (k − 1) / (n − 1)))`, and 5 when `n = 1`. So the highest
//! values score 5 and ties are broken deterministically by `tiebreak`
//! (the member id in `member_rfm`).
//!
//! The same numbers come from three `row_number() OVER (ORDER BY ...)`
//! windows and the formula, but each of those sorts all rows. A score only
//! changes at four ranks (`K_j = 1 + ⌊j (n − 1) / 5⌋`, j = 1..4), so the
//! evaluator selects the rows at those ranks (`select_nth_unstable` on an
//! integer key of the value, then by tiebreak among that value's ties:
//! O(n)) and scores every row by how many of the four it sorts after:
//! linear time instead of a sort, and the tiebreak strings are compared
//! only between rows with equal values.

use std::{cmp::Ordering, sync::Arc};

use datafusion::{
    arrow::{
        array::{make_comparator, Array, ArrayRef, AsArray, DynComparator, Int32Array},
        compute::SortOptions,
        datatypes::{DataType, Field, FieldRef},
    },
    common::{exec_err, Result},
    logical_expr::{
        function::{PartitionEvaluatorArgs, WindowUDFFieldArgs},
        PartitionEvaluator, Signature, Volatility, WindowUDF, WindowUDFImpl,
    },
};

/// The `quintile_score` window function.
pub fn quintile_score() -> WindowUDF {
    WindowUDF::from(QuintileScore {
        signature: Signature::any(2, Volatility::Immutable),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct QuintileScore {
    signature: Signature,
}

impl WindowUDFImpl for QuintileScore {
    fn name(&self) -> &str {
        "quintile_score"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn partition_evaluator(
        &self,
        _args: PartitionEvaluatorArgs,
    ) -> Result<Box<dyn PartitionEvaluator>> {
        Ok(Box::new(QuintileEvaluator))
    }
    fn field(&self, field_args: WindowUDFFieldArgs) -> Result<FieldRef> {
        Ok(Arc::new(Field::new(
            field_args.name(),
            DataType::Int32,
            false,
        )))
    }
}

#[derive(Debug)]
struct QuintileEvaluator;

impl PartitionEvaluator for QuintileEvaluator {
    fn evaluate_all(&mut self, values: &[ArrayRef], num_rows: usize) -> Result<ArrayRef> {
        let [value, tiebreak] = values else {
            return exec_err!("quintile_score(value, tiebreak) takes two arguments");
        };
        let keys = order_keys(value)?;
        let tie = make_comparator(tiebreak, tiebreak, SortOptions::default())?;
        Ok(Arc::new(Int32Array::from(scores(&keys, &tie, num_rows))))
    }
}

/// Order-preserving integer keys of `value`, NULL last: integers,
/// timestamps, dates and decimals by value (a decimal column has one
/// scale), floats by their IEEE total order.
fn order_keys(value: &ArrayRef) -> Result<Vec<i128>> {
    use datafusion::arrow::{compute::cast, datatypes::*};
    let n = value.len();
    let keys: Vec<i128> = match value.data_type() {
        DataType::Decimal128(..) => {
            let a = value.as_primitive::<Decimal128Type>();
            (0..n)
                .map(|i| if a.is_null(i) { i128::MAX } else { a.value(i) })
                .collect()
        }
        DataType::Float16 | DataType::Float32 | DataType::Float64 => {
            let f = cast(value, &DataType::Float64)?;
            let a = f.as_primitive::<Float64Type>();
            (0..n)
                .map(|i| {
                    if a.is_null(i) {
                        i128::MAX
                    } else {
                        // IEEE total order as a signed integer.
                        let b = a.value(i).to_bits() as i64;
                        (b ^ (((b >> 63) as u64) >> 1) as i64) as i128
                    }
                })
                .collect()
        }
        t if t.is_integer() || t.is_temporal() => {
            let c = cast(value, &DataType::Int64)?;
            let a = c.as_primitive::<Int64Type>();
            (0..n)
                .map(|i| {
                    if a.is_null(i) {
                        i128::MAX
                    } else {
                        a.value(i) as i128
                    }
                })
                .collect()
        }
        other => {
            return exec_err!(
                "quintile_score: value must be a number, decimal or timestamp, got {other}"
            )
        }
    };
    Ok(keys)
}

/// The `(key, tiebreak, position)` order of rows `a` and `b`.
fn cmp(keys: &[i128], tie: &DynComparator, a: u32, b: u32) -> Ordering {
    keys[a as usize]
        .cmp(&keys[b as usize])
        .then_with(|| tie(a as usize, b as usize))
        .then(a.cmp(&b))
}

/// The rows at 0-based ranks `at` (ascending) in `(key, tiebreak,
/// position)` order. Keys alone are selected first (nested selections on
/// one copy, each left of the previous); then, only when a threshold's key
/// is shared by several rows, those ties are ordered by tiebreak.
fn select_ranks(keys: &[i128], tie: &DynComparator, at: &[usize]) -> Vec<u32> {
    let mut sorted: Vec<i128> = keys.to_vec();
    let mut hi = sorted.len();
    let mut kth = vec![0i128; at.len()];
    for (j, &p) in at.iter().enumerate().rev() {
        sorted[..hi].select_nth_unstable(p);
        kth[j] = sorted[p];
        hi = p + 1;
    }
    let mut out = vec![0u32; at.len()];
    let mut j = 0;
    while j < at.len() {
        // Thresholds j..e share one key value: select their rows among
        // that value's ties, highest first, each left of the previous.
        let k = kth[j];
        let e = (j..at.len()).find(|&x| kth[x] != k).unwrap_or(at.len());
        let below = keys.iter().filter(|&&x| x < k).count();
        let mut ties: Vec<u32> = (0..keys.len() as u32)
            .filter(|&i| keys[i as usize] == k)
            .collect();
        let mut hi = ties.len();
        for x in (j..e).rev() {
            let q = at[x] - below;
            ties[..hi].select_nth_unstable_by(q, |a, b| cmp(keys, tie, *a, *b));
            out[x] = ties[q];
            hi = q + 1;
        }
        j = e;
    }
    out
}

/// Quintile scores of `n` rows (see the module docs).
fn scores(keys: &[i128], tie: &DynComparator, n: usize) -> Vec<i32> {
    if n <= 1 {
        return vec![5; n];
    }
    // Rows at the four threshold ranks (0-based j (n − 1) / 5).
    let at: Vec<usize> = (1..=4).map(|j| j * (n - 1) / 5).collect();
    let thresholds = select_ranks(keys, tie, &at);
    let tk: Vec<i128> = thresholds.iter().map(|&t| keys[t as usize]).collect();
    (0..n as u32)
        .map(|i| {
            let k = keys[i as usize];
            let mut s = 1;
            for (j, &t) in thresholds.iter().enumerate() {
                let after = match k.cmp(&tk[j]) {
                    Ordering::Greater => true,
                    Ordering::Less => false,
                    Ordering::Equal => cmp(keys, tie, i, t) == Ordering::Greater,
                };
                s += i32::from(after);
            }
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use proptest::prelude::*;

    /// The formula over an explicit sort, as the view was written before.
    fn by_sort(values: &[Option<i64>], ids: &[String]) -> Vec<i32> {
        let n = values.len();
        let mut order: Vec<usize> = (0..n).collect();
        // NULLS LAST, then id, then position.
        order.sort_by(|&a, &b| {
            let va = values[a].map_or((1, 0), |v| (0, v));
            let vb = values[b].map_or((1, 0), |v| (0, v));
            va.cmp(&vb).then(ids[a].cmp(&ids[b])).then(a.cmp(&b))
        });
        let mut out = vec![0; n];
        for (k0, &i) in order.iter().enumerate() {
            let k = (k0 + 1) as f64;
            out[i] = if n == 1 {
                5
            } else {
                (5.0 * (k - 1.0) / (n as f64 - 1.0)).ceil().max(1.0) as i32
            };
        }
        out
    }

    fn run(values: &[Option<i64>], ids: &[String]) -> Vec<i32> {
        let v: ArrayRef = Arc::new(Int64Array::from(values.to_vec()));
        let t: ArrayRef = Arc::new(StringArray::from(ids.to_vec()));
        let out = QuintileEvaluator
            .evaluate_all(&[v, t], values.len())
            .unwrap();
        out.as_any()
            .downcast_ref::<Int32Array>()
            .unwrap()
            .values()
            .to_vec()
    }

    #[test]
    fn spec_examples() {
        let ids: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
        // n = 6: ranks 1..6 → 1, 1, 2, 3, 4, 5.
        assert_eq!(
            run(
                &[Some(60), Some(10), Some(30), Some(20), Some(50), Some(40)],
                &ids
            ),
            vec![5, 1, 2, 1, 4, 3]
        );
        // Ties broken by id: m0 and m1 both 7, m0 ranks first.
        assert_eq!(run(&[Some(7), Some(7)], &ids[..2]), vec![1, 5]);
        assert_eq!(run(&[Some(1)], &ids[..1]), vec![5]);
        // NULL sorts last (highest score).
        assert_eq!(run(&[None, Some(1), Some(2)], &ids[..3]), vec![5, 1, 3]);
    }

    proptest! {
        #[test]
        fn equals_the_sorted_formula(
            rows in proptest::collection::vec((proptest::option::of(0i64..20), 0u8..6), 1..300)
        ) {
            let values: Vec<Option<i64>> = rows.iter().map(|r| r.0).collect();
            let ids: Vec<String> = rows.iter().map(|r| format!("m{}", r.1)).collect();
            prop_assert_eq!(run(&values, &ids), by_sort(&values, &ids));
        }
    }
}
