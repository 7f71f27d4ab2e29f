//! Throughput harness for the streaming path (issue #2).
//!
//! Pre-generates JSON `sales` receipts in memory, then replays them through
//! decode (one thread) and the engine with three continuous views (another
//! thread), like the real pipeline:
//!
//! 1. hourly tumbling sales per (store, SKU),
//! 2. a 24-hour hopping window sliding hourly per (store, SKU),
//! 3. an updating aggregate per member.
//!
//! It reports events/s, per-batch latency percentiles and peak memory, then
//! runs plain DataFusion over the same events and SQL (batch) so the ratio
//! is visible, and finally measures the state of 1,000,000 (store, SKU) keys.
//!
//! `cargo bench --bench throughput` (env: `BENCH_EVENTS`, default 2,000,000).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::{decode_thread, generate, percentile, proc_status_mb, records, BATCH, VIEWS};
use datafusion::{datasource::MemTable, prelude::SessionContext};
use storepulse_engine::{Engine, EngineConfig};
use storepulse_ingest::{EventDecoder, SourceMessage, StreamKind};

mod common;

async fn streaming(lines: Arc<Vec<String>>, views: &str) -> (f64, Vec<Duration>, Engine) {
    let mut engine = Engine::new(EngineConfig {
        allowed_lateness: Duration::from_secs(30 * 86_400),
        ..Default::default()
    })
    .expect("engine");
    engine.execute_sql(views).await.expect("views");
    let started = Instant::now();
    let rx = decode_thread(lines.clone());
    let mut lat = Vec::new();
    while let Ok((batch, t)) = rx.recv() {
        engine
            .apply(SourceMessage::Batch(batch), 0)
            .await
            .expect("apply");
        lat.push(t.elapsed());
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    (lines.len() as f64 / secs, lat, engine)
}

async fn batch(lines: &[String], views: &str) -> (f64, f64) {
    let started = Instant::now();
    let mut dec = EventDecoder::new(StreamKind::Sales, "bench");
    let mut batches = Vec::new();
    for chunk in lines.chunks(BATCH) {
        let recs = records(chunk);
        batches.push(dec.decode(&recs).expect("decode").batch.expect("rows"));
    }
    let decoded = started.elapsed().as_secs_f64();
    let ctx = SessionContext::new();
    storepulse_sql::register(&ctx);
    let table = MemTable::try_new(StreamKind::Sales.schema(), vec![batches]).expect("table");
    ctx.register_table("sales", Arc::new(table))
        .expect("register");
    for stmt in storepulse_sql::parse_script(views).expect("parse") {
        if let storepulse_sql::Statement::CreateMaterializedView { query, .. } = stmt {
            let rows: usize = ctx
                .sql(&query.to_string())
                .await
                .expect("plan")
                .collect()
                .await
                .expect("run")
                .iter()
                .map(|b| b.num_rows())
                .sum();
            assert!(rows > 0);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    (lines.len() as f64 / secs, decoded)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes; nothing to list
    }
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    println!("generating {n} receipts (JSON, in memory)...");
    let lines = Arc::new(generate(n, 7, false));
    let bytes: usize = lines.iter().map(|l| l.len()).sum();
    println!(
        "{:.1} MB of JSON, {:.0} bytes/event",
        bytes as f64 / 1e6,
        bytes as f64 / n as f64
    );
    let base_rss = proc_status_mb("VmRSS:");

    let (eps, lat, mut engine) = streaming(lines.clone(), VIEWS).await;
    let t = Instant::now();
    engine.snapshot().expect("snapshot");
    let read_ms = t.elapsed().as_secs_f64() * 1000.0;
    println!("\n## streaming: decode + 3 continuous views");
    println!("events/s            {:>12.0}", eps);
    println!(
        "batch latency ms    p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}  ({} batches of {BATCH})",
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0),
        lat.len()
    );
    for v in engine.views() {
        println!(
            "view {:<10} groups {:>10}  state {:>8.1} MB",
            v.name,
            v.groups.unwrap_or(0),
            v.state_bytes.unwrap_or(0) as f64 / 1e6
        );
    }
    println!("snapshot (evaluate all views) {read_ms:.0} ms");
    println!(
        "peak RSS {:.0} MB (JSON input itself: {:.0} MB; RSS before: {:.0} MB)",
        proc_status_mb("VmHWM:"),
        bytes as f64 / 1e6,
        base_rss
    );
    drop(engine);

    let (batch_eps, decode_s) = batch(&lines, VIEWS).await;
    println!("\n## batch: plain DataFusion, same events and SQL");
    println!(
        "events/s            {:>12.0}  (decode {:.2} s)",
        batch_eps, decode_s
    );
    println!("streaming / batch   {:>12.2}", eps / batch_eps);

    // State of 1,000,000 (store, SKU) keys.
    drop(lines);
    let keys = Arc::new(generate(1_000_000, 8, true));
    let before = proc_status_mb("VmRSS:");
    let (_, _, mut engine) = streaming(
        keys,
        "CREATE MATERIALIZED VIEW by_key AS SELECT store_id, sku, sum(qty) AS units, count(*) AS lines, max(ts) AS last_ts FROM sales GROUP BY store_id, sku;",
    )
    .await;
    engine.snapshot().expect("snapshot");
    let v = &engine.views()[0];
    println!("\n## state for 1,000,000 (store, SKU) keys (sum, count, max)");
    println!(
        "groups {}  view state {:.1} MB  dedup ids {:.1} MB  RSS growth {:.0} MB",
        v.groups.unwrap_or(0),
        v.state_bytes.unwrap_or(0) as f64 / 1e6,
        (engine.state_bytes() - v.state_bytes.unwrap_or(0)) as f64 / 1e6,
        proc_status_mb("VmRSS:") - before
    );
}
