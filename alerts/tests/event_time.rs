//! Event-time alerting: the same events, arriving live (each batch
//! evaluated as it lands, the way the manager's loop does) or replayed from
//! a file by a bounded run (rules evaluated at the end of every `every` of
//! event time, `AlertManager::before_batch`), give the same alert episodes:
//! the same set of (alert_id, state), `for` elapsed in event time, and
//! `first_seen` at the event time the condition started.

use std::collections::BTreeSet;

use storepulse_alerts::{AlertManager, AlertState, AlertsConfig, BoundedEvaluation, SinkConfig};
use storepulse_engine::{Engine, EngineConfig, EngineHandle};
use storepulse_ingest::StreamKind;

const T0: i64 = 1_767_600_000_000; // a multiple of 10 s
const S: i64 = 1_000;

const SQL: &str = "
CREATE MATERIALIZED VIEW fridge AS
SELECT device_id, last_value(value ORDER BY ts) AS last_c FROM iot_readings GROUP BY device_id;
CREATE ALERT warm AS SELECT device_id, last_c FROM fridge WHERE last_c > 8
WITH (key = 'device_id', every = '10s', for = '20s', keep_firing_for = '0s', renotify = '30s');
";

/// Readings every 5 s for 3 minutes. Temperatures change only at the start
/// of a 10 s cell, so every evaluation inside a cell sees the same
/// condition. d1 is warm 20–90 s, d2 40–60 s (too short for `for`), d3 from
/// 100 s to the end (re-notified every 30 s).
fn batches() -> Vec<(i64, Vec<String>)> {
    let warm = |d: &str, t: i64| match d {
        "d1" => (20..90).contains(&t),
        "d2" => (40..60).contains(&t),
        _ => t >= 100,
    };
    (0..36)
        .map(|k| {
            let t = k * 5;
            let lines = ["d1", "d2", "d3"]
                .iter()
                .map(|d| {
                    let c = if warm(d, t) { 12.0 } else { 4.0 };
                    format!(
                        r#"{{"event_id":"{d}-{t}","ts":{},"store_id":"S1","device_id":"{d}","metric":"fridge_temp_c","value":{c}}}"#,
                        T0 + t * S
                    )
                })
                .collect();
            (T0 + t * S, lines)
        })
        .collect()
}

async fn setup(dir: &std::path::Path) -> (EngineHandle, AlertManager) {
    let mut e = Engine::new(EngineConfig::default()).unwrap();
    e.execute_sql(SQL).await.unwrap();
    let defs = e.alerts().to_vec();
    let h = EngineHandle::new(e);
    let cfg = AlertsConfig {
        sinks: vec![SinkConfig::Log { name: "log".into() }],
        bounded_evaluation: BoundedEvaluation::EventTime,
        ..Default::default()
    };
    let m = AlertManager::new(h.clone(), &defs, cfg, dir).unwrap();
    (h, m)
}

async fn apply(h: &EngineHandle, lines: &[String], seq: u64) {
    let msg = storepulse_testkit::json_message(StreamKind::IotReadings, lines, "p0", seq)
        .unwrap()
        .unwrap();
    h.lock().await.apply(msg, 0).await.unwrap();
}

type Episodes = BTreeSet<(String, String, AlertState, i64, i64)>;

fn episodes(m: &AlertManager) -> Episodes {
    m.outbox()
        .history()
        .unwrap()
        .into_iter()
        .map(|n| {
            (
                n.alert_id,
                n.alert_key,
                n.state,
                n.first_seen - T0,
                n.notified_at - T0,
            )
        })
        .collect()
}

#[tokio::test]
async fn live_and_replayed_events_give_the_same_alert_episodes() {
    // Live: every batch is evaluated as it lands.
    let live_dir = tempfile::tempdir().unwrap();
    let (h, live) = setup(live_dir.path()).await;
    for (seq, (_, lines)) in batches().iter().enumerate() {
        apply(&h, lines, seq as u64).await;
        live.evaluate(0).await.unwrap();
    }
    // Replayed: as the bounded pipeline does, the rule is evaluated only
    // when a batch is about to leave an `every` cell of event time.
    let replay_dir = tempfile::tempdir().unwrap();
    let (h2, replay) = setup(replay_dir.path()).await;
    for (seq, (max_ts, lines)) in batches().iter().enumerate() {
        let as_of = h2.lock().await.as_of();
        replay.before_batch(as_of, *max_ts).await;
        apply(&h2, lines, seq as u64).await;
    }
    replay.evaluate(0).await.unwrap(); // the final views

    let (a, b) = (episodes(&live), episodes(&replay));
    assert_eq!(a, b, "live and replayed episodes differ");
    let s = |k: &str, st: AlertState| -> Vec<(i64, i64)> {
        a.iter()
            .filter(|e| e.1 == k && e.2 == st)
            .map(|e| (e.3 / S, e.4 / S))
            .collect()
    };
    // d1: warm from 20 s; `for` 20 s of event time → fires at 40 s; cool
    // at 90 s → resolved at 90 s. (first_seen, notified_at) in seconds.
    assert_eq!(s("d1", AlertState::Firing), vec![(20, 40), (20, 70)]);
    assert_eq!(s("d1", AlertState::Resolved), vec![(20, 90)]);
    // d2 held 20 s but cooled before `for` elapsed on the 10 s clock
    // (40 → 50, gone at 60): never fires.
    assert!(a.iter().all(|e| e.1 != "d2"), "{a:?}");
    // d3: from 100 s, fires at 120 s, re-notified at 150 s.
    assert_eq!(s("d3", AlertState::Firing), vec![(100, 120), (100, 150)]);
    // Replayed at full speed: evaluated once per cell left, not per batch.
    let h = &replay.rule_health()[0];
    assert!(h.evaluations < 20);
    // Each evaluation's time is accounted (health, and the duration
    // histogram): the total covers at least the last one.
    assert!(h.evaluation_seconds > 0.0, "{h:?}");
    assert!(
        h.evaluation_seconds * 1000.0 >= h.last_duration_ms as f64,
        "{h:?}"
    );
}
