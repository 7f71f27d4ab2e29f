//! Test support shared by the crates' integration tests: the batch oracle.
//!
//! A streaming result is right when it equals what plain DataFusion computes
//! over every event at once. [`oracle_views`] builds that answer for every
//! materialized view of a script from a dataset directory (`<stream>.jsonl`
//! files), counting each `event_id` once and leaving out the events the
//! engine recorded as late; [`normalize`] turns batches into sorted rows so
//! two answers compare with `assert_eq!`.

pub mod calendar;
pub mod process;

use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
    sync::Arc,
};

use arrow::{
    array::{Array, AsArray, RecordBatch},
    datatypes::{DataType, Float64Type, SchemaRef},
    util::display::{ArrayFormatter, FormatOptions},
};
use datafusion::{datasource::MemTable, prelude::SessionContext};
use storepulse_ingest::{EventDecoder, RawRecord, StreamKind};
use storepulse_sql::Statement;

/// Rows as sorted strings; floats rounded to 6 decimals (sums of floats
/// depend on order in their last bits).
pub fn normalize(batches: &[RecordBatch]) -> Vec<String> {
    let mut rows = Vec::new();
    for b in batches {
        for r in 0..b.num_rows() {
            rows.push(
                b.columns()
                    .iter()
                    .map(|c| value(c.as_ref(), r))
                    .collect::<Vec<_>>()
                    .join(" | "),
            );
        }
    }
    rows.sort();
    rows
}

/// One value as text; floats (also inside structs and lists) rounded to 6
/// decimals.
fn value(a: &dyn Array, r: usize) -> String {
    if a.is_null(r) {
        return "NULL".into();
    }
    match a.data_type() {
        DataType::Float64 => format!("{:.6}", a.as_primitive::<Float64Type>().value(r)),
        DataType::Struct(fields) => {
            let s = a.as_struct();
            let parts: Vec<String> = fields
                .iter()
                .zip(s.columns())
                .map(|(f, c)| format!("{}: {}", f.name(), value(c.as_ref(), r)))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        DataType::List(_) => {
            let l = a.as_list::<i32>();
            let items = l.value(r);
            let mut parts: Vec<String> =
                (0..items.len()).map(|i| value(items.as_ref(), i)).collect();
            // array_agg(DISTINCT) has no defined order.
            parts.sort();
            format!("[{}]", parts.join(", "))
        }
        _ => {
            let opts = FormatOptions::default().with_null("NULL");
            let f = ArrayFormatter::try_new(a, &opts).expect("formattable");
            f.value(r).to_string()
        }
    }
}

/// Every built-in view script (default `[retail]` parameters) as one script.
pub fn builtin_script() -> String {
    storepulse_sql::builtin::scripts(&Default::default())
        .expect("built-in scripts render")
        .into_iter()
        .map(|(_, s)| s)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The materialized views of a script: (name, defining SELECT).
pub fn materialized_views(script: &str) -> Vec<(String, String)> {
    storepulse_sql::parse_script(script)
        .expect("valid script")
        .into_iter()
        .filter_map(|s| match s {
            Statement::CreateMaterializedView { name, query, .. } => {
                Some((name.to_string(), query.to_string()))
            }
            _ => None,
        })
        .collect()
}

/// Every stream of a dataset directory as one batch, each `event_id` once
/// (first occurrence), without the `(stream, event_id)`s in `late`.
pub fn dataset_tables(
    dir: &Path,
    late: &HashSet<(String, String)>,
) -> BTreeMap<StreamKind, RecordBatch> {
    let mut out = BTreeMap::new();
    for k in StreamKind::ALL {
        let path = dir.join(format!("{}.jsonl", k.name()));
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let mut seen = HashSet::new();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("valid dataset line");
                let id = v["event_id"].as_str().expect("event_id").to_string();
                !late.contains(&(k.name().to_string(), id.clone())) && seen.insert(id)
            })
            .collect();
        let recs: Vec<RawRecord<'_>> = lines
            .iter()
            .map(|l| RawRecord {
                bytes: l.as_bytes(),
                position: 0,
            })
            .collect();
        let decoded = EventDecoder::new(k, "oracle")
            .decode(&recs)
            .expect("decodable");
        assert!(
            decoded.dead_letters.is_empty(),
            "{:?}",
            decoded.dead_letters
        );
        if let Some(b) = decoded.batch {
            out.insert(k, b);
        }
    }
    out
}

/// The `sales` lines (qty > 0) with the price in force as `p`, for
/// `price_mismatches`: every `prices` row of the line's SKU in force at its
/// time whose scope matches the store (itself, its city, its format, or the
/// chain), the most specific level first, then the newest `valid_from`.
pub const PRICED_SALES_ORACLE: &str = "
CREATE VIEW oracle_priced_sales AS
WITH cand AS (
    SELECT l.store_id, l.sku, l.ts, l.qty, l.unit_price, l.event_id, l.line_no,
        p.price, p.valid_from,
        CASE WHEN p.store_id IS NOT NULL THEN 0 WHEN p.city IS NOT NULL THEN 1
             WHEN p.format IS NOT NULL THEN 2 ELSE 3 END AS level
    FROM sales l
    LEFT JOIN stores s ON s.store_id = l.store_id
    JOIN prices p ON p.sku = l.sku AND p.valid_from <= l.ts
        AND (p.valid_to IS NULL OR l.ts < p.valid_to)
        AND (p.store_id = l.store_id
             OR (p.store_id IS NULL AND p.city = s.city)
             OR (p.store_id IS NULL AND p.city IS NULL AND p.format = s.format)
             OR (p.store_id IS NULL AND p.city IS NULL AND p.format IS NULL))
    WHERE l.qty > 0
), best AS (
    SELECT *, row_number() OVER (PARTITION BY store_id, event_id, line_no
                                 ORDER BY level, valid_from DESC) AS rn
    FROM cand
)
SELECT store_id, sku, ts, qty, unit_price,
    named_struct('price', price, 'valid_from', valid_from,
                 'source', CASE level WHEN 0 THEN 'store' WHEN 1 THEN 'city'
                                      WHEN 2 THEN 'format' ELSE 'chain' END) AS p
FROM best WHERE rn = 1";

/// `sql` with `price_mismatches` reading [`PRICED_SALES_ORACLE`] instead of
/// calling the engine's `price_in_force`.
pub fn priced_by_oracle(sql: &str) -> String {
    if !sql.contains("price_in_force(") {
        return sql.to_string();
    }
    const CALL: &str = "price_in_force(sku, store_id, ts) AS p";
    let mut out = String::new();
    let mut rest = sql;
    while let Some(i) = rest.find(CALL) {
        let after = rest[i + CALL.len()..].trim_start();
        let after = after
            .strip_prefix("FROM sales")
            .unwrap_or_else(|| panic!("price_in_force not over sales: {rest}"));
        out.push_str(&rest[..i]);
        out.push_str("p FROM oracle_priced_sales");
        rest = after;
    }
    out.push_str(rest);
    assert!(
        !out.contains("price_in_force("),
        "price_in_force left in {out}"
    );
    out
}

/// The oracle's answer for every materialized view of `script` over the
/// dataset in `dir`: name → normalized rows. `dimensions` are registered
/// empty (name, schema: the engine's `DimensionKind::ALL`).
pub async fn oracle_views(
    script: &str,
    dir: &Path,
    late: &HashSet<(String, String)>,
    dimensions: &[(&str, SchemaRef)],
) -> BTreeMap<String, Vec<String>> {
    let ctx = SessionContext::new();
    storepulse_sql::register(&ctx);
    let mut tables = dataset_tables(dir, late);
    for k in StreamKind::ALL {
        // A stream with no events is an empty table, as in the engine.
        let parts = vec![tables.remove(&k).map(|b| vec![b]).unwrap_or_default()];
        let table = MemTable::try_new(k.schema(), parts).expect("mem table");
        ctx.register_table(k.name(), Arc::new(table))
            .expect("register");
    }
    // Dimension tables a view joins (store_category_losses joins
    // products), empty as the engine registers them until a file is
    // configured (the runs this oracle checks configure none).
    for (name, schema) in dimensions {
        let table = MemTable::try_new(schema.clone(), vec![vec![]]).expect("mem table");
        ctx.register_table(*name, Arc::new(table))
            .expect("register");
    }
    // No stores rows: every store keeps UTC.
    for f in calendar::calendar_udfs(&[]) {
        ctx.register_udf(f);
    }
    ctx.sql(PRICED_SALES_ORACLE)
        .await
        .expect("the priced sales view");
    let mut out = BTreeMap::new();
    for (name, select) in materialized_views(script) {
        let batches = ctx
            .sql(&priced_by_oracle(&select))
            .await
            .unwrap_or_else(|e| panic!("oracle for {name}: {e}"))
            .collect()
            .await
            .unwrap_or_else(|e| panic!("oracle for {name}: {e}"));
        out.insert(name, normalize(&batches));
    }
    out
}

/// Decodes JSON `lines` of `stream` into the message a source would send
/// (one batch, at `partition` / `next_offset`). Errors on any dead letter,
/// with its reason; `None` if no row decoded.
pub fn json_message<S: AsRef<str>>(
    stream: storepulse_ingest::StreamKind,
    lines: &[S],
    partition: &str,
    next_offset: u64,
) -> Result<Option<storepulse_ingest::SourceMessage>, String> {
    use storepulse_ingest::{EventDecoder, Position, RawRecord, SourceBatch, SourceMessage};
    let records: Vec<RawRecord<'_>> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| RawRecord {
            bytes: l.as_ref().as_bytes(),
            position: next_offset.saturating_sub(lines.len() as u64) + i as u64 + 1,
        })
        .collect();
    let out = EventDecoder::new(stream, partition)
        .decode(&records)
        .map_err(|e| e.to_string())?;
    if let Some(d) = out.dead_letters.first() {
        return Err(format!("dead letter: {}", d.reason));
    }
    Ok(out.batch.map(|batch| {
        SourceMessage::Batch(SourceBatch {
            stream,
            batch,
            events: out.events,
            bytes: 0,
            position: Position {
                partition: partition.into(),
                next_offset,
            },
        })
    }))
}
