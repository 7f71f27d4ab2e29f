//! The stock model against a straightforward batch computation: random
//! interleavings of counts, movements, sales and opening balances, delivered
//! in random arrival order and batches (late arrivals included), give the
//! `stock_on_hand` status and level a plain replay of the rules gives:
//!
//! * the count in effect is the latest by event time (ties: the larger
//!   value, as the ledger orders them); movements and sales at or before
//!   it are included in it, later ones are added;
//! * no count: the opening balance plus every movement and sale (derived),
//!   or unknown (NULL) without an opening balance;
//! * `counted` when nothing happened after the count in effect.

use std::{collections::BTreeMap, sync::Arc};

use datafusion::arrow::{
    array::{Array, AsArray, RecordBatch, StringArray},
    datatypes::{DataType, Field, Int64Type, Schema},
};
use proptest::prelude::*;
use rand::{seq::SliceRandom, SeedableRng};
use rand_chacha::ChaCha8Rng;
use storepulse_engine::{Engine, EngineConfig};
use storepulse_ingest::StreamKind;

const T0: i64 = 1_772_409_600_000; // 2026-03-02T00:00:00Z
const MIN: i64 = 60_000;

#[derive(Debug, Clone, Copy)]
enum Ev {
    Count(i64),
    Move(i64),
    Sale(i64),
}

/// (SKU index, minute, event).
type Row = (usize, i64, Ev);

fn row_strategy() -> impl Strategy<Value = Row> {
    (
        0usize..4,
        0i64..240,
        prop_oneof![
            (0i64..40).prop_map(Ev::Count),
            (-5i64..30).prop_map(Ev::Move),
            (1i64..6).prop_map(Ev::Sale),
        ],
    )
}

/// The expected (status, on_hand) per SKU.
fn batch_model(rows: &[Row], opening: &[Option<i64>]) -> BTreeMap<String, (String, Option<i64>)> {
    let mut out = BTreeMap::new();
    for (sku, open) in opening.iter().enumerate() {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.0 == sku).collect();
        if mine.is_empty() {
            continue;
        }
        let delta = |e: &Ev| match e {
            Ev::Move(q) => *q,
            Ev::Sale(q) => -*q,
            Ev::Count(_) => 0,
        };
        let count = mine
            .iter()
            .filter_map(|(_, t, e)| match e {
                Ev::Count(v) => Some((*t, *v)),
                _ => None,
            })
            .max();
        let last = mine.iter().map(|r| r.1).max().expect("rows");
        let got = match (count, open) {
            (Some((ct, cv)), _) => {
                let after: i64 = mine.iter().filter(|r| r.1 > ct).map(|r| delta(&r.2)).sum();
                let status = if last > ct { "derived" } else { "counted" };
                (status.to_string(), Some(cv + after))
            }
            (None, Some(o)) => (
                "derived".to_string(),
                Some(o + mine.iter().map(|r| delta(&r.2)).sum::<i64>()),
            ),
            (None, None) => ("unknown".to_string(), None),
        };
        out.insert(format!("K{sku}"), got);
    }
    out
}

fn json(i: usize, (sku, minute, ev): &Row) -> (StreamKind, String) {
    let ts = T0 + minute * MIN;
    let head = format!(r#""event_id":"e{i}","ts":{ts},"store_id":"S1""#);
    match ev {
        Ev::Count(v) => (
            StreamKind::StockCounts,
            format!(r#"{{{head},"sku":"K{sku}","on_hand":{v}}}"#),
        ),
        Ev::Move(q) => (
            StreamKind::StockMovements,
            format!(r#"{{{head},"sku":"K{sku}","kind":"adjustment","qty":{q}}}"#),
        ),
        Ev::Sale(q) => (
            StreamKind::Sales,
            format!(
                r#"{{{head},"receipt_id":"r{i}","lines":[{{"sku":"K{sku}","qty":{q},"unit_price":1}}]}}"#
            ),
        ),
    }
}

async fn streamed(
    rows: &[Row],
    opening: &[Option<i64>],
    seed: u64,
    chunk: usize,
) -> BTreeMap<String, (String, Option<i64>)> {
    let mut engine = Engine::new(EngineConfig {
        // Every arrival is within lateness (the fixture spans four hours).
        allowed_lateness: std::time::Duration::from_secs(6 * 3600),
        ..Default::default()
    })
    .unwrap();
    let (skus, values): (Vec<String>, Vec<i64>) = opening
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.map(|v| (format!("K{i}"), v)))
        .unzip();
    let schema = Arc::new(Schema::new(vec![
        Field::new("store_id", DataType::Utf8, true),
        Field::new("sku", DataType::Utf8, true),
        Field::new("on_hand", DataType::Int64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec!["S1"; skus.len()])),
            Arc::new(StringArray::from(skus)),
            Arc::new(datafusion::arrow::array::Int64Array::from(values)),
        ],
    )
    .unwrap();
    engine
        .register_dimension("opening_stock", vec![batch], schema)
        .unwrap();
    engine
        .execute_sql(&storepulse_testkit::builtin_script())
        .await
        .unwrap();
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut offset = 0u64;
    for part in order.chunks(chunk.max(1)) {
        for kind in [
            StreamKind::StockCounts,
            StreamKind::StockMovements,
            StreamKind::Sales,
        ] {
            let lines: Vec<String> = part
                .iter()
                .map(|&i| json(i, &rows[i]))
                .filter(|(k, _)| *k == kind)
                .map(|(_, l)| l)
                .collect();
            if lines.is_empty() {
                continue;
            }
            offset += lines.len() as u64;
            if let Some(msg) =
                storepulse_testkit::json_message(kind, &lines, kind.name(), offset).unwrap()
            {
                engine.apply(msg, 0).await.unwrap();
            }
        }
    }
    let out = engine
        .execute_sql("SELECT sku, stock_status, on_hand FROM stock_on_hand")
        .await
        .unwrap();
    let mut got = BTreeMap::new();
    for b in &out[0].batches {
        let sku = b.column(0).as_string::<i32>();
        let status = b.column(1).as_string::<i32>();
        let on_hand = b.column(2).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            got.insert(
                sku.value(i).to_string(),
                (
                    status.value(i).to_string(),
                    (!on_hand.is_null(i)).then(|| on_hand.value(i)),
                ),
            );
        }
    }
    got
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn stock_status_and_level_match_a_plain_replay(
        rows in proptest::collection::vec(row_strategy(), 1..60),
        opening in proptest::collection::vec(proptest::option::of(0i64..50), 4),
        seed in any::<u64>(),
        chunk in 1usize..20,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let got = rt.block_on(streamed(&rows, &opening, seed, chunk));
        prop_assert_eq!(got, batch_model(&rows, &opening));
    }
}
