//! An alert storm: one evaluation with 600,000 keys turning true at once,
//! a slow sink and a small outbox. The rule must keep evaluating (no error,
//! no jam), each evaluation admits only what the outbox has room for, a
//! summary states the true number held back, the sink catches up between
//! evaluations, and nothing admitted is lost or delivered twice.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{body::Bytes, extract::State, http::StatusCode, routing::post, Router};
use storepulse_alerts::{AlertManager, AlertsConfig, Notification, SinkConfig};
use storepulse_engine::{Engine, EngineConfig, EngineHandle};
use storepulse_ingest::StreamKind;
use tokio::sync::watch;

const KEYS: usize = 600_000;
const CAPACITY: u64 = 5_000;

const SQL: &str = "
CREATE MATERIALIZED VIEW temps AS
SELECT device_id, count(*) AS readings FROM iot_readings GROUP BY device_id;
CREATE ALERT storm AS
SELECT concat('S', CAST(k % 600 AS VARCHAR)) AS store_id, k AS sku
FROM (SELECT unnest(range(0, 600000)) AS k) CROSS JOIN (SELECT count(*) AS n FROM temps)
WITH (key = 'store_id, sku', every = '1h', for = '0s', keep_firing_for = '1h',
      renotify = '0s', severity = 'warning', sinks = 'hook',
      max_notifications_per_evaluation = '20000');
";

#[derive(Clone, Default)]
struct Slow {
    got: Arc<Mutex<Vec<Notification>>>,
}

/// A slow receiver: 20 ms per request.
async fn hook(State(s): State<Slow>, body: Bytes) -> StatusCode {
    tokio::time::sleep(Duration::from_millis(20)).await;
    let batch: Vec<Notification> = serde_json::from_slice(&body).unwrap();
    s.got.lock().unwrap().extend(batch);
    StatusCode::OK
}

fn peak_rss_mb() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_600k_keys_never_jams_and_goes_out_in_bounded_slices() {
    let slow = Slow::default();
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(slow.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let mut e = Engine::new(EngineConfig::default()).unwrap();
    e.execute_sql(SQL).await.unwrap();
    let h = EngineHandle::new(e);
    let line = r#"{"event_id":"e1","ts":1767600000000,"store_id":"S1","device_id":"d1","metric":"fridge_temp_c","value":4.0}"#;
    let msg = storepulse_testkit::json_message(StreamKind::IotReadings, &[line], "p0", 1)
        .unwrap()
        .unwrap();
    h.lock().await.apply(msg, 0).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let cfg = AlertsConfig {
        outbox_capacity: CAPACITY,
        history_capacity: 1_000,
        batch_max: 1_000,
        min_interval: Duration::from_secs(3600),
        sinks: vec![SinkConfig::Webhook {
            name: "hook".into(),
            url,
            secret: None,
            timeout: Duration::from_secs(10),
            max_requests_per_second: 1_000,
        }],
        ..Default::default()
    };
    let defs = h.lock().await.alerts().to_vec();
    let m = Arc::new(AlertManager::new(h.clone(), &defs, cfg, dir.path()).unwrap());
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(m.clone().run(rx));

    // The manager's own loop evaluates once at start; each round here waits
    // for the sink to catch up and evaluates again.
    for round in 0..4 {
        assert!(
            m.wait_delivered(Duration::from_secs(60)).await,
            "round {round}: the sink catches up"
        );
        let notes = m
            .evaluate(0)
            .await
            .unwrap_or_else(|e| panic!("round {round}: the rule must not fail: {e}"));
        let pending = m.outbox().pending().unwrap();
        assert!(pending <= CAPACITY, "outbox bounded: {pending}");
        assert!(
            !notes.is_empty() && notes.len() as u64 <= CAPACITY,
            "round {round}: {} notifications",
            notes.len()
        );
        assert_eq!(m.rule_health()[0].consecutive_failures, 0);
    }
    assert!(m.wait_delivered(Duration::from_secs(60)).await);
    stop.send(true).unwrap();
    task.await.unwrap();

    // Delivered in commit order: each evaluation's alerts, then its summary,
    // which states exactly how many it admitted and how many still wait.
    let got = slow.got.lock().unwrap();
    let (mut since_summary, mut total, mut summaries) = (0u64, 0u64, 0);
    let mut ids = BTreeSet::new();
    for n in got.iter() {
        if n.alert_key == "(held back)" {
            summaries += 1;
            assert_eq!(
                n.row["admitted"].as_u64(),
                Some(since_summary),
                "{:?}",
                n.row
            );
            assert_eq!(
                n.row["held_back"].as_u64(),
                Some(KEYS as u64 - total),
                "{:?}",
                n.row
            );
            assert_eq!(n.row["reason"], "outbox_capacity");
            since_summary = 0;
        } else {
            assert!(
                ids.insert(n.alert_id.clone()),
                "delivered twice: {}",
                n.alert_key
            );
            since_summary += 1;
            total += 1;
        }
    }
    assert!(summaries >= 4, "{summaries} evaluations");
    assert_eq!(since_summary, 0, "every slice ends with its summary");
    assert!(total >= 4 * (CAPACITY - 1), "{total} admitted");
    // 600 K keys' lifecycle and rows fit in well under a gigabyte.
    if let Some(mb) = peak_rss_mb() {
        eprintln!("peak RSS {mb} MB");
        assert!(mb < 1_500, "peak RSS {mb} MB");
    }
}
