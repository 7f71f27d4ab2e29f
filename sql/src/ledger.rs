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

/// Flag byte of the compact encoding (top bit set: the former layout began
/// with an 8-byte 0 or 1) and its flags.
const COMPACT: u8 = 0x80;
const STARTED: u8 = 1;
const HAS_COUNT: u8 = 2;
const DAYS: u8 = 4;
const VARIANCE: u8 = 8;

/// Output struct of `stock_ledger`.
pub fn ledger_fields() -> Fields {
    Fields::from(vec![
        Field::new("on_hand", DataType::Int64, true),
        Field::new("last_count_ts", ts_type(), true),
        Field::new("last_count", DataType::Int64, true),
        Field::new("last_ts", ts_type(), true),
        Field::new("counts_checked", DataType::Int64, true),
        Field::new("last_count_variance", DataType::Int64, true),
        Field::new("shrinkage_units", DataType::Int64, true),
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

impl Day {
    /// A day without rows: the level held all day.
    fn quiet(day: i64, level: i64) -> Self {
        Day {
            day,
            begin: level,
            end: level,
            unit_ms: level * DAY_MS,
            sold: 0,
            received: 0,
        }
    }
}

/// Per-day figures (`stock_days` only): the day in progress and the closed
/// days of the window that had rows. A closed day without rows holds the
/// level all day (the next listed day's `begin`), so it is implied, not
/// stored: most pairs of a chain sell a few times a year, and the window's
/// every day stored was 48 bytes a day per pair.
#[derive(Debug, Clone, Default)]
struct Days {
    /// The day of the first row: no figures before it.
    first: i64,
    cur: Day,
    /// Closed days with rows, ascending, inside the window.
    closed: Vec<Day>,
}

impl Days {
    /// Every day of the last `keep` up to the day in progress, from the
    /// pair's first day on, quiet days included, the day in progress last
    /// (as it is).
    fn window(&self, keep: i64) -> impl Iterator<Item = Day> + '_ {
        let from = (self.cur.day - keep + 1).max(self.first);
        let mut listed = self
            .closed
            .iter()
            .chain(std::iter::once(&self.cur))
            .skip_while(move |d| d.day < from)
            .peekable();
        (from..=self.cur.day).filter_map(move |d| {
            let next = listed.peek()?;
            if next.day == d {
                listed.next().copied()
            } else {
                Some(Day::quiet(d, next.begin))
            }
        })
    }
}

/// The replay position: everything before `t` has been applied.
#[derive(Debug, Clone, Default)]
struct Cursor {
    t: i64,
    level: i64,
    /// Time and value of the latest count (when `has_count`).
    count_ts: i64,
    count: i64,
    /// `Some` when the kernel keeps days.
    days: Option<Box<Days>>,
    /// `stock_ledger` only, once a count followed another: the counts
    /// checked against the level before them (boxed: most pairs have none).
    variance: Option<Box<Variance>>,
    started: bool,
    has_count: bool,
}

/// Counts checked against the level the ledger had derived before them (a
/// count after an earlier count: the level before it is known).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Variance {
    /// Counts checked.
    counts: i64,
    /// Counted − derived at the latest of them.
    last: i64,
    /// Σ (derived − counted) over them: units lost (negative: found).
    shrinkage: i64,
}

impl Cursor {
    fn last_count(&self) -> Option<(i64, i64)> {
        self.has_count.then_some((self.count_ts, self.count))
    }

    /// The per-day figures as `stock_days` reports them: the day in
    /// progress runs to its end at the final level (after the last row).
    fn finish_days(&mut self) -> Option<&Days> {
        let days = self.days.as_deref_mut()?;
        days.cur.unit_ms += self.level * ((days.cur.day + 1) * DAY_MS - self.t);
        days.cur.end = self.level;
        Some(days)
    }

    fn advance(&mut self, to: i64, keep: i64) {
        let Some(days) = self.days.as_deref_mut() else {
            self.t = to;
            return;
        };
        let to_day = to.div_euclid(DAY_MS);
        if to_day > days.cur.day {
            days.cur.unit_ms += self.level * ((days.cur.day + 1) * DAY_MS - self.t);
            days.cur.end = self.level;
            days.closed.push(days.cur);
            days.cur = Day {
                day: to_day,
                begin: self.level,
                ..Day::default()
            };
            self.t = to_day * DAY_MS;
            let cut = days.closed.partition_point(|d| d.day <= to_day - keep);
            if cut > 0 {
                days.closed.drain(..cut);
            }
        }
        days.cur.unit_ms += self.level * (to - self.t);
        self.t = to;
    }

    fn apply(&mut self, e: &Ev, keep: i64) {
        if !self.started {
            self.started = true;
            self.t = e.ts;
            if keep > 0 {
                let day = e.ts.div_euclid(DAY_MS);
                self.days = Some(Box::new(Days {
                    first: day,
                    cur: Day {
                        day,
                        ..Day::default()
                    },
                    closed: Vec::new(),
                }));
            }
        } else {
            self.advance(e.ts, keep);
        }
        if let Some(days) = self.days.as_deref_mut() {
            days.cur.sold += e.sold;
            days.cur.received += e.received;
        }
        if e.is_count {
            if self.has_count && keep == 0 {
                let v = self.variance.get_or_insert_with(Box::default);
                v.counts += 1;
                v.last = e.value - self.level;
                v.shrinkage += self.level - e.value;
            }
            self.level = e.value;
            self.count_ts = e.ts;
            self.count = e.value;
            self.has_count = true;
        } else {
            self.level += e.value;
        }
    }
}

/// Per-group ledger state: a folded prefix and the rows after it (88
/// bytes a pair and the rows of the lateness window; `stock_days` adds its
/// window's days with rows).
#[derive(Debug, Clone)]
pub(crate) struct Ledger {
    base: Cursor,
    /// Largest `floor` seen (`i64::MIN`: none); rows before the floor are
    /// folded into `base` when states merge.
    floor: i64,
    events: Vec<Ev>,
}

impl Default for Ledger {
    fn default() -> Self {
        Self {
            base: Cursor::default(),
            floor: i64::MIN,
            events: Vec::new(),
        }
    }
}

fn sort_rows(events: &mut [Ev]) {
    if !events.is_sorted_by_key(|e| e.key()) {
        events.sort_unstable_by_key(|e| e.key());
    }
}

impl Ledger {
    fn is_empty(&self) -> bool {
        self.events.is_empty() && !self.base.started
    }

    fn push(&mut self, e: Ev) {
        self.events.push(e);
    }

    /// The time of the latest row.
    fn max_ts(&self) -> Option<i64> {
        let rows = self.events.iter().map(|e| e.ts).max();
        let base = self.base.started.then_some(self.base.t);
        rows.max(base)
    }

    /// Sorts the rows and merges deltas of the same instant.
    fn normalize(&mut self) {
        sort_rows(&mut self.events);
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

    /// Folds the rows before the floor into the prefix.
    fn fold(&mut self, keep: i64) {
        let floor = self.floor;
        if !self.events.iter().any(|e| e.ts < floor) {
            return;
        }
        self.normalize();
        let n = self.events.partition_point(|e| e.ts < floor);
        for e in &self.events[..n] {
            self.base.apply(e, keep);
        }
        self.events.drain(..n);
        // Most pairs of a chain sell a few times a year: once folded they
        // hold no rows, and must not keep the buffer of their last burst.
        if self.events.capacity() > 2 * self.events.len() {
            self.events.shrink_to_fit();
        }
    }

    /// The cursor after every row.
    fn replay(&self, keep: i64) -> Cursor {
        let mut c = self.base.clone();
        let mut ev = self.events.clone();
        sort_rows(&mut ev);
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
        if state.is_empty() {
            let floor = state.floor;
            *state = other;
            state.floor = state.floor.max(floor);
        } else if other.base.started {
            return internal_err!("stock ledger: cannot merge two folded states");
        } else {
            state.floor = state.floor.max(other.floor);
            state.events.extend(other.events);
        }
        state.fold(self.keep_days);
        Ok(())
    }

    /// Compact: a flag byte, then zigzag varints, times as differences from
    /// the cursor's (a folded pair with no rows in the lateness window is
    /// about 15 bytes; the fixed-width layout before it was 128 and stored
    /// every quiet day). A state whose first byte has the top bit clear is
    /// in that former layout, and still decodes.
    fn encode(&self, s: &Ledger, out: &mut Vec<u8>) {
        use codec::put_var;
        let c = &s.base;
        let mut flags = COMPACT;
        if c.started {
            flags |= STARTED;
        }
        if c.has_count {
            flags |= HAS_COUNT;
        }
        if c.days.is_some() {
            flags |= DAYS;
        }
        if c.variance.is_some() {
            flags |= VARIANCE;
        }
        out.push(flags);
        put_var(out, c.t);
        put_var(out, c.level);
        if c.has_count {
            put_var(out, c.t.wrapping_sub(c.count_ts));
            put_var(out, c.count);
        }
        put_var(out, s.floor.wrapping_sub(c.t));
        if let Some(v) = c.variance.as_deref() {
            put_var(out, v.counts);
            put_var(out, v.last);
            put_var(out, v.shrinkage);
        }
        let put_day = |out: &mut Vec<u8>, d: &Day| {
            for v in [d.begin, d.end, d.unit_ms, d.sold, d.received] {
                put_var(out, v);
            }
        };
        if let Some(days) = c.days.as_deref() {
            put_var(out, days.cur.day);
            put_var(out, days.cur.day.wrapping_sub(days.first));
            put_day(out, &days.cur);
            put_var(out, days.closed.len() as i64);
            for d in &days.closed {
                put_var(out, days.cur.day.wrapping_sub(d.day));
                put_day(out, d);
            }
        }
        put_var(out, s.events.len() as i64);
        for e in &s.events {
            put_var(out, e.ts.wrapping_sub(c.t));
            out.push(e.is_count as u8);
            put_var(out, e.value);
            put_var(out, e.sold);
            put_var(out, e.received);
        }
    }

    fn decode(&self, bytes: &[u8]) -> Result<Ledger> {
        match bytes.first() {
            Some(f) if f & COMPACT != 0 => self.decode_compact(bytes),
            _ => self.decode_former(bytes),
        }
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
        let mut checked = Int64Builder::with_capacity(n);
        let mut last_var = Int64Builder::with_capacity(n);
        let mut shrink = Int64Builder::with_capacity(n);
        for s in &states {
            let c = s.replay(0);
            if !c.started {
                on_hand.append_null();
                last_ts.append_null();
            } else {
                on_hand.append_value(c.level);
                last_ts.append_option(s.max_ts());
            }
            match c.last_count() {
                Some((t, v)) => {
                    count_ts.append_value(t);
                    count.append_value(v);
                }
                None => {
                    count_ts.append_null();
                    count.append_null();
                }
            }
            let v = c.variance.as_deref().copied().unwrap_or_default();
            checked.append_value(v.counts);
            last_var.append_option((v.counts > 0).then_some(v.last));
            shrink.append_value(v.shrinkage);
        }
        Ok(Arc::new(StructArray::try_new(
            ledger_fields(),
            vec![
                Arc::new(on_hand.finish()),
                Arc::new(count_ts.finish()),
                Arc::new(count.finish()),
                Arc::new(last_ts.finish()),
                Arc::new(checked.finish()),
                Arc::new(last_var.finish()),
                Arc::new(shrink.finish()),
            ],
            None,
        )?))
    }

    fn heap_size(&self, s: &Ledger) -> usize {
        s.events.capacity() * std::mem::size_of::<Ev>()
            + s.base
                .variance
                .as_ref()
                .map_or(0, |_| std::mem::size_of::<Variance>())
            + s.base.days.as_ref().map_or(0, |d| {
                std::mem::size_of::<Days>() + d.closed.capacity() * std::mem::size_of::<Day>()
            })
    }
}

impl LedgerKernel {
    fn decode_compact(&self, bytes: &[u8]) -> Result<Ledger> {
        let mut r = codec::Reader(bytes);
        let flags = r.u8()?;
        let started = flags & STARTED != 0;
        let has_count = flags & HAS_COUNT != 0;
        let t = r.var()?;
        let level = r.var()?;
        let (count_ts, count) = if has_count {
            (t.wrapping_sub(r.var()?), r.var()?)
        } else {
            (0, 0)
        };
        let floor = t.wrapping_add(r.var()?);
        let variance = if flags & VARIANCE != 0 {
            Some(Box::new(Variance {
                counts: r.var()?,
                last: r.var()?,
                shrinkage: r.var()?,
            }))
        } else {
            None
        };
        let day = |r: &mut codec::Reader<'_>, day: i64| -> Result<Day> {
            Ok(Day {
                day,
                begin: r.var()?,
                end: r.var()?,
                unit_ms: r.var()?,
                sold: r.var()?,
                received: r.var()?,
            })
        };
        let days = if flags & DAYS != 0 {
            let cur_day = r.var()?;
            let first = cur_day.wrapping_sub(r.var()?);
            let cur = day(&mut r, cur_day)?;
            let n = r.var_len()?;
            let mut closed = Vec::with_capacity(n);
            for _ in 0..n {
                let d = cur_day.wrapping_sub(r.var()?);
                closed.push(day(&mut r, d)?);
            }
            Some(Box::new(Days { first, cur, closed }))
        } else {
            None
        };
        let days = match (days, self.keep_days > 0 && started) {
            (Some(d), true) => Some(d),
            (None, false) | (Some(_), false) => None,
            (None, true) => return internal_err!("stock_days: a state without its days"),
        };
        let n = r.var_len()?;
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            events.push(Ev {
                ts: t.wrapping_add(r.var()?),
                is_count: r.u8()? != 0,
                value: r.var()?,
                sold: r.var()?,
                received: r.var()?,
            });
        }
        Ok(Ledger {
            base: Cursor {
                t,
                level,
                count_ts,
                count,
                days,
                variance,
                started,
                has_count,
            },
            floor,
            events,
        })
    }

    /// Decodes the fixed-width layout of checkpoints written before the
    /// compact one (quiet days were stored, and dropped here).
    fn decode_former(&self, bytes: &[u8]) -> Result<Ledger> {
        let mut r = codec::Reader(bytes);
        let started = r.i64()? != 0;
        let t = r.i64()?;
        let level = r.i64()?;
        let (has_count, count_ts, count) = if r.i64()? != 0 {
            (true, r.i64()?, r.i64()?)
        } else {
            (false, 0, 0)
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
        let mut closed = Vec::new();
        let mut first = cur.day;
        for i in 0..n {
            let d = day(&mut r)?;
            if i == 0 {
                first = d.day;
            }
            if d != Day::quiet(d.day, d.begin) {
                closed.push(d);
            }
        }
        let days = (started && self.keep_days > 0).then(|| {
            closed.shrink_to_fit();
            Box::new(Days { first, cur, closed })
        });
        let _folded_at = r.i64()?;
        let floor = r.i64()?;
        let _max_ts = r.i64()?;
        let _sorted = r.i64()?;
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
                t,
                level,
                count_ts,
                count,
                days,
                variance: None,
                started,
                has_count,
            },
            floor,
            events,
        })
    }

    fn evaluate_days(&self, states: Vec<Ledger>) -> Result<ArrayRef> {
        let mut b = struct_list_builder(day_fields());
        for s in &states {
            let mut c = s.replay(self.keep_days);
            if let Some(days) = c.finish_days() {
                for d in days.window(self.keep_days) {
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
        let summary = format!(
            "{} {} {:?} {:?}",
            c.started,
            c.level,
            c.last_count(),
            l.max_ts()
        );
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
            days in prop_oneof![Just(0i64), Just(3i64), Just(8i64)],
            // 15 minutes (rows span ~4 days) or 3 hours (~50 days, with
            // quiet days between rows and days leaving the window).
            unit in prop_oneof![Just(900_000i64), Just(10_800_000i64)],
        ) {
            let evs: Vec<Ev> = rows.iter().map(|(t, k, v)| ev(t * unit, *k, *v)).collect();
            let k = LedgerKernel { keep_days: days };
            let all = state(&evs, i64::MIN);
            // Split by time into ascending windows; floor = start of the next window.
            let mut bounds: Vec<i64> = cuts.iter().map(|c| (*c as i64) * unit * 4).collect();
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
        assert_eq!((c.level, c.last_count()), (3, Some((200, 4))));
        // A delta at the count's instant is taken as included in the count.
        k.merge(&mut l, state(&[ev(200, 2, 2)], i64::MIN)).unwrap();
        assert_eq!(l.replay(0).level, 3);
    }

    /// The days the ledger outputs, as `(day, begin, end, unit_ms, sold, received)`.
    fn day_rows(k: &LedgerKernel, l: &Ledger) -> Vec<(i64, i64, i64, i64, i64, i64)> {
        let mut c = l.replay(k.keep_days);
        let Some(days) = c.finish_days() else {
            return Vec::new();
        };
        days.window(k.keep_days)
            .map(|d| (d.day, d.begin, d.end, d.unit_ms, d.sold, d.received))
            .collect()
    }

    #[test]
    fn a_long_tail_pair_keeps_only_its_days_with_rows() {
        // A count of 10 on day 0, then one unit sold at noon every 10th day
        // for 100 days, folded as it goes: 14 days are reported, but only
        // the days that had rows are held.
        let k = LedgerKernel { keep_days: 14 };
        let mut l = Ledger::default();
        k.merge(&mut l, state(&[ev(0, 0, 10)], i64::MIN)).unwrap();
        for d in 1..=10 {
            let t = d * 10 * DAY_MS + DAY_MS / 2;
            k.merge(&mut l, state(&[ev(t, 2, 1)], t + 1)).unwrap();
        }
        assert!(l.events.is_empty(), "every row folded");
        let days = l.base.days.as_deref().unwrap();
        // Day 100 in progress; day 90 is the only closed day with a row.
        assert_eq!(days.cur.day, 100);
        assert_eq!(days.closed.iter().map(|d| d.day).collect::<Vec<_>>(), [90]);
        assert_eq!(
            k.heap_size(&l),
            std::mem::size_of::<Days>() + days.closed.capacity() * std::mem::size_of::<Day>()
        );
        let rows = day_rows(&k, &l);
        assert_eq!(rows.len(), 14);
        assert_eq!(rows[0].0, 87);
        // Days 87..89 hold 2 units (10 - 8 sold), day 90 sells one at noon,
        // days 91..99 hold 1, day 100 sells the last at noon.
        assert_eq!(rows[0], (87, 2, 2, 2 * DAY_MS, 0, 0));
        assert_eq!(rows[3], (90, 2, 1, DAY_MS + DAY_MS / 2, 1, 0));
        assert_eq!(rows[4], (91, 1, 1, DAY_MS, 0, 0));
        assert_eq!(rows[13], (100, 1, 0, DAY_MS / 2, 1, 0));
    }

    #[test]
    fn checkpoints_of_the_former_layout_restore() {
        // The layout stored every day of the window, quiet days included,
        // and the per-day fields of `stock_ledger` too. This is what it
        // wrote for: count 5 on day 0 at 00:00, 2 sold on day 2 at 12:00,
        // a count of 3 at the start of day 3, keep 3.
        use codec::put_i64;
        let mut b = Vec::new();
        for v in [1, 3 * DAY_MS, 3, 1, 3 * DAY_MS, 3] {
            put_i64(&mut b, v);
        }
        // cur: day 3, begin 3, end 0, unit_ms 0 (nothing yet), sold 0, received 0
        for v in [3, 3, 0, 0, 0, 0] {
            put_i64(&mut b, v);
        }
        put_i64(&mut b, 2);
        // day 1 (quiet at 5), day 2 (sold 2 at noon)
        for v in [1, 5, 5, 5 * DAY_MS, 0, 0, 2, 5, 3, 4 * DAY_MS, 2, 0] {
            put_i64(&mut b, v);
        }
        // folded_at, floor, max_ts, sorted, no rows
        for v in [3 * DAY_MS, 3 * DAY_MS, 3 * DAY_MS, 1, 0] {
            put_i64(&mut b, v);
        }
        let k = LedgerKernel { keep_days: 3 };
        let l = k.decode(&b).unwrap();
        assert_eq!(
            l.base.days.as_deref().unwrap().closed.len(),
            1,
            "quiet day 1 is implied"
        );
        assert_eq!(
            day_rows(&k, &l),
            [
                (1, 5, 5, 5 * DAY_MS, 0, 0),
                (2, 5, 3, 4 * DAY_MS, 2, 0),
                (3, 3, 3, 3 * DAY_MS, 0, 0),
            ]
        );
        // Written again, it is the compact layout, and reads back the same.
        let mut again = Vec::new();
        k.encode(&l, &mut again);
        assert_ne!(again[0] & COMPACT, 0);
        assert!(
            again.len() * 3 < b.len(),
            "{} vs {} bytes",
            again.len(),
            b.len()
        );
        let back = k.decode(&again).unwrap();
        assert_eq!(day_rows(&k, &back), day_rows(&k, &l));
        assert_eq!(back.base.last_count(), l.base.last_count());
        // `stock_ledger` holds no days at all.
        let k0 = LedgerKernel { keep_days: 0 };
        let l0 = k0.decode(&b).unwrap();
        assert!(l0.base.days.is_none());
        assert_eq!(
            (l0.base.level, l0.base.last_count()),
            (3, Some((3 * DAY_MS, 3)))
        );
    }

    #[test]
    fn a_folded_pair_encodes_in_a_few_bytes() {
        // A pair counted once and sold since, everything folded: what most
        // of a chain's pairs are at a checkpoint.
        let k = LedgerKernel { keep_days: 0 };
        let t0 = 1_767_225_600_000; // 2026-01-01
        let mut l = Ledger::default();
        k.merge(&mut l, state(&[ev(t0, 0, 24)], i64::MIN)).unwrap();
        let t1 = t0 + 40 * DAY_MS;
        k.merge(&mut l, state(&[ev(t1, 2, 3)], t1 + 3_600_000))
            .unwrap();
        let mut b = Vec::new();
        k.encode(&l, &mut b);
        assert!(b.len() <= 24, "{} bytes", b.len());
        let back = k.decode(&b).unwrap();
        assert_eq!(outputs(&k, &back), outputs(&k, &l));
        assert_eq!(back.floor, l.floor);
        // Truncated, it is an error, not a wrong state.
        for cut in 0..b.len() {
            assert!(k.decode(&b[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn the_ledger_is_compact() {
        // 88 bytes a pair inline (it was 176): the per-day fields live
        // behind a pointer that `stock_ledger` leaves empty, the count
        // variance behind one that only pairs counted twice fill.
        assert_eq!(std::mem::size_of::<Ledger>(), 88);
    }
}
