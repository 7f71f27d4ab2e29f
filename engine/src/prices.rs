//! The `prices` dimension as an as-of index, and the function that reads
//! it: `price_in_force(sku, store_id, ts)`.
//!
//! A `prices` row sets the list price of a SKU from `valid_from` (until
//! `valid_to`, exclusive, when set) at one scope: a store (`store_id`), a
//! city, a format, or the whole chain (no scope column). The price in force
//! for a SKU in a store at time `ts` comes from the most specific scope with
//! a row in force at `ts` (store, then the store's city, then its format,
//! then the chain); within that scope the row with the newest `valid_from`
//! wins, so a promotion with an end (`valid_to`) falls back to the price
//! before it. A store's city and format are read from `stores`.
//!
//! `price_in_force` returns `{price, valid_from, source}` (`source`:
//! `store`, `city`, `format` or `chain`), or NULL when no row is in force.
//! The index is built once per version of the two tables (a reload swaps
//! their rows, and the next call sees the new ones: checked per call by
//! pointer), so a lookup is two hash probes and a binary search.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
};

use datafusion::{
    arrow::{
        array::{
            Array, ArrayRef, AsArray, Decimal128Builder, RecordBatch, StringBuilder, StructArray,
            TimestampMillisecondBuilder,
        },
        compute::cast,
        datatypes::{DataType, Decimal128Type, Field, Fields, TimestampMillisecondType},
    },
    common::{exec_err, Result},
    logical_expr::{
        ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
    },
};
use storepulse_ingest::schema::{ts_type, MONEY};

use crate::dims::DimensionData;

/// The scopes of a price, most specific first.
const SOURCES: [&str; 4] = ["store", "city", "format", "chain"];

/// One price row.
#[derive(Debug, Clone, Copy)]
struct Row {
    from: i64,
    to: Option<i64>,
    price: i128,
}

/// The rows of one SKU at one scope value, by `valid_from`.
#[derive(Debug)]
struct Series {
    /// Index into [`SOURCES`].
    level: u8,
    /// The store, city or format (empty for the chain).
    scope: Box<str>,
    rows: Vec<Row>,
}

impl Series {
    /// The row in force at `ts`: the newest started one not yet ended.
    fn at(&self, ts: i64) -> Option<Row> {
        let started = self.rows.partition_point(|r| r.from <= ts);
        self.rows[..started]
            .iter()
            .rev()
            .find(|r| r.to.is_none_or(|to| ts < to))
            .copied()
    }
}

/// A store's city and format (either may be missing).
type Place = (Option<Box<str>>, Option<Box<str>>);

/// Everything a lookup needs, built from one version of the two tables.
#[derive(Debug, Default)]
struct Index {
    /// Per SKU, its series, most specific level first.
    skus: HashMap<Box<str>, Vec<Series>>,
    /// Per store: city and format.
    stores: HashMap<Box<str>, Place>,
}

fn text_col<'a>(
    b: &'a RecordBatch,
    name: &str,
) -> Option<&'a datafusion::arrow::array::StringArray> {
    b.column_by_name(name)
        .and_then(|a| a.as_string_opt::<i32>())
}

impl Index {
    fn build(prices: &[RecordBatch], stores: &[RecordBatch]) -> Self {
        let mut skus: HashMap<Box<str>, Vec<Series>> = HashMap::new();
        for b in prices {
            let (Some(sku), Some(price), Some(from)) = (
                text_col(b, "sku"),
                b.column_by_name("price")
                    .and_then(|a| a.as_primitive_opt::<Decimal128Type>()),
                b.column_by_name("valid_from")
                    .and_then(|a| a.as_primitive_opt::<TimestampMillisecondType>()),
            ) else {
                continue;
            };
            let to = b
                .column_by_name("valid_to")
                .and_then(|a| a.as_primitive_opt::<TimestampMillisecondType>());
            let scopes = [
                text_col(b, "store_id"),
                text_col(b, "city"),
                text_col(b, "format"),
            ];
            for r in 0..b.num_rows() {
                if sku.is_null(r) || price.is_null(r) || from.is_null(r) {
                    continue;
                }
                let (level, scope) = scopes
                    .iter()
                    .enumerate()
                    .find_map(|(l, c)| c.filter(|c| !c.is_null(r)).map(|c| (l as u8, c.value(r))))
                    .unwrap_or((3, ""));
                let row = Row {
                    from: from.value(r),
                    to: to.filter(|t| !t.is_null(r)).map(|t| t.value(r)),
                    price: price.value(r),
                };
                let series = skus.entry(sku.value(r).into()).or_default();
                match series
                    .iter_mut()
                    .find(|s| s.level == level && &*s.scope == scope)
                {
                    Some(s) => s.rows.push(row),
                    None => series.push(Series {
                        level,
                        scope: scope.into(),
                        rows: vec![row],
                    }),
                }
            }
        }
        for series in skus.values_mut() {
            series.sort_by_key(|s| s.level);
            for s in series.iter_mut() {
                s.rows.sort_by_key(|r| r.from);
            }
        }
        let mut by_store = HashMap::new();
        for b in stores {
            let Some(id) = text_col(b, "store_id") else {
                continue;
            };
            let (city, format) = (text_col(b, "city"), text_col(b, "format"));
            let get = |c: Option<&datafusion::arrow::array::StringArray>, r: usize| {
                c.filter(|c| !c.is_null(r)).map(|c| c.value(r).into())
            };
            for r in 0..b.num_rows() {
                if !id.is_null(r) {
                    by_store.insert(id.value(r).into(), (get(city, r), get(format, r)));
                }
            }
        }
        Self {
            skus,
            stores: by_store,
        }
    }

    /// The price of `sku` in `store` at `ts`, and the level it came from.
    fn lookup(&self, sku: &str, store: &str, ts: i64) -> Option<(Row, u8)> {
        let series = self.skus.get(sku)?;
        let (city, format) = match self.stores.get(store) {
            Some((c, f)) => (c.as_deref(), f.as_deref()),
            None => (None, None),
        };
        series.iter().find_map(|s| {
            let matches = match s.level {
                0 => &*s.scope == store,
                1 => city == Some(&*s.scope),
                2 => format == Some(&*s.scope),
                _ => true,
            };
            if !matches {
                return None;
            }
            s.at(ts).map(|row| (row, s.level))
        })
    }
}

/// The two tables an index is built from, and the index of their current
/// rows.
#[derive(Debug)]
struct Cells {
    prices: DimensionData,
    stores: DimensionData,
}

type Built = (Arc<Vec<RecordBatch>>, Arc<Vec<RecordBatch>>, Arc<Index>);

/// The `prices` and `stores` tables as one as-of index, shared by the
/// `price_in_force` functions of both sessions. Re-pointed when either
/// table is registered again ([`PriceBook::set_table`]).
#[derive(Debug, Clone)]
pub struct PriceBook {
    cells: Arc<RwLock<Cells>>,
    built: Arc<Mutex<Option<Built>>>,
}

impl PriceBook {
    /// A book over these two tables.
    pub fn new(prices: DimensionData, stores: DimensionData) -> Self {
        Self {
            cells: Arc::new(RwLock::new(Cells { prices, stores })),
            built: Arc::default(),
        }
    }

    /// Points the book at a newly registered `prices` or `stores` table
    /// (other names are ignored).
    pub fn set_table(&self, name: &str, data: &DimensionData) {
        let mut cells = self.cells.write().expect("price cells");
        match name {
            "prices" => cells.prices = data.clone(),
            "stores" => cells.stores = data.clone(),
            _ => {}
        }
    }

    /// The index of the tables' current rows (built when they changed).
    fn index(&self) -> Arc<Index> {
        let (prices, stores) = {
            let cells = self.cells.read().expect("price cells");
            (cells.prices.batches(), cells.stores.batches())
        };
        let mut built = self.built.lock().expect("price index");
        if let Some((p, s, index)) = built.as_ref() {
            if Arc::ptr_eq(p, &prices) && Arc::ptr_eq(s, &stores) {
                return index.clone();
            }
        }
        let index = Arc::new(Index::build(&prices, &stores));
        tracing::debug!(
            skus = index.skus.len(),
            stores = index.stores.len(),
            "price index built"
        );
        *built = Some((prices, stores, index.clone()));
        index
    }

    /// The `price_in_force(sku, store_id, ts)` function.
    pub fn udf(&self) -> ScalarUDF {
        ScalarUDF::from(PriceInForce {
            book: self.clone(),
            signature: Signature::exact(
                vec![DataType::Utf8, DataType::Utf8, ts_type()],
                Volatility::Volatile,
            ),
        })
    }
}

fn return_fields() -> Fields {
    Fields::from(vec![
        Field::new("price", MONEY, false),
        Field::new("valid_from", ts_type(), false),
        Field::new("source", DataType::Utf8, false),
    ])
}

#[derive(Debug)]
struct PriceInForce {
    book: PriceBook,
    signature: Signature,
}

impl PartialEq for PriceInForce {
    fn eq(&self, o: &Self) -> bool {
        Arc::ptr_eq(&self.book.cells, &o.book.cells)
    }
}
impl Eq for PriceInForce {}
impl std::hash::Hash for PriceInForce {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        "price_in_force".hash(state)
    }
}

impl ScalarUDFImpl for PriceInForce {
    fn name(&self) -> &str {
        "price_in_force"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Struct(return_fields()))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let [sku, store, ts] = arrays.as_slice() else {
            return exec_err!("price_in_force(sku, store_id, ts) takes three arguments");
        };
        let ts = cast(ts, &ts_type())?;
        let (Some(sku), Some(store), Some(ts)) = (
            sku.as_string_opt::<i32>(),
            store.as_string_opt::<i32>(),
            ts.as_primitive_opt::<TimestampMillisecondType>(),
        ) else {
            return exec_err!("price_in_force(sku, store_id, ts): expected text, text, timestamp");
        };
        let index = self.book.index();
        let mut price = Decimal128Builder::with_capacity(n).with_data_type(MONEY);
        let mut from = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut source = StringBuilder::with_capacity(n, n * 5);
        let mut valid = Vec::with_capacity(n);
        for r in 0..n {
            let hit = (!sku.is_null(r) && !store.is_null(r) && !ts.is_null(r))
                .then(|| index.lookup(sku.value(r), store.value(r), ts.value(r)))
                .flatten();
            match hit {
                Some((row, level)) => {
                    price.append_value(row.price);
                    from.append_value(row.from);
                    source.append_value(SOURCES[level as usize]);
                    valid.push(true);
                }
                None => {
                    price.append_value(0);
                    from.append_value(0);
                    source.append_value("");
                    valid.push(false);
                }
            }
        }
        let out = StructArray::try_new(
            return_fields(),
            vec![
                Arc::new(price.finish()) as ArrayRef,
                Arc::new(from.finish()),
                Arc::new(source.finish()),
            ],
            Some(valid.into()),
        )?;
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dims::DimensionSource;

    async fn table(name: &str, csv: &str) -> DimensionData {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("{name}.csv"));
        std::fs::write(&path, csv).unwrap();
        let (schema, batches) = DimensionSource {
            table: name.into(),
            location: path.display().to_string(),
        }
        .load()
        .await
        .unwrap();
        DimensionData::new(schema, batches)
    }

    fn ms(s: &str) -> i64 {
        datafusion::arrow::compute::kernels::cast_utils::string_to_timestamp_nanos(s).unwrap()
            / 1_000_000
    }

    #[tokio::test]
    async fn most_specific_scope_then_newest_row_in_force() {
        let stores = table(
            "stores",
            "store_id,name,city,format\nS1,a,Lyon,supermarket\nS2,b,Lyon,convenience\nS3,c,Nice,convenience\n",
        )
        .await;
        let prices = table(
            "prices",
            "sku,store_id,city,format,price,valid_from,valid_to\n\
             A,,,,1.00,2026-03-01,\n\
             A,,,,1.20,2026-03-10,\n\
             A,,Lyon,,1.10,2026-03-05,\n\
             A,S1,,,0.90,2026-03-07T00:00:00Z,2026-03-08T00:00:00Z\n\
             A,,,convenience,1.05,2026-03-01,\n\
             B,,,,2.000001,2026-03-01,\n",
        )
        .await;
        let book = PriceBook::new(prices, stores);
        let index = book.index();
        let at = |sku: &str, store: &str, t: &str| {
            index
                .lookup(sku, store, ms(t))
                .map(|(r, l)| (r.price, SOURCES[l as usize]))
        };
        // Before the city row: the chain's (S1) or the format's (S3).
        assert_eq!(
            at("A", "S1", "2026-03-02T00:00:00Z"),
            Some((1_000_000, "chain"))
        );
        assert_eq!(
            at("A", "S3", "2026-03-02T00:00:00Z"),
            Some((1_050_000, "format"))
        );
        // The city row beats the format row and later chain changes.
        assert_eq!(
            at("A", "S2", "2026-03-11T00:00:00Z"),
            Some((1_100_000, "city"))
        );
        // S1's one-day promotion, then back to the city price.
        assert_eq!(
            at("A", "S1", "2026-03-07T12:00:00Z"),
            Some((900_000, "store"))
        );
        assert_eq!(
            at("A", "S1", "2026-03-08T00:00:00Z"),
            Some((1_100_000, "city"))
        );
        // An unknown store gets the chain's price; nothing before valid_from.
        assert_eq!(
            at("A", "S9", "2026-03-11T00:00:00Z"),
            Some((1_200_000, "chain"))
        );
        assert_eq!(at("A", "S1", "2026-02-28T23:59:59Z"), None);
        assert_eq!(
            at("B", "S1", "2026-03-02T00:00:00Z"),
            Some((2_000_001, "chain"))
        );
        assert_eq!(at("C", "S1", "2026-03-02T00:00:00Z"), None);
    }

    #[tokio::test]
    async fn bad_price_rows_name_line_and_column() {
        for (csv, want) in [
            (
                "sku,store_id,city,price,valid_from\nA,S1,Lyon,1.00,2026-03-01\n",
                ":2: a price row sets one scope",
            ),
            (
                "sku,price,valid_from\nA,1.0000001,2026-03-01\n",
                ":2: column 'price': 1.0000001 has more than 6 decimal places",
            ),
            (
                "sku,price,valid_from\nA,-1,2026-03-01\n",
                ":2: column 'price': -1 is negative",
            ),
            (
                "sku,price,valid_from\nA,1,yesterday\n",
                ":2: column 'valid_from': 'yesterday' is not a timestamp",
            ),
            ("sku,price\nA,1\n", ":1: missing column 'valid_from'"),
            (
                "sku,price,valid_from,valid_to\nA,1,2026-03-02,2026-03-01\n",
                ":2: column 'valid_to' must be after valid_from",
            ),
            (
                "sku,price,valid_from\nA,1,2026-03-01\nA,2,2026-03-01T00:00:00Z\n",
                ":3: duplicate key (sku = A, valid_from = 2026-03-01T00:00:00Z)",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("prices.csv");
            std::fs::write(&path, csv).unwrap();
            let e = DimensionSource {
                table: "prices".into(),
                location: path.display().to_string(),
            }
            .load()
            .await
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{csv:?}: {e}");
        }
    }
}
