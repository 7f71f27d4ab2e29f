//! The cost of the serving path's hostile-input checks (issue: hardening
//! the query surface), in process, without a network or a broker in the way:
//! every query goes through `EngineHandle::query_with` as the HTTP API's
//! does (parse and check the text on a SQL thread, plan there, collect
//! with the result reserved in the memory pool, one deadline), under the
//! default `[serving]` limits.
//!
//! An engine holds a materialized view of 100,000 (store, SKU) keys; after
//! a warm-up, `BENCH_QUERY_N` (5,000) point lookups by random key and 500
//! aggregates run one after another from one client. Reports queries/s and
//! latency p50/p99/max, and separately what the added steps cost alone: the
//! Postgres-dialect text check of a point lookup and a round trip to a SQL
//! thread.
//!
//! `cargo bench --bench query_path`

mod common;

use std::time::{Duration, Instant};

use common::percentile;
use rand::{Rng, SeedableRng};
use storepulse_engine::{
    sqlrt::on_sql_thread, Ddl, Engine, EngineConfig, EngineHandle, QueryLimits, SqlLimits,
};
use storepulse_ingest::StreamKind;

const KEYS: u64 = 100_000;

fn limits() -> QueryLimits {
    QueryLimits {
        timeout: Some(Duration::from_secs(30)),
        max_rows: Some(1_000_000),
        max_result_bytes: Some(256 << 20),
        sql: SqlLimits::DEFAULT,
        deadline: None,
    }
}

async fn engine() -> EngineHandle {
    let mut e = Engine::new(EngineConfig {
        query_memory_limit: Some(2 << 30),
        ..Default::default()
    })
    .unwrap();
    e.execute_sql(
        "CREATE MATERIALIZED VIEW stock AS
         SELECT store_id, device_id AS sku, count(*) AS n, max(value) AS hottest
         FROM iot_readings GROUP BY store_id, device_id",
    )
    .await
    .unwrap();
    for chunk in 0..(KEYS / 10_000) {
        let lines: Vec<String> = (0..10_000)
            .map(|i| {
                let k = chunk * 10_000 + i;
                format!(
                    r#"{{"event_id":"e{k}","ts":{},"store_id":"S{:03}","device_id":"sku-{k}","metric":"fridge_temp_c","value":{}}}"#,
                    1_767_600_000_000i64 + k as i64,
                    k % 50,
                    (k % 97) as f64 / 10.0
                )
            })
            .collect();
        let msg =
            storepulse_testkit::json_message(StreamKind::IotReadings, &lines, "p0", chunk + 1)
                .unwrap()
                .unwrap();
        e.apply(msg, 0).await.unwrap();
    }
    EngineHandle::new(e)
}

fn report(name: &str, mut lat: Vec<Duration>, wall: Duration) {
    lat.sort();
    println!(
        "{name:<28} {:>8.0} q/s   p50 {:>7.3} ms   p99 {:>7.3} ms   max {:>7.3} ms",
        lat.len() as f64 / wall.as_secs_f64(),
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0)
    );
}

async fn run(h: &EngineHandle, name: &str, n: usize, sql: impl Fn(u64) -> String) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut lat = Vec::with_capacity(n);
    let started = Instant::now();
    for _ in 0..n {
        let q = sql(rng.random_range(0..KEYS));
        let t = Instant::now();
        let out = h
            .query_with(&q, &limits(), Ddl::Refused("bench"))
            .await
            .unwrap();
        assert!(!out.is_empty());
        lat.push(t.elapsed());
    }
    report(name, lat, started.elapsed());
}

fn main() {
    let n: usize = std::env::var("BENCH_QUERY_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let h = engine().await;
        let point = |k: u64| {
            format!(
                "SELECT n, hottest FROM stock WHERE store_id = 'S{:03}' AND sku = 'sku-{k}'",
                k % 50
            )
        };
        let agg = |_| "SELECT store_id, count(*) AS skus, avg(hottest) AS t FROM stock GROUP BY store_id ORDER BY store_id".to_string();
        run(&h, "warm-up", 500, point).await;
        run(&h, "point lookup", n, point).await;
        run(&h, "aggregate (100,000 rows)", 500, agg).await;

        // The added steps alone.
        let text = point(12_345);
        let reps = 20_000;
        let t = Instant::now();
        for _ in 0..reps {
            SqlLimits::DEFAULT.check_postgres_text(&text).unwrap();
        }
        println!(
            "{:<28} {:>8.1} µs per point lookup (parse + depth walk)",
            "pgwire text check",
            t.elapsed().as_secs_f64() * 1e6 / reps as f64
        );
        let mut hops = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t = Instant::now();
            on_sql_thread(async {}).await.unwrap();
            hops.push(t.elapsed());
        }
        hops.sort();
        println!(
            "{:<28} p50 {:>6.1} µs   p99 {:>6.1} µs",
            "SQL-thread round trip",
            percentile(&hops, 0.50) * 1000.0,
            percentile(&hops, 0.99) * 1000.0
        );
    });
}
