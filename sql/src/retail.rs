//! Scalar functions the retail views use.
//!
//! * `watermark_floor()` — inside the engine, the smallest event time a
//!   future accepted row of the view being maintained can have (see
//!   [`crate::ledger`]); `NULL` anywhere else.
//! * `decayed_rate(sum, at, as_of, half_life)` — a `decayed_sum` decayed on
//!   to `as_of` (never forward in time) and scaled to a rate per hour:
//!   `sum · 2^(−max(0, as_of − at)/half_life) · ln 2 / half_life_hours`.
//!   `NULL` sum (no sales) → 0.
//! * `units_in(panes, as_of, hours)` — units of an `hourly_units` list in the
//!   `hours` hour-aligned panes ending with the one holding `as_of`.
//! * `normal_quantile(p)` — z such that Φ(z) = p (`NULL` outside (0, 1)).
//! * `stockout_probability(on_hand, mu, var)` — P(demand > on_hand) for
//!   lead-time demand with mean `mu` and variance `var`: Poisson(mu) while
//!   `mu < 20` (slow movers), normal N(mu, var) with a continuity
//!   correction from 20 on (fast movers; the Poisson is then close to normal
//!   and the measured variance, which counts multi-unit lines, is used).
//!   `demand_model(mu)` names the branch: `none` (mu = 0), `poisson`,
//!   `normal`.
//! * `expected_shortage(on_hand, mu, var)` — E[(demand − on_hand)⁺], the
//!   units a stock-out would lose over the lead time, same model.
//! * `stock_days_until(days, as_of, keep)` — a `stock_days` list extended
//!   with the quiet days up to the day holding `as_of` (the level holds), the
//!   day holding `as_of` cut at `as_of`, and only the last `keep` days; adds
//!   `hours`, the elapsed hours of each day.

use std::sync::{
    atomic::{AtomicI64, Ordering},
    Arc,
};

use datafusion::{
    arrow::{
        array::{
            Array, ArrayRef, AsArray, Float64Array, Float64Builder, Int64Array, Int64Builder,
            StringArray, StructArray, TimestampMillisecondBuilder,
        },
        datatypes::{DataType, Field, Fields, Float64Type, Int64Type},
    },
    common::{exec_err, plan_err, Result, ScalarValue},
    logical_expr::{
        ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
    },
};
use statrs::distribution::{Continuous, ContinuousCDF, Normal};

use crate::{
    agg::{as_f64, as_i64, struct_list_builder, struct_list_type, ts_millis, ts_type},
    ledger::{day_fields, DAY_MS},
    udf::interval_literal_ms,
};

/// Expected lead-time demand from which demand is modelled as normal.
pub const NORMAL_FROM_MU: f64 = 20.0;

const HOUR_MS: i64 = 3_600_000;

macro_rules! scalar_udf {
    ($ty:ident, $name:literal, $ret:expr, $args:literal, $vol:expr) => {
        #[derive(Debug, PartialEq, Eq, Hash)]
        struct $ty {
            signature: Signature,
        }
        impl $ty {
            fn udf() -> ScalarUDF {
                ScalarUDF::from($ty {
                    signature: Signature::any($args, $vol),
                })
            }
        }
        impl ScalarUDFImpl for $ty {
            fn name(&self) -> &str {
                $name
            }
            fn signature(&self) -> &Signature {
                &self.signature
            }
            fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
                Ok($ret)
            }
            fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
                let n = args.number_rows;
                let arrays = ColumnarValue::values_to_arrays(&args.args)?;
                let out = self.run(&arrays, n)?;
                Ok(ColumnarValue::Array(out))
            }
        }
    };
}

/// The engine's current floor (`i64::MIN` = none), shared with the
/// `watermark_floor()` function it registers.
#[derive(Debug, Clone)]
pub struct FloorCell(Arc<AtomicI64>);

impl Default for FloorCell {
    fn default() -> Self {
        Self(Arc::new(AtomicI64::new(i64::MIN)))
    }
}

impl FloorCell {
    /// Sets the floor (`None`: no floor).
    pub fn set(&self, ms: Option<i64>) {
        self.0.store(ms.unwrap_or(i64::MIN), Ordering::Release);
    }
    /// The `watermark_floor()` function reading this cell.
    pub fn udf(&self) -> ScalarUDF {
        ScalarUDF::from(WatermarkFloor {
            cell: self.clone(),
            signature: Signature::nullary(Volatility::Volatile),
        })
    }
}

#[derive(Debug)]
struct WatermarkFloor {
    cell: FloorCell,
    signature: Signature,
}
impl PartialEq for WatermarkFloor {
    fn eq(&self, o: &Self) -> bool {
        Arc::ptr_eq(&self.cell.0, &o.cell.0)
    }
}
impl Eq for WatermarkFloor {}
impl std::hash::Hash for WatermarkFloor {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        "watermark_floor".hash(state)
    }
}

impl ScalarUDFImpl for WatermarkFloor {
    fn name(&self) -> &str {
        "watermark_floor"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(ts_type())
    }
    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let v = self.cell.0.load(Ordering::Acquire);
        Ok(ColumnarValue::Scalar(ScalarValue::TimestampMillisecond(
            (v != i64::MIN).then_some(v),
            Some("UTC".into()),
        )))
    }
}

fn scalar_interval_ms(a: &ArrayRef, fname: &str) -> Result<i64> {
    if a.is_empty() {
        return Ok(1);
    }
    let v = ScalarValue::try_from_array(a, 0)?;
    match interval_literal_ms(&v) {
        Some(ms) if ms > 0 => Ok(ms),
        _ => exec_err!("{fname}: expected a positive interval without months, got {v}"),
    }
}

scalar_udf!(
    DecayedRate,
    "decayed_rate",
    DataType::Float64,
    4,
    Volatility::Immutable
);
impl DecayedRate {
    fn run(&self, a: &[ArrayRef], _n: usize) -> Result<ArrayRef> {
        let sum = as_f64(&a[0])?;
        let at = ts_millis(&a[1], "decayed_rate")?;
        let as_of = ts_millis(&a[2], "decayed_rate")?;
        let hl = scalar_interval_ms(&a[3], "decayed_rate")? as f64;
        let per_hour = std::f64::consts::LN_2 * HOUR_MS as f64 / hl;
        let out: Float64Array = (0..sum.len())
            .map(|i| {
                if sum.is_null(i) || at.is_null(i) {
                    return Some(0.0);
                }
                if as_of.is_null(i) {
                    return None;
                }
                let age = (as_of.value(i) - at.value(i)).max(0) as f64;
                Some(sum.value(i) * (-age / hl).exp2() * per_hour)
            })
            .collect();
        Ok(Arc::new(out))
    }
}

scalar_udf!(
    UnitsIn,
    "units_in",
    DataType::Int64,
    3,
    Volatility::Immutable
);
impl UnitsIn {
    fn run(&self, a: &[ArrayRef], _n: usize) -> Result<ArrayRef> {
        let Some(panes) = a[0].as_list_opt::<i32>() else {
            return exec_err!(
                "units_in: expected an hourly_units list, got {}",
                a[0].data_type()
            );
        };
        let as_of = ts_millis(&a[1], "units_in")?;
        let hours = as_i64(&a[2])?;
        let values = panes.values().as_struct();
        let hour = ts_millis(values.column(0), "units_in")?;
        let units = values.column(1).as_primitive::<Int64Type>();
        let out: Int64Array = (0..panes.len())
            .map(|i| {
                if as_of.is_null(i) || hours.is_null(i) {
                    return None;
                }
                if panes.is_null(i) {
                    return Some(0);
                }
                let last = as_of.value(i).div_euclid(HOUR_MS) * HOUR_MS;
                let first = last - (hours.value(i) - 1) * HOUR_MS;
                let r = panes.value_offsets()[i] as usize..panes.value_offsets()[i + 1] as usize;
                Some(
                    r.filter(|&j| (first..=last).contains(&hour.value(j)))
                        .map(|j| units.value(j))
                        .sum(),
                )
            })
            .collect();
        Ok(Arc::new(out))
    }
}

scalar_udf!(
    NormalQuantile,
    "normal_quantile",
    DataType::Float64,
    1,
    Volatility::Immutable
);
impl NormalQuantile {
    fn run(&self, a: &[ArrayRef], _n: usize) -> Result<ArrayRef> {
        let p = as_f64(&a[0])?;
        let n = Normal::standard();
        // Service levels take a handful of values: remember the last one.
        let mut last = (f64::NAN, f64::NAN);
        let out: Float64Array = p
            .iter()
            .map(|p| {
                p.filter(|p| *p > 0.0 && *p < 1.0).map(|p| {
                    if p != last.0 {
                        last = (p, n.inverse_cdf(p));
                    }
                    last.1
                })
            })
            .collect();
        Ok(Arc::new(out))
    }
}

/// P(D > k) for D ~ Poisson(mu), mu < [`NORMAL_FROM_MU`]: 1 − e^−μ Σ_{i≤k}
/// μ^i/i!, summed directly (the hot path of `stockout_risk`: ~20× faster
/// than the incomplete-gamma route and exact to rounding for these μ;
/// checked against statrs in the tests). Beyond k = 400 the tail is below
/// 1e−200 for any μ < 20.
fn poisson_sf(k: u64, mu: f64) -> f64 {
    if k > 400 {
        return 0.0;
    }
    let mut term = (-mu).exp();
    let mut cdf = term;
    for i in 1..=k {
        term *= mu / i as f64;
        cdf += term;
    }
    (1.0 - cdf).clamp(0.0, 1.0)
}

/// P(D > on_hand) for lead-time demand D with mean `mu` and variance `var`.
pub fn stockout_probability(on_hand: f64, mu: f64, var: f64) -> f64 {
    if on_hand < 0.0 {
        return 1.0;
    }
    if mu <= 0.0 {
        return 0.0;
    }
    if mu < NORMAL_FROM_MU {
        poisson_sf(on_hand.floor() as u64, mu)
    } else {
        let sigma = if var > 0.0 { var.sqrt() } else { mu.sqrt() };
        let z = (on_hand.floor() + 0.5 - mu) / sigma;
        1.0 - Normal::standard().cdf(z)
    }
}

/// Expected units short over the lead time, E[(D − on_hand)⁺] (the sales a
/// stock-out would lose), under the same demand model as
/// [`stockout_probability`]: Poisson μ − Σ_{i<k} P(D > i), normal
/// σ·(φ(z) − z·(1 − Φ(z))) with z = (on_hand − μ)/σ.
pub fn expected_shortage(on_hand: f64, mu: f64, var: f64) -> f64 {
    if mu <= 0.0 {
        return 0.0;
    }
    let on_hand = on_hand.max(0.0);
    if mu < NORMAL_FROM_MU {
        let k = on_hand.floor() as u64;
        if k > 400 {
            return 0.0;
        }
        let mut term = (-mu).exp();
        let mut cdf = term;
        let mut covered = 0.0;
        for i in 0..k {
            covered += (1.0 - cdf).max(0.0);
            term *= mu / (i + 1) as f64;
            cdf += term;
        }
        (mu - covered).max(0.0)
    } else {
        let sigma = if var > 0.0 { var.sqrt() } else { mu.sqrt() };
        let z = (on_hand - mu) / sigma;
        let n = Normal::standard();
        (sigma * (n.pdf(z) - z * (1.0 - n.cdf(z)))).max(0.0)
    }
}

scalar_udf!(
    ExpectedShortage,
    "expected_shortage",
    DataType::Float64,
    3,
    Volatility::Immutable
);
impl ExpectedShortage {
    fn run(&self, a: &[ArrayRef], _n: usize) -> Result<ArrayRef> {
        demand_fn(a, expected_shortage)
    }
}

/// `f(on_hand, mu, var)` over three columns: NULL when on_hand or mu is,
/// a NULL variance taken as 0.
fn demand_fn(a: &[ArrayRef], f: fn(f64, f64, f64) -> f64) -> Result<ArrayRef> {
    let (h, mu, var) = (as_f64(&a[0])?, as_f64(&a[1])?, as_f64(&a[2])?);
    let out: Float64Array = (0..h.len())
        .map(|i| {
            if h.is_null(i) || mu.is_null(i) {
                return None;
            }
            let var = if var.is_null(i) { 0.0 } else { var.value(i) };
            Some(f(h.value(i), mu.value(i), var))
        })
        .collect();
    Ok(Arc::new(out))
}

scalar_udf!(
    StockoutProbability,
    "stockout_probability",
    DataType::Float64,
    3,
    Volatility::Immutable
);
impl StockoutProbability {
    fn run(&self, a: &[ArrayRef], _n: usize) -> Result<ArrayRef> {
        demand_fn(a, stockout_probability)
    }
}

scalar_udf!(
    DemandModel,
    "demand_model",
    DataType::Utf8,
    1,
    Volatility::Immutable
);
impl DemandModel {
    fn run(&self, a: &[ArrayRef], _n: usize) -> Result<ArrayRef> {
        let mu = as_f64(&a[0])?;
        let out: StringArray = mu
            .iter()
            .map(|m| {
                m.map(|m| {
                    if m <= 0.0 {
                        "none"
                    } else if m < NORMAL_FROM_MU {
                        "poisson"
                    } else {
                        "normal"
                    }
                })
            })
            .collect();
        Ok(Arc::new(out))
    }
}

fn days_until_fields() -> Fields {
    let mut f: Vec<Field> = day_fields().iter().map(|f| f.as_ref().clone()).collect();
    f.push(Field::new("hours", DataType::Float64, false));
    Fields::from(f)
}

fn days_until_type() -> DataType {
    struct_list_type(days_until_fields())
}

scalar_udf!(
    DaysUntil,
    "stock_days_until",
    days_until_type(),
    3,
    Volatility::Immutable
);
impl DaysUntil {
    fn run(&self, a: &[ArrayRef], _n: usize) -> Result<ArrayRef> {
        let Some(list) = a[0].as_list_opt::<i32>() else {
            return plan_err!(
                "stock_days_until: expected a stock_days list, got {}",
                a[0].data_type()
            );
        };
        let as_of = ts_millis(&a[1], "stock_days_until")?;
        let keep = (scalar_interval_ms(&a[2], "stock_days_until")? + DAY_MS - 1) / DAY_MS;
        let v: &StructArray = list.values().as_struct();
        let day = ts_millis(v.column(0), "stock_days_until")?;
        let int = |i: usize| v.column(i).as_primitive::<Int64Type>();
        let (begin, end, sold, recv) = (int(1), int(2), int(4), int(5));
        let uh = v.column(3).as_primitive::<Float64Type>();
        let mut b = struct_list_builder(days_until_fields());
        // (day ms, begin, end, unit_hours, sold, received)
        let mut rows: Vec<(i64, i64, i64, f64, i64, i64)> = Vec::new();
        for i in 0..list.len() {
            if list.is_null(i) || as_of.is_null(i) {
                b.append(false);
                continue;
            }
            let t = as_of.value(i);
            let today = t.div_euclid(DAY_MS) * DAY_MS;
            rows.clear();
            let r = list.value_offsets()[i] as usize..list.value_offsets()[i + 1] as usize;
            for j in r {
                if day.value(j) > today {
                    continue; // after as_of
                }
                rows.push((
                    day.value(j),
                    begin.value(j),
                    end.value(j),
                    uh.value(j),
                    sold.value(j),
                    recv.value(j),
                ));
            }
            if let Some(&(last, _, level, ..)) = rows.last() {
                let first_quiet = (last + DAY_MS).max(today - (keep - 1) * DAY_MS);
                let mut d = first_quiet;
                while d <= today {
                    rows.push((d, level, level, level as f64 * 24.0, 0, 0));
                    d += DAY_MS;
                }
            }
            let first = today - (keep - 1) * DAY_MS;
            let sb = b.values();
            for &(d, bg, en, unit_hours, so, re) in rows.iter().filter(|r| r.0 >= first) {
                let (uh, hours) = if d == today {
                    // Cut the day at as_of: the end level held from as_of to
                    // the day's end in `unit_hours`.
                    let rest = (today + DAY_MS - t) as f64 / HOUR_MS as f64;
                    ((unit_hours - en as f64 * rest).max(0.0), 24.0 - rest)
                } else {
                    (unit_hours, 24.0)
                };
                sb.field_builder::<TimestampMillisecondBuilder>(0)
                    .expect("day")
                    .append_value(d);
                for (k, x) in [(1, bg), (2, en)] {
                    sb.field_builder::<Int64Builder>(k)
                        .expect("int")
                        .append_value(x);
                }
                sb.field_builder::<Float64Builder>(3)
                    .expect("uh")
                    .append_value(uh);
                for (k, x) in [(4, so), (5, re)] {
                    sb.field_builder::<Int64Builder>(k)
                        .expect("int")
                        .append_value(x);
                }
                sb.field_builder::<Float64Builder>(6)
                    .expect("hours")
                    .append_value(hours);
                sb.append(true);
            }
            b.append(true);
        }
        Ok(Arc::new(b.finish()))
    }
}

/// The retail scalar functions (except `watermark_floor`, which belongs to
/// an engine or is registered NULL-valued by [`crate::register`]).
pub fn scalar_functions() -> Vec<ScalarUDF> {
    vec![
        DecayedRate::udf(),
        UnitsIn::udf(),
        NormalQuantile::udf(),
        StockoutProbability::udf(),
        ExpectedShortage::udf(),
        DemandModel::udf(),
        DaysUntil::udf(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stockout_probability_branches() {
        // Poisson(2): P(D > 1) = 1 − e^−2 (1 + 2) = 0.5939941502901619
        let p = stockout_probability(1.0, 2.0, 2.0);
        assert!((p - 0.593_994_150_290_161_9).abs() < 1e-12, "{p}");
        assert_eq!(stockout_probability(5.0, 0.0, 0.0), 0.0);
        assert_eq!(stockout_probability(-1.0, 0.0, 0.0), 1.0);
        // Normal(100, 100): P(D > 100) with continuity = 1 − Φ(0.05)
        let p = stockout_probability(100.0, 100.0, 100.0);
        assert!((p - 0.480_061_194_161_628_2).abs() < 1e-9, "{p}");
    }

    #[test]
    fn poisson_summation_matches_statrs() {
        use statrs::distribution::{DiscreteCDF, Poisson};
        for mu in [0.001, 0.3, 1.0, 2.5, 7.0, 13.0, 19.99] {
            let d = Poisson::new(mu).unwrap();
            for k in [0u64, 1, 2, 5, 10, 20, 40, 80] {
                let want = (1.0 - d.cdf(k)).max(0.0);
                let got = poisson_sf(k, mu);
                assert!((got - want).abs() < 1e-12, "mu {mu} k {k}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn expected_shortage_matches_direct_sums() {
        use statrs::distribution::{Discrete, Poisson};
        // Poisson: E[(D − k)+] = Σ_{d>k} (d − k) P(D = d), summed directly.
        for mu in [0.2, 1.0, 4.0, 12.0] {
            let d = Poisson::new(mu).unwrap();
            for k in [0.0, 1.0, 3.0, 10.0] {
                let want: f64 = ((k as u64 + 1)..200)
                    .map(|x| (x as f64 - k) * d.pmf(x))
                    .sum();
                let got = expected_shortage(k, mu, mu);
                assert!((got - want).abs() < 1e-9, "mu {mu} k {k}: {got} vs {want}");
            }
        }
        // Normal(100, 100) at x = 100: σ φ(0) = 10 / sqrt(2π).
        let got = expected_shortage(100.0, 100.0, 100.0);
        assert!(
            (got - 10.0 / (2.0 * std::f64::consts::PI).sqrt()).abs() < 1e-9,
            "{got}"
        );
        assert_eq!(expected_shortage(3.0, 0.0, 0.0), 0.0);
        // Monotone: more stock, fewer lost units.
        assert!(expected_shortage(2.0, 5.0, 5.0) > expected_shortage(3.0, 5.0, 5.0));
    }
}
