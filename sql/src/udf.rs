//! Window functions for `GROUP BY`.
//!
//! * `tumble(ts, INTERVAL '1 hour')` — the start of the tumbling window that
//!   contains `ts` (the same as `date_bin(INTERVAL '1 hour', ts)`).
//! * `hop(ts, slide, size)` — the starts of every hopping window of length
//!   `size`, advancing by `slide`, that contains `ts`, as a list. Use it with
//!   `unnest` so that each row counts in every window it belongs to:
//!   `SELECT .., w AS window_start FROM (SELECT *, unnest(hop(ts, INTERVAL
//!   '1 hour', INTERVAL '24 hours')) AS w FROM sales) GROUP BY .., w`.
//!
//! * `session(ts, INTERVAL '30 minutes')` — in a materialized view's
//!   `GROUP BY` only: rows of the same other keys whose times are at most the
//!   gap apart form one session; the column holds the session's start. The
//!   engine maintains it (sessions merge when a late row bridges two). As a
//!   plain function it returns `ts` unchanged.
//!
//! `tumble` and `hop` are plain scalar functions, so a batch query with the same SQL gives
//! the same answer as the continuous view (the batch oracle).

use std::sync::Arc;

use datafusion::{
    arrow::{
        array::{Array, ArrayRef, AsArray, ListArray, TimestampMillisecondArray},
        buffer::OffsetBuffer,
        datatypes::{DataType, Field, IntervalMonthDayNano, TimeUnit, TimestampMillisecondType},
    },
    common::{exec_err, plan_err, Result, ScalarValue},
    logical_expr::{
        ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
    },
};

/// All storepulse scalar UDFs, to register in every `SessionContext`.
pub fn all() -> Vec<ScalarUDF> {
    vec![
        ScalarUDF::from(Tumble::new()),
        ScalarUDF::from(Hop::new()),
        ScalarUDF::from(Session {
            signature: Signature::any(2, Volatility::Immutable),
        }),
    ]
}

/// `__hop_pane(ts, slide)`: the one-element list `[tumble(ts, slide)]`, with
/// the same type as `hop`. The engine substitutes it for `hop` so that a
/// hopping view keeps one state entry per (key, slide-sized pane) instead of
/// one per window; windows are assembled from panes when the view is read.
pub fn hop_pane() -> ScalarUDF {
    ScalarUDF::from(HopPane {
        signature: Signature::any(2, Volatility::Immutable),
    })
}

/// Milliseconds of a constant interval literal (no months), if it is one.
pub fn interval_literal_ms(v: &ScalarValue) -> Option<i64> {
    interval_ms(&ColumnarValue::Scalar(v.clone()), "", "").ok()
}

fn interval_ms(v: &ColumnarValue, fname: &str, arg: &str) -> Result<i64> {
    let ColumnarValue::Scalar(s) = v else {
        return exec_err!("{fname}: {arg} must be a constant interval");
    };
    let ms = match s {
        ScalarValue::IntervalMonthDayNano(Some(IntervalMonthDayNano {
            months,
            days,
            nanoseconds,
        })) => {
            if *months != 0 {
                return exec_err!("{fname}: {arg} cannot use months (windows need a fixed length)");
            }
            *days as i64 * 86_400_000 + nanoseconds / 1_000_000
        }
        ScalarValue::IntervalDayTime(Some(v)) => v.days as i64 * 86_400_000 + v.milliseconds as i64,
        ScalarValue::Int64(Some(ms)) => *ms,
        other => return exec_err!("{fname}: {arg} must be an interval, got {other}"),
    };
    if ms <= 0 {
        return exec_err!("{fname}: {arg} must be positive");
    }
    Ok(ms)
}

fn check_ts(fname: &str, t: &DataType) -> Result<()> {
    match t {
        DataType::Timestamp(TimeUnit::Millisecond, _) => Ok(()),
        other => plan_err!(
            "{fname}: the first argument must be a millisecond timestamp such as an event's `ts`, got {other}"
        ),
    }
}

fn ts_array(v: &ColumnarValue, rows: usize) -> Result<ArrayRef> {
    v.to_array(rows)
}

/// `tumble(ts, size)`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Tumble {
    signature: Signature,
}

impl Tumble {
    fn new() -> Self {
        Self {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for Tumble {
    fn name(&self) -> &str {
        "tumble"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        check_ts("tumble", &args[0])?;
        Ok(args[0].clone())
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let size = interval_ms(&args.args[1], "tumble", "size")?;
        let ts = ts_array(&args.args[0], args.number_rows)?;
        let ts = ts.as_primitive::<TimestampMillisecondType>();
        let out: TimestampMillisecondArray = ts.unary(|t| t - t.rem_euclid(size));
        let out = out.with_data_type(ts.data_type().clone());
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

/// `hop(ts, slide, size)`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Hop {
    signature: Signature,
}

impl Hop {
    fn new() -> Self {
        Self {
            signature: Signature::any(3, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for Hop {
    fn name(&self) -> &str {
        "hop"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        check_ts("hop", &args[0])?;
        Ok(DataType::List(Arc::new(Field::new(
            "item",
            args[0].clone(),
            false,
        ))))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let slide = interval_ms(&args.args[1], "hop", "slide")?;
        let size = interval_ms(&args.args[2], "hop", "size")?;
        if size % slide != 0 {
            return exec_err!("hop: size ({size} ms) must be a multiple of slide ({slide} ms)");
        }
        window_starts(&args, slide, (size / slide) as usize)
    }
}

/// For each timestamp of `args.args[0]`, the list of the `per_row` window
/// starts (oldest first) of slide-aligned windows that contain it; with
/// `per_row == 1` that is just the slide-sized pane.
fn window_starts(args: &ScalarFunctionArgs, slide: i64, per_row: usize) -> Result<ColumnarValue> {
    let ts = ts_array(&args.args[0], args.number_rows)?;
    let ts = ts.as_primitive::<TimestampMillisecondType>();
    let mut values = Vec::with_capacity(ts.len() * per_row);
    let mut lengths = Vec::with_capacity(ts.len());
    for i in 0..ts.len() {
        if ts.is_null(i) {
            lengths.push(0);
            continue;
        }
        let t = ts.value(i);
        let last = t - t.rem_euclid(slide);
        for k in (0..per_row as i64).rev() {
            values.push(last - k * slide);
        }
        lengths.push(per_row);
    }
    let values = TimestampMillisecondArray::from(values).with_data_type(ts.data_type().clone());
    let field = Arc::new(Field::new("item", ts.data_type().clone(), false));
    let list = ListArray::try_new(
        field,
        OffsetBuffer::from_lengths(lengths),
        Arc::new(values),
        ts.nulls().cloned(),
    )?;
    Ok(ColumnarValue::Array(Arc::new(list)))
}

/// See [`hop_pane`].
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct HopPane {
    signature: Signature,
}

impl ScalarUDFImpl for HopPane {
    fn name(&self) -> &str {
        "__hop_pane"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        Hop::new().return_type(&[args[0].clone(), args[1].clone(), args[1].clone()])
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let slide = interval_ms(&args.args[1], "hop", "slide")?;
        window_starts(&args, slide, 1)
    }
}

/// `session(ts, gap)`: see the module docs.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Session {
    signature: Signature,
}

impl ScalarUDFImpl for Session {
    fn name(&self) -> &str {
        "session"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        check_ts("session", &args[0])?;
        Ok(args[0].clone())
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        interval_ms(&args.args[1], "session", "gap")?;
        Ok(ColumnarValue::Array(ts_array(
            &args.args[0],
            args.number_rows,
        )?))
    }
}
