//! A key explosion stops at `[engine] max_state_bytes` with an error that
//! names the view, instead of growing until the process is OOM-killed.

mod common;

use storepulse_engine::{Engine, EngineConfig, EngineError};
use storepulse_ingest::StreamKind;

#[tokio::test]
async fn a_key_explosion_hits_the_state_limit_with_a_clear_error() {
    let mut e = Engine::new(EngineConfig {
        max_state_bytes: Some(bytesize::ByteSize::kib(256)),
        ..Default::default()
    })
    .unwrap();
    e.execute_sql(
        "CREATE MATERIALIZED VIEW per_device AS
         SELECT device_id, count(*) AS n, max(value) AS hottest FROM iot_readings GROUP BY device_id",
    )
    .await
    .unwrap();
    let mut failed = None;
    for chunk in 0..200u64 {
        let lines: Vec<String> = (0..500)
            .map(|i| {
                let d = chunk * 500 + i;
                format!(
                    r#"{{"event_id":"e{d}","ts":{},"store_id":"S1","device_id":"device-{d}","metric":"fridge_temp_c","value":4.0}}"#,
                    1_767_600_000_000i64 + d as i64
                )
            })
            .collect();
        let msg =
            storepulse_testkit::json_message(StreamKind::IotReadings, &lines, "p0", chunk + 1)
                .unwrap()
                .unwrap();
        if let Err(err) = e.apply(msg, 0).await {
            failed = Some((chunk, err));
            break;
        }
    }
    let (chunk, err) = failed.expect("100,000 distinct keys must pass 256 KiB");
    assert!(chunk > 0, "the first small batch fits");
    assert!(matches!(err, EngineError::StateLimit { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("max_state_bytes") && msg.contains("per_device") && msg.contains("groups"),
        "{msg}"
    );
    assert!(e.state_bytes() < 4 * 256 * 1024, "stopped near the limit");
}

/// The TTL test's view: count, hottest and last reading per device.
const PER_DEVICE: &str =
    "SELECT device_id, count(*) AS n, max(value) AS hottest, max(ts) AS last_ts \
     FROM iot_readings GROUP BY device_id";

/// The readings of the TTL test, in batches of 100 one second apart: five
/// "hot" devices report every 50 s, every other reading comes from a new
/// device that never reports again (90,000 of them).
fn ttl_batches() -> Vec<storepulse_ingest::SourceMessage> {
    (0..1000u64)
        .map(|chunk| {
            let lines: Vec<String> = (0..100)
                .map(|i| {
                    let d = chunk * 100 + i;
                    let device = if d % 10 == 0 {
                        format!("hot-{}", (d / 10) % 5)
                    } else {
                        format!("device-{d}")
                    };
                    format!(
                        r#"{{"event_id":"e{d}","ts":{},"store_id":"S1","device_id":"{device}","metric":"fridge_temp_c","value":{}}}"#,
                        1_767_600_000_000i64 + d as i64 * 1000,
                        (d % 97) as f64 / 10.0
                    )
                })
                .collect();
            storepulse_testkit::json_message(StreamKind::IotReadings, &lines, "p0", chunk + 1)
                .unwrap()
                .unwrap()
        })
        .collect()
}

fn by_device(
    batches: &[datafusion::arrow::array::RecordBatch],
) -> std::collections::BTreeMap<String, (i64, f64, i64)> {
    use datafusion::arrow::{array::AsArray, datatypes::*};
    let mut out = std::collections::BTreeMap::new();
    for b in batches {
        let ts = datafusion::arrow::compute::cast(b.column(3), &DataType::Int64).unwrap();
        for i in 0..b.num_rows() {
            out.insert(
                b.column(0).as_string::<i32>().value(i).to_string(),
                (
                    b.column(1).as_primitive::<Int64Type>().value(i),
                    b.column(2).as_primitive::<Float64Type>().value(i),
                    ts.as_primitive::<Int64Type>().value(i),
                ),
            );
        }
    }
    out
}

/// An engine with [`PER_DEVICE`] as `per_device`, `state_ttl` `ttl_ms`.
async fn per_device_ttl_engine(ttl_ms: i64) -> Engine {
    let mut e = Engine::new(EngineConfig {
        // Without the TTL, 90,000 devices would pass this limit (the test
        // above): the TTL keeps the state bounded without an error.
        max_state_bytes: Some(bytesize::ByteSize::kib(256)),
        // The de-duplication set is state too, bounded by its horizon.
        dedup_horizon: std::time::Duration::from_secs(300),
        state_ttl: [(
            "per_device".to_string(),
            std::time::Duration::from_millis(ttl_ms as u64).into(),
        )]
        .into(),
        ..Default::default()
    })
    .unwrap();
    e.execute_sql(&format!(
        "CREATE MATERIALIZED VIEW per_device AS {PER_DEVICE}"
    ))
    .await
    .unwrap();
    e
}

#[tokio::test]
async fn a_state_ttl_evicts_idle_keys_and_keeps_active_ones_exact() {
    const TTL_MS: i64 = 10 * 60_000;
    let mut e = per_device_ttl_engine(TTL_MS).await;
    // Incremental checkpoints every 3 batches (deltas until the first
    // eviction; each batch spans 100 s of event time, so from then on every
    // batch evicts and every image is whole).
    let mut chains = common::MemoryChains::default();
    let mut last_cp = None;
    let msgs = ttl_batches();
    let total = msgs.len();
    let mut events = Vec::new();
    let mut most_groups = 0;
    for msg in msgs {
        if let storepulse_ingest::SourceMessage::Batch(b) = &msg {
            events.push(b.batch.clone());
        }
        e.apply(msg, 0).await.expect("bounded by the TTL");
        if events.len() % 3 == 0 || events.len() == total {
            last_cp = Some(chains.checkpoint(&mut e));
        }
        let out = e
            .execute_sql("SELECT count(*) FROM per_device")
            .await
            .unwrap();
        use datafusion::arrow::array::AsArray;
        let n = out[0].batches[0]
            .column(0)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
            .value(0);
        most_groups = most_groups.max(n);
    }
    // ~600 s of one-off devices live at a time (plus a batch and the step).
    assert!(most_groups < 1000, "at most {most_groups} groups");

    // The batch oracle: the same SQL by plain DataFusion over every event.
    let ctx = datafusion::prelude::SessionContext::new();
    let table =
        datafusion::datasource::MemTable::try_new(events[0].schema(), vec![events]).unwrap();
    ctx.register_table("iot_readings", std::sync::Arc::new(table))
        .unwrap();
    let oracle = by_device(&ctx.sql(PER_DEVICE).await.unwrap().collect().await.unwrap());
    let live = by_device(&e.execute_sql("SELECT * FROM per_device").await.unwrap()[0].batches);
    assert_eq!(oracle.len(), 90_005);
    let watermark = oracle.values().map(|(_, _, ts)| *ts).max().unwrap();
    let (mut kept, mut evicted) = (0, 0);
    for (device, want) in &oracle {
        let last = want.2;
        if last >= watermark - TTL_MS {
            // Active within the TTL: present, and exactly the oracle's row
            // (the hot devices were never evicted, so they count every event).
            assert_eq!(live.get(device), Some(want), "{device} is active");
            kept += 1;
        } else if last < watermark - TTL_MS - 2 * 60_000 {
            // Idle for the TTL plus a batch (100 s) and the step (TTL / 64).
            assert!(!live.contains_key(device), "{device} idle since {last}");
            evicted += 1;
        }
    }
    assert!(live.keys().all(|d| oracle.contains_key(d)));
    assert_eq!(live["hot-0"].0, 2_000, "hot devices count every reading");
    assert!(
        kept > 500 && evicted > 80_000,
        "kept {kept}, evicted {evicted}"
    );

    // The last checkpoint (taken after the last batch) restores the live
    // rows: no evicted device comes back through an older image.
    assert!(chains.deltas > 0, "{} delta images", chains.deltas);
    let mut r = per_device_ttl_engine(TTL_MS).await;
    r.restore(last_cp.expect("checkpoints taken"), 0).unwrap();
    let restored = by_device(&r.execute_sql("SELECT * FROM per_device").await.unwrap()[0].batches);
    assert!(restored == live, "the restored rows are the live ones");
}

#[tokio::test]
async fn an_eviction_makes_the_next_checkpoint_image_whole() {
    const TTL_MS: i64 = 10 * 60_000;
    let t0 = 1_767_600_000_000i64;
    let reading = |id: &str, ts: i64, device: &str| {
        format!(
            r#"{{"event_id":"{id}","ts":{ts},"store_id":"S1","device_id":"{device}","metric":"fridge_temp_c","value":4.0}}"#
        )
    };
    let msg = |lines: Vec<String>, seq: u64| {
        storepulse_testkit::json_message(StreamKind::IotReadings, &lines, "p0", seq)
            .unwrap()
            .unwrap()
    };
    let mut e = per_device_ttl_engine(TTL_MS).await;
    let mut chains = common::MemoryChains::default();
    e.apply(
        msg(
            (0..100)
                .map(|d| reading(&format!("a{d}"), t0, &format!("d{d}")))
                .collect(),
            1,
        ),
        0,
    )
    .await
    .unwrap();
    let cp = chains.checkpoint(&mut e);
    assert!(!cp.meta.views[0].delta);
    // One device, a minute later: a delta of one row.
    e.apply(msg(vec![reading("b0", t0 + 60_000, "d0")], 2), 0)
        .await
        .unwrap();
    let cp = chains.checkpoint(&mut e);
    assert!(cp.meta.views[0].delta && cp.views[0].rows() == 101);
    // 10.5 minutes on, d1 reports: the 98 devices idle since t0 are
    // evicted. A delta (d1 only) would bring them back at a restore; the
    // image is whole.
    e.apply(msg(vec![reading("c1", t0 + 630_000, "d1")], 3), 0)
        .await
        .unwrap();
    assert_eq!(e.views()[0].groups, Some(2), "d0 and d1 kept");
    let cp = chains.checkpoint(&mut e);
    assert!(!cp.meta.views[0].delta, "whole after an eviction");
    let mut r = per_device_ttl_engine(TTL_MS).await;
    r.restore(cp, 0).unwrap();
    let devices = by_device(&r.execute_sql("SELECT * FROM per_device").await.unwrap()[0].batches);
    assert_eq!(devices.keys().collect::<Vec<_>>(), ["d0", "d1"]);
}

const HOP_WINDOWS: &str = "SELECT device_id, window_start, count(*) AS n, sum(value) AS total, max(ts) AS last_ts \
     FROM (SELECT *, unnest(hop(ts, INTERVAL '1 minute', INTERVAL '5 minutes')) AS window_start FROM iot_readings) \
     GROUP BY device_id, window_start";

/// Hop view rows as (device, window start) -> (n, total, last event ms).
fn by_window(
    batches: &[datafusion::arrow::array::RecordBatch],
) -> std::collections::BTreeMap<(String, i64), (i64, f64, i64)> {
    use datafusion::arrow::{array::AsArray, compute::cast, datatypes::*};
    let mut out = std::collections::BTreeMap::new();
    for b in batches {
        let start = cast(b.column(1), &DataType::Int64).unwrap();
        let last = cast(b.column(4), &DataType::Int64).unwrap();
        for i in 0..b.num_rows() {
            out.insert(
                (
                    b.column(0).as_string::<i32>().value(i).to_string(),
                    start.as_primitive::<Int64Type>().value(i),
                ),
                (
                    b.column(2).as_primitive::<Int64Type>().value(i),
                    b.column(3).as_primitive::<Float64Type>().value(i),
                    last.as_primitive::<Int64Type>().value(i),
                ),
            );
        }
    }
    out
}

/// An engine with [`HOP_WINDOWS`] as `device_windows`, `state_ttl` `ttl_ms`.
async fn hop_ttl_engine(ttl_ms: i64) -> Engine {
    let mut e = Engine::new(EngineConfig {
        dedup_horizon: std::time::Duration::from_secs(300),
        state_ttl: [(
            "device_windows".to_string(),
            std::time::Duration::from_millis(ttl_ms as u64).into(),
        )]
        .into(),
        ..Default::default()
    })
    .unwrap();
    e.execute_sql(&format!(
        "CREATE MATERIALIZED VIEW device_windows AS {HOP_WINDOWS}"
    ))
    .await
    .unwrap();
    e
}

/// `device_windows`' rows and groups (panes held).
async fn hop_rows(
    e: &mut Engine,
) -> (
    std::collections::BTreeMap<(String, i64), (i64, f64, i64)>,
    usize,
) {
    let rows = by_window(&e.execute_sql("SELECT * FROM device_windows").await.unwrap()[0].batches);
    let groups = e
        .views()
        .into_iter()
        .find(|v| v.name == "device_windows")
        .and_then(|v| v.groups)
        .unwrap();
    (rows, groups)
}

/// A TTL on a hop() window view: a window row leaves once all its panes
/// are idle for the TTL, a pane stays while a neighbouring window still
/// needs it, and every row kept is exactly the batch oracle's. A
/// checkpoint restored 50 batches before the end (through its file
/// encoding) shows the same rows and then evicts the same panes as the
/// uninterrupted engine.
#[tokio::test]
async fn a_state_ttl_on_a_hop_view_drops_idle_windows_and_keeps_live_ones_exact() {
    const TTL_MS: i64 = 10 * 60_000;
    const BASE: i64 = 1_767_600_000_000;
    let mut e = hop_ttl_engine(TTL_MS).await;
    let mut restored: Option<Engine> = None;
    // 60,000 readings one second apart in batches of 100: five hot
    // devices (every 50 s each), a "pair" device every 100 s that reports
    // once more four minutes later (its two panes share one window), and
    // one-off devices.
    let device = |d: u64| match (d % 10, d % 100) {
        (0, _) => format!("hot-{}", (d / 10) % 5),
        (_, 5) => format!("pair-{}", d / 100),
        (_, 45) if d >= 245 => format!("pair-{}", (d - 245) / 100),
        _ => format!("device-{d}"),
    };
    let mut events = Vec::new();
    let mut most_panes = 0;
    for chunk in 0..600u64 {
        let lines: Vec<String> = (0..100)
            .map(|i| {
                let d = chunk * 100 + i;
                format!(
                    r#"{{"event_id":"e{d}","ts":{},"store_id":"S1","device_id":"{}","metric":"fridge_temp_c","value":{}}}"#,
                    BASE + d as i64 * 1000,
                    device(d),
                    // Halves: sums are exact in any order.
                    (d % 97) as f64 + 0.5
                )
            })
            .collect();
        let msg = || {
            storepulse_testkit::json_message(StreamKind::IotReadings, &lines, "p0", chunk + 1)
                .unwrap()
                .unwrap()
        };
        let m = msg();
        if let storepulse_ingest::SourceMessage::Batch(b) = &m {
            events.push(b.batch.clone());
        }
        e.apply(m, 0).await.unwrap();
        let groups = e
            .views()
            .into_iter()
            .find(|v| v.name == "device_windows")
            .and_then(|v| v.groups)
            .unwrap();
        most_panes = most_panes.max(groups);
        if let Some(r) = &mut restored {
            r.apply(msg(), 0).await.unwrap();
            assert!(
                hop_rows(r).await == hop_rows(&mut e).await,
                "the restored engine differs after batch {chunk}"
            );
        } else if chunk == 549 {
            let cp = common::checkpoint_round_trip(&mut e);
            let mut r = hop_ttl_engine(TTL_MS).await;
            r.restore(cp, 0).unwrap();
            let (want, got) = (hop_rows(&mut e).await, hop_rows(&mut r).await);
            assert_eq!(got.1, want.1, "panes restored");
            let extra: Vec<_> = got.0.keys().filter(|k| !want.0.contains_key(*k)).collect();
            assert!(
                extra.is_empty(),
                "windows shown after the restore only ({} of them): {:?}",
                extra.len(),
                &extra[..extra.len().min(5)]
            );
            assert!(got.0 == want.0, "the restored rows are the engine's");
            restored = Some(r);
        }
    }
    // ~600 s of one-off devices (one pane each) live at a time, plus the
    // hot devices' panes, a batch (100 s) and the step.
    assert!(most_panes < 1500, "at most {most_panes} panes held");

    let ctx = datafusion::prelude::SessionContext::new();
    storepulse_sql::register(&ctx);
    let table =
        datafusion::datasource::MemTable::try_new(events[0].schema(), vec![events]).unwrap();
    ctx.register_table("iot_readings", std::sync::Arc::new(table))
        .unwrap();
    let oracle = by_window(&ctx.sql(HOP_WINDOWS).await.unwrap().collect().await.unwrap());
    let live = by_window(&e.execute_sql("SELECT * FROM device_windows").await.unwrap()[0].batches);
    let watermark = BASE + 59_999 * 1000;
    let (mut kept, mut gone) = (0, 0);
    for (key, want) in &oracle {
        let last = want.2;
        if last >= watermark - TTL_MS {
            assert_eq!(live.get(key), Some(want), "{key:?} is live");
            kept += 1;
        } else if last < watermark - TTL_MS - 2 * 60_000 {
            assert!(!live.contains_key(key), "{key:?} idle since {last}");
            gone += 1;
        }
    }
    // Every row shown is exact: a live window never lost an evicted pane.
    for (key, got) in &live {
        assert_eq!(oracle.get(key), Some(got), "{key:?}");
    }
    // pair-592 reported 13.3 and 9.3 minutes before the end: the window
    // holding both is live and counts both readings (its first pane was
    // kept), the windows holding only the first are gone.
    let first = BASE + 59_205 * 1000;
    let pane = first - first.rem_euclid(60_000);
    assert_eq!(
        live.get(&("pair-592".to_string(), pane)).map(|r| r.0),
        Some(2)
    );
    assert!(!live.contains_key(&("pair-592".to_string(), pane - 60_000)));
    assert!(kept > 500 && gone > 200_000, "kept {kept}, gone {gone}");
}

#[tokio::test]
async fn a_state_ttl_on_a_session_view_is_refused_naming_the_view() {
    let mut e = Engine::new(EngineConfig {
        state_ttl: [(
            "visits".to_string(),
            std::time::Duration::from_secs(60).into(),
        )]
        .into(),
        ..Default::default()
    })
    .unwrap();
    let err = e
        .execute_sql(
            "CREATE MATERIALIZED VIEW visits AS
             SELECT member_id, session(ts, INTERVAL '30 minutes') AS visit_start, count(*) AS n
             FROM sales GROUP BY member_id, session(ts, INTERVAL '30 minutes')",
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("engine.state_ttl") && err.contains("visits") && err.contains("session()"),
        "{err}"
    );
    assert_eq!(e.unknown_state_ttl_views(), vec!["visits".to_string()]);
}

/// `count(DISTINCT x)` over many small groups costs the values it holds:
/// 20,000 devices seen in two stores each stay within a few megabytes (a
/// hash set per group, DataFusion's way for strings, took ~9 KB a group),
/// the counts are right, and reading the view keeps it so.
#[tokio::test]
async fn count_distinct_over_many_groups_costs_its_values() {
    let mut e = Engine::new(EngineConfig::default()).unwrap();
    e.execute_sql(
        "CREATE MATERIALIZED VIEW device_stores AS
         SELECT device_id, count(DISTINCT store_id) AS stores, count(*) AS n
         FROM iot_readings GROUP BY device_id",
    )
    .await
    .unwrap();
    for chunk in 0..60u64 {
        let lines: Vec<String> = (0..1000)
            .map(|i| {
                let d = chunk * 1000 + i;
                format!(
                    r#"{{"event_id":"e{d}","ts":{},"store_id":"S{}","device_id":"device-{}","metric":"fridge_temp_c","value":4.0}}"#,
                    1_767_600_000_000i64 + d as i64,
                    d % 2 + 10 * (d / 40_000),
                    d % 20_000
                )
            })
            .collect();
        let msg =
            storepulse_testkit::json_message(StreamKind::IotReadings, &lines, "p0", chunk + 1)
                .unwrap()
                .unwrap();
        e.apply(msg, 0).await.unwrap();
    }
    let bytes = e.state_bytes();
    assert!(bytes < 8 << 20, "state {bytes} bytes for 20,000 groups");
    let q = "SELECT stores, n, count(*) AS devices FROM device_stores GROUP BY stores, n ORDER BY stores";
    for _ in 0..2 {
        let out = e.execute_sql(q).await.unwrap();
        let text = datafusion::arrow::util::pretty::pretty_format_batches(&out[0].batches)
            .unwrap()
            .to_string();
        // Devices 0..20,000 get events 3 times (d, d + 20k, d + 40k): stores
        // S0/S1 for the first two, S10/S11 for the third; same parity, so
        // two distinct stores each.
        assert!(text.contains("| 2      | 3 | 20000   |"), "{text}");
        assert!(e.state_bytes() < 8 << 20, "reading keeps the state small");
    }
    // The read left the view's evaluated rows in memory, reported apart
    // from the state: 20,000 rows of a device id and a distinct count.
    let out = e.output_bytes();
    let listed: usize = e.views().iter().filter_map(|v| v.output_bytes).sum();
    assert_eq!(out, listed);
    assert!(out > 20_000 * 8 && out < 8 << 20, "output {out} bytes");
}

/// A stream that goes quiet (stock counts between stock-takes) follows the
/// other streams' watermark once idle for `idle_timeout`, so a view over
/// both folds its old rows instead of keeping every row since the last
/// count; a count that then arrives older than the followed watermark −
/// allowed lateness is late (in `late_events`), not lost.
#[tokio::test]
async fn a_quiet_stream_follows_the_others_and_its_stragglers_are_late() {
    use storepulse_engine::watermark::Watermark;
    const T0: i64 = 1_767_600_000_000;
    const MIN: i64 = 60_000;
    let mut e = Engine::new(EngineConfig {
        allowed_lateness: std::time::Duration::from_secs(600),
        idle_timeout: std::time::Duration::from_secs(30),
        ..Default::default()
    })
    .unwrap();
    let count = |id: &str, t: i64| {
        format!(r#"{{"event_id":"{id}","ts":{t},"store_id":"S1","sku":"A","on_hand":50}}"#)
    };
    let sale = |i: i64, t: i64| {
        format!(
            r#"{{"event_id":"r{i}","ts":{t},"store_id":"S1","receipt_id":"R{i}","lines":[{{"sku":"A","qty":1,"unit_price":1.0}}]}}"#
        )
    };
    let msg = |k, lines: Vec<String>, off| {
        storepulse_testkit::json_message(k, &lines, "p0", off)
            .unwrap()
            .unwrap()
    };
    let wm = |e: &Engine, k: StreamKind| {
        e.streams()
            .into_iter()
            .find(|s| s.stream == k)
            .unwrap()
            .watermark
    };
    e.apply(msg(StreamKind::StockCounts, vec![count("c0", T0)], 1), 0)
        .await
        .unwrap();
    // Sales for two hours of event time, over a minute of wall clock.
    for i in 0..120 {
        let now = i * 1000;
        e.apply(
            msg(StreamKind::Sales, vec![sale(i, T0 + i * MIN)], i as u64 + 1),
            now,
        )
        .await
        .unwrap();
    }
    assert_eq!(wm(&e, StreamKind::Sales), Watermark::At(T0 + 119 * MIN));
    // Idle since wall clock 0: follows sales (as of the last batch).
    assert!(
        matches!(wm(&e, StreamKind::StockCounts), Watermark::At(t) if t >= T0 + 118 * MIN),
        "{:?}",
        wm(&e, StreamKind::StockCounts)
    );
    // A straggling count from the first hour is late; a fresh one is not.
    e.apply(
        msg(
            StreamKind::StockCounts,
            vec![count("c1", T0 + 30 * MIN), count("c2", T0 + 119 * MIN)],
            2,
        ),
        121_000,
    )
    .await
    .unwrap();
    let s = e
        .streams()
        .into_iter()
        .find(|s| s.stream == StreamKind::StockCounts)
        .unwrap();
    assert_eq!((s.accepted_events, s.late_events), (2, 1));
    let late = e
        .execute_sql("SELECT event_id FROM late_events")
        .await
        .unwrap();
    let text = datafusion::arrow::util::pretty::pretty_format_batches(&late[0].batches)
        .unwrap()
        .to_string();
    assert!(text.contains("c1") && !text.contains("c2"), "{text}");
}
