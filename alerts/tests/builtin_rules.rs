//! The built-in rules' conditions (`sql/alerts/builtin.sql`) on hand-made
//! events: which keys each returns, with the default `[retail]` thresholds.

use storepulse_engine::{Engine, EngineConfig, EngineHandle};
use storepulse_ingest::StreamKind;

const T0: i64 = 1_767_600_000_000; // 2026-01-05T08:00:00Z
const MIN: i64 = 60_000;

async fn engine() -> EngineHandle {
    engine_with(&[]).await
}

/// An engine with the built-in views and rules over these dimension tables
/// (name, CSV text), loaded as `storepulse run` loads dimension files.
async fn engine_with(dims: &[(&str, &str)]) -> EngineHandle {
    let mut e = Engine::new(EngineConfig::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in dims {
        let path = dir.path().join(format!("{name}.csv"));
        std::fs::write(&path, text).unwrap();
        let (schema, batches) = storepulse_engine::DimensionSource {
            table: name.to_string(),
            location: path.display().to_string(),
        }
        .load()
        .await
        .unwrap();
        e.register_dimension(name, batches, schema).unwrap();
    }
    let params = Default::default();
    for (_, sql) in storepulse_sql::builtin::scripts(&params).unwrap() {
        e.execute_sql(&sql).await.unwrap();
    }
    let (_, alerts) = storepulse_sql::builtin::alert_script(&params).unwrap();
    e.execute_sql(&alerts).await.unwrap();
    EngineHandle::new(e)
}

async fn apply(h: &EngineHandle, stream: StreamKind, lines: &[String]) {
    let msg = storepulse_testkit::json_message(stream, lines, "p0", 0)
        .unwrap()
        .unwrap();
    h.lock().await.apply(msg, 0).await.unwrap();
}

/// One text column of `rows`, in row order.
fn texts<'a>(rows: &'a [serde_json::Value], column: &str) -> Vec<&'a str> {
    rows.iter().map(|r| r[column].as_str().unwrap()).collect()
}

/// The rule's condition rows as JSON objects.
async fn rows(h: &EngineHandle, rule: &str) -> Vec<serde_json::Value> {
    let sql = h
        .lock()
        .await
        .alerts()
        .iter()
        .find(|a| a.name == rule)
        .unwrap()
        .query_sql
        .clone();
    let (out, _) = h.query_at(&sql).await.unwrap();
    let mut buf = Vec::new();
    {
        let mut w = arrow_json::ArrayWriter::new(&mut buf);
        for b in &out.batches {
            w.write(b).unwrap();
        }
        w.finish().unwrap();
    }
    if buf.is_empty() {
        return Vec::new();
    }
    serde_json::from_slice(&buf).unwrap()
}

fn reading(device: &str, t: i64, value: f64) -> String {
    format!(
        r#"{{"event_id":"{device}-{t}","ts":{t},"store_id":"S1","device_id":"{device}","metric":"fridge_temp_c","value":{value}}}"#
    )
}

#[tokio::test]
async fn cold_chain_needs_the_fridge_above_the_limit_for_the_whole_duration() {
    let h = engine().await;
    let mut lines = Vec::new();
    for k in 0..=8 {
        let t = T0 + k * 5 * MIN;
        // A: 8 °C for 40 minutes.
        lines.push(reading("A", t, 8.0));
        // B: 8 °C, but 4 °C at 20 minutes: above for only 20 minutes.
        lines.push(reading("B", t, if k == 4 { 4.0 } else { 8.0 }));
        // C: recovered: the latest reading is 4 °C.
        lines.push(reading("C", t, if k == 8 { 4.0 } else { 9.0 }));
        // D: normal all along.
        lines.push(reading("D", t, 3.5));
    }
    // E: above for 25 minutes only (started late).
    for k in 3..=8 {
        lines.push(reading("E", T0 + k * 5 * MIN, 7.0));
    }
    apply(&h, StreamKind::IotReadings, &lines).await;
    let got = rows(&h, "cold_chain").await;
    let devices = texts(&got, "device_id");
    assert_eq!(devices, vec!["A"], "{got:?}");
    assert_eq!(got[0]["minutes_above"], 40.0);
    assert_eq!(got[0]["temperature_c"], 8.0);
}

fn receipt(id: &str, t: i64, sku: &str) -> String {
    format!(
        r#"{{"event_id":"{id}","ts":{t},"store_id":"S1","receipt_id":"{id}","lines":[{{"sku":"{sku}","qty":1,"unit_price":2.0}}]}}"#
    )
}

#[tokio::test]
async fn sales_stall_flags_a_fast_seller_that_stopped_in_an_open_store() {
    let h = engine().await;
    let counts: Vec<String> = ["X", "Y", "Z", "W"]
        .iter()
        .map(|sku| {
            format!(
                r#"{{"event_id":"c-{sku}","ts":{},"store_id":"S1","sku":"{sku}","on_hand":1000,"source":"stocktake"}}"#,
                T0 - MIN
            )
        })
        .collect();
    apply(&h, StreamKind::StockCounts, &counts).await;
    let mut sales = Vec::new();
    // X: one a minute for four hours, then nothing for two.
    for m in 0..240 {
        sales.push(receipt(&format!("x{m}"), T0 + m * MIN, "X"));
    }
    // Y: every five minutes for six hours (the store is open).
    for m in (0..=360).step_by(5) {
        sales.push(receipt(&format!("y{m}"), T0 + m * MIN, "Y"));
    }
    // Z: a slow seller (four sales), silent for hours: below the rate floor.
    for m in [0, 30, 60, 90] {
        sales.push(receipt(&format!("z{m}"), T0 + m * MIN, "Z"));
    }
    // W: fast, stopped only 30 minutes ago: within its expected gap x factor.
    for m in 0..330 {
        sales.push(receipt(&format!("w{m}"), T0 + m * MIN, "W"));
    }
    apply(&h, StreamKind::Sales, &sales).await;
    let got = rows(&h, "sales_stall").await;
    let skus = texts(&got, "sku");
    assert_eq!(skus, vec!["X"], "{got:?}");
    let r = &got[0];
    assert!(
        (r["hours_since_sale"].as_f64().unwrap() - (2.0 + 1.0 / 60.0)).abs() < 1e-6,
        "{r}"
    );
    assert!(r["expected_gap_hours"].as_f64().unwrap() < 2.0, "{r}");
    assert_eq!(r["on_hand"], 760);
}

#[tokio::test]
async fn sales_stall_counts_only_opening_time() {
    // S1 opens 08:00–22:00 in Shanghai (T0 = 16:00 there); S2 has no hours.
    // X sells one a minute in both until 21:59 local, then nothing; Y sells
    // once the next morning, which moves the clock. At 08:10 local, S1's X
    // has been silent 11 open minutes (no stall) and S2's for 10 hours (a
    // stall); at 10:30 local both have.
    let h = engine_with(&[(
        "stores",
        "store_id,name,city,format,timezone,opens,closes
         S1,a,c,f,Asia/Shanghai,08:00,22:00
         S2,b,c,f,,,
",
    )])
    .await;
    let sale = |store: &str, id: &str, t: i64, sku: &str| {
        format!(
            r#"{{"event_id":"{store}{id}","ts":{t},"store_id":"{store}","receipt_id":"{store}{id}","lines":[{{"sku":"{sku}","qty":1,"unit_price":2.0}}]}}"#
        )
    };
    let mut counts = Vec::new();
    let mut sales = Vec::new();
    for store in ["S1", "S2"] {
        counts.push(count(store, "X", T0 - MIN, 1000));
        counts.push(count(store, "Y", T0 - MIN, 1000));
        for m in 0..360 {
            sales.push(sale(store, &format!("x{m}"), T0 + m * MIN, "X"));
        }
    }
    apply(&h, StreamKind::StockCounts, &counts).await;
    apply(&h, StreamKind::Sales, &sales).await;
    let morning = T0 + (16 * 60 + 10) * MIN; // 08:10 local
    let y = [
        sale("S1", "y1", morning, "Y"),
        sale("S2", "y1", morning, "Y"),
    ];
    apply(&h, StreamKind::Sales, &y).await;
    let got = rows(&h, "sales_stall").await;
    let stalled: Vec<(&str, &str)> = got
        .iter()
        .map(|r| (r["store_id"].as_str().unwrap(), r["sku"].as_str().unwrap()))
        .collect();
    assert_eq!(stalled, vec![("S2", "X")], "{got:?}");
    let since = got[0]["hours_since_sale"].as_f64().unwrap();
    assert!((since - (10.0 + 11.0 / 60.0)).abs() < 1e-6, "{got:?}");

    let later = T0 + (18 * 60 + 30) * MIN; // 10:30 local
    let y = [sale("S1", "y2", later, "Y"), sale("S2", "y2", later, "Y")];
    apply(&h, StreamKind::Sales, &y).await;
    let mut got = rows(&h, "sales_stall").await;
    got.sort_by_key(|r| r["store_id"].as_str().unwrap().to_string());
    assert_eq!(texts(&got, "store_id"), vec!["S1", "S2"], "{got:?}");
    let since = got[0]["hours_since_sale"].as_f64().unwrap();
    assert!(
        (since - (2.5 + 1.0 / 60.0)).abs() < 1e-6,
        "open hours only: {got:?}"
    );
}

fn count(store: &str, sku: &str, t: i64, on_hand: i64) -> String {
    format!(
        r#"{{"event_id":"c-{store}-{sku}-{t}","ts":{t},"store_id":"{store}","sku":"{sku}","on_hand":{on_hand},"source":"stocktake"}}"#
    )
}

#[tokio::test]
async fn low_stock_fires_below_min_stock_even_without_demand() {
    // S1/A has a store x SKU min_stock of 10 and 3 on hand, no sales: the
    // probability is 0 but the floor is broken. S1/B (no policy row, the
    // default min_stock 0) with 3 on hand does not fire.
    let h = engine_with(&[(
        "replenishment_policy",
        "store_id,sku,city,format,category,lead_time_hours,service_level,review_hours,min_stock\n\
         S1,A,,,,24,,,10\n",
    )])
    .await;
    let counts = [count("S1", "A", T0, 3), count("S1", "B", T0, 3)];
    apply(&h, StreamKind::StockCounts, &counts).await;
    let got = rows(&h, "low_stock").await;
    assert_eq!(got.len(), 1, "{got:?}");
    let r = &got[0];
    assert_eq!(
        (r["store_id"].as_str(), r["sku"].as_str()),
        (Some("S1"), Some("A"))
    );
    assert_eq!(r["reason"], "below_min_stock");
    assert_eq!(r["policy_source"], "store_sku");
    assert_eq!(r["p_stockout"], 0.0);
    assert_eq!(r["min_stock"], 10);
    assert_eq!(r["suggested_order_qty"], 7, "up to min_stock: {r}");
}

#[tokio::test]
async fn low_cover_warns_days_before_the_order_is_due() {
    // X and Y sell one unit a minute for an hour (~1.73 units/h decayed).
    // X keeps 300: 173 h of cover, under lead 48 h + review 24 h + 7 days =
    // 240 h, over the reorder point: a heads-up, no order yet. Y keeps 740
    // (427 h): nothing. Z keeps 60 (35 h): an order is due (low_stock's
    // business), so no low_cover.
    let h = engine().await;
    let counts = [
        count("S1", "X", T0 - MIN, 360),
        count("S1", "Y", T0 - MIN, 800),
        count("S1", "Z", T0 - MIN, 120),
    ];
    apply(&h, StreamKind::StockCounts, &counts).await;
    let mut sales = Vec::new();
    for m in 0..60 {
        for sku in ["X", "Y", "Z"] {
            sales.push(receipt(&format!("{sku}{m}"), T0 + m * MIN, sku));
        }
    }
    apply(&h, StreamKind::Sales, &sales).await;
    let got = rows(&h, "low_cover").await;
    let skus = texts(&got, "sku");
    assert_eq!(skus, vec!["X"], "{got:?}");
    let r = &got[0];
    let cover = r["hours_of_cover"].as_f64().unwrap();
    assert!((170.0..176.0).contains(&cover), "{r}");
    let days = r["days_until_order"].as_f64().unwrap();
    assert!((days - (cover - 72.0) / 24.0).abs() < 1e-9, "{r}");
    let low = rows(&h, "low_stock").await;
    assert_eq!(texts(&low, "sku"), vec!["Z"], "Z needs an order now");
}

#[tokio::test]
async fn store_silent_needs_the_rest_of_the_chain_awake() {
    // Day: S1 to S3 sell at 12:00, S4 last sold at 09:00: S4 is silent.
    let h = engine().await;
    let sale = |store: &str, t: i64| {
        format!(
            r#"{{"event_id":"{store}-{t}","ts":{t},"store_id":"{store}","receipt_id":"{store}-{t}","lines":[{{"sku":"A","qty":1,"unit_price":2.0}}]}}"#
        )
    };
    let noon = T0 + 4 * 60 * MIN;
    let day = [
        sale("S4", T0 + 60 * MIN),
        sale("S1", noon),
        sale("S2", noon),
        sale("S3", noon),
    ];
    apply(&h, StreamKind::Sales, &day).await;
    let got = rows(&h, "store_silent").await;
    let stores = texts(&got, "store_id");
    assert_eq!(stores, vec!["S4"], "{got:?}");
    assert_eq!(got[0]["minutes_silent"], 180.0);
    assert_eq!(
        (got[0]["active_stores"].as_i64(), got[0]["stores"].as_i64()),
        (Some(3), Some(4))
    );

    // Night: only S1 still sends (its stock counter): the others closed at
    // 09:00; nobody is flagged.
    let h = engine().await;
    let night = [
        sale("S2", T0 + 60 * MIN),
        sale("S3", T0 + 60 * MIN),
        sale("S4", T0 + 60 * MIN),
        sale("S1", noon),
    ];
    apply(&h, StreamKind::Sales, &night).await;
    assert!(rows(&h, "store_silent").await.is_empty());
}

#[tokio::test]
async fn store_silent_counts_a_store_s_opening_time_only() {
    // S1 is open 08:00–22:00 UTC; S2 to S4 have no hours. All last sent at
    // 21:50 the day before, S5 sends through the morning (the clock). At
    // 08:30 S1 has been silent 40 open minutes: not yet. At 09:30, 100: it
    // fires although most of the chain is quiet (S2–S4 need the chain awake).
    let h = engine_with(&[(
        "stores",
        "store_id,name,city,format,opens,closes
         S1,a,c,f,08:00,22:00
S2,b,c,f,,
S3,b,c,f,,
S4,b,c,f,,
S5,b,c,f,,
",
    )])
    .await;
    let sale = |store: &str, t: i64| {
        format!(
            r#"{{"event_id":"{store}-{t}","ts":{t},"store_id":"{store}","receipt_id":"{store}-{t}","lines":[{{"sku":"A","qty":1,"unit_price":2.0}}]}}"#
        )
    };
    let evening = T0 + (13 * 60 + 50) * MIN; // 21:50
    let last: Vec<String> = ["S1", "S2", "S3", "S4"]
        .iter()
        .map(|s| sale(s, evening))
        .collect();
    apply(&h, StreamKind::Sales, &last).await;
    apply(
        &h,
        StreamKind::Sales,
        &[sale("S5", T0 + 24 * 60 * MIN + 30 * MIN)],
    )
    .await;
    assert!(rows(&h, "store_silent").await.is_empty());
    apply(
        &h,
        StreamKind::Sales,
        &[sale("S5", T0 + 24 * 60 * MIN + 90 * MIN)],
    )
    .await;
    let got = rows(&h, "store_silent").await;
    assert_eq!(texts(&got, "store_id"), vec!["S1"], "{got:?}");
    assert_eq!(got[0]["minutes_silent"], 100.0);
    assert_eq!(got[0]["has_hours"], true);
}

#[tokio::test]
async fn order_overdue_and_transfer_overdue_fire_past_their_grace() {
    let h = engine().await;
    let order = |id: &str, t: i64, expected: i64| {
        format!(
            r#"{{"event_id":"p-{id}","ts":{t},"store_id":"S1","order_id":"{id}","sku":"A","status":"placed","qty":6,"expected_at":{expected}}}"#
        )
    };
    // O1 expected at 09:00, O2 at 11:00; the clock reaches 12:00 with the
    // shipment. O1 is 3 h late (overdue after 2 h), O2 1 h late (not yet).
    apply(
        &h,
        StreamKind::PurchaseOrders,
        &[
            order("O1", T0, T0 + 60 * MIN),
            order("O2", T0, T0 + 3 * 60 * MIN),
        ],
    )
    .await;
    let ship = |t: i64, id: &str| {
        format!(
            r#"{{"event_id":"{id}","ts":{t},"store_id":"S2","sku":"A","kind":"transfer_out","qty":-3,"transfer_id":"{id}","peer_store_id":"S1"}}"#
        )
    };
    apply(
        &h,
        StreamKind::StockMovements,
        &[ship(T0 + 4 * 60 * MIN, "T1")],
    )
    .await;
    let got = rows(&h, "order_overdue").await;
    let late: Vec<(&str, f64)> = got
        .iter()
        .map(|r| {
            (
                r["order_id"].as_str().unwrap(),
                r["hours_late"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(late, vec![("O1", 3.0)], "{got:?}");
    assert!(rows(&h, "transfer_overdue").await.is_empty());

    // Two days later T1 has not arrived: overdue; O1 and O2 too.
    let later = T0 + (4 + 49) * 60 * MIN;
    apply(&h, StreamKind::StockMovements, &[ship(later, "T2")]).await;
    let got = rows(&h, "transfer_overdue").await;
    let ids = texts(&got, "transfer_id");
    assert_eq!(ids, vec!["T1"], "{got:?}");
    assert_eq!(got[0]["to_store"], "S1");
    assert_eq!(rows(&h, "order_overdue").await.len(), 2);
}

#[tokio::test]
async fn price_mismatch_fires_on_a_store_still_charging_the_old_price() {
    // A head-office change from 1.00 to 1.20 at T0; S2 keeps the old price.
    let h = engine_with(&[
        (
            "stores",
            "store_id,name,city,format\nS1,a,Lyon,supermarket\nS2,b,Lyon,supermarket\n",
        ),
        (
            "prices",
            "sku,price,valid_from\nA,1.00,2026-01-01\nA,1.20,2026-01-05T08:00:00Z\n",
        ),
    ])
    .await;
    let sale = |id: &str, store: &str, t: i64, price: &str| {
        format!(
            r#"{{"event_id":"{id}","ts":{t},"store_id":"{store}","receipt_id":"{id}","lines":[{{"sku":"A","qty":1,"unit_price":{price}}}]}}"#
        )
    };
    // One off-price line is not enough (price_mismatch_min_lines = 2); a
    // line before the change at the old price is right.
    apply(
        &h,
        StreamKind::Sales,
        &[
            sale("r0", "S2", T0 - 60 * MIN, "1.00"),
            sale("r1", "S1", T0 + MIN, "1.20"),
            sale("r2", "S2", T0 + 2 * MIN, "1.00"),
        ],
    )
    .await;
    assert!(rows(&h, "price_mismatch").await.is_empty());
    apply(
        &h,
        StreamKind::Sales,
        &[sale("r3", "S2", T0 + 3 * MIN, "1.00")],
    )
    .await;
    let got = rows(&h, "price_mismatch").await;
    assert_eq!(texts(&got, "store_id"), vec!["S2"], "{got:?}");
    assert_eq!(got[0]["mismatched_lines"], 2);
    assert_eq!(got[0]["lost_revenue"], 0.4);
    assert_eq!(got[0]["price_valid_from"], "2026-01-05T08:00:00Z");
    // The till is fixed: the alert holds until a day passes without a
    // wrong line (it reads only the lines off).
    apply(
        &h,
        StreamKind::Sales,
        &[sale("r4", "S2", T0 + 4 * MIN, "1.20")],
    )
    .await;
    assert_eq!(rows(&h, "price_mismatch").await.len(), 1);
    apply(
        &h,
        StreamKind::Sales,
        &[sale("r5", "S1", T0 + 25 * 60 * MIN, "1.20")],
    )
    .await;
    assert!(rows(&h, "price_mismatch").await.is_empty());
    // price_deviations tells at once that S2's latest sale was right.
    let (out, _) = h
        .query_at("SELECT still_mismatched FROM price_deviations WHERE store_id = 'S2'")
        .await
        .unwrap();
    let flags = out.batches[0]
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::BooleanArray>()
        .unwrap()
        .value(0);
    assert!(!flags);
}

#[tokio::test]
async fn near_expiry_fires_for_a_lot_on_the_shelf_a_day_before_its_date() {
    let h = engine().await;
    let mv = |id: &str, t: i64, qty: i64, lot: &str, expires: i64| {
        format!(
            r#"{{"event_id":"{id}","ts":{t},"store_id":"S1","sku":"M","kind":"receipt","qty":{qty},"lot":"{lot}","expires_at":{expires}}}"#
        )
    };
    let day = 24 * 60 * MIN;
    apply(
        &h,
        StreamKind::StockCounts,
        &[
            r#"{"event_id":"c0","ts":1767600000000,"store_id":"S1","sku":"M","on_hand":0}"#
                .to_string(),
        ],
    )
    .await;
    // L1 (10, expires in 30 h) then L2 (6, in 20 h); 10 sold: the 6 left
    // are the newest units, L2's (first in, first out), due within the
    // 24 h of near_expiry_within. L1 is sold out.
    apply(
        &h,
        StreamKind::StockMovements,
        &[
            mv("m1", T0 + MIN, 10, "L1", T0 + 30 * 60 * MIN),
            mv("m2", T0 + 2 * MIN, 6, "L2", T0 + 20 * 60 * MIN),
        ],
    )
    .await;
    apply(
        &h,
        StreamKind::Sales,
        &[format!(
            r#"{{"event_id":"r1","ts":{},"store_id":"S1","receipt_id":"r1","lines":[{{"sku":"M","qty":10,"unit_price":1.00}}]}}"#,
            T0 + 3 * MIN
        )],
    )
    .await;
    let got = rows(&h, "near_expiry").await;
    assert_eq!(texts(&got, "lot"), vec!["L2"], "{got:?}");
    assert_eq!(got[0]["on_hand_est"], 6);
    assert_eq!(got[0]["reason"], "near_expiry");
    // A day later L2 has expired on the shelf.
    apply(
        &h,
        StreamKind::StockMovements,
        &[mv("m3", T0 + day, 1, "L3", T0 + 10 * day)],
    )
    .await;
    let got = rows(&h, "near_expiry").await;
    assert_eq!(texts(&got, "lot"), vec!["L2"], "{got:?}");
    assert_eq!(got[0]["reason"], "expired");
    // Expired for more than a day: no longer paged (still listed).
    apply(
        &h,
        StreamKind::StockMovements,
        &[mv("m4", T0 + 2 * day, 1, "L4", T0 + 10 * day)],
    )
    .await;
    assert!(rows(&h, "near_expiry").await.is_empty());
    let (out, _) = h
        .query_at("SELECT count(*) AS n FROM expiring_stock WHERE lot = 'L2' AND expired")
        .await
        .unwrap();
    assert_eq!(
        out.batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap()
            .value(0),
        1
    );
}
