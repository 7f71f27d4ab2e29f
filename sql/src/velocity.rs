//! Sales-velocity aggregates.
//!
//! * `decayed_sum(value, ts, half_life)` — Σ value·2^(−(t_ref − ts)/half_life)
//!   where `t_ref` is the group's latest `ts` among non-null values. Returns
//!   `{sum, at}` (`at` = `t_ref`). It is a *sum* of decayed contributions,
//!   not a recursive EWMA, so it does not depend on arrival order: two
//!   partial states are rebased to the later reference time and added.
//!   `decayed_rate(d.sum, d.at, as_of, half_life)` turns it into a rate per
//!   hour at `as_of`: for a steady rate r it converges to r.
//! * `hourly_units(qty, ts, keep)` — units per hour-aligned pane, keeping
//!   the panes within `keep` of the group's latest `ts` (older panes can no
//!   longer fall in a window ending at or after that time). Returns a list
//!   of `{hour, units}`; `units_in(panes, as_of, hours)` sums the `hours`
//!   panes ending with the one that holds `as_of`.

use std::sync::Arc;

use datafusion::{
    arrow::{
        array::{
            Array, ArrayRef, AsArray, BooleanArray, Float64Builder, Int64Builder, ListBuilder,
            StructArray, TimestampMillisecondArray, TimestampMillisecondBuilder,
        },
        datatypes::{DataType, Field, Fields},
    },
    common::{plan_err, Result},
    logical_expr::{function::AccumulatorArgs, Signature, Volatility},
};

use crate::agg::{
    as_f64, as_i64, codec, interval_arg, passes, struct_list_builder, struct_list_type, ts_millis,
    ts_type, Kernel, KernelFactory,
};

const HOUR_MS: i64 = 3_600_000;

/// Output struct of `decayed_sum`.
pub fn decayed_fields() -> Fields {
    Fields::from(vec![
        Field::new("sum", DataType::Float64, true),
        Field::new("at", ts_type(), true),
    ])
}

/// `decayed_sum(value, ts, half_life)`.
#[derive(Debug)]
pub(crate) struct DecayedSumFactory {
    signature: Signature,
}

impl DecayedSumFactory {
    pub(crate) fn new() -> Self {
        Self {
            signature: Signature::any(3, Volatility::Immutable),
        }
    }
}

impl KernelFactory for DecayedSumFactory {
    type K = DecayedSum;
    fn name(&self) -> &str {
        "decayed_sum"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        if !(args[0].is_numeric() || args[0] == DataType::Null) {
            return plan_err!("decayed_sum: value must be numeric, got {}", args[0]);
        }
        Ok(DataType::Struct(decayed_fields()))
    }
    fn kernel(&self, args: &AccumulatorArgs) -> Result<DecayedSum> {
        Ok(DecayedSum {
            half_life_ms: interval_arg(args, 2, "half-life")? as f64,
        })
    }
}

/// The `decayed_sum` kernel.
#[derive(Debug)]
pub(crate) struct DecayedSum {
    half_life_ms: f64,
}

/// `(reference time, sum decayed to it)`; `at == i64::MIN` when empty.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Decayed {
    at: i64,
    sum: f64,
}

impl Default for Decayed {
    fn default() -> Self {
        Self {
            at: i64::MIN,
            sum: 0.0,
        }
    }
}

impl DecayedSum {
    #[inline]
    fn add(&self, s: &mut Decayed, at: i64, v: f64) {
        if s.at == i64::MIN {
            *s = Decayed { at, sum: v };
        } else if at > s.at {
            s.sum = s.sum * (-((at - s.at) as f64) / self.half_life_ms).exp2() + v;
            s.at = at;
        } else {
            s.sum += v * (-((s.at - at) as f64) / self.half_life_ms).exp2();
        }
    }
}

impl Kernel for DecayedSum {
    type State = Decayed;
    fn update(
        &self,
        states: &mut [Decayed],
        args: &[ArrayRef],
        groups: &[usize],
        filter: Option<&BooleanArray>,
    ) -> Result<()> {
        let v = as_f64(&args[0])?;
        let ts = ts_millis(&args[1], "decayed_sum")?;
        for (i, &g) in groups.iter().enumerate() {
            if v.is_null(i) || ts.is_null(i) || !passes(filter, i) {
                continue;
            }
            self.add(&mut states[g], ts.value(i), v.value(i));
        }
        Ok(())
    }
    fn merge(&self, state: &mut Decayed, other: Decayed) -> Result<()> {
        if other.at != i64::MIN {
            self.add(state, other.at, other.sum);
        }
        Ok(())
    }
    fn encode(&self, s: &Decayed, out: &mut Vec<u8>) {
        codec::put_i64(out, s.at);
        codec::put_f64(out, s.sum);
    }
    fn decode(&self, bytes: &[u8]) -> Result<Decayed> {
        let mut r = codec::Reader(bytes);
        Ok(Decayed {
            at: r.i64()?,
            sum: r.f64()?,
        })
    }
    fn evaluate(&self, states: Vec<Decayed>) -> Result<ArrayRef> {
        let n = states.len();
        let mut sums = Float64Builder::with_capacity(n);
        let mut ats = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
        for s in &states {
            if s.at == i64::MIN {
                sums.append_null();
                ats.append_null();
            } else {
                sums.append_value(s.sum);
                ats.append_value(s.at);
            }
        }
        let ats: TimestampMillisecondArray = ats.finish();
        Ok(Arc::new(StructArray::try_new(
            decayed_fields(),
            vec![Arc::new(sums.finish()), Arc::new(ats)],
            None,
        )?))
    }
    fn heap_size(&self, _: &Decayed) -> usize {
        0
    }
}

/// Fields of one `hourly_units` pane.
pub fn pane_fields() -> Fields {
    Fields::from(vec![
        Field::new("hour", ts_type(), false),
        Field::new("units", DataType::Int64, false),
    ])
}

/// The list type `hourly_units` returns.
pub fn panes_type() -> DataType {
    struct_list_type(pane_fields())
}

/// `hourly_units(qty, ts, keep)`.
#[derive(Debug)]
pub(crate) struct HourlyUnitsFactory {
    signature: Signature,
}

impl HourlyUnitsFactory {
    pub(crate) fn new() -> Self {
        Self {
            signature: Signature::any(3, Volatility::Immutable),
        }
    }
}

impl KernelFactory for HourlyUnitsFactory {
    type K = HourlyUnits;
    fn name(&self) -> &str {
        "hourly_units"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        if !(args[0].is_numeric() || args[0] == DataType::Null) {
            return plan_err!("hourly_units: qty must be numeric, got {}", args[0]);
        }
        Ok(panes_type())
    }
    fn kernel(&self, args: &AccumulatorArgs) -> Result<HourlyUnits> {
        let keep = interval_arg(args, 2, "panes kept")?;
        Ok(HourlyUnits {
            keep_hours: (keep + HOUR_MS - 1) / HOUR_MS,
        })
    }
}

/// The `hourly_units` kernel.
#[derive(Debug)]
pub(crate) struct HourlyUnits {
    keep_hours: i64,
}

/// Panes sorted by hour (hour index since the epoch, units).
#[derive(Debug, Clone, Default)]
pub(crate) struct Panes(Vec<(i64, i64)>);

impl HourlyUnits {
    fn add(&self, p: &mut Panes, hour: i64, units: i64) {
        match p.0.binary_search_by_key(&hour, |e| e.0) {
            Ok(i) => p.0[i].1 += units,
            Err(i) => {
                let newest = p.0.last().map_or(hour, |e| e.0.max(hour));
                if hour <= newest - self.keep_hours {
                    return; // already outside every window that can be asked for
                }
                p.0.insert(i, (hour, units));
                let cut = p.0.partition_point(|e| e.0 <= newest - self.keep_hours);
                if cut > 0 {
                    p.0.drain(..cut);
                }
            }
        }
    }
}

impl Kernel for HourlyUnits {
    type State = Panes;
    fn update(
        &self,
        states: &mut [Panes],
        args: &[ArrayRef],
        groups: &[usize],
        filter: Option<&BooleanArray>,
    ) -> Result<()> {
        let q = as_i64(&args[0])?;
        let ts = ts_millis(&args[1], "hourly_units")?;
        for (i, &g) in groups.iter().enumerate() {
            if q.is_null(i) || ts.is_null(i) || !passes(filter, i) {
                continue;
            }
            self.add(&mut states[g], ts.value(i).div_euclid(HOUR_MS), q.value(i));
        }
        Ok(())
    }
    fn merge(&self, state: &mut Panes, other: Panes) -> Result<()> {
        if state.0.is_empty() {
            *state = other;
            return Ok(());
        }
        for (h, u) in other.0 {
            self.add(state, h, u);
        }
        Ok(())
    }
    fn encode(&self, s: &Panes, out: &mut Vec<u8>) {
        codec::put_i64(out, s.0.len() as i64);
        for (h, u) in &s.0 {
            codec::put_i64(out, *h);
            codec::put_i64(out, *u);
        }
    }
    fn decode(&self, bytes: &[u8]) -> Result<Panes> {
        let mut r = codec::Reader(bytes);
        let n = r.len()?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push((r.i64()?, r.i64()?));
        }
        Ok(Panes(v))
    }
    fn evaluate(&self, states: Vec<Panes>) -> Result<ArrayRef> {
        let mut b = struct_list_builder(pane_fields());
        for s in &states {
            let sb = b.values();
            for (h, u) in &s.0 {
                sb.field_builder::<TimestampMillisecondBuilder>(0)
                    .expect("hour")
                    .append_value(h * HOUR_MS);
                sb.field_builder::<Int64Builder>(1)
                    .expect("units")
                    .append_value(*u);
                sb.append(true);
            }
            b.append(true);
        }
        Ok(Arc::new(b.finish()))
    }
    fn heap_size(&self, s: &Panes) -> usize {
        s.0.capacity() * 16
    }
}

/// The list type `distinct_days` returns.
pub fn day_list_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", ts_type(), true)))
}

/// `distinct_days(ts)`: the distinct UTC days (as midnight timestamps) of a
/// group's rows, sorted. A few bytes per day instead of a generic distinct
/// set. Given lists of timestamps (e.g. other `distinct_days` results) it
/// returns the distinct days of their union.
#[derive(Debug)]
pub(crate) struct DistinctDaysFactory {
    signature: Signature,
}

impl DistinctDaysFactory {
    pub(crate) fn new() -> Self {
        Self {
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

impl KernelFactory for DistinctDaysFactory {
    type K = DistinctDays;
    fn name(&self) -> &str {
        "distinct_days"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(day_list_type())
    }
    fn kernel(&self, _args: &AccumulatorArgs) -> Result<DistinctDays> {
        Ok(DistinctDays)
    }
}

/// The `distinct_days` kernel.
#[derive(Debug)]
pub(crate) struct DistinctDays;

const DAY_MS: i64 = 86_400_000;

impl Kernel for DistinctDays {
    type State = Vec<i32>;
    fn update(
        &self,
        states: &mut [Vec<i32>],
        args: &[ArrayRef],
        groups: &[usize],
        filter: Option<&BooleanArray>,
    ) -> Result<()> {
        let insert = |s: &mut Vec<i32>, t: i64| {
            let d = t.div_euclid(DAY_MS) as i32;
            if let Err(p) = s.binary_search(&d) {
                s.insert(p, d);
            }
        };
        if let Some(list) = args[0].as_list_opt::<i32>() {
            // Lists of days (e.g. several cards' `distinct_days`): union.
            let ts = ts_millis(list.values(), "distinct_days")?;
            let offsets = list.value_offsets();
            for (i, &g) in groups.iter().enumerate() {
                if list.is_null(i) || !passes(filter, i) {
                    continue;
                }
                for j in offsets[i] as usize..offsets[i + 1] as usize {
                    if ts.is_valid(j) {
                        insert(&mut states[g], ts.value(j));
                    }
                }
            }
            return Ok(());
        }
        let ts = ts_millis(&args[0], "distinct_days")?;
        for (i, &g) in groups.iter().enumerate() {
            if ts.is_null(i) || !passes(filter, i) {
                continue;
            }
            insert(&mut states[g], ts.value(i));
        }
        Ok(())
    }
    fn merge(&self, state: &mut Vec<i32>, other: Vec<i32>) -> Result<()> {
        if state.is_empty() {
            *state = other;
            return Ok(());
        }
        for d in other {
            if let Err(p) = state.binary_search(&d) {
                state.insert(p, d);
            }
        }
        Ok(())
    }
    fn encode(&self, s: &Vec<i32>, out: &mut Vec<u8>) {
        codec::put_i64(out, s.len() as i64);
        for d in s {
            codec::put_i64(out, *d as i64);
        }
    }
    fn decode(&self, bytes: &[u8]) -> Result<Vec<i32>> {
        let mut r = codec::Reader(bytes);
        let n = r.len()?;
        (0..n).map(|_| Ok(r.i64()? as i32)).collect()
    }
    fn evaluate(&self, states: Vec<Vec<i32>>) -> Result<ArrayRef> {
        let mut b = ListBuilder::new(TimestampMillisecondBuilder::new().with_timezone("UTC"))
            .with_field(Arc::new(Field::new("item", ts_type(), true)));
        for s in &states {
            for d in s {
                b.values().append_value(*d as i64 * DAY_MS);
            }
            b.append(true);
        }
        Ok(Arc::new(b.finish()))
    }
    fn heap_size(&self, s: &Vec<i32>) -> usize {
        s.capacity() * 4
    }
}
