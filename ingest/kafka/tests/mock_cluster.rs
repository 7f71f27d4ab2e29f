//! The Kafka source against librdkafka's in-process mock cluster (a real
//! Kafka-protocol broker on loopback): a replayed dataset consumed into the
//! engine must equal the batch oracle, through broker outages, injected
//! request errors and a consumer restart; malformed messages must arrive on
//! the dead-letter topic with their bytes and headers; bad configuration
//! must fail fast naming the broker, topic or property.

use std::{
    collections::HashSet,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use arrow::array::{AsArray, RecordBatch};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::Headers,
    mocking::MockCluster,
    producer::{BaseProducer, BaseRecord, Producer},
    types::{RDKafkaApiKey, RDKafkaRespErr},
    ClientConfig, Message, Offset, TopicPartitionList,
};
use storepulse_engine::{Engine, EngineConfig, EngineHandle};
use storepulse_ingest::{gen::ChainConfig, AppliedPositions, SourceMessage, StreamKind};
use storepulse_kafka::{
    config::{topic_name, DEFAULT_DEAD_LETTER_TOPIC},
    replay::{dataset_inputs, replay, ReplayOptions},
    source::headers,
    KafkaSource, KafkaSourceConfig, KafkaSourceError, KafkaStatus,
};
use tokio::sync::{mpsc, watch};

const PARTITIONS: i32 = 3;

/// Logs (`RUST_LOG=info cargo test ... -- --nocapture`) when asked.
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn cluster() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    init_logs();
    let c = MockCluster::new(3).unwrap();
    for k in StreamKind::ALL {
        c.create_topic(&topic_name("storepulse.", k), PARTITIONS, 1)
            .unwrap();
    }
    c.create_topic(DEFAULT_DEAD_LETTER_TOPIC, 1, 1).unwrap();
    c
}

fn dataset(dir: &Path, seed: u64) {
    let cfg = ChainConfig {
        stores: 4,
        skus: 30,
        members: 120,
        seed,
        ..Default::default()
    };
    storepulse_ingest::gen::write_dataset(cfg, 1, dir, &mut |_, _| {}).unwrap();
}

fn publish(brokers: &str, dir: &Path) -> u64 {
    let opts = ReplayOptions {
        brokers: brokers.to_string(),
        topic_prefix: "storepulse.".into(),
        rate: None,
        properties: Default::default(),
        timeout: Duration::from_secs(10),
        progress: false,
    };
    let report = replay(&dataset_inputs(dir).unwrap(), &opts).unwrap();
    let lines: u64 = StreamKind::ALL.iter().map(|k| event_lines(dir, *k)).sum();
    assert_eq!(report.events, lines, "every line acknowledged once");
    report.events
}

async fn engine() -> Engine {
    let mut e = Engine::new(EngineConfig::default()).unwrap();
    for (_, sql) in storepulse_sql::builtin::scripts(&Default::default()).unwrap() {
        e.execute_sql(&sql).await.unwrap();
    }
    e
}

fn source_config(brokers: &str, group: &str) -> KafkaSourceConfig {
    let mut c = KafkaSourceConfig::new(brokers);
    c.group_id = group.into();
    c.batch_max_messages = 500;
    c.batch_linger = Duration::from_millis(20);
    c.connect_timeout = Duration::from_secs(5);
    c.commit_interval = Duration::from_millis(200);
    // The mock coordinator lets a departed member's session run out before
    // it rebalances a restarted one: keep that short.
    c.properties
        .insert("session.timeout.ms".into(), "6000".into());
    c.properties
        .insert("heartbeat.interval.ms".into(), "500".into());
    c
}

/// Connects a source (blocking work, off the runtime).
async fn connect(
    cfg: KafkaSourceConfig,
    until_eof: bool,
    applied: Arc<AppliedPositions>,
) -> Result<KafkaSource, KafkaSourceError> {
    tokio::task::spawn_blocking(move || KafkaSource::connect(cfg, until_eof, applied))
        .await
        .unwrap()
}

/// Applies everything from `rx` (ticking watermarks) until the source ends.
async fn apply_all(handle: &EngineHandle, rx: &mut mpsc::Receiver<SourceMessage>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                handle.lock().await.apply(msg, EngineHandle::now_ms()).await.unwrap();
            }
            _ = tick.tick() => handle.lock().await.tick(EngineHandle::now_ms()),
        }
    }
}

/// Produces raw payloads, keyed `S001`, to partition 0 of `topic`.
fn produce_raw(brokers: &str, topic: &str, payloads: &[&[u8]]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    for payload in payloads {
        producer
            .send(
                BaseRecord::to(topic)
                    .key("S001")
                    .payload(*payload)
                    .partition(0),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
}

/// Events accepted by the engine over all streams.
async fn accepted(handle: &EngineHandle) -> u64 {
    handle
        .lock()
        .await
        .streams()
        .iter()
        .map(|s| s.accepted_events)
        .sum()
}

/// Non-blank lines of a stream's file in the dataset (0 if absent).
fn event_lines(dir: &Path, k: StreamKind) -> u64 {
    std::fs::read_to_string(dir.join(format!("{}.jsonl", k.name())))
        .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count() as u64)
        .unwrap_or(0)
}

/// Runs one source into `handle` until it ends (until_eof) or `stop_after`
/// batches have been applied (then shuts it down). `on_progress` runs after
/// every applied batch and every 100 ms tick with the batch count so far
/// (so a fault can be lifted on time even while no batch arrives).
async fn consume(
    handle: &EngineHandle,
    cfg: KafkaSourceConfig,
    until_eof: bool,
    stop_after: Option<usize>,
    mut on_progress: impl FnMut(usize, &KafkaStatus),
) -> usize {
    let applied = handle.lock().await.positions().clone();
    let src = connect(cfg, until_eof, applied).await.unwrap();
    let status = src.status();
    let (tx, mut rx) = mpsc::channel::<SourceMessage>(2);
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(src.run(tx, stop_rx));
    let mut batches = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        assert!(Instant::now() < deadline, "source did not finish");
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                let is_batch = matches!(msg, SourceMessage::Batch(_));
                handle.lock().await.apply(msg, EngineHandle::now_ms()).await.unwrap();
                if is_batch {
                    batches += 1;
                    on_progress(batches, &status);
                    if stop_after == Some(batches) {
                        stop_tx.send(true).unwrap();
                    }
                }
            }
            _ = tick.tick() => {
                handle.lock().await.tick(EngineHandle::now_ms());
                on_progress(batches, &status);
            }
        }
    }
    task.await.unwrap().unwrap();
    batches
}

async fn late_ids(handle: &EngineHandle) -> HashSet<(String, String)> {
    let out = handle
        .query("SELECT stream, event_id FROM late_events")
        .await
        .unwrap();
    let mut set = HashSet::new();
    for b in &out.last().unwrap().batches {
        let s = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
        let e = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::Utf8).unwrap();
        for r in 0..b.num_rows() {
            set.insert((
                s.as_string::<i32>().value(r).to_string(),
                e.as_string::<i32>().value(r).to_string(),
            ));
        }
    }
    set
}

/// Every built-in materialized view equals the oracle; returns the accepted
/// event count.
async fn assert_matches_oracle(handle: &EngineHandle, dir: &Path) -> u64 {
    let late = late_ids(handle).await;
    let script: String = storepulse_testkit::builtin_script();
    let dims = storepulse_engine::DimensionKind::ALL.map(|k| (k.name(), k.schema()));
    let want = storepulse_testkit::oracle_views(&script, dir, &late, &dims).await;
    assert!(want.len() >= 5, "{:?}", want.keys());
    let non_empty = want.values().filter(|r| !r.is_empty()).count();
    assert!(non_empty >= 3, "the dataset exercises most views: {want:?}");
    for (view, rows) in &want {
        let got = handle
            .query(&format!("SELECT * FROM {view}"))
            .await
            .unwrap();
        let got: Vec<RecordBatch> = got.last().unwrap().batches.clone();
        let got = storepulse_testkit::normalize(&got);
        assert_eq!(&got, rows, "view {view} differs from the batch oracle");
    }
    let accepted = accepted(handle).await;
    let distinct: u64 = storepulse_testkit::dataset_tables(dir, &HashSet::new())
        .keys()
        .map(|k| distinct_ids(dir, *k))
        .sum();
    assert_eq!(
        accepted + late.len() as u64,
        distinct,
        "every distinct event accepted once or recorded late"
    );
    accepted
}

fn distinct_ids(dir: &Path, k: StreamKind) -> u64 {
    let text = std::fs::read_to_string(dir.join(format!("{}.jsonl", k.name()))).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event_id"].clone())
        .map(|v| v.to_string())
        .collect::<HashSet<_>>()
        .len() as u64
}

fn committed(brokers: &str, group: &str) -> i64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for k in StreamKind::ALL {
        for p in 0..PARTITIONS {
            tpl.add_partition(&topic_name("storepulse.", k), p);
        }
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    got.elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_dataset_consumed_from_kafka_matches_the_batch_oracle() {
    let c = cluster();
    let brokers = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), 3);
    let published = publish(&brokers, dir.path());
    let handle = EngineHandle::new(engine().await);
    let batches = consume(
        &handle,
        source_config(&brokers, "g1"),
        true,
        None,
        |_, _| {},
    )
    .await;
    assert!(batches > 5, "micro-batches were assembled per partition");
    let accepted = assert_matches_oracle(&handle, dir.path()).await;
    assert!(accepted > 1000, "{accepted}");
    // Every partition's position was applied and committed: the committed
    // offsets add up to every message published.
    assert_eq!(committed(&brokers, "g1") as u64, published);
    // The applied positions (what a checkpoint stores) cover every message.
    let positions = handle.lock().await.positions().snapshot();
    assert!(positions.len() >= 5, "{positions:?}");
    assert!(positions
        .iter()
        .all(|p| p.partition.starts_with("storepulse.")));
    assert_eq!(
        positions.iter().map(|p| p.next_offset).sum::<u64>(),
        published
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outages_and_request_errors_lose_and_double_nothing() {
    let c = cluster();
    let brokers = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), 5);
    publish(&brokers, dir.path());
    let handle = EngineHandle::new(engine().await);
    let mut cfg = source_config(&brokers, "g2");
    cfg.batch_max_messages = 100;
    cfg.max_pending_batches = 1;
    // Faults start mid-stream (after the 10th applied batch) and last a
    // while: a broker down (every partition it leads moves or waits),
    // then fetch and commit errors.
    let mut fault: Option<Instant> = None;
    let mut phase = 0;
    consume(&handle, cfg, true, None, |n, _| {
        if n == 10 && phase == 0 {
            c.broker_down(1).unwrap();
            c.request_errors(
                RDKafkaApiKey::Fetch,
                &[
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                ],
            );
            c.request_errors(
                RDKafkaApiKey::OffsetCommit,
                &[
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                ],
            );
            fault = Some(Instant::now());
            phase = 1;
        }
        if phase == 1 && fault.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
            c.broker_up(1).unwrap();
            phase = 2;
        }
    })
    .await;
    if phase == 1 {
        c.broker_up(1).unwrap();
    }
    assert!(phase >= 1, "the fault was injected mid-stream");
    assert_matches_oracle(&handle, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_broker_down_is_reported_and_consumption_resumes_after() {
    let c = cluster();
    let brokers = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), 9);
    publish(&brokers, dir.path());
    let handle = EngineHandle::new(engine().await);
    let mut cfg = source_config(&brokers, "g-outage");
    cfg.batch_max_messages = 100;
    cfg.max_pending_batches = 1;
    cfg.properties
        .insert("statistics.interval.ms".into(), "100".into());
    // After the 5th batch the whole cluster goes down; it comes back once
    // the source has reported the outage (no broker up, the client's error)
    // and the engine answered a query meanwhile.
    let mut phase = 0;
    let mut reported = None;
    consume(&handle, cfg, true, None, |n, status| {
        if n >= 5 && phase == 0 {
            for b in 1..=3 {
                c.broker_down(b).unwrap();
            }
            phase = 1;
        }
        if phase == 1 {
            if let (Some((0, known)), Some(err)) = (status.brokers_up(), status.last_error()) {
                if known > 0 {
                    reported = Some((known, err.1));
                    for b in 1..=3 {
                        c.broker_up(b).unwrap();
                    }
                    phase = 2;
                }
            }
        }
    })
    .await;
    assert_eq!(phase, 2, "the outage was reported while it lasted");
    let (known, err) = reported.unwrap();
    // librdkafka lists the brokers it has learned of (1 to 3 here).
    assert!((1..=3).contains(&known), "{known} brokers known: {err}");
    assert!(
        ["127.0.0.1", "broker", "Broker"]
            .iter()
            .any(|w| err.contains(w)),
        "the error says what is down: {err}"
    );
    assert_matches_oracle(&handle, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_consumer_resumes_at_the_committed_offsets() {
    let c = cluster();
    let brokers = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), 9);
    let published = publish(&brokers, dir.path());
    let handle = EngineHandle::new(engine().await);
    // First run: stopped after 8 batches (commits what was applied).
    let mut cfg = source_config(&brokers, "g3");
    cfg.batch_max_messages = 200;
    consume(&handle, cfg.clone(), true, Some(8), |_, _| {}).await;
    let after_first = committed(&brokers, "g3");
    assert!(
        after_first > 0 && (after_first as u64) < published,
        "{after_first}"
    );
    // Second run, same group, same engine state: picks up exactly there.
    consume(&handle, cfg, true, None, |_, _| {}).await;
    assert_eq!(committed(&brokers, "g3") as u64, published);
    let dup: u64 = handle
        .lock()
        .await
        .streams()
        .iter()
        .map(|s| s.duplicate_events)
        .sum();
    let file_dups: u64 = StreamKind::ALL
        .iter()
        .map(|k| {
            let n = event_lines(dir.path(), *k);
            n - if n > 0 {
                distinct_ids(dir.path(), *k)
            } else {
                0
            }
        })
        .sum();
    assert_eq!(
        dup, file_dups,
        "no message was delivered twice across the restart (only the dataset's own retransmits are duplicates)"
    );
    assert_matches_oracle(&handle, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_go_to_the_dead_letter_topic_with_headers() {
    let c = cluster();
    let brokers = c.bootstrap_servers();
    let topic = topic_name("storepulse.", StreamKind::StockMovements);
    let good = r#"{"event_id":"m1","ts":"2026-01-05T10:00:00Z","store_id":"S001","sku":"P00001","kind":"receipt","qty":5}"#;
    let bad: [&[u8]; 3] = [
        br#"{"event_id":"m2","ts":"2026-01-05T10:00:00Z","store_id":"S001","sku":"P00001","kind":"receipt""#,
        br#"{"event_id":"m3","ts":"2026-01-05T10:00:00Z","store_id":"S001","sku":"P00001","kind":"teleport","qty":1}"#,
        b"\xff\xfe not utf-8",
    ];
    produce_raw(&brokers, &topic, &[good.as_bytes(), bad[0], bad[1], bad[2]]);
    let handle = EngineHandle::new(engine().await);
    let mut cfg = source_config(&brokers, "g4");
    cfg.streams = Some(vec![StreamKind::StockMovements]);
    consume(&handle, cfg, true, None, |_, _| {}).await;
    assert_eq!(accepted(&handle).await, 1, "the good message is applied");
    // The dead letters: original bytes, key, and headers.
    let dlq: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "dlq-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(DEFAULT_DEAD_LETTER_TOPIC, 0, Offset::Beginning)
        .unwrap();
    dlq.assign(&tpl).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 3 && Instant::now() < deadline {
        if let Some(m) = dlq.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            let h = m.headers().unwrap();
            let header = |name: &str| {
                h.iter()
                    .find(|x| x.key == name)
                    .map(|x| String::from_utf8(x.value.unwrap().to_vec()).unwrap())
                    .unwrap()
            };
            got.push((
                m.payload().unwrap().to_vec(),
                m.key().unwrap().to_vec(),
                header(headers::SOURCE_TOPIC),
                header(headers::SOURCE_PARTITION),
                header(headers::SOURCE_OFFSET),
                header(headers::STREAM),
                header(headers::REASON),
            ));
        }
    }
    assert_eq!(got.len(), 3, "three dead letters");
    for (i, (payload, key, t, p, o, s, reason)) in got.iter().enumerate() {
        assert_eq!(payload.as_slice(), bad[i], "original bytes kept");
        assert_eq!(key.as_slice(), b"S001");
        assert_eq!(t, &topic);
        assert_eq!(p, "0");
        assert_eq!(o, &(i + 1).to_string());
        assert_eq!(s, "stock_movements");
        assert!(!reason.is_empty());
    }
    assert!(got[0].6.contains("invalid JSON"), "{}", got[0].6);
    assert!(got[1].6.contains("kind"), "{}", got[1].6);
    // The committed offset is past the dead letters: nothing re-read.
    let c2: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "g4")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&topic, 0);
    let off = c2.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    assert_eq!(off.elements()[0].offset(), Offset::Offset(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_fails_fast_with_a_clear_error() {
    let applied = Arc::new(AppliedPositions::default());
    // Unreachable broker: bounded by connect_timeout, names the broker.
    let mut cfg = KafkaSourceConfig::new("127.0.0.1:1");
    cfg.connect_timeout = Duration::from_secs(2);
    let started = Instant::now();
    let err = connect(cfg, false, applied.clone()).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(matches!(err, KafkaSourceError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    // Unknown topic.
    let c = cluster();
    let mut cfg = KafkaSourceConfig::new(c.bootstrap_servers());
    cfg.topics.insert("sales".into(), "no.such.topic".into());
    let err = connect(cfg, false, applied.clone()).await.unwrap_err();
    assert!(
        err.to_string().contains("'no.such.topic' (stream sales)"),
        "{err}"
    );
    // A cluster made before purchase_orders joined the contract: the
    // default config consumes the streams it has, a config naming the
    // stream refuses to start.
    let old = MockCluster::new(1).unwrap();
    for k in StreamKind::ALL {
        if k != StreamKind::PurchaseOrders {
            old.create_topic(&topic_name("storepulse.", k), 1, 1)
                .unwrap();
        }
    }
    old.create_topic(DEFAULT_DEAD_LETTER_TOPIC, 1, 1).unwrap();
    let src = connect(
        KafkaSourceConfig::new(old.bootstrap_servers()),
        false,
        applied.clone(),
    )
    .await
    .unwrap();
    drop(src);
    let mut cfg = KafkaSourceConfig::new(old.bootstrap_servers());
    cfg.streams = Some(vec![StreamKind::Sales, StreamKind::PurchaseOrders]);
    let err = connect(cfg, false, applied.clone()).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("'storepulse.purchase_orders' (stream purchase_orders)"),
        "{err}"
    );
    // A property librdkafka does not know.
    let mut cfg = KafkaSourceConfig::new(c.bootstrap_servers());
    cfg.properties.insert("fetch.max.bytez".into(), "1".into());
    let err = connect(cfg, false, applied).await.unwrap_err();
    assert!(err.to_string().contains("fetch.max.bytez"), "{err}");
    // A topic override for a stream that does not exist.
    let mut cfg = KafkaSourceConfig::new("x:1");
    cfg.topics.insert("salez".into(), "t".into());
    assert!(cfg
        .stream_topics()
        .unwrap_err()
        .to_string()
        .contains("topics.salez"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_engine_pauses_the_partitions_instead_of_buffering() {
    let c = cluster();
    let brokers = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path(), 13);
    publish(&brokers, dir.path());
    let handle = EngineHandle::new(engine().await);
    let mut cfg = source_config(&brokers, "g5");
    cfg.batch_max_messages = 50;
    cfg.max_pending_batches = 3;
    let applied = handle.lock().await.positions().clone();
    let src = connect(cfg, true, applied).await.unwrap();
    let status = src.status();
    let (tx, mut rx) = mpsc::channel::<SourceMessage>(1);
    let (_stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(src.run(tx, stop_rx));
    // The engine takes nothing: the source must pause with a bounded queue.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !status.paused() {
        assert!(Instant::now() < deadline, "source never paused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pending = status.pending_batches();
    // Bounded: the limit, the 15 partition announcements, and at most one
    // flush per partition of messages fetched before the pause took effect.
    assert!(pending <= 3 + 15 + 15, "{pending} messages queued");
    // And it does not grow while the engine stays away.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(status.paused());
    assert_eq!(status.pending_batches(), pending, "queue grew while paused");
    // The engine catches up: nothing was lost to the pause.
    apply_all(&handle, &mut rx).await;
    task.await.unwrap().unwrap();
    assert!(!status.paused() || status.pending_batches() == 0);
    assert_matches_oracle(&handle, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_dead_letter_topic_holds_the_source_instead_of_dropping() {
    let c = cluster();
    let brokers = c.bootstrap_servers();
    let topic = topic_name("storepulse.", StreamKind::StockMovements);
    let bad = br#"{"event_id":"x1","ts":"2026-01-05T10:00:00Z"#;
    let good = br#"{"event_id":"x2","ts":"2026-01-05T10:00:00Z","store_id":"S001","sku":"P00001","kind":"receipt","qty":5}"#;
    produce_raw(&brokers, &topic, &[&bad[..], &good[..]]);
    // From now on every produce request fails (non-retriable).
    c.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 500],
    );
    let handle = EngineHandle::new(engine().await);
    let applied = handle.lock().await.positions().clone();
    let mut cfg = source_config(&brokers, "g6");
    cfg.streams = Some(vec![StreamKind::StockMovements]);
    let src = connect(cfg, true, applied.clone()).await.unwrap();
    let (tx, mut rx) = mpsc::channel::<SourceMessage>(4);
    let (_stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(src.run(tx, stop_rx));
    // While the dead letter cannot be written, the batch holding it (and
    // the good message after it) is not handed on: nothing advances.
    let hold_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < hold_until {
        if let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            assert!(
                !matches!(msg, SourceMessage::Batch(_) | SourceMessage::Advance { .. }),
                "a batch passed an unwritten dead letter: {msg:?}"
            );
            handle
                .lock()
                .await
                .apply(msg, EngineHandle::now_ms())
                .await
                .unwrap();
        }
    }
    assert_eq!(applied.get(&format!("{topic}/0")), None);
    // The topic becomes writable: the dead letter is written, then the
    // batch goes on.
    c.clear_request_errors(RDKafkaApiKey::Produce);
    apply_all(&handle, &mut rx).await;
    task.await.unwrap().unwrap();
    assert_eq!(applied.get(&format!("{topic}/0")), Some(2));
    assert_eq!(accepted(&handle).await, 1);
    let watcher: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let (low, high) = watcher
        .fetch_watermarks(DEFAULT_DEAD_LETTER_TOPIC, 0, Duration::from_secs(10))
        .unwrap();
    assert_eq!(high - low, 1, "exactly one dead letter written");
}

/// Produces IoT readings to one partition: `n` readings from `base_ms`,
/// `step_ms` apart.
fn produce_readings(brokers: &str, partition: i32, n: i64, base_ms: i64, step_ms: i64) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    let topic = topic_name("storepulse.", StreamKind::IotReadings);
    for i in 0..n {
        let payload = format!(
            r#"{{"event_id":"p{partition}-{i}","ts":{},"store_id":"S{partition}","device_id":"f1","metric":"fridge_temp_c","value":4.5}}"#,
            base_ms + i * step_ms
        );
        producer
            .send(
                BaseRecord::<str, str>::to(&topic)
                    .payload(&payload)
                    .partition(partition),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Watermark alignment: partition 0 covers 100 hours of event time and
/// partition 1 ten hours in as many messages, so read at the same message
/// rate partition 0 runs hours ahead. With `max_watermark_drift = 1h` it
/// waits: no batch handed on is more than the drift (plus the batches in
/// flight) ahead of partition 1 while partition 1 still has messages;
/// nothing is lost, and partition 2 (empty) holds nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_far_ahead_in_event_time_waits_with_watermark_alignment() {
    const BASE: i64 = 1_767_600_000_000;
    const N: i64 = 6_000;
    const DRIFT_MS: i64 = 3_600_000;
    let c = cluster();
    let brokers = c.bootstrap_servers();
    produce_readings(&brokers, 0, N, BASE, 60_000);
    produce_readings(&brokers, 1, N, BASE, 6_000);
    let mut cfg = source_config(&brokers, "g-align");
    cfg.streams = Some(vec![StreamKind::IotReadings]);
    cfg.batch_max_messages = 100;
    cfg.max_watermark_drift = Some(Duration::from_millis(DRIFT_MS as u64));
    let src = connect(cfg, true, Arc::new(AppliedPositions::default()))
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::channel::<SourceMessage>(4);
    let (_stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(src.run(tx, stop_rx));
    let (mut newest, mut rows) = ([i64::MIN; 2], [0usize; 2]);
    let mut worst = 0i64;
    while let Some(msg) = rx.recv().await {
        let SourceMessage::Batch(b) = msg else {
            continue;
        };
        let p = usize::from(b.position.partition.ends_with("/1"));
        let ts = b
            .batch
            .column_by_name("ts")
            .unwrap()
            .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        newest[p] = newest[p].max(arrow::compute::max(ts).unwrap());
        rows[p] += b.batch.num_rows();
        // While partition 1 still has messages, partition 0 stays near it.
        if rows[1] > 0 && (rows[1] as i64) < N {
            worst = worst.max(newest[0].saturating_sub(newest[1]));
        }
    }
    task.await.unwrap().unwrap();
    assert_eq!(
        rows,
        [N as usize, N as usize],
        "every reading delivered once"
    );
    // Unaligned, partition 0 would be up to ~90 hours ahead. Aligned: the
    // drift plus what was in flight when it paused (a few batches of 100
    // minutes each).
    assert!(
        worst <= DRIFT_MS + 6 * 6_000_000,
        "partition 0 ran {:.1} h ahead of partition 1",
        worst as f64 / 3_600_000.0
    );
}

/// Kafka timestamps (producer create time, ms) of every message of `topic`.
fn create_times(brokers: &str, topic: &str, expected: usize) -> Vec<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "replay-order")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    while out.len() < expected {
        assert!(
            Instant::now() < deadline,
            "read {} of {expected}",
            out.len()
        );
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            out.push(m.timestamp().to_millis().unwrap());
        }
    }
    out
}

/// `storepulse replay` merges the streams by event time: readings of day 1
/// in one file and counts of day 2 in another are published day 1 first
/// (interleaved by how far each file was read, as before, they went out
/// together, and a topic could run days ahead of another).
#[test]
fn replay_publishes_the_streams_in_event_time_order() {
    const BASE: i64 = 1_767_600_000_000;
    const DAY: i64 = 86_400_000;
    let c = cluster();
    let brokers = c.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let readings: Vec<String> = (0..300)
        .map(|i| format!(r#"{{"event_id":"r{i}","ts":{},"store_id":"S{}","device_id":"f1","metric":"fridge_temp_c","value":4.5}}"#, BASE + i * 1000, i % 4))
        .collect();
    let counts: Vec<String> = (0..300)
        .map(|i| {
            let ts = chrono::DateTime::from_timestamp_millis(BASE + DAY + i * 1000).unwrap();
            format!(
                r#"{{"event_id":"c{i}","ts":"{}","store_id":"S{}","sku":"A","on_hand":3}}"#,
                ts.to_rfc3339(),
                i % 4
            )
        })
        .collect();
    std::fs::write(dir.path().join("iot_readings.jsonl"), readings.join("\n")).unwrap();
    std::fs::write(dir.path().join("stock_counts.jsonl"), counts.join("\n")).unwrap();
    let opts = ReplayOptions {
        brokers: brokers.clone(),
        topic_prefix: "storepulse.".into(),
        rate: Some(2_000.0),
        properties: Default::default(),
        timeout: Duration::from_secs(10),
        progress: false,
    };
    let report = replay(&dataset_inputs(dir.path()).unwrap(), &opts).unwrap();
    assert_eq!(report.events, 600);
    let day1 = create_times(
        &brokers,
        &topic_name("storepulse.", StreamKind::IotReadings),
        300,
    );
    let day2 = create_times(
        &brokers,
        &topic_name("storepulse.", StreamKind::StockCounts),
        300,
    );
    // 300 events at 2,000/s: 150 ms of readings, then the counts.
    let (last1, first2) = (*day1.iter().max().unwrap(), *day2.iter().min().unwrap());
    assert!(
        last1 <= first2,
        "day-2 counts went out at {first2}, before day-1 readings at {last1}"
    );
}
