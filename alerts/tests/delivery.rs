//! Alert delivery end to end inside one process: an engine with a rule, the
//! manager, and real receivers — an HTTP server started here that fails the
//! first requests, and librdkafka's mock cluster.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{body::Bytes, extract::State, http::HeaderMap, http::StatusCode, routing::post, Router};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    mocking::MockCluster,
    ClientConfig, Message,
};
use storepulse_alerts::{verify, AlertManager, AlertState, AlertsConfig, Notification, SinkConfig};
use storepulse_engine::{Engine, EngineConfig, EngineHandle};
use storepulse_ingest::StreamKind;
use tokio::sync::watch;

const SECRET: &str = "s3cret";
const T0: i64 = 1_767_600_000_000;

const SQL: &str = "
CREATE MATERIALIZED VIEW temps AS
SELECT store_id, device_id, count(*) AS readings, max(value) AS max_c
FROM iot_readings GROUP BY store_id, device_id;
CREATE ALERT warm AS SELECT store_id, device_id, readings, max_c FROM temps WHERE readings < 3
WITH (key = 'store_id, device_id', every = '100ms', for = '0s', keep_firing_for = '0s',
      renotify = '0s', severity = 'critical', sinks = 'hook');
";

async fn engine() -> EngineHandle {
    let mut e = Engine::new(EngineConfig::default()).unwrap();
    e.execute_sql(SQL).await.unwrap();
    EngineHandle::new(e)
}

/// One reading per device at `T0 + secs`.
async fn ingest(h: &EngineHandle, devices: std::ops::Range<usize>, secs: i64) {
    let lines: Vec<String> = devices
        .map(|d| {
            format!(
                r#"{{"event_id":"e{secs}-{d}","ts":{},"store_id":"S{}","device_id":"d{d}","metric":"fridge_temp_c","value":9.5}}"#,
                T0 + secs * 1000,
                d % 2
            )
        })
        .collect();
    let msg = storepulse_testkit::json_message(StreamKind::IotReadings, &lines, "p0", secs as u64)
        .unwrap()
        .unwrap();
    let epoch = {
        let mut e = h.lock().await;
        e.apply(msg, 0).await.unwrap();
        e.epoch()
    };
    h.notify_changed(epoch);
}

/// What the webhook receiver accepted.
#[derive(Default)]
struct Received {
    /// Requests to fail before accepting.
    fail_first: usize,
    requests: usize,
    bad_signatures: usize,
    accepted: Vec<Notification>,
}

#[derive(Clone)]
struct Receiver {
    inner: Arc<Mutex<Received>>,
    changed: Arc<watch::Sender<usize>>,
}

async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mut g = r.inner.lock().unwrap();
    g.requests += 1;
    if g.requests <= g.fail_first {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let sig = headers
        .get("x-storepulse-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !verify(SECRET, &body, sig) {
        g.bad_signatures += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let batch: Vec<Notification> = serde_json::from_slice(&body).unwrap();
    g.accepted.extend(batch);
    let n = g.accepted.len();
    drop(g);
    r.changed.send_replace(n);
    StatusCode::OK
}

async fn receiver(fail_first: usize) -> (String, Receiver) {
    let r = Receiver {
        inner: Arc::new(Mutex::new(Received {
            fail_first,
            ..Default::default()
        })),
        changed: Arc::new(watch::channel(0).0),
    };
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), r)
}

/// Waits (bounded) until the receiver accepted `n` notifications.
async fn until_accepted(r: &Receiver, n: usize) {
    let mut rx = r.changed.subscribe();
    tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|v| *v >= n))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {n} notifications"))
        .unwrap();
}

fn config(url: &str) -> AlertsConfig {
    AlertsConfig {
        min_interval: Duration::from_millis(50),
        retry_max_delay: Duration::from_millis(400),
        sinks: vec![
            SinkConfig::Webhook {
                name: "hook".into(),
                url: url.into(),
                secret: Some(SECRET.into()),
                timeout: Duration::from_secs(5),
                max_requests_per_second: 100,
            },
            SinkConfig::Log { name: "log".into() },
        ],
        ..Default::default()
    }
}

async fn start(
    h: &EngineHandle,
    url: &str,
    dir: &std::path::Path,
) -> (
    Arc<AlertManager>,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let defs = h.lock().await.alerts().to_vec();
    let m = Arc::new(AlertManager::new(h.clone(), &defs, config(url), dir).unwrap());
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(m.clone().run(rx));
    (m, stop, task)
}

#[tokio::test]
async fn webhook_gets_every_alert_once_signed_despite_failures_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (url, rx) = receiver(3).await;
    let h = engine().await;
    ingest(&h, 0..5, 0).await;
    let (m, stop, task) = start(&h, &url, dir.path()).await;
    // The receiver refuses: the sink reports it (health) while it retries.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let failing = loop {
        let hook = m
            .sink_health()
            .into_iter()
            .find(|s| s.name == "hook")
            .unwrap();
        if hook.consecutive_failures > 0 {
            break hook;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "failures not reported"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert!(failing.failing_since_ms.is_some());
    assert!(
        failing
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("503")),
        "{failing:?}"
    );
    // Five devices warm: five firing alerts, delivered after three refused requests.
    until_accepted(&rx, 5).await;
    // d0..d2 reach three readings: their condition stops holding → resolved.
    ingest(&h, 0..3, 1).await;
    ingest(&h, 0..3, 2).await;
    until_accepted(&rx, 8).await;
    assert!(m.drain(Duration::from_secs(10)).await, "outbox drained");
    // Drained = acknowledged, which follows the health update.
    let hook = m
        .sink_health()
        .into_iter()
        .find(|s| s.name == "hook")
        .unwrap();
    assert_eq!(hook.consecutive_failures, 0, "recovered: {hook:?}");
    assert!(
        hook.failing_since_ms.is_none() && hook.delivered >= 8,
        "{hook:?}"
    );
    assert!(
        hook.last_error.is_some(),
        "the last error is kept after recovery"
    );
    let active = m.active().await;
    assert_eq!(active.len(), 2);
    assert!(active.iter().all(|a| a.state == AlertState::Firing));
    stop.send(true).unwrap();
    task.await.unwrap();
    drop(m); // closes the outbox

    // Restart: a new engine fed the same events and a new manager on the
    // same data dir. The restored lifecycles continue the episodes: nothing
    // is sent again.
    let h2 = engine().await;
    ingest(&h2, 0..5, 0).await;
    ingest(&h2, 0..3, 1).await;
    ingest(&h2, 0..3, 2).await;
    let (m2, stop2, task2) = start(&h2, &url, dir.path()).await;
    assert!(m2.drain(Duration::from_secs(10)).await);
    // A new episode after the restart is delivered (proves delivery runs).
    ingest(&h2, 5..6, 3).await;
    until_accepted(&rx, 9).await;
    stop2.send(true).unwrap();
    task2.await.unwrap();

    let g = rx.inner.lock().unwrap();
    assert_eq!(g.bad_signatures, 0);
    assert!(
        g.requests >= 3 + 2,
        "three refused requests, then deliveries: {}",
        g.requests
    );
    let mut by: BTreeMap<(String, AlertState), usize> = BTreeMap::new();
    for n in &g.accepted {
        *by.entry((n.alert_id.clone(), n.state)).or_default() += 1;
        assert_eq!(n.rule, "warm");
        assert_eq!(n.severity, "critical");
    }
    assert!(
        by.values().all(|c| *c == 1),
        "each (id, state) exactly once: {by:?}"
    );
    let firing: BTreeMap<String, String> = g
        .accepted
        .iter()
        .filter(|n| n.state == AlertState::Firing)
        .map(|n| (n.alert_key.clone(), n.alert_id.clone()))
        .collect();
    assert_eq!(
        firing.keys().cloned().collect::<Vec<_>>(),
        vec!["S0|d0", "S0|d2", "S0|d4", "S1|d1", "S1|d3", "S1|d5"]
    );
    for n in g
        .accepted
        .iter()
        .filter(|n| n.state == AlertState::Resolved)
    {
        assert_eq!(
            firing[&n.alert_key], n.alert_id,
            "resolved keeps the episode id"
        );
        let r = n.row["readings"].as_i64().unwrap();
        assert!(r < 3, "the last row seen holding: {r}");
    }
    assert_eq!(
        g.accepted
            .iter()
            .filter(|n| n.state == AlertState::Resolved)
            .count(),
        3
    );
    // The first notification's payload carries the row's columns.
    let first = &g.accepted[0];
    assert_eq!(first.row["max_c"], 9.5);
    assert_eq!(first.first_seen, T0);
    drop(g);
    // alert_history: one row per notification.
    let hist = m2.outbox().history().unwrap();
    assert_eq!(hist.len(), 9);
}

#[tokio::test]
async fn kafka_sink_produces_keyed_json_to_the_mock_cluster() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("storepulse.alerts", 2, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let sink = storepulse_alerts::sink::build(&SinkConfig::Kafka {
        name: "replenishment".into(),
        brokers: brokers.clone(),
        topic: "storepulse.alerts".into(),
        properties: Default::default(),
    })
    .unwrap();
    let notes: Vec<Notification> = (0..4)
        .map(|i| Notification {
            alert_id: format!("id{i}"),
            rule: "low_stock".into(),
            alert_key: format!("S{i}|P1"),
            state: AlertState::Firing,
            severity: "warning".into(),
            first_seen: T0,
            last_seen: T0,
            notified_at: T0,
            sequence: 1,
            row: serde_json::json!({"store_id": format!("S{i}"), "sku": "P1", "suggested_order_qty": 12}),
        })
        .collect();
    sink.deliver(&notes).await.unwrap();
    assert_eq!(sink.name(), "replenishment");

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "t")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&["storepulse.alerts"]).unwrap();
    let mut got = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while got.len() < 4 && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
            let n: Notification = serde_json::from_slice(m.payload().unwrap()).unwrap();
            got.insert(key, n);
        }
    }
    assert_eq!(got.len(), 4, "all four consumed");
    for (i, n) in notes.iter().enumerate() {
        assert_eq!(
            &got[&format!("S{i}")],
            n,
            "keyed by store_id, payload intact"
        );
    }
}

/// Lifecycle changes without a notification (a firing key's `last_seen`
/// and row) are committed at most once per rule `every`, and at `drain`;
/// notifications are committed with the lifecycle that produced them.
/// (`every` is 1 minute: the rule's clock is event time rounded down to it,
/// so the second reading, a minute later, moves the clock.)
#[tokio::test]
async fn quiet_lifecycle_changes_are_committed_once_per_every_and_at_drain() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = Engine::new(EngineConfig::default()).unwrap();
    e.execute_sql(
        "CREATE MATERIALIZED VIEW temps AS
         SELECT device_id, max(value) AS max_c, max(ts) AS last_ts FROM iot_readings GROUP BY device_id;
         CREATE ALERT warm AS SELECT device_id, last_ts FROM temps WHERE max_c > 8
         WITH (key = 'device_id', every = '1m', for = '0s', keep_firing_for = '1h');",
    )
    .await
    .unwrap();
    let h = EngineHandle::new(e);
    let defs = h.lock().await.alerts().to_vec();
    let m = AlertManager::new(h.clone(), &defs, AlertsConfig::default(), dir.path()).unwrap();
    let saved = |m: &AlertManager| {
        m.outbox().lifecycles().unwrap()["warm"]
            .evaluated_at
            .expect("evaluated")
    };

    ingest(&h, 0..3, 0).await;
    let notes = m.evaluate(0).await.unwrap();
    assert_eq!(notes.len(), 3, "three keys fire");
    assert_eq!(saved(&m), T0, "committed with the notifications");

    ingest(&h, 0..3, 60).await;
    assert!(
        m.evaluate(0).await.unwrap().is_empty(),
        "still firing: no notification"
    );
    assert_eq!(saved(&m), T0, "a quiet change waits for `every`");
    assert_eq!(m.active().await.len(), 3);

    m.drain(Duration::from_millis(50)).await;
    assert_eq!(
        saved(&m),
        T0 + 60_000,
        "drain commits the lifecycle as it is"
    );
    let lc = &m.outbox().lifecycles().unwrap()["warm"];
    assert!(
        lc.keys.values().all(|k| k.last_seen == T0 + 60_000),
        "{lc:?}"
    );
}
