//! The batch oracle's `local_time(store_id, ts)` and `store_open(store_id,
//! ts)`, written apart from the engine's (`storepulse_engine::calendar`): a
//! store's wall clock comes from DataFusion's `to_local_time` over the
//! instants labelled with the store's zone, not from the engine's offset
//! spans; opening hours compare the local minute of the day.

use std::{collections::HashMap, sync::Arc};

use arrow::{
    array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, TimestampMillisecondArray},
    compute::cast,
    datatypes::{DataType, Field, TimeUnit, TimestampMillisecondType},
};
use datafusion::{
    common::Result,
    logical_expr::{create_udf, ColumnarValue, ScalarFunctionArgs, ScalarUDF, Volatility},
};

/// A store's zone and opening hours (minutes after midnight).
type Place = (Option<String>, Option<(i64, i64)>);

/// Per store: its place.
#[derive(Debug, Clone, Default)]
struct Stores(HashMap<String, Place>);

fn minutes(s: &str) -> i64 {
    let (h, m) = s.split_once(':').expect("HH:MM");
    h.parse::<i64>().unwrap() * 60 + m.parse::<i64>().unwrap()
}

impl Stores {
    fn of(batches: &[RecordBatch]) -> Self {
        let mut out = HashMap::new();
        for b in batches {
            let col = |n: &str| {
                b.column_by_name(n)
                    .map(|a| cast(a, &DataType::Utf8).unwrap())
            };
            let (id, tz, opens, closes) = (
                col("store_id"),
                col("timezone"),
                col("opens"),
                col("closes"),
            );
            let get = |a: &Option<ArrayRef>, r: usize| {
                a.as_ref()
                    .map(|a| a.as_string::<i32>())
                    .filter(|a| !a.is_null(r))
                    .map(|a| a.value(r).to_string())
            };
            for r in 0..b.num_rows() {
                let Some(id) = get(&id, r) else { continue };
                let hours = match (get(&opens, r), get(&closes, r)) {
                    (Some(o), Some(c)) if minutes(&o) % 1440 != minutes(&c) % 1440 => {
                        Some((minutes(&o) % 1440, minutes(&c) % 1440))
                    }
                    _ => None,
                };
                out.insert(id, (get(&tz, r), hours));
            }
        }
        Self(out)
    }

    /// Local wall-clock milliseconds of every row.
    fn local(&self, store: &ArrayRef, ts: &ArrayRef) -> Result<Vec<Option<i64>>> {
        let store = cast(store, &DataType::Utf8)?;
        let store = store.as_string::<i32>();
        let utc = cast(ts, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
        let utc = utc.as_primitive::<TimestampMillisecondType>();
        // Each zone's local times for the whole array, by Arrow's cast.
        let mut by_zone: HashMap<&str, TimestampMillisecondArray> = HashMap::new();
        for (zone, _) in self.0.values() {
            let Some(z) = zone.as_deref() else { continue };
            if by_zone.contains_key(z) {
                continue;
            }
            let zoned: ArrayRef = Arc::new(utc.clone().with_timezone(z));
            let f = datafusion::functions::datetime::to_local_time();
            let args = ScalarFunctionArgs {
                args: vec![ColumnarValue::Array(zoned.clone())],
                arg_fields: vec![Arc::new(Field::new("ts", zoned.data_type().clone(), true))],
                number_rows: zoned.len(),
                return_field: Arc::new(Field::new(
                    "local",
                    DataType::Timestamp(TimeUnit::Millisecond, None),
                    true,
                )),
                config_options: Arc::default(),
            };
            let local = f.invoke_with_args(args)?.into_array(zoned.len())?;
            let local = cast(&local, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
            by_zone.insert(z, local.as_primitive::<TimestampMillisecondType>().clone());
        }
        Ok((0..utc.len())
            .map(|r| {
                if utc.is_null(r) {
                    return None;
                }
                let zone = (!store.is_null(r))
                    .then(|| self.0.get(store.value(r)))
                    .flatten()
                    .and_then(|(z, _)| z.as_deref());
                Some(match zone {
                    Some(z) => by_zone[z].value(r),
                    None => utc.value(r),
                })
            })
            .collect())
    }
}

/// The oracle's `local_time` and `store_open` over these `stores` rows.
pub fn calendar_udfs(stores: &[RecordBatch]) -> Vec<ScalarUDF> {
    let s = Arc::new(Stores::of(stores));
    let ts_utc = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let local = {
        let s = s.clone();
        create_udf(
            "local_time",
            vec![DataType::Utf8, ts_utc.clone()],
            DataType::Timestamp(TimeUnit::Millisecond, None),
            Volatility::Immutable,
            Arc::new(move |args: &[ColumnarValue]| {
                let a = ColumnarValue::values_to_arrays(args)?;
                let v = s.local(&a[0], &a[1])?;
                Ok(ColumnarValue::Array(Arc::new(
                    TimestampMillisecondArray::from(v),
                )))
            }),
        )
    };
    let open = create_udf(
        "store_open",
        vec![DataType::Utf8, ts_utc],
        DataType::Boolean,
        Volatility::Immutable,
        Arc::new(move |args: &[ColumnarValue]| {
            let a = ColumnarValue::values_to_arrays(args)?;
            let v = s.local(&a[0], &a[1])?;
            let store = cast(&a[0], &DataType::Utf8)?;
            let store = store.as_string::<i32>();
            let out: BooleanArray = v
                .iter()
                .enumerate()
                .map(|(r, l)| {
                    let l = (*l)?;
                    let hours = (!store.is_null(r))
                        .then(|| s.0.get(store.value(r)))
                        .flatten()
                        .and_then(|(_, h)| *h);
                    let m = l.div_euclid(60_000).rem_euclid(1440);
                    Some(match hours {
                        None => true,
                        Some((o, c)) if o < c => o <= m && m < c,
                        Some((o, c)) => m >= o || m < c,
                    })
                })
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    );
    vec![local, open]
}

#[cfg(test)]
mod tests {
    use arrow::{array::StringArray, datatypes::Schema};

    use super::*;

    #[test]
    fn instants_on_each_store_s_wall_clock() {
        let b = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("store_id", DataType::Utf8, true),
                Field::new("timezone", DataType::Utf8, true),
            ])),
            vec![
                Arc::new(StringArray::from(vec!["SH", "NY"])),
                Arc::new(StringArray::from(vec!["Asia/Shanghai", "America/New_York"])),
            ],
        )
        .unwrap();
        let s = Stores::of(&[b]);
        let store: ArrayRef = Arc::new(StringArray::from(vec![Some("SH"), Some("NY"), None]));
        // 2026-03-01T16:00Z; 2026-03-08T07:00Z (EDT starts); 0.
        let ts: ArrayRef = Arc::new(
            TimestampMillisecondArray::from(vec![1_772_380_800_000, 1_772_953_200_000, 0])
                .with_timezone("UTC"),
        );
        let l = s.local(&store, &ts).unwrap();
        assert_eq!(l[0], Some(1_772_380_800_000 + 8 * 3_600_000));
        assert_eq!(l[1], Some(1_772_953_200_000 - 4 * 3_600_000));
        assert_eq!(l[2], Some(0));
    }
}
