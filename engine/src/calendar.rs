//! Store-local time: the `stores` table's `timezone` and opening hours as an
//! index, and the two functions that read it.
//!
//! - `local_time(store_id, ts)` → `Timestamp(Millisecond)` without a zone:
//!   the wall clock at the store at instant `ts` (its IANA `timezone`; a
//!   store without one, or not in `stores`, keeps UTC). Business periods are
//!   `date_trunc('day' | 'week' | 'month' | 'year', local_time(store_id,
//!   ts))`: a UTC+8 store's day runs from 16:00 to 16:00 UTC, and a
//!   daylight-saving zone's from its own midnight (23 or 25 hours on the
//!   change days).
//! - `store_open(store_id, ts)` → `Boolean`: whether `ts` falls inside the
//!   store's opening hours (`opens` ≤ local time < `closes`; a `closes`
//!   before `opens` runs past midnight; equal times are around the clock).
//!   A store without hours, or not in `stores`, is open.
//! - `open_hours(store_id, from, to)` → `Double`: the hours of opening time
//!   between two instants (wall-clock hours for a store open all day; 0
//!   when `to` ≤ `from`): "silent for 30 minutes" counts only the time the
//!   store was open.
//!
//! The index is built once per version of `stores` (a reload swaps its
//! rows; the next call sees them, checked per call by pointer). A lookup is
//! a hash probe per run of rows of one store, and a zone's offset is kept
//! for the UTC day it holds all of, so a batch of one store's rows converts
//! with an addition per row.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
};

use chrono::{DateTime, Offset, TimeZone};
use chrono_tz::Tz;
use datafusion::{
    arrow::{
        array::{
            Array, ArrayRef, AsArray, BooleanBuilder, Float64Builder, RecordBatch, StringArray,
            TimestampMillisecondBuilder,
        },
        compute::cast,
        datatypes::{DataType, TimeUnit, TimestampMillisecondType},
    },
    common::{exec_err, Result},
    logical_expr::{
        ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
    },
};
use storepulse_ingest::schema::ts_type;

use crate::dims::DimensionData;

const MINUTE_MS: i64 = 60_000;
const DAY_MINUTES: i64 = 24 * 60;
const DAY_MS: i64 = 86_400_000;

/// `HH:MM` (`00:00` to `24:00`) as minutes after midnight.
pub fn parse_local_time(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
}

/// One store's zone and opening hours (minutes after local midnight).
#[derive(Debug, Clone, Copy)]
struct Place {
    tz: Tz,
    hours: Option<(u16, u16)>,
}

impl Place {
    const UTC: Place = Place {
        tz: Tz::UTC,
        hours: None,
    };

    /// Milliseconds of opening time between two wall-clock times
    /// (`from` ≤ `to`; all of it for a store open all day).
    fn open_ms(&self, from: i64, to: i64) -> i64 {
        let Some((opens, closes)) = self.hours else {
            return to - from;
        };
        let (opens, closes) = (i64::from(opens) * MINUTE_MS, i64::from(closes) * MINUTE_MS);
        let len = if closes > opens {
            closes - opens
        } else {
            DAY_MS - opens + closes
        };
        // Whole days between contribute `len` each; the ends are walked.
        let first = from.div_euclid(DAY_MS) - 1;
        let last = to.div_euclid(DAY_MS);
        let overlap = |d: i64| {
            let start = d * DAY_MS + opens;
            (to.min(start + len) - from.max(start)).max(0)
        };
        if last - first <= 4 {
            return (first..=last).map(overlap).sum();
        }
        let head: i64 = (first..first + 2).map(overlap).sum();
        let tail: i64 = (last - 1..=last).map(overlap).sum();
        head + tail + (last - 1 - (first + 2)) * len
    }

    fn open_at(&self, local_ms: i64) -> bool {
        let Some((opens, closes)) = self.hours else {
            return true;
        };
        let m = (local_ms.div_euclid(MINUTE_MS)).rem_euclid(DAY_MINUTES) as u16;
        if opens < closes {
            opens <= m && m < closes
        } else {
            // Past midnight (or 24 hours when equal).
            m >= opens || m < closes
        }
    }
}

/// The offset of one zone over a span of instants.
#[derive(Debug, Clone, Copy)]
struct Span {
    tz: Tz,
    from: i64,
    to: i64,
    offset_ms: i64,
}

/// Converts instants to a zone's wall clock, keeping each zone's last
/// offset span.
#[derive(Debug, Default)]
struct Converter {
    spans: Vec<Span>,
}

impl Converter {
    /// The wall clock of `tz` at UTC milliseconds `ts`.
    fn local(&mut self, tz: Tz, ts: i64) -> i64 {
        let slot = self.spans.iter().position(|s| s.tz == tz);
        if let Some(s) = slot.map(|i| self.spans[i]) {
            if s.from <= ts && ts < s.to {
                return ts + s.offset_ms;
            }
        }
        let offset = |t: i64| {
            DateTime::from_timestamp_millis(t).map(|at| {
                let o = tz.offset_from_utc_datetime(&at.naive_utc());
                i64::from(o.fix().local_minus_utc()) * 1000
            })
        };
        let Some(offset_ms) = offset(ts) else {
            return ts;
        };
        // Kept for the UTC day when the zone has the same offset at its
        // first and last millisecond (zones change a few times a year; on
        // the day of a change, each row is looked up).
        let from = ts.div_euclid(DAY_MS) * DAY_MS;
        let to = from + DAY_MS;
        if offset(from) == Some(offset_ms) && offset(to - 1) == Some(offset_ms) {
            let span = Span {
                tz,
                from,
                to,
                offset_ms,
            };
            match slot {
                Some(i) => self.spans[i] = span,
                None => self.spans.push(span),
            }
        }
        ts + offset_ms
    }
}

fn get(c: Option<&StringArray>, r: usize) -> Option<&str> {
    c.filter(|c| !c.is_null(r)).map(|c| c.value(r))
}

fn text_col<'a>(b: &'a RecordBatch, name: &str) -> Option<&'a StringArray> {
    b.column_by_name(name)
        .and_then(|a| a.as_string_opt::<i32>())
}

/// Per store: its place.
#[derive(Debug, Default)]
struct Index {
    stores: HashMap<Box<str>, Place>,
}

impl Index {
    fn build(stores: &[RecordBatch]) -> Self {
        let mut out = HashMap::new();
        for b in stores {
            let Some(id) = text_col(b, "store_id") else {
                continue;
            };
            let (tz, opens, closes) = (
                text_col(b, "timezone"),
                text_col(b, "opens"),
                text_col(b, "closes"),
            );
            for r in 0..b.num_rows() {
                if id.is_null(r) {
                    continue;
                }
                // Validated on load: a zone that does not parse is not here.
                let tz = get(tz, r)
                    .and_then(|z| z.parse::<Tz>().ok())
                    .unwrap_or(Tz::UTC);
                let hours = match (
                    get(opens, r).and_then(parse_local_time),
                    get(closes, r).and_then(parse_local_time),
                ) {
                    // Equal times: open around the clock.
                    (Some(o), Some(c)) if o % DAY_MINUTES as u16 != c % DAY_MINUTES as u16 => {
                        Some((o % DAY_MINUTES as u16, c % DAY_MINUTES as u16))
                    }
                    _ => None,
                };
                out.insert(id.value(r).into(), Place { tz, hours });
            }
        }
        Self { stores: out }
    }

    fn place(&self, store: &str) -> Place {
        self.stores.get(store).copied().unwrap_or(Place::UTC)
    }
}

type Built = (Arc<Vec<RecordBatch>>, Arc<Index>);

/// The `stores` table as a calendar index, shared by the functions of both
/// sessions; re-pointed when `stores` is registered again.
#[derive(Debug, Clone)]
pub struct StoreCalendar {
    stores: Arc<RwLock<DimensionData>>,
    built: Arc<Mutex<Option<Built>>>,
}

impl StoreCalendar {
    /// A calendar over this `stores` table.
    pub fn new(stores: DimensionData) -> Self {
        Self {
            stores: Arc::new(RwLock::new(stores)),
            built: Arc::default(),
        }
    }

    /// Points the calendar at a newly registered `stores` table (other
    /// names are ignored).
    pub fn set_table(&self, name: &str, data: &DimensionData) {
        if name == "stores" {
            *self.stores.write().expect("calendar stores") = data.clone();
        }
    }

    fn index(&self) -> Arc<Index> {
        let stores = self.stores.read().expect("calendar stores").batches();
        let mut built = self.built.lock().expect("calendar index");
        if let Some((s, index)) = built.as_ref() {
            if Arc::ptr_eq(s, &stores) {
                return index.clone();
            }
        }
        let index = Arc::new(Index::build(&stores));
        tracing::debug!(stores = index.stores.len(), "store calendar built");
        *built = Some((stores, index.clone()));
        index
    }

    /// `local_time(store_id, ts)`, `store_open(store_id, ts)` and
    /// `open_hours(store_id, from, to)`.
    pub fn udfs(&self) -> [ScalarUDF; 3] {
        [Kind::LocalTime, Kind::Open, Kind::OpenHours].map(|kind| {
            ScalarUDF::from(CalendarFn {
                calendar: self.clone(),
                kind,
                signature: Signature::any(
                    if kind == Kind::OpenHours { 3 } else { 2 },
                    Volatility::Volatile,
                ),
            })
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    LocalTime,
    Open,
    OpenHours,
}

#[derive(Debug)]
struct CalendarFn {
    calendar: StoreCalendar,
    kind: Kind,
    signature: Signature,
}

impl PartialEq for CalendarFn {
    fn eq(&self, o: &Self) -> bool {
        self.kind == o.kind && Arc::ptr_eq(&self.calendar.stores, &o.calendar.stores)
    }
}
impl Eq for CalendarFn {}
impl std::hash::Hash for CalendarFn {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.kind.hash(state)
    }
}

impl ScalarUDFImpl for CalendarFn {
    fn name(&self) -> &str {
        match self.kind {
            Kind::LocalTime => "local_time",
            Kind::Open => "store_open",
            Kind::OpenHours => "open_hours",
        }
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(match self.kind {
            Kind::LocalTime => DataType::Timestamp(TimeUnit::Millisecond, None),
            Kind::Open => DataType::Boolean,
            Kind::OpenHours => DataType::Float64,
        })
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let (store, ts, to) = match (self.kind, arrays.as_slice()) {
            (Kind::OpenHours, [s, f, t]) => (s, f, Some(t)),
            (Kind::LocalTime | Kind::Open, [s, t]) => (s, t, None),
            _ => {
                return exec_err!(
                    "{}: takes (store_id, ts){}",
                    self.name(),
                    if self.kind == Kind::OpenHours {
                        " and an end: (store_id, from, to)"
                    } else {
                        ""
                    }
                )
            }
        };
        let times = |a: &ArrayRef| cast(a, &ts_type());
        let (Ok(store), Ok(ts), Ok(to)) = (
            cast(store, &DataType::Utf8),
            times(ts),
            to.map(times).transpose(),
        ) else {
            return exec_err!("{}: expected text and timestamps", self.name());
        };
        let (store, ts) = (
            store.as_string::<i32>(),
            ts.as_primitive::<TimestampMillisecondType>(),
        );
        let to = to
            .as_ref()
            .map(|t| t.as_primitive::<TimestampMillisecondType>());
        let index = self.calendar.index();
        let mut conv = Converter::default();
        let mut last: Option<(&str, Place)> = None;
        let mut place = |r: usize| -> Place {
            if store.is_null(r) {
                return Place::UTC;
            }
            let s = store.value(r);
            match last {
                Some((l, p)) if l == s => p,
                _ => {
                    let p = index.place(s);
                    last = Some((s, p));
                    p
                }
            }
        };
        Ok(ColumnarValue::Array(match self.kind {
            Kind::LocalTime => {
                let mut b = TimestampMillisecondBuilder::with_capacity(n);
                for r in 0..n {
                    if ts.is_null(r) {
                        b.append_null();
                    } else {
                        let p = place(r);
                        b.append_value(conv.local(p.tz, ts.value(r)));
                    }
                }
                Arc::new(b.finish())
            }
            Kind::Open => {
                let mut b = BooleanBuilder::with_capacity(n);
                for r in 0..n {
                    if ts.is_null(r) {
                        b.append_null();
                    } else {
                        let p = place(r);
                        b.append_value(p.open_at(conv.local(p.tz, ts.value(r))));
                    }
                }
                Arc::new(b.finish())
            }
            Kind::OpenHours => {
                let to = to.expect("three arguments");
                let mut b = Float64Builder::with_capacity(n);
                for r in 0..n {
                    if ts.is_null(r) || to.is_null(r) {
                        b.append_null();
                        continue;
                    }
                    let p = place(r);
                    let (from, until) = (ts.value(r), to.value(r));
                    let ms = if until <= from {
                        0
                    } else {
                        p.open_ms(conv.local(p.tz, from), conv.local(p.tz, until))
                    };
                    b.append_value(ms.max(0) as f64 / 3_600_000.0);
                }
                Arc::new(b.finish())
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::{
        array::{ArrayRef, TimestampMillisecondArray},
        datatypes::{Field, Schema},
    };

    use super::*;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    type StoreRow<'a> = (&'a str, Option<&'a str>, Option<&'a str>, Option<&'a str>);

    fn calendar(rows: &[StoreRow<'_>]) -> StoreCalendar {
        let col = |i: usize| -> ArrayRef {
            Arc::new(StringArray::from(
                rows.iter()
                    .map(|r| [Some(r.0), r.1, r.2, r.3][i])
                    .collect::<Vec<_>>(),
            ))
        };
        let schema = Arc::new(Schema::new(
            ["store_id", "timezone", "opens", "closes"]
                .map(|n| Field::new(n, DataType::Utf8, true))
                .to_vec(),
        ));
        let b = RecordBatch::try_new(schema.clone(), (0..4).map(col).collect()).unwrap();
        StoreCalendar::new(DimensionData::new(schema, vec![b]))
    }

    fn local(c: &StoreCalendar, store: &str, ts: i64) -> i64 {
        let p = c.index().place(store);
        Converter::default().local(p.tz, ts)
    }

    #[test]
    fn local_times() {
        assert_eq!(parse_local_time("7:30"), Some(450));
        assert_eq!(parse_local_time("24:00"), Some(1440));
        for bad in ["24:01", "7", "07:60", "x:00", "07:5", ""] {
            assert_eq!(parse_local_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn wall_clock_per_store_and_across_daylight_saving() {
        let c = calendar(&[
            ("SH", Some("Asia/Shanghai"), None, None),
            ("NY", Some("America/New_York"), None, None),
        ]);
        // 16:00 UTC is midnight of the next day in Shanghai.
        assert_eq!(
            local(&c, "SH", ms("2026-03-01T16:00:00Z")),
            ms("2026-03-02T00:00:00Z")
        );
        // New York: EST (-5) before 2026-03-08 07:00 UTC, EDT (-4) after.
        assert_eq!(
            local(&c, "NY", ms("2026-03-08T06:59:00Z")),
            ms("2026-03-08T01:59:00Z")
        );
        assert_eq!(
            local(&c, "NY", ms("2026-03-08T07:00:00Z")),
            ms("2026-03-08T03:00:00Z")
        );
        // Unknown store: UTC.
        assert_eq!(local(&c, "XX", 12_345), 12_345);
        // One converter over a day that changes offset keeps both right.
        let mut conv = Converter::default();
        let ny: Tz = "America/New_York".parse().unwrap();
        let mut t = ms("2026-03-08T00:00:00Z");
        while t < ms("2026-03-09T00:00:00Z") {
            let want = ny
                .offset_from_utc_datetime(&DateTime::from_timestamp_millis(t).unwrap().naive_utc())
                .fix()
                .local_minus_utc() as i64
                * 1000;
            assert_eq!(conv.local(ny, t), t + want, "at {t}");
            t += 7 * MINUTE_MS;
        }
    }

    #[test]
    fn opening_hours_including_past_midnight() {
        let c = calendar(&[
            ("D", Some("Asia/Shanghai"), Some("08:00"), Some("22:00")),
            ("N", None, Some("18:00"), Some("02:00")),
            ("A", None, None, None),
        ]);
        let open = |s: &str, t: &str| {
            let p = c.index().place(s);
            p.open_at(Converter::default().local(p.tz, ms(t)))
        };
        // 00:30 UTC is 08:30 in Shanghai.
        assert!(open("D", "2026-03-01T00:30:00Z"));
        assert!(!open("D", "2026-03-01T23:59:00Z"));
        assert!(!open("D", "2026-03-01T14:00:00Z")); // 22:00 local: closed
        assert!(open("N", "2026-03-01T01:59:00Z"));
        assert!(!open("N", "2026-03-01T02:00:00Z"));
        assert!(open("N", "2026-03-01T18:00:00Z"));
        assert!(open("A", "2026-03-01T03:00:00Z"));
    }

    #[test]
    fn opening_time_between_two_instants() {
        let c = calendar(&[
            ("D", None, Some("08:00"), Some("22:00")),
            ("N", None, Some("18:00"), Some("02:00")),
            ("A", None, None, None),
        ]);
        let hours = |s: &str, a: &str, b: &str| {
            let p = c.index().place(s);
            p.open_ms(ms(a), ms(b)) as f64 / 3_600_000.0
        };
        // Closed at night: 21:30 to 08:30 the next day is one open hour.
        assert_eq!(
            hours("D", "2026-03-01T21:30:00Z", "2026-03-02T08:30:00Z"),
            1.0
        );
        assert_eq!(
            hours("D", "2026-03-01T23:00:00Z", "2026-03-02T07:00:00Z"),
            0.0
        );
        // Ten whole days: 14 hours each.
        assert_eq!(
            hours("D", "2026-03-01T00:00:00Z", "2026-03-11T00:00:00Z"),
            140.0
        );
        assert_eq!(
            hours("D", "2026-03-01T12:00:00Z", "2026-03-11T12:00:00Z"),
            140.0
        );
        // Past midnight: 18:00–02:00 is 8 hours a day.
        assert_eq!(
            hours("N", "2026-03-01T01:00:00Z", "2026-03-01T19:00:00Z"),
            2.0
        );
        assert_eq!(
            hours("N", "2026-03-01T00:00:00Z", "2026-03-08T00:00:00Z"),
            56.0
        );
        assert_eq!(
            hours("A", "2026-03-01T00:00:00Z", "2026-03-01T05:30:00Z"),
            5.5
        );
        // Brute force, minute by minute, over spans up to a week.
        let p = c.index().place("N");
        let t0 = ms("2026-03-01T00:00:00Z");
        for (a, b) in [(0, 7), (13, 3000), (59, 10_080), (600, 601), (1439, 1441)] {
            let (from, to) = (t0 + a * MINUTE_MS, t0 + b * MINUTE_MS);
            let want = (a..b).filter(|m| p.open_at(t0 + m * MINUTE_MS)).count() as i64 * MINUTE_MS;
            assert_eq!(p.open_ms(from, to), want, "{a}..{b}");
        }
    }

    #[test]
    fn udf_over_arrays() {
        let c = calendar(&[("SH", Some("Asia/Shanghai"), Some("08:00"), Some("22:00"))]);
        let [lt, open, _] = c.udfs();
        let stores = Arc::new(StringArray::from(vec![Some("SH"), None, Some("SH")]));
        let ts = Arc::new(
            TimestampMillisecondArray::from(vec![Some(ms("2026-03-01T01:00:00Z")), Some(5), None])
                .with_timezone("UTC"),
        );
        let run = |f: &ScalarUDF| {
            let args = ScalarFunctionArgs {
                args: vec![
                    ColumnarValue::Array(stores.clone()),
                    ColumnarValue::Array(ts.clone()),
                ],
                arg_fields: vec![
                    Arc::new(Field::new("s", DataType::Utf8, true)),
                    Arc::new(Field::new("t", ts_type(), true)),
                ],
                number_rows: 3,
                return_field: Arc::new(Field::new(
                    "r",
                    f.return_type(&[DataType::Utf8, ts_type()]).unwrap(),
                    true,
                )),
                config_options: Arc::default(),
            };
            f.invoke_with_args(args).unwrap().into_array(3).unwrap()
        };
        let l = run(&lt);
        let l = l.as_primitive::<TimestampMillisecondType>();
        assert_eq!(l.value(0), ms("2026-03-01T09:00:00Z"));
        assert_eq!(l.value(1), 5);
        assert!(l.is_null(2));
        let o = run(&open);
        let o = o.as_boolean();
        assert!(o.value(0));
        assert!(o.value(1));
        assert!(o.is_null(2));
    }
}
