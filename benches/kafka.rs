//! Kafka ingest harness (issue #3): Kafka → decode → the three foundation
//! views, from librdkafka's in-process mock cluster and from a real broker
//! process (`tansu`, memory storage, loopback), in release mode; then the
//! consumer lag under a paced 50,000 events/s load on the real broker.
//!
//! `cargo bench --bench kafka`
//! (env: `BENCH_KAFKA_EVENTS`, default 1,000,000, for the real broker;
//! `BENCH_KAFKA_MOCK_EVENTS`, default 100,000; `BENCH_KAFKA_PACED_SECS`,
//! default 30). The real-broker parts are skipped, with a note, when `tansu`
//! is not installed.

mod common;

use std::{
    io::Write,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{generate, percentile, VIEWS};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    mocking::MockCluster,
    ClientConfig,
};
use storepulse_engine::{Engine, EngineConfig, EngineHandle};
use storepulse_ingest::{SourceMessage, StreamKind};
use storepulse_kafka::{
    admin::ensure_topics,
    config::DEFAULT_DEAD_LETTER_TOPIC,
    replay::{replay, ReplayOptions},
    KafkaSource, KafkaSourceConfig,
};
use storepulse_testkit::process::{tansu_bin, Tansu};
use tokio::sync::{mpsc, watch};

const PARTITIONS: i32 = 8;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn write_sales(dir: &Path, lines: &[String]) {
    std::fs::create_dir_all(dir).expect("dir");
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(dir.join("sales.jsonl")).expect("file"));
    for l in lines {
        writeln!(f, "{l}").expect("write");
    }
}

fn publish(brokers: &str, dir: &Path, prefix: &str, rate: Option<f64>) -> (u64, f64) {
    let opts = ReplayOptions {
        brokers: brokers.into(),
        topic_prefix: prefix.into(),
        rate,
        properties: Default::default(),
        timeout: Duration::from_secs(10),
        progress: false,
    };
    let r = replay(&[(StreamKind::Sales, dir.join("sales.jsonl"))], &opts).expect("replay");
    (r.events, r.events as f64 / r.seconds)
}

async fn engine() -> EngineHandle {
    let mut e = Engine::new(EngineConfig {
        allowed_lateness: Duration::from_secs(30 * 86_400),
        ..Default::default()
    })
    .expect("engine");
    e.execute_sql(VIEWS).await.expect("views");
    EngineHandle::new(e)
}

fn source_config(brokers: &str, prefix: &str, group: &str) -> KafkaSourceConfig {
    let mut c = KafkaSourceConfig::new(brokers);
    c.group_id = group.into();
    c.topic_prefix = prefix.into();
    c.streams = Some(vec![StreamKind::Sales]);
    c
}

struct Run {
    events: u64,
    events_per_sec: f64,
    latencies: Vec<Duration>,
}

/// Consumes until every published message is applied (not `until_eof`:
/// tansu 0.6's ListOffsets under-reports the end); the clock starts at the
/// first batch (group join excluded).
async fn consume(handle: &EngineHandle, cfg: KafkaSourceConfig, published: u64) -> Run {
    let applied = handle.lock().await.positions().clone();
    let a = applied.clone();
    let src = tokio::task::spawn_blocking(move || KafkaSource::connect(cfg, false, a))
        .await
        .expect("join")
        .expect("connect");
    let (tx, mut rx) = mpsc::channel::<SourceMessage>(16);
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(src.run(tx, stop_rx));
    let mut started = None;
    let mut events = 0u64;
    let mut latencies = Vec::new();
    let mut secs = f64::NAN;
    while let Some(msg) = rx.recv().await {
        let is_batch = matches!(msg, SourceMessage::Batch(_));
        if let SourceMessage::Batch(b) = &msg {
            started.get_or_insert_with(Instant::now);
            events += b.events as u64;
        }
        let t = Instant::now();
        handle
            .lock()
            .await
            .apply(msg, EngineHandle::now_ms())
            .await
            .expect("apply");
        if is_batch {
            latencies.push(t.elapsed());
        }
        let done: u64 = applied.snapshot().iter().map(|p| p.next_offset).sum();
        if done >= published && !*stop.borrow() {
            secs = started.map_or(f64::NAN, |s| s.elapsed().as_secs_f64());
            stop.send(true).expect("stop");
        }
    }
    task.await.expect("join").expect("source");
    latencies.sort();
    Run {
        events,
        events_per_sec: events as f64 / secs,
        latencies,
    }
}

fn report(name: &str, published: u64, publish_eps: f64, run: &Run) {
    println!("\n## {name}: Kafka → decode → 3 views");
    println!(
        "published           {published} receipts ({publish_eps:.0} events/s, idempotent producer)"
    );
    println!("consumed            {} receipts", run.events);
    println!("events/s            {:>12.0}", run.events_per_sec);
    println!(
        "apply latency ms    p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}  ({} batches)",
        percentile(&run.latencies, 0.5),
        percentile(&run.latencies, 0.9),
        percentile(&run.latencies, 0.99),
        percentile(&run.latencies, 1.0),
        run.latencies.len()
    );
    assert_eq!(
        run.events, published,
        "{name}: every published receipt consumed once"
    );
}

async fn topics(brokers: &str, prefix: &str) {
    ensure_topics(
        brokers,
        &Default::default(),
        &[
            format!("{prefix}sales"),
            DEFAULT_DEAD_LETTER_TOPIC.to_string(),
        ],
        PARTITIONS,
        1,
        Duration::from_secs(10),
    )
    .await
    .expect("topics");
}

/// Publishes at `rate` for `secs` while consuming (not until_eof); samples
/// the lag (high watermarks − applied offsets) every second.
async fn paced(brokers: &str, dir: &Path, rate: f64) {
    let prefix = "paced.";
    topics(brokers, prefix).await;
    let handle = engine().await;
    let applied = handle.lock().await.positions().clone();
    let cfg = source_config(brokers, prefix, "bench-paced");
    let src = tokio::task::spawn_blocking({
        let applied = applied.clone();
        move || KafkaSource::connect(cfg, false, applied)
    })
    .await
    .expect("join")
    .expect("connect");
    let (tx, mut rx) = mpsc::channel::<SourceMessage>(16);
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(src.run(tx, stop_rx));
    let driver = {
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    msg = rx.recv() => {
                        let Some(msg) = msg else { break };
                        handle.lock().await.apply(msg, EngineHandle::now_ms()).await.expect("apply");
                    }
                    _ = tick.tick() => handle.lock().await.tick(EngineHandle::now_ms()),
                }
            }
        })
    };
    let (b, d) = (brokers.to_string(), dir.to_path_buf());
    let producer = std::thread::spawn(move || publish(&b, &d, prefix, Some(rate)));
    let watcher: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("watcher");
    let topic = format!("{prefix}sales");
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut published_done = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let high: i64 = (0..PARTITIONS)
            .map(|p| {
                watcher
                    .fetch_watermarks(&topic, p, Duration::from_secs(5))
                    .map(|(_, h)| h)
                    .unwrap_or(0)
            })
            .sum();
        let done: i64 = applied
            .snapshot()
            .iter()
            .filter(|p| p.partition.starts_with(&topic))
            .map(|p| p.next_offset as i64)
            .sum();
        samples.push((started.elapsed().as_secs(), high, high - done));
        if producer.is_finished() && published_done.is_none() {
            published_done = Some(high);
        }
        if published_done.is_some_and(|h| done >= h) {
            break;
        }
    }
    let (published, eps) = producer.join().expect("producer");
    stop_tx.send(true).expect("stop");
    task.await.expect("join").expect("source");
    driver.await.expect("driver");
    println!("\n## paced load on the real broker: {rate:.0} events/s target");
    println!("published {published} at {eps:.0} events/s");
    println!("second  produced  lag(messages)");
    for (s, h, lag) in &samples {
        println!("{s:>6}  {h:>8}  {lag:>6}");
    }
    let steady: Vec<i64> = samples
        .iter()
        .skip(3)
        .take(samples.len().saturating_sub(4))
        .map(|s| s.2)
        .collect();
    let max = steady.iter().copied().max().unwrap_or(0);
    let mean = steady.iter().sum::<i64>() as f64 / steady.len().max(1) as f64;
    println!(
        "steady-state lag: mean {mean:.0} messages ({:.1} ms at the rate), max {max} messages",
        mean / rate * 1000.0
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n = env_usize("BENCH_KAFKA_EVENTS", 1_000_000);
    let n_mock = env_usize("BENCH_KAFKA_MOCK_EVENTS", 100_000);
    let paced_secs = env_usize("BENCH_KAFKA_PACED_SECS", 30);
    let rate = 50_000.0;
    let lines = Arc::new(generate(
        n.max(n_mock).max(rate as usize * paced_secs),
        7,
        false,
    ));
    let tmp = tempfile::tempdir().expect("tmp");
    let (mock_dir, real_dir, paced_dir) = (
        tmp.path().join("mock"),
        tmp.path().join("real"),
        tmp.path().join("paced"),
    );
    write_sales(&mock_dir, &lines[..n_mock]);
    write_sales(&real_dir, &lines[..n]);
    write_sales(&paced_dir, &lines[..rate as usize * paced_secs]);
    drop(lines);

    {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let brokers = cluster.bootstrap_servers();
        // The mock cluster has no CreateTopics: its own API makes them.
        cluster
            .create_topic("storepulse.sales", PARTITIONS, 1)
            .expect("topic");
        cluster
            .create_topic(DEFAULT_DEAD_LETTER_TOPIC, 1, 1)
            .expect("topic");
        let (published, eps) = publish(&brokers, &mock_dir, "storepulse.", None);
        let handle = engine().await;
        let run = consume(
            &handle,
            source_config(&brokers, "storepulse.", "bench"),
            published,
        )
        .await;
        report("mock cluster (in-process)", published, eps, &run);
    }

    let Some(bin) = tansu_bin() else {
        println!("\n(tansu not installed: real-broker figures skipped; `cargo install tansu --locked --features dynostore`)");
        return;
    };
    let broker = Tansu::start(&bin);
    let addr = broker.addr.clone();
    topics(&addr, "storepulse.").await;
    let (published, eps) = publish(&addr, &real_dir, "storepulse.", None);
    let handle = engine().await;
    let run = consume(
        &handle,
        source_config(&addr, "storepulse.", "bench"),
        published,
    )
    .await;
    report("tansu broker on loopback", published, eps, &run);
    drop(handle);
    paced(&addr, &paced_dir, rate).await;
}
