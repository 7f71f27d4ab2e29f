//! Refreshable query-time views (`[engine] refresh`): a listed view is read
//! from its last result, is due for background refresh at 3/4 of its
//! interval, and is recomputed on the query path only when its result is
//! older than `refresh_max_staleness` (stale-while-revalidate).

use std::{collections::BTreeMap, time::Duration};

use datafusion::arrow::array::{AsArray, RecordBatch};
use storepulse_engine::{Engine, EngineConfig, EngineHandle};
use storepulse_ingest::StreamKind;

const SQL: &str = "
CREATE MATERIALIZED VIEW temps AS
SELECT device_id, count(*) AS readings, max(value) AS hottest FROM iot_readings GROUP BY device_id;
CREATE VIEW hot AS SELECT count(*) AS devices, sum(readings) AS readings FROM temps;
CREATE VIEW live AS SELECT count(*) AS devices FROM temps;
CREATE VIEW per_device AS SELECT device_id, readings, hottest FROM temps;
CREATE VIEW per_device_live AS SELECT device_id, readings, hottest FROM temps;
";

async fn engine(refresh: &[(&str, Duration)]) -> EngineHandle {
    engine_with(refresh, EngineConfig::default().refresh_max_staleness).await
}

async fn engine_with(refresh: &[(&str, Duration)], max_staleness: Duration) -> EngineHandle {
    let cfg = EngineConfig {
        refresh: refresh
            .iter()
            .map(|(n, d)| (n.to_string(), (*d).into()))
            .collect::<BTreeMap<_, _>>(),
        refresh_max_staleness: max_staleness,
        ..Default::default()
    };
    let mut e = Engine::new(cfg).unwrap();
    e.execute_sql(SQL).await.unwrap();
    EngineHandle::new(e)
}

async fn ingest(h: &EngineHandle, devices: std::ops::Range<usize>, seq: u64) {
    let lines: Vec<String> = devices
        .map(|d| {
            format!(
                r#"{{"event_id":"e{seq}-{d}","ts":{},"store_id":"S1","device_id":"d{d}","metric":"fridge_temp_c","value":4.0}}"#,
                1_767_600_000_000i64 + seq as i64 * 1000
            )
        })
        .collect();
    let msg = storepulse_testkit::json_message(StreamKind::IotReadings, &lines, "p0", seq)
        .unwrap()
        .unwrap();
    h.lock().await.apply(msg, 0).await.unwrap();
}

fn first_i64(out: &[RecordBatch]) -> i64 {
    out[0]
        .column(0)
        .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
        .value(0)
}

async fn devices(h: &EngineHandle, view: &str) -> i64 {
    let out = h.query(&format!("SELECT * FROM {view}")).await.unwrap();
    first_i64(&out[0].batches)
}

#[tokio::test]
async fn a_fresh_result_is_served_until_the_interval_passes() {
    let h = engine(&[("hot", Duration::from_secs(3600))]).await;
    ingest(&h, 0..3, 1).await;
    assert_eq!(devices(&h, "hot").await, 3);
    assert_eq!(devices(&h, "live").await, 3);
    ingest(&h, 3..5, 2).await;
    // `hot` is read from its result (younger than an hour); `live` is not listed.
    assert_eq!(
        devices(&h, "hot").await,
        3,
        "served from the refreshed result"
    );
    assert_eq!(devices(&h, "live").await, 5);
    // Not due yet: the background refresher leaves it.
    assert!(h.refresh_due().await.unwrap().is_empty());
    // Filters and aggregates over it work on the cached rows.
    let out = h
        .query("SELECT devices + 1 FROM hot WHERE readings > 0")
        .await
        .unwrap();
    assert_eq!(first_i64(&out[0].batches), 4);
}

#[tokio::test]
async fn a_stale_result_is_recomputed_and_due_views_are_refreshed() {
    // Interval and staleness bound zero: always stale, so every read
    // recomputes (same as unlisted).
    let h = engine_with(&[("hot", Duration::ZERO)], Duration::ZERO).await;
    ingest(&h, 0..2, 1).await;
    assert_eq!(devices(&h, "hot").await, 2);
    ingest(&h, 2..7, 2).await;
    assert_eq!(devices(&h, "hot").await, 7);
    // Always due: the refresher recomputes it (from the current snapshot).
    assert_eq!(h.refresh_due().await.unwrap(), vec!["hot".to_string()]);
    ingest(&h, 7..8, 3).await;
    assert_eq!(h.refresh_due().await.unwrap(), vec!["hot".to_string()]);
    assert_eq!(devices(&h, "hot").await, 8);
}

#[tokio::test]
async fn a_result_past_its_interval_is_served_until_the_staleness_bound() {
    // Refreshed every millisecond, but the refresher is "behind" (not
    // called): queries keep reading the last result rather than
    // recomputing it, until it is older than the bound.
    let bound = Duration::from_millis(400);
    let h = engine_with(&[("hot", Duration::from_millis(1))], bound).await;
    ingest(&h, 0..2, 1).await;
    assert_eq!(devices(&h, "hot").await, 2);
    let computed = std::time::Instant::now();
    ingest(&h, 2..6, 2).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let served = devices(&h, "hot").await;
    if computed.elapsed() < bound {
        assert_eq!(
            served, 2,
            "past the interval, within the bound: the last result"
        );
    }
    // The refresher brings it up to date without a query waiting.
    assert_eq!(h.refresh_due().await.unwrap(), vec!["hot".to_string()]);
    assert_eq!(devices(&h, "hot").await, 6);
    // Past the bound a query recomputes on its own.
    ingest(&h, 6..9, 3).await;
    tokio::time::sleep(bound).await;
    assert_eq!(
        devices(&h, "hot").await,
        9,
        "older than the bound: recomputed"
    );
}

#[tokio::test]
async fn refresh_of_an_unknown_view_is_reported() {
    let h = engine(&[
        ("hot", Duration::from_secs(1)),
        ("hto", Duration::from_secs(1)),
    ])
    .await;
    let e = h.lock().await;
    assert_eq!(e.unknown_refresh_views(), vec!["hto".to_string()]);
}

#[tokio::test]
async fn indexed_point_lookups_on_a_refreshed_view_answer_as_a_scan_does() {
    // `per_device` is refreshed (indexed lookups), `per_device_live` is the
    // same query planned every time: every filter must give the same rows.
    let h = engine(&[("per_device", Duration::from_secs(3600))]).await;
    ingest(&h, 0..50, 1).await;
    ingest(&h, 10..20, 2).await;
    let filters = [
        "device_id = 'd3'",
        "'d13' = device_id",
        "device_id = 'd13' AND readings = 2",
        "device_id = 'd13' AND readings = 1",
        "readings = 2",
        "readings = CAST(2 AS INT)",
        "readings = 2 AND hottest > 3.5",
        "device_id = 'missing'",
        "device_id = NULL",
        "device_id = 'd3' OR device_id = 'd4'",
        "device_id IN ('d1', 'd2')",
        "device_id <> 'd3' AND readings = 1",
    ];
    for f in filters {
        let rows = |view: &str| {
            format!("SELECT device_id, readings, hottest FROM {view} WHERE {f} ORDER BY device_id")
        };
        // Twice: the first lookup of a column builds its index.
        for _ in 0..2 {
            let got = h.query(&rows("per_device")).await.unwrap();
            let want = h.query(&rows("per_device_live")).await.unwrap();
            let pretty = |o: &[storepulse_engine::QueryOutput]| {
                datafusion::arrow::util::pretty::pretty_format_batches(&o[0].batches)
                    .unwrap()
                    .to_string()
            };
            assert_eq!(pretty(&got), pretty(&want), "WHERE {f}");
        }
    }
    // Until the refresh, the new row is not in the result (nor its index).
    ingest(&h, 50..51, 3).await;
    let q = "SELECT count(*) FROM per_device WHERE device_id = 'd50'";
    assert_eq!(first_i64(&h.query(q).await.unwrap()[0].batches), 0);
}

#[tokio::test]
async fn the_index_is_rebuilt_with_each_recompute() {
    // Always stale: every read recomputes, and the looked-up column's
    // index is built with the result.
    let h = engine_with(&[("per_device", Duration::ZERO)], Duration::ZERO).await;
    ingest(&h, 0..5, 1).await;
    let q = "SELECT count(*) FROM per_device WHERE device_id = 'd7'";
    assert_eq!(first_i64(&h.query(q).await.unwrap()[0].batches), 0);
    ingest(&h, 5..8, 2).await;
    assert_eq!(first_i64(&h.query(q).await.unwrap()[0].batches), 1);
}
