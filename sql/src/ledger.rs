//! The stock ledger: on-hand by event time from counts, movements and sales.
//!
//! `stock_ledger(ts, counted, delta, sold, received, floor)` and
//! `stock_days(ts, counted, delta, sold, received, floor, keep)` read one row
//! per event of a (store, SKU): a stock count has `counted` (the absolute
//! on-hand), a movement or sale has a signed `delta`; `sold` and `received`
//! are the units sold / received by that row (for the turnover figures).
//!
//! The rows are replayed in event-time order `(ts, deltas before counts,
//! smaller count first)`: a count sets the level, a delta adds to it. So the
//! on-hand is the latest count plus the deltas *after* it; a delta at the
//! same instant as a count is taken to be included in the count, and a late
//! count older than a later one changes nothing. Before the first count the
//! level starts at 0. The replay depends only on the set of rows, never on
//! their arrival order.
//!
//! **Folding.** Keeping every row forever would grow without bound, so rows
//! older than `floor` are folded into a running prefix (level, latest count,
//! per-day figures). `floor` is `watermark_floor()`: inside the engine, the
//! smallest event time any future accepted row of the view's streams can
//! have (stream watermark − allowed lateness, the minimum over the streams);
//! rows before it can never be reordered by a later arrival, so folding is
//! exact. Outside the engine (`NULL`) nothing is folded. Folding happens
//! only when states merge into the keyed state, never inside a micro-batch.
//!
//! `stock_ledger` returns `{on_hand, last_count_ts, last_count, last_ts}`.
//! `stock_days` returns, for each of the last `keep` days up to the day of
//! the latest row, `{day, begin_on_hand, end_on_hand, unit_hours,
//! units_sold, received}`, where `unit_hours` is the time integral of the
//! on-hand over the day (the level holds between rows and after the last
//! one until the day's end; before the first row it is 0).

use std::sync::Arc;

use datafusion::{
    arrow::{
        array::{
            Array, ArrayRef, BooleanArray, Float64Builder, Int64Builder, StructArray,
            TimestampMillisecondBuilder,
        },
        datatypes::{DataType, Field, Fields},
    },
    common::{internal_err, Result},
    logical_expr::{function::AccumulatorArgs, Signature, Volatility},
};

use crate::agg::{
    as_i64, codec, interval_arg, passes, struct_list_builder, struct_list_type, ts_millis, ts_type,
    Kernel, KernelFactory,
};

/// Milliseconds per day.
pub const DAY_MS: i64 = 86_400_000;
const HOUR_MS: f64 = 3_600_000.0;

/// Output struct of `stock_ledger`.
pub fn ledger_fields() -> Fields {
    Fields::from(vec![
        Field::new("on_hand", DataType::Int64, true),
        Field::new("last_count_ts", ts_type(), true),
        Field::new("last_count", DataType::Int64, true),
        Field::new("last_ts", ts_type(), true),
    ])
}

/// Fields of one `stock_days` element.
pub fn day_fields() -> Fields {
    Fields::from(vec![
        Field::new("day", ts_type(), false),
        Field::new("begin_on_hand", DataType::Int64, false),
        Field::new("end_on_hand", DataType::Int64, false),
        Field::new("unit_hours", DataType::Float64, false),
        Field::new("units_sold", DataType::Int64, false),
        Field::new("received", DataType::Int64, false),
    ])
}

/// The list type `stock_days` returns.
pub fn days_type() -> DataType {
    struct_list_type(day_fields())
}

/// `stock_ledger` (`days = false`) or `stock_days` (`days = true`).
#[derive(Debug)]
pub(crate) struct LedgerFactory {
    days: bool,
    signature: Signature,
}

impl LedgerFactory {
    pub(crate) fn new(days: bool) -> Self {
        Self {
            days,
            signature: Signature::any(if days { 7 } else { 6 }, Volatility::Immutable),
        }
    }
}

impl KernelFactory for LedgerFactory {
    type K = LedgerKernel;
    fn name(&self) -> &str {
        if self.days {
            "stock_days"
        } else {
            "stock_ledger"
        }
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(if self.days {
            days_type()
        } else {
            DataType::Struct(ledger_fields())
        })
    }
    fn kernel(&self, args: &AccumulatorArgs) -> Result<LedgerKernel> {
        let keep_days = if self.days {
            (interval_arg(args, 6, "days kept")? + DAY_MS - 1) / DAY_MS
        } else {
            0
        };
        Ok(LedgerKernel { keep_days })
    }
}

/// The ledger kernel; `keep_days == 0` skips the per-day figures.
#[derive(Debug)]
pub(crate) struct LedgerKernel {
    keep_days: i64,
}

/// One row: a count (`is_count`, `value` = on-hand) or a delta (`value`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ev {
    ts: i64,
    is_count: bool,
    value: i64,
    sold: i64,
    received: i64,
}

impl Ev {
    fn key(&self) -> (i64, bool, i64) {
        (
            self.ts,
            self.is_count,
            if self.is_count { self.value } else { 0 },
        )
    }
}

/// Figures of one day.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Day {
    day: i64,
    begin: i64,
    end: i64,
    unit_ms: i64,
    sold: i64,
    received: i64,
}

/// The replay position: everything before `t` has been applied.
#[derive(Debug, Clone, Default)]
struct Cursor {
    started: bool,
    t: i64,
    level: i64,
    last_count: Option<(i64, i64)>,
    cur: Day,
    closed: Vec<Day>,
}

impl Cursor {
    fn advance(&mut self, to: i64, keep: i64) {
        if keep == 0 {
            self.t = to;
            return;
        }
        let to_day = to.div_euclid(DAY_MS);
        if to_day > self.cur.day {
            self.cur.unit_ms += self.level * ((self.cur.day + 1) * DAY_MS - self.t);
            self.cur.end = self.level;
            self.closed.push(self.cur);
            // Quiet days in between hold the level all day; only the last
            // `keep` of them can still be reported.
            let first_quiet = (self.cur.day + 1).max(to_day - keep);
            for d in first_quiet..to_day {
                self.closed.push(Day {
                    day: d,
                    begin: self.level,
                    end: self.level,
                    unit_ms: self.level * DAY_MS,
                    sold: 0,
                    received: 0,
                });
            }
            self.cur = Day {
                day: to_day,
                begin: self.level,
                ..Day::default()
            };
            self.t = to_day * DAY_MS;
            let cut = self.closed.partition_point(|d| d.day <= to_day - keep);
            if cut > 0 {
                self.closed.drain(..cut);
            }
        }
        self.cur.unit_ms += self.level * (to - self.t);
        self.t = to;
    }

    fn apply(&mut self, e: &Ev, keep: i64) {
        if !self.started {
            self.started = true;
            self.t = e.ts;
            self.cur = Day {
                day: e.ts.div_euclid(DAY_MS),
                ..Day::default()
            };
        } else {
            self.advance(e.ts, keep);
        }
        self.cur.sold += e.sold;
        self.cur.received += e.received;
        if e.is_count {
            self.level = e.value;
            self.last_count = Some((e.ts, e.value));
        } else {
            self.level += e.value;
        }
    }
}

/// Per-group ledger state: a folded prefix and the rows after it.
#[derive(Debug, Clone)]
pub(crate) struct Ledger {
    base: Cursor,
    /// Rows before this time are folded into `base` (`i64::MIN`: none).
    folded_at: i64,
    /// Largest `floor` seen (`i64::MIN`: none).
    floor: i64,
    events: Vec<Ev>,
    sorted: bool,
    max_ts: i64,
}

impl Default for Ledger {
    fn default() -> Self {
        Self {
            base: Cursor::default(),
            folded_at: i64::MIN,
            floor: i64::MIN,
            events: Vec::new(),
            sorted: true,
            max_ts: i64::MIN,
        }
    }
}

impl Ledger {
    fn is_empty(&self) -> bool {
        self.events.is_empty() && !self.base.started
    }

    fn push(&mut self, e: Ev) {
        if self.sorted && self.events.last().is_some_and(|l| l.key() > e.key()) {
            self.sorted = false;
        }
        self.max_ts = self.max_ts.max(e.ts);
        self.events.push(e);
    }

    /// Sorts the rows and merges deltas of the same instant.
    fn normalize(&mut self) {
        if !self.sorted {
            self.events.sort_unstable_by_key(|e| e.key());
            self.sorted = true;
        }
        let mut out: Vec<Ev> = Vec::with_capacity(self.events.len());
        for e in self.events.drain(..) {
            match out.last_mut() {
                Some(l) if !l.is_count && !e.is_count && l.ts == e.ts => {
                    l.value += e.value;
                    l.sold += e.sold;
                    l.received += e.received;
                }
                _ => out.push(e),
            }
        }
        self.events = out;
    }

    fn fold(&mut self, keep: i64) {
        if self.floor <= self.folded_at {
            return;
        }
        self.normalize();
        let n = self.events.partition_point(|e| e.ts < self.floor);
        for e in &self.events[..n] {
            self.base.apply(e, keep);
        }
        self.events.drain(..n);
        // Most pairs of a chain sell a few times a year: once folded they
        // hold no rows, and must not keep the buffer of their last burst.
        if self.events.capacity() > 2 * self.events.len() {
            self.events.shrink_to_fit();
        }
        self.folded_at = self.floor;
    }

    /// The cursor after every row.
    fn replay(&self, keep: i64) -> Cursor {
        let mut c = self.base.clone();
        let mut ev = self.events.clone();
        if !self.sorted {
            ev.sort_unstable_by_key(|e| e.key());
        }
        for e in &ev {
            c.apply(e, keep);
        }
        c
    }
}

impl Kernel for LedgerKernel {
    type State = Ledger;

    fn update(
        &self,
        states: &mut [Ledger],
        args: &[ArrayRef],
        groups: &[usize],
        filter: Option<&BooleanArray>,
    ) -> Result<()> {
        let name = if self.keep_days > 0 {
            "stock_days"
        } else {
            "stock_ledger"
        };
        let ts = ts_millis(&args[0], name)?;
        let counted = as_i64(&args[1])?;
        let delta = as_i64(&args[2])?;
        let sold = as_i64(&args[3])?;
        let received = as_i64(&args[4])?;
        let floor = ts_millis(&args[5], name)?;
        let opt = |a: &datafusion::arrow::array::Int64Array, i: usize| {
            if a.is_null(i) {
                0
            } else {
                a.value(i)
            }
        };
        for (i, &g) in groups.iter().enumerate() {
            if ts.is_null(i) || !passes(filter, i) {
                continue;
            }
            let (is_count, value) = if counted.is_valid(i) {
                (true, counted.value(i))
            } else if delta.is_valid(i) {
                (false, delta.value(i))
            } else {
                continue;
            };
            let s = &mut states[g];
            s.push(Ev {
                ts: ts.value(i),
                is_count,
                value,
                sold: opt(&sold, i),
                received: opt(&received, i),
            });
            if floor.is_valid(i) {
                s.floor = s.floor.max(floor.value(i));
            }
        }
        Ok(())
    }

    fn merge(&self, state: &mut Ledger, other: Ledger) -> Result<()> {
        if state.is_empty() && state.folded_at == i64::MIN {
            *state = other;
        } else if other.folded_at != i64::MIN || other.base.started {
            return internal_err!("stock ledger: cannot merge two folded states");
        } else {
            state.floor = state.floor.max(other.floor);
            state.max_ts = state.max_ts.max(other.max_ts);
            let was_sorted = state.sorted && other.sorted;
            let boundary_ok = match (state.events.last(), other.events.first()) {
                (Some(a), Some(b)) => a.key() <= b.key(),
                _ => true,
            };
            state.events.extend(other.events);
            state.sorted = was_sorted && boundary_ok;
        }
        state.fold(self.keep_days);
        Ok(())
    }

    fn encode(&self, s: &Ledger, out: &mut Vec<u8>) {
        use codec::put_i64;
        let c = &s.base;
        put_i64(out, c.started as i64);
        put_i64(out, c.t);
        put_i64(out, c.level);
        match c.last_count {
            Some((t, v)) => {
                put_i64(out, 1);
                put_i64(out, t);
                put_i64(out, v);
            }
            None => put_i64(out, 0),
        }
        let put_day = |out: &mut Vec<u8>, d: &Day| {
            for v in [d.day, d.begin, d.end, d.unit_ms, d.sold, d.received] {
                put_i64(out, v);
            }
        };
        put_day(out, &c.cur);
        put_i64(out, c.closed.len() as i64);
        for d in &c.closed {
            put_day(out, d);
        }
        put_i64(out, s.folded_at);
        put_i64(out, s.floor);
        put_i64(out, s.max_ts);
        put_i64(out, s.sorted as i64);
        put_i64(out, s.events.len() as i64);
        for e in &s.events {
            put_i64(out, e.ts);
            put_i64(out, e.is_count as i64);
            put_i64(out, e.value);
            put_i64(out, e.sold);
            put_i64(out, e.received);
        }
    }

    fn decode(&self, bytes: &[u8]) -> Result<Ledger> {
        let mut r = codec::Reader(bytes);
        let started = r.i64()? != 0;
        let t = r.i64()?;
        let level = r.i64()?;
        let last_count = if r.i64()? != 0 {
            Some((r.i64()?, r.i64()?))
        } else {
            None
        };
        let day = |r: &mut codec::Reader<'_>| -> Result<Day> {
            Ok(Day {
                day: r.i64()?,
                begin: r.i64()?,
                end: r.i64()?,
                unit_ms: r.i64()?,
                sold: r.i64()?,
                received: r.i64()?,
            })
        };
        let cur = day(&mut r)?;
        let n = r.len()?;
        let mut closed = Vec::with_capacity(n);
        for _ in 0..n {
            closed.push(day(&mut r)?);
        }
        let folded_at = r.i64()?;
        let floor = r.i64()?;
        let max_ts = r.i64()?;
        let sorted = r.i64()? != 0;
        let n = r.len()?;
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            events.push(Ev {
                ts: r.i64()?,
                is_count: r.i64()? != 0,
                value: r.i64()?,
                sold: r.i64()?,
                received: r.i64()?,
            });
        }
        Ok(Ledger {
            base: Cursor {
                started,
                t,
                level,
                last_count,
                cur,
                closed,
            },
            folded_at,
            floor,
            events,
            sorted,
            max_ts,
        })
    }

    fn evaluate(&self, states: Vec<Ledger>) -> Result<ArrayRef> {
        if self.keep_days > 0 {
            return self.evaluate_days(states);
        }
        let n = states.len();
        let mut on_hand = Int64Builder::with_capacity(n);
        let mut count_ts = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut count = Int64Builder::with_capacity(n);
        let mut last_ts = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
        for s in &states {
            let c = s.replay(0);
            if !c.started {
                on_hand.append_null();
                last_ts.append_null();
            } else {
                on_hand.append_value(c.level);
                last_ts.append_value(c.t.max(s.max_ts));
            }
            match c.last_count {
                Some((t, v)) => {
                    count_ts.append_value(t);
                    count.append_value(v);
                }
                None => {
                    count_ts.append_null();
                    count.append_null();
                }
            }
        }
        Ok(Arc::new(StructArray::try_new(
            ledger_fields(),
            vec![
                Arc::new(on_hand.finish()),
                Arc::new(count_ts.finish()),
                Arc::new(count.finish()),
                Arc::new(last_ts.finish()),
            ],
            None,
        )?))
    }

    fn heap_size(&self, s: &Ledger) -> usize {
        s.events.capacity() * std::mem::size_of::<Ev>()
            + s.base.closed.capacity() * std::mem::size_of::<Day>()
    }
}

impl LedgerKernel {
    fn evaluate_days(&self, states: Vec<Ledger>) -> Result<ArrayRef> {
        let mut b = struct_list_builder(day_fields());
        for s in &states {
            let mut c = s.replay(self.keep_days);
            if c.started {
                // The last day runs to its end at the final level.
                c.cur.unit_ms += c.level * ((c.cur.day + 1) * DAY_MS - c.t);
                c.cur.end = c.level;
                let first = c.cur.day - self.keep_days + 1;
                for d in c.closed.iter().chain(std::iter::once(&c.cur)) {
                    if d.day < first {
                        continue;
                    }
                    let sb = b.values();
                    sb.field_builder::<TimestampMillisecondBuilder>(0)
                        .expect("day")
                        .append_value(d.day * DAY_MS);
                    for (i, v) in [(1, d.begin), (2, d.end)] {
                        sb.field_builder::<Int64Builder>(i)
                            .expect("int")
                            .append_value(v);
                    }
                    sb.field_builder::<Float64Builder>(3)
                        .expect("unit_hours")
                        .append_value(d.unit_ms as f64 / HOUR_MS);
                    for (i, v) in [(4, d.sold), (5, d.received)] {
                        sb.field_builder::<Int64Builder>(i)
                            .expect("int")
                            .append_value(v);
                    }
                    sb.append(true);
                }
            }
            b.append(true);
        }
        Ok(Arc::new(b.finish()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ev(ts: i64, kind: u8, value: i64) -> Ev {
        match kind {
            0 => Ev {
                ts,
                is_count: true,
                value,
                sold: 0,
                received: 0,
            },
            1 => Ev {
                ts,
                is_count: false,
                value,
                sold: 0,
                received: value.max(0),
            },
            _ => Ev {
                ts,
                is_count: false,
                value: -value,
                sold: value,
                received: 0,
            },
        }
    }

    fn state(events: &[Ev], floor: i64) -> Ledger {
        let mut l = Ledger::default();
        for e in events {
            l.push(*e);
        }
        l.floor = floor;
        l
    }

    fn outputs(k: &LedgerKernel, l: &Ledger) -> (Vec<u8>, String) {
        let c = l.replay(k.keep_days);
        let summary = format!("{} {} {:?} {}", c.started, c.level, c.last_count, l.max_ts);
        let days = k.evaluate(vec![l.clone()]).unwrap();
        let mut buf = Vec::new();
        buf.extend_from_slice(format!("{days:?}").as_bytes());
        (buf, summary)
    }

    proptest! {
        /// Batches merged in arrival order with a rising floor (each batch's
        /// rows at or after the previous floor, as the engine guarantees)
        /// give the same ledger and day figures as all rows at once.
        #[test]
        fn folding_at_the_floor_is_exact(
            rows in proptest::collection::vec((0i64..400, 0u8..3, -5i64..60), 1..120),
            cuts in proptest::collection::vec(0usize..120, 0..6),
            days in prop_oneof![Just(0i64), Just(3i64)],
        ) {
            // Time unit: 15 minutes, so rows span ~4 days.
            let evs: Vec<Ev> = rows.iter().map(|(t, k, v)| ev(t * 900_000, *k, *v)).collect();
            let k = LedgerKernel { keep_days: days };
            let all = state(&evs, i64::MIN);
            // Split by time into ascending windows; floor = start of the next window.
            let mut bounds: Vec<i64> = cuts.iter().map(|c| (*c as i64) * 900_000 * 4).collect();
            bounds.sort();
            bounds.dedup();
            let mut merged = Ledger::default();
            let mut prev = i64::MIN;
            for (i, b) in bounds.iter().chain(std::iter::once(&i64::MAX)).enumerate() {
                let part: Vec<Ev> = evs.iter().filter(|e| e.ts >= prev && e.ts < *b).copied().collect();
                // Arrival order inside a batch is reversed on purpose.
                let part: Vec<Ev> = part.into_iter().rev().collect();
                let floor = if i < bounds.len() { *b } else { i64::MIN };
                k.merge(&mut merged, state(&part, floor)).unwrap();
                // Encoding round trip, as between partial and keyed state.
                let mut buf = Vec::new();
                k.encode(&merged, &mut buf);
                merged = k.decode(&buf).unwrap();
                prev = *b;
            }
            prop_assert_eq!(outputs(&k, &merged), outputs(&k, &all));
        }
    }

    #[test]
    fn a_late_older_count_does_not_override_a_newer_one() {
        let k = LedgerKernel { keep_days: 0 };
        let mut l = state(&[ev(200, 0, 4), ev(300, 2, 1)], i64::MIN);
        k.merge(&mut l, state(&[ev(100, 0, 50)], i64::MIN)).unwrap();
        let c = l.replay(0);
        assert_eq!((c.level, c.last_count), (3, Some((200, 4))));
        // A delta at the count's instant is taken as included in the count.
        k.merge(&mut l, state(&[ev(200, 2, 2)], i64::MIN)).unwrap();
        assert_eq!(l.replay(0).level, 3);
    }
}
