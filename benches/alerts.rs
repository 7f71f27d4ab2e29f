//! Event-to-notification latency (issue #5): from the event time of a
//! reading in the store to the webhook receiving the alert, while the engine
//! ingests a steady stream of receipts.
//!
//! In one process: every built-in view and rule, plus a `hot_fridge` rule
//! (`max(value) > 50` per fridge, `for = 0s`) routed to a webhook served by
//! this harness on loopback. A load task decodes and applies JSON receipts
//! at `BENCH_ALERTS_RATE` events/s (default 50,000) stamped with the
//! current time; every 100 ms it also sends one reading of a new fridge at
//! 60 °C. The receiver records `arrival − event ts` per alert.
//!
//! `cargo bench --bench alerts` (BENCH_ALERTS_SECS=30, BENCH_ALERTS_RATE=50000)
//!
//! Storm (issue #22): `BENCH_ALERTS_SCENARIO=storm cargo bench --bench
//! alerts` — a rule whose condition turns true for `BENCH_ALERTS_KEYS`
//! (600,000) keys at once, the default `[alerts]` configuration (outbox
//! 100,000, 10,000 notifications per evaluation), a webhook that takes
//! `BENCH_ALERTS_SINK_MS` (5) ms per request: the time until every
//! notification is delivered, the evaluations it took, and the peak RSS.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{body::Bytes, extract::State, http::StatusCode, routing::post, Router};
use common::percentile;
use storepulse_alerts::{AlertManager, AlertsConfig, Notification, SinkConfig};
use storepulse_engine::{Engine, EngineConfig, EngineHandle};
use storepulse_ingest::{SourceMessage, StreamKind};
use tokio::sync::watch;

const RULE: &str = "
CREATE MATERIALIZED VIEW bench_fridge AS
SELECT store_id, device_id, max(value) AS max_c, max(ts) AS last_ts
FROM iot_readings GROUP BY store_id, device_id;
CREATE ALERT hot_fridge AS SELECT store_id, device_id, max_c, last_ts FROM bench_fridge
WHERE max_c > 50
WITH (key = 'store_id, device_id', every = '10s', for = '0s', sinks = 'hook');
";

fn env(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ms() -> i64 {
    EngineHandle::now_ms()
}

#[derive(Clone, Default)]
struct Latencies(Arc<Mutex<Vec<Duration>>>);

async fn hook(State(l): State<Latencies>, body: Bytes) -> StatusCode {
    let arrived = now_ms();
    let batch: Vec<Notification> = serde_json::from_slice(&body).unwrap_or_default();
    let mut g = l.0.lock().expect("latencies");
    for n in batch.iter().filter(|n| n.rule == "hot_fridge") {
        // last_ts is the reading's event time, written as RFC 3339.
        if let Some(ts) = n.row["last_ts"].as_str() {
            if let Ok(t) = chrono::DateTime::parse_from_rfc3339(ts) {
                let ms = (arrived - t.timestamp_millis()).max(0) as u64;
                g.push(Duration::from_millis(ms));
            }
        }
    }
    StatusCode::OK
}

async fn apply(h: &EngineHandle, stream: StreamKind, lines: &[String], seq: u64) -> usize {
    let partition = format!("bench-{stream}");
    let Some(msg) =
        storepulse_testkit::json_message(stream, lines, &partition, seq).expect("decode")
    else {
        return 0;
    };
    let events = match &msg {
        SourceMessage::Batch(b) => b.events,
        _ => 0,
    };
    let epoch = {
        let mut e = h.lock().await;
        e.apply(msg, now_ms()).await.expect("apply");
        e.epoch()
    };
    h.notify_changed(epoch);
    events
}

/// Serves `app` on a free loopback port; the webhook URL.
async fn serve_hook(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    url
}

fn peak_rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

#[derive(Clone, Default)]
struct Delivered(Arc<Mutex<(usize, usize)>>);

async fn slow_hook(State(d): State<Delivered>, body: Bytes) -> StatusCode {
    tokio::time::sleep(Duration::from_millis(env("BENCH_ALERTS_SINK_MS", 5) as u64)).await;
    let batch: Vec<Notification> = serde_json::from_slice(&body).unwrap_or_default();
    let mut g = d.0.lock().expect("delivered");
    for n in &batch {
        if n.alert_key == "(held back)" {
            g.1 += 1;
        } else {
            g.0 += 1;
        }
    }
    StatusCode::OK
}

fn storm() {
    let keys = env("BENCH_ALERTS_KEYS", 600_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let got = Delivered::default();
        let url = serve_hook(
            Router::new()
                .route("/hook", post(slow_hook))
                .with_state(got.clone()),
        )
        .await;
        let mut e = Engine::new(EngineConfig::default()).expect("engine");
        e.execute_sql(&format!(
            "CREATE MATERIALIZED VIEW temps AS SELECT device_id, count(*) AS n FROM iot_readings GROUP BY device_id;
             CREATE ALERT storm AS
             SELECT concat('S', CAST(k % 3000 AS VARCHAR)) AS store_id, concat('P', CAST(k AS VARCHAR)) AS sku,
                    0.95 AS p_stockout, 12 AS suggested_order_qty
             FROM (SELECT unnest(range(0, {keys})) AS k) CROSS JOIN (SELECT count(*) AS n FROM temps)
             WITH (key = 'store_id, sku', every = '1s', for = '0s', keep_firing_for = '1h', sinks = 'hook');"
        ))
        .await
        .expect("rule");
        let line = format!(
            r#"{{"event_id":"e1","ts":{},"store_id":"S1","device_id":"d1","metric":"fridge_temp_c","value":4.0}}"#,
            now_ms()
        );
        let defs = e.alerts().to_vec();
        let h = EngineHandle::new(e);
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = AlertsConfig {
            sinks: vec![SinkConfig::Webhook {
                name: "hook".into(),
                url,
                secret: None,
                timeout: Duration::from_secs(30),
                max_requests_per_second: 1000,
            }],
            ..Default::default()
        };
        let (capacity, per_eval) = (cfg.outbox_capacity, storepulse_alerts::DEFAULT_MAX_NOTIFICATIONS);
        let m = Arc::new(AlertManager::new(h.clone(), &defs, cfg, dir.path()).expect("manager"));
        let started = Instant::now();
        apply(&h, StreamKind::IotReadings, &[line], 1).await;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(m.clone().run(stop_rx));
        let mut max_pending = 0;
        let first = loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            max_pending = max_pending.max(m.outbox().pending().unwrap_or(0));
            if got.0.lock().expect("got").0 > 0 {
                break started.elapsed();
            }
        };
        while got.0.lock().expect("got").0 < keys {
            tokio::time::sleep(Duration::from_millis(100)).await;
            max_pending = max_pending.max(m.outbox().pending().unwrap_or(0));
            assert!(started.elapsed() < Duration::from_secs(1800), "storm not delivered in 30 min");
        }
        let all = started.elapsed();
        let evaluations = m.rule_health()[0].evaluations;
        stop.send(true).expect("stop");
        task.await.expect("manager");
        let (alerts, summaries) = *got.0.lock().expect("got");
        println!(
            "storm: {keys} keys true at once; first notification after {:.1} s, all {alerts} delivered after {:.1} s ({:.0}/s) in {summaries} slices ({evaluations} evaluations); outbox peak {max_pending} of {capacity}, {per_eval} per evaluation; peak RSS {} MB",
            first.as_secs_f64(),
            all.as_secs_f64(),
            alerts as f64 / all.as_secs_f64(),
            peak_rss_mb()
        );
    });
}

fn main() {
    if std::env::var("BENCH_ALERTS_SCENARIO").as_deref() == Ok("storm") {
        return storm();
    }
    let secs = env("BENCH_ALERTS_SECS", 30) as u64;
    let rate = env("BENCH_ALERTS_RATE", 50_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let lat = Latencies::default();
        let url = serve_hook(
            Router::new()
                .route("/hook", post(hook))
                .with_state(lat.clone()),
        )
        .await;

        let mut e = Engine::new(EngineConfig::default()).expect("engine");
        for (file, sql) in storepulse_sql::builtin::scripts(&Default::default()).expect("scripts") {
            e.execute_sql(&sql).await.unwrap_or_else(|err| panic!("{file}: {err}"));
        }
        let (_, alerts) = storepulse_sql::builtin::alert_script(&Default::default()).expect("alerts");
        e.execute_sql(&alerts).await.expect("built-in alerts");
        e.execute_sql(RULE).await.expect("rule");
        let defs = e.alerts().to_vec();
        let h = EngineHandle::new(e);
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = AlertsConfig {
            sinks: vec![SinkConfig::Webhook {
                name: "hook".into(),
                url,
                secret: Some("bench".into()),
                timeout: Duration::from_secs(5),
                max_requests_per_second: 1000,
            }],
            ..Default::default()
        };
        let min_interval = cfg.min_interval;
        let m = Arc::new(AlertManager::new(h.clone(), &defs, cfg, dir.path()).expect("manager"));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(m.clone().run(stop_rx));

        // Load: receipts every 20 ms, a hot fridge every 100 ms.
        let tick = Duration::from_millis(20);
        let per_tick = (rate as f64 * tick.as_secs_f64()).round() as usize;
        let started = Instant::now();
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let (mut events, mut seq, mut fridges) = (0usize, 0u64, 0usize);
        while started.elapsed() < Duration::from_secs(secs) {
            interval.tick().await;
            let t = now_ms();
            let lines: Vec<String> = (0..per_tick)
                .map(|i| {
                    let n = seq as usize * per_tick + i;
                    format!(
                        r#"{{"event_id":"r{n}","ts":{t},"store_id":"S{:03}","receipt_id":"R{n}","member_id":"M{:05}","lines":[{{"sku":"P{:05}","qty":1,"unit_price":2.5}}]}}"#,
                        n % 200,
                        n % 20_000,
                        n % 2_000
                    )
                })
                .collect();
            seq += 1;
            events += apply(&h, StreamKind::Sales, &lines, seq).await;
            if seq % 5 == 0 {
                fridges += 1;
                let line = format!(
                    r#"{{"event_id":"f{fridges}","ts":{},"store_id":"S001","device_id":"bench-{fridges}","metric":"fridge_temp_c","value":60.0}}"#,
                    now_ms()
                );
                events += apply(&h, StreamKind::IotReadings, &[line], seq).await;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        m.drain(Duration::from_secs(10)).await;
        stop.send(true).expect("stop");
        task.await.expect("manager");
        let mut l = lat.0.lock().expect("latencies").clone();
        l.sort();
        println!(
            "alerts: {events} events in {elapsed:.1} s = {:.0} events/s (target rate {rate}); {fridges} hot fridges, {} alerts received; min_interval {min_interval:?}",
            events as f64 / elapsed,
            l.len()
        );
        println!(
            "event-to-notification latency: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            percentile(&l, 0.5),
            percentile(&l, 0.99),
            l.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        );
    });
}
