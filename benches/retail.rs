//! Retail views harness (issue #4).
//!
//! 1. **Throughput with every built-in view**: the chain generator's events
//!    (all five streams, offline uploads and retransmits included), decoded
//!    up front, applied to an engine running `starter.sql` + `retail.sql`
//!    with the chain's dimension tables. Reports events/s and per-batch
//!    latency percentiles.
//! 2. **Query latency at scale**: 1,000,000 (store, SKU) keys (1,000 stores ×
//!    1,000 SKUs, a count and sales for each) and 1,000,000 members (10% of
//!    them on a store-local card linked to the chain id), built as Arrow
//!    batches and applied through the engine. Then the two analyst queries of
//!    the issue are timed: the first run after ingest (it evaluates the
//!    views the query reads that changed) and repeated runs on the same
//!    snapshot. This part loads `retail.sql` only (the starter views are not
//!    read by these queries).
//!
//! 3. **Checkpoints at that scale** (issue #23): a whole checkpoint, then
//!    `BENCH_RETAIL_TRICKLE` (2,000) sale lines over as many keys and the
//!    incremental checkpoint after them (the default `[checkpoint]`).
//!
//! `cargo bench --bench retail` (env: `BENCH_RETAIL_HOURS` of generated chain
//! activity, default 72; `BENCH_RETAIL_KEYS` default 1,000,000;
//! `BENCH_RETAIL_RUNS` default 10).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::{percentile, proc_status_mb};
use datafusion::arrow::{
    array::{
        ArrayRef, Decimal128Array, Int32Array, Int64Array, RecordBatch, StringArray,
        TimestampMillisecondArray,
    },
    datatypes::SchemaRef,
};
use storepulse_engine::{DimensionSource, Engine, EngineConfig};
use storepulse_ingest::{
    gen::{Chain, ChainConfig, Simulator},
    source::Position,
    EventDecoder, RawRecord, SourceBatch, SourceMessage, StreamKind,
};

mod common;

const STOCKOUT_Q: &str =
    "SELECT * FROM stockout_risk WHERE p_stockout > 0.5 ORDER BY p_stockout DESC LIMIT 100";
const SEGMENT_Q: &str = "SELECT segment, count(*) FROM member_rfm GROUP BY segment";

fn env(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn engine_with_views(
    dims: Vec<(String, SchemaRef, Vec<RecordBatch>)>,
    only: Option<&str>,
    refresh: &[(&str, Duration)],
) -> Engine {
    let mut e = Engine::new(EngineConfig {
        idle_timeout: Duration::from_secs(3600),
        allowed_lateness: Duration::from_secs(3 * 3600),
        refresh: refresh
            .iter()
            .map(|(n, d)| (n.to_string(), (*d).into()))
            .collect(),
        ..Default::default()
    })
    .expect("engine");
    for (name, schema, batches) in dims {
        e.register_dimension(&name, batches, schema)
            .expect("dimension");
    }
    for (file, sql) in storepulse_sql::builtin::scripts(&Default::default()).expect("scripts") {
        if only.is_some_and(|o| o != file) {
            continue;
        }
        e.execute_sql(&sql)
            .await
            .unwrap_or_else(|err| panic!("{file}: {err}"));
    }
    e
}

async fn load_dims(tables: &[(&str, String)]) -> Vec<(String, SchemaRef, Vec<RecordBatch>)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut out = Vec::new();
    for (name, text) in tables {
        let path = dir.path().join(format!("{name}.csv"));
        std::fs::write(&path, text).expect("write");
        let (schema, batches) = DimensionSource {
            table: name.to_string(),
            location: path.display().to_string(),
        }
        .load()
        .await
        .expect("dimension");
        out.push((name.to_string(), schema, batches));
    }
    out
}

fn batch_msg(stream: StreamKind, batch: RecordBatch, events: usize, seq: u64) -> SourceMessage {
    SourceMessage::Batch(SourceBatch {
        stream,
        batch,
        events,
        bytes: 0,
        position: Position {
            partition: "bench".into(),
            next_offset: seq,
        },
    })
}

async fn finish(e: &mut Engine) {
    for k in StreamKind::ALL {
        e.apply(
            SourceMessage::EndOfPartition {
                stream: k,
                partition: "bench".into(),
            },
            0,
        )
        .await
        .expect("finish");
    }
}

/// Part 1: every built-in view over the generated chain.
async fn throughput(hours: usize) {
    let cfg = ChainConfig {
        stores: 200,
        skus: 400,
        members: 50_000,
        ..Default::default()
    };
    let chain = Chain::new(cfg.clone());
    let dims = load_dims(&[
        ("stores", chain.stores_csv()),
        ("products", chain.products_csv()),
        ("replenishment_policy", chain.policy_csv()),
        ("prices", chain.prices_csv(cfg.start_ms + 400 * 86_400_000)),
    ])
    .await;
    let mut sim = Simulator::new(chain);
    let mut events = Vec::new();
    sim.advance(cfg.start_ms + hours as i64 * 3_600_000, &mut |e| {
        events.push(e)
    });
    sim.flush_offline(&mut |e| events.push(e));
    // Arrival order, cut into per-stream micro-batches of up to 8,192 events.
    let mut msgs = Vec::new();
    let mut total_events = 0usize;
    for chunk in events.chunks(32_768) {
        for k in StreamKind::ALL {
            let recs: Vec<RawRecord<'_>> = chunk
                .iter()
                .filter(|e| e.stream == k)
                .map(|e| RawRecord {
                    bytes: e.json.as_bytes(),
                    position: 0,
                })
                .collect();
            for part in recs.chunks(8192) {
                let out = EventDecoder::new(k, "bench").decode(part).expect("decode");
                if let Some(b) = out.batch {
                    total_events += out.events;
                    msgs.push((k, b, out.events));
                }
            }
        }
    }
    let mut e = engine_with_views(dims, None, &[]).await;
    let mut lat = Vec::with_capacity(msgs.len());
    let started = Instant::now();
    for (i, (k, b, n)) in msgs.into_iter().enumerate() {
        let t = Instant::now();
        e.apply(batch_msg(k, b, n, i as u64), 0)
            .await
            .expect("apply");
        lat.push(t.elapsed());
    }
    finish(&mut e).await;
    let secs = started.elapsed().as_secs_f64();
    let t = Instant::now();
    e.snapshot().expect("snapshot");
    let eval = t.elapsed();
    lat.sort();
    print_evaluation(&e);
    let views = e.views();
    let keys = views
        .iter()
        .find(|v| v.name == "sku_activity")
        .and_then(|v| v.groups)
        .unwrap_or(0);
    println!(
        "all built-in views ({} materialized): {hours} h of a 200-store chain, {total_events} events in {secs:.2} s = {:.0} events/s; batch latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} batches); {keys} (store, SKU) keys; evaluating every view once {:.0} ms; state {:.0} MB",
        views.len(),
        total_events as f64 / secs,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0),
        lat.len(),
        eval.as_secs_f64() * 1000.0,
        e.state_bytes() as f64 / 1e6,
    );
}

fn print_evaluation(e: &Engine) {
    let mut ev: Vec<_> = e.last_evaluation().to_vec();
    ev.sort_by(|a, b| b.1.total_cmp(&a.1));
    let states: Vec<String> = e
        .views()
        .iter()
        .filter_map(|v| Some(format!("{} {:.0} MB", v.name, v.state_bytes? as f64 / 1e6)))
        .collect();
    println!(
        "  evaluation: {}\n  state: {}",
        ev.iter()
            .map(|(n, s)| format!("{n} {:.0} ms", s * 1000.0))
            .collect::<Vec<_>>()
            .join(", "),
        states.join(", ")
    );
}

fn strings(v: impl Iterator<Item = String>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(v))
}

fn ts(v: impl Iterator<Item = i64>) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from_iter_values(v).with_timezone("UTC"))
}

/// Part 2: 1M keys, 1M members; the two analyst queries, computed per
/// query or (with `refresh`) served from refreshed results.
/// Sale lines `ids` (one line per receipt `R<i>`): event time, store, SKU
/// and member card per line; 1 to 3 units at 1.00 to 5.90 (money at the
/// contract's six decimals, no discount, no till amount).
fn sale_batch(
    ids: std::ops::Range<usize>,
    t: impl Fn(usize) -> i64,
    store: impl Fn(usize) -> String,
    sku: impl Fn(usize) -> String,
    member: impl Fn(usize) -> String,
) -> RecordBatch {
    let n = ids.len();
    RecordBatch::try_new(
        StreamKind::Sales.schema(),
        vec![
            strings(ids.clone().map(|i| format!("r{i}"))),
            ts(ids.clone().map(t)),
            strings(ids.clone().map(store)),
            strings(ids.clone().map(|i| format!("R{i}"))),
            strings(ids.clone().map(member)),
            Arc::new(StringArray::from(vec![Some("pos"); n])),
            Arc::new(Int32Array::from(vec![0; n])),
            strings(ids.clone().map(sku)),
            Arc::new(Int64Array::from_iter_values(
                ids.clone().map(|i| 1 + (i % 3) as i64),
            )),
            Arc::new(
                Decimal128Array::from_iter_values(
                    ids.map(|i| 1_000_000 + (i % 50) as i128 * 100_000),
                )
                .with_precision_and_scale(18, 6)
                .expect("decimal"),
            ),
            // discount, amount
            Arc::new(
                Decimal128Array::from(vec![None; n])
                    .with_precision_and_scale(18, 6)
                    .expect("decimal"),
            ),
            Arc::new(
                Decimal128Array::from(vec![None; n])
                    .with_precision_and_scale(18, 6)
                    .expect("decimal"),
            ),
        ],
    )
    .expect("sales")
}

/// Checkpoints at scale (issue #23): a whole checkpoint of `e` written to a
/// local store, then `trickle` sale lines over as many keys (what a chain
/// sells in a few seconds) at `at`, then the incremental checkpoint.
async fn checkpoints_at_scale(
    e: &mut Engine,
    at: i64,
    trickle: usize,
    key: impl Fn(usize) -> (usize, usize),
    seq: &mut u64,
) {
    use storepulse_lake::{CheckpointConfig, CheckpointStore};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CheckpointStore::open(
        &CheckpointConfig {
            keep: 2,
            ..Default::default()
        },
        dir.path(),
    )
    .expect("store");
    println!("| checkpoint | view rows written | capture (engine locked) | encode + write | total | bytes |");
    println!("|---|---|---|---|---|---|");
    for round in ["whole (the first)", "incremental, after the trickle"] {
        if round.starts_with("incremental") {
            let b = sale_batch(
                0..trickle,
                |i| at + i as i64,
                |i| format!("S{:04}", key(i * 7919).0),
                |i| format!("P{:04}", key(i * 7919).1),
                |i| format!("M{i:07}"),
            );
            *seq += 1;
            e.apply(batch_msg(StreamKind::Sales, b, trickle, *seq), 0)
                .await
                .expect("apply");
        }
        let t = Instant::now();
        let cp = e.checkpoint_incremental().expect("checkpoint");
        let capture = t.elapsed().as_secs_f64();
        let rows: usize = cp.views.iter().map(|v| v.rows()).sum();
        let t = Instant::now();
        let m = store.write(&cp, None).await.expect("write");
        let write = t.elapsed().as_secs_f64();
        e.checkpoint_stored(&cp);
        println!(
            "| {round} | {rows} | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} MB |",
            capture * 1e3,
            write * 1e3,
            (capture + write) * 1e3,
            m.bytes() as f64 / 1e6
        );
    }
}

async fn at_scale(keys: usize, runs: usize, refresh: Option<Duration>) {
    let refreshed: Vec<(&str, Duration)> = refresh
        .map(|d| vec![("stockout_risk", d), ("member_rfm", d)])
        .unwrap_or_default();
    println!(
        "--- {} ---",
        match refresh {
            Some(d) =>
                format!("stockout_risk and member_rfm refreshed every {d:?} ([engine] refresh)"),
            None => "query-time views computed per query (default)".into(),
        }
    );
    let stores = 1000usize;
    let skus = keys.div_ceil(stores);
    let members = keys;
    let start = 1_767_571_200_000i64; // 2026-01-05
    let day = 86_400_000i64;
    let store_csv: String = std::iter::once("store_id,name,city,format\n".to_string())
        .chain((0..stores).map(|s| {
            let fmt = ["supermarket", "convenience", "tea_shop", "bakery"][s % 4];
            format!("S{s:04},Store {s},City{},{fmt}\n", s % 50)
        }))
        .collect();
    let product_csv: String =
        std::iter::once("sku,name,category,unit_cost,case_pack\n".to_string())
            .chain((0..skus).map(|p| {
                let cat = ["dairy", "produce", "snacks", "drinks", "bakery"][p % 5];
                format!(
                    "P{p:04},Item {p},{cat},{}.{:02},{}\n",
                    1 + p % 7,
                    p % 100,
                    [1, 6, 12][p % 3]
                )
            }))
            .collect();
    let mut policy_csv =
        String::from("format,category,lead_time_hours,service_level,review_hours,min_stock\n");
    for f in ["supermarket", "convenience", "tea_shop", "bakery"] {
        for c in ["dairy", "produce", "snacks", "drinks", "bakery"] {
            policy_csv.push_str(&format!("{f},{c},36,0.95,48,2\n"));
        }
    }
    let dims = load_dims(&[
        ("stores", store_csv),
        ("products", product_csv),
        ("replenishment_policy", policy_csv),
    ])
    .await;
    // Only retail.sql: the starter views are not what these queries read
    // (part 1 runs every view).
    let mut e = engine_with_views(dims, Some("retail.sql"), &refreshed).await;
    let chunk = 65_536usize;
    let started = Instant::now();
    let mut seq = 0u64;
    let mut rows = 0usize;
    // A count per key (day 0), then sales: each key sells 1–3 lines over
    // two days; line i belongs to member i % members; 10% of members buy on
    // a store-local card.
    let key = |i: usize| (i % stores, (i / stores) % skus);
    for lo in (0..keys).step_by(chunk) {
        let hi = (lo + chunk).min(keys);
        let b = RecordBatch::try_new(
            StreamKind::StockCounts.schema(),
            vec![
                strings((lo..hi).map(|i| format!("c{i}"))),
                ts((lo..hi).map(|i| start + (i % 3600) as i64 * 1000)),
                strings((lo..hi).map(|i| format!("S{:04}", key(i).0))),
                strings((lo..hi).map(|i| format!("P{:04}", key(i).1))),
                Arc::new(Int64Array::from_iter_values(
                    (lo..hi).map(|i| (i % 40) as i64),
                )),
                Arc::new(StringArray::from(vec![Some("stocktake"); hi - lo])),
            ],
        )
        .expect("counts");
        seq += 1;
        rows += b.num_rows();
        e.apply(batch_msg(StreamKind::StockCounts, b, hi - lo, seq), 0)
            .await
            .expect("apply");
    }
    let lines = keys * 2;
    let local = |m: usize| m.is_multiple_of(10);
    let mut last_links = 0usize;
    for lo in (0..lines).step_by(chunk) {
        let hi = (lo + chunk).min(lines);
        let n = hi - lo;
        // Event time rises with i (two days of sales), as a live feed.
        let t = |i: usize| start + day / 2 + (i as i64 * 2 * day) / lines as i64;
        let member = |i: usize| i % members;
        let b = sale_batch(
            lo..hi,
            t,
            |i| format!("S{:04}", key(i % keys).0),
            |i| format!("P{:04}", key(i % keys).1),
            |i| {
                let m = member(i);
                if local(m) {
                    format!("S{:04}-L{m}", key(m % keys).0)
                } else {
                    format!("M{m:07}")
                }
            },
        );
        seq += 1;
        rows += n;
        e.apply(batch_msg(StreamKind::Sales, b, n, seq), 0)
            .await
            .expect("apply");
        // Links for the local cards first used in this chunk.
        let firsts: Vec<usize> = (lo..hi)
            .filter(|&i| i < members && local(member(i)))
            .collect();
        if !firsts.is_empty() {
            let b = RecordBatch::try_new(
                StreamKind::MemberLinks.schema(),
                vec![
                    strings(firsts.iter().map(|i| format!("l{i}"))),
                    ts(firsts.iter().map(|&i| t(i))),
                    strings(firsts.iter().map(|&i| format!("S{:04}", key(i % keys).0))),
                    strings(
                        firsts
                            .iter()
                            .map(|&i| format!("S{:04}-L{}", key(member(i) % keys).0, member(i))),
                    ),
                    strings(firsts.iter().map(|&i| format!("M{:07}", member(i)))),
                ],
            )
            .expect("links");
            last_links += b.num_rows();
            seq += 1;
            rows += b.num_rows();
            e.apply(batch_msg(StreamKind::MemberLinks, b, firsts.len(), seq), 0)
                .await
                .expect("apply");
        }
    }
    let ingest = started.elapsed().as_secs_f64();
    if refresh.is_none() {
        let trickle = env("BENCH_RETAIL_TRICKLE", 2_000);
        checkpoints_at_scale(&mut e, start + 3 * day, trickle, key, &mut seq).await;
    }
    finish(&mut e).await;
    let groups = |name: &str| {
        e.views()
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.groups)
            .unwrap_or(0)
    };
    println!(
        "at scale: {rows} rows ({keys} keys, {lines} sale lines, {last_links} links) applied in {ingest:.1} s = {:.0} rows/s; sku_activity {} groups, member_purchases {} groups; state {:.0} MB; peak RSS {:.0} MB",
        rows as f64 / ingest,
        groups("sku_activity"),
        groups("member_purchases"),
        e.state_bytes() as f64 / 1e6,
        proc_status_mb("VmHWM"),
    );
    let handle = storepulse_engine::EngineHandle::new(e);
    for (label, q) in [
        ("stockout top-100", STOCKOUT_Q),
        ("RFM segments", SEGMENT_Q),
    ] {
        // First run after ingest: evaluates the views the batch touched.
        let t = Instant::now();
        let out = handle.query(q).await.expect("query");
        let first = t.elapsed();
        let n: usize = out[0].batches.iter().map(|b| b.num_rows()).sum();
        print_evaluation(&*handle.lock().await);
        if std::env::var_os("BENCH_RETAIL_EXPLAIN").is_some() {
            let out = handle
                .query(&format!("EXPLAIN ANALYZE {q}"))
                .await
                .expect("explain");
            let text = datafusion::arrow::util::pretty::pretty_format_batches(&out[0].batches)
                .expect("format");
            println!("{text}");
        }
        let mut lat = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            handle.query(q).await.expect("query");
            lat.push(t.elapsed());
        }
        lat.sort();
        println!(
            "{label}: {n} rows; first run after ingest {:.0} ms; then p50 {:.0} ms, p99 {:.0} ms over {runs} runs   [{q}]",
            first.as_secs_f64() * 1000.0,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
        );
    }
    // After one more small batch the touched views are re-evaluated.
    {
        let mut e = handle.lock().await;
        let b = RecordBatch::try_new(
            StreamKind::StockCounts.schema(),
            vec![
                strings(std::iter::once("late-count".to_string())),
                ts(std::iter::once(start + 3 * day)),
                strings(std::iter::once("S0000".to_string())),
                strings(std::iter::once("P0000".to_string())),
                Arc::new(Int64Array::from(vec![5])),
                Arc::new(StringArray::from(vec![Some("stocktake")])),
            ],
        )
        .expect("batch");
        // The stream is final, so this row is late: it changes nothing and
        // the cached evaluation stays.
        e.apply(batch_msg(StreamKind::StockCounts, b, 1, u64::MAX), 0)
            .await
            .expect("apply");
    }
    let t = Instant::now();
    handle.query(STOCKOUT_Q).await.expect("query");
    println!(
        "stockout top-100 after a late row (no view changed): {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let hours = env("BENCH_RETAIL_HOURS", 72);
        if hours > 0 {
            throughput(hours).await;
        }
        let keys = env("BENCH_RETAIL_KEYS", 1_000_000);
        let runs = env("BENCH_RETAIL_RUNS", 10);
        at_scale(keys, runs, None).await;
        at_scale(keys, runs, Some(Duration::from_secs(30))).await;
    });
}
