//! Query serving under ingest (issue #7): point and aggregate queries over
//! pgwire and HTTP while the real binary ingests a generated chain.
//!
//! Generates a chain (50 stores, 400 SKUs, enough days for the run), starts
//! a `tansu` broker, replays the chain into it with `storepulse replay
//! --rate BENCH_SERVING_RATE` (default 100,000 events/s) and starts
//! `storepulse run` (release build, every built-in view and rule) consuming
//! it; `BENCH_SERVING_SOURCE=generator` uses the live generator instead
//! (which follows the stores' opening hours in UTC). After
//! `BENCH_SERVING_WARMUP_SECS` (5) it runs four scenarios of
//! `BENCH_SERVING_SECS` (15) each with `BENCH_SERVING_CLIENTS` (4)
//! concurrent clients:
//!
//! * pgwire point: prepared `SELECT ... FROM stockout_risk WHERE store_id =
//!   $1 AND sku = $2` with random keys (tokio-postgres, binary rows);
//! * pgwire aggregate: `SELECT category, count(*), sum(suggested_order_qty),
//!   avg(p_stockout) FROM stockout_risk GROUP BY category`;
//! * HTTP point and HTTP aggregate: the same SQL as JSON over `POST
//!   /api/v1/query`.
//!
//! Reports queries/s, latency p50/p99/max and the ingest rate measured over
//! each scenario (accepted events from `/api/v1/health`). With
//! `BENCH_SERVING_REFRESH=1s` the config adds `[engine.refresh]
//! stockout_risk = "1s"` (bounded staleness; docs/views.md).
//!
//! `cargo bench --bench serving`

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::percentile;
use rand::{Rng, SeedableRng};
use storepulse_testkit::process::{gen_dataset, tansu_bin, Server, Tansu};

const BIN: &str = env!("CARGO_BIN_EXE_storepulse");
const POINT: &str = "SELECT on_hand, hours_of_cover, p_stockout, suggested_order_qty FROM stockout_risk WHERE store_id = $1 AND sku = $2";
const AGG: &str = "SELECT category, count(*) AS skus, sum(suggested_order_qty) AS units, avg(p_stockout) AS p FROM stockout_risk GROUP BY category ORDER BY category";

fn env_num(key: &str, default: f64) -> f64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn accepted(base: &str) -> u64 {
    let body = ureq::get(&format!("{base}/api/v1/health"))
        .call()
        .expect("health")
        .into_body()
        .read_to_string()
        .expect("body");
    let h: serde_json::Value = serde_json::from_str(&body).expect("json");
    h["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .map(|s| s["accepted_events"].as_u64().unwrap_or(0))
        .sum()
}

fn http_rows(base: &str, sql: &str) -> Vec<serde_json::Value> {
    let body = ureq::post(&format!("{base}/api/v1/query"))
        .send(sql)
        .expect("query")
        .into_body()
        .read_to_string()
        .expect("body");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["rows"].as_array().expect("rows").clone()
}

struct Outcome {
    name: &'static str,
    queries: usize,
    secs: f64,
    lat: Vec<Duration>,
    ingest_eps: f64,
    errors: usize,
}

fn report(o: &mut Outcome) {
    o.lat.sort();
    println!(
        "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {} |",
        o.name,
        o.queries as f64 / o.secs,
        percentile(&o.lat, 0.50),
        percentile(&o.lat, 0.99),
        o.lat.last().unwrap_or(&Duration::ZERO).as_secs_f64() * 1000.0,
        o.ingest_eps,
        o.errors,
    );
}

async fn pg_scenario(
    name: &'static str,
    addr: &str,
    base: &str,
    keys: Arc<Vec<(String, String)>>,
    point: bool,
    clients: usize,
    secs: f64,
) -> Outcome {
    let (host, port) = addr.rsplit_once(':').expect("addr");
    let before = accepted(base);
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let conn = format!("host={host} port={port} user=storepulse dbname=storepulse");
        let (keys, stop) = (keys.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
                .await
                .expect("pg connect");
            tokio::spawn(connection);
            let stmt = client
                .prepare(if point { POINT } else { AGG })
                .await
                .expect("prepare");
            let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64);
            let (mut lat, mut errors) = (Vec::new(), 0);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = if point {
                    let (s, k) = &keys[rng.random_range(0..keys.len())];
                    client.query(&stmt, &[s, k]).await
                } else {
                    client.query(&stmt, &[]).await
                };
                match r {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut o = Outcome {
        name,
        queries: 0,
        secs: 0.0,
        lat: Vec::new(),
        ingest_eps: 0.0,
        errors: 0,
    };
    for t in tasks {
        let (lat, errors) = t.await.expect("client");
        o.lat.extend(lat);
        o.errors += errors;
    }
    o.secs = started.elapsed().as_secs_f64();
    o.queries = o.lat.len();
    o.ingest_eps = (accepted(base) - before) as f64 / o.secs;
    o
}

fn http_scenario(
    name: &'static str,
    base: &str,
    keys: Arc<Vec<(String, String)>>,
    point: bool,
    clients: usize,
    secs: f64,
) -> Outcome {
    let before = accepted(base);
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (keys, stop, base) = (keys.clone(), stop.clone(), base.to_string());
            std::thread::spawn(move || {
                let agent = ureq::Agent::new_with_defaults();
                let url = format!("{base}/api/v1/query");
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + c as u64);
                let (mut lat, mut errors) = (Vec::new(), 0);
                while !stop.load(Ordering::Relaxed) {
                    let sql = if point {
                        let (s, k) = &keys[rng.random_range(0..keys.len())];
                        POINT
                            .replace("$1", &format!("'{s}'"))
                            .replace("$2", &format!("'{k}'"))
                    } else {
                        AGG.to_string()
                    };
                    let t = Instant::now();
                    match agent
                        .post(&url)
                        .send(&sql)
                        .and_then(|r| r.into_body().read_to_vec())
                    {
                        Ok(_) => lat.push(t.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let mut o = Outcome {
        name,
        queries: 0,
        secs: 0.0,
        lat: Vec::new(),
        ingest_eps: 0.0,
        errors: 0,
    };
    for h in handles {
        let (lat, errors) = h.join().expect("client");
        o.lat.extend(lat);
        o.errors += errors;
    }
    o.secs = started.elapsed().as_secs_f64();
    o.queries = o.lat.len();
    o.ingest_eps = (accepted(base) - before) as f64 / o.secs;
    o
}

fn main() {
    let rate = env_num("BENCH_SERVING_RATE", 100_000.0);
    let secs = env_num("BENCH_SERVING_SECS", 15.0);
    let warmup = env_num("BENCH_SERVING_WARMUP_SECS", 5.0);
    let clients = env_num("BENCH_SERVING_CLIENTS", 4.0) as usize;
    let refresh = std::env::var("BENCH_SERVING_REFRESH").ok();
    let source = std::env::var("BENCH_SERVING_SOURCE").unwrap_or_else(|_| "kafka".into());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = "data_dir = \"data\"\n[http]\nlisten = \"127.0.0.1:0\"\n[pg]\nlisten = \"127.0.0.1:0\"\n[lake]\nenabled = false\n".to_string();
    // Kafka: a generated chain (enough days for the whole run at `rate`)
    // replayed into a tansu broker at `rate` while the server consumes it.
    let mut _broker = None;
    let mut replay = None;
    if source == "kafka" {
        let tansu = tansu_bin().expect("tansu (cargo install tansu --locked --features dynostore)");
        let broker = Tansu::start(&tansu);
        let events = rate * (warmup + 4.0 * secs + 10.0);
        let days = (events / 87_000.0).ceil() as usize + 1; // ~87k events per day at 50 stores
        let data = dir.path().join("gen");
        gen_dataset(BIN, &data, [50, 400, 20000, days], 7);
        config.push_str(&format!(
            "[engine]\nallowed_lateness = \"3650d\"\n\
             [[dimensions]]\nname = \"stores\"\npath = \"gen/stores.csv\"\n\
             [[dimensions]]\nname = \"products\"\npath = \"gen/products.csv\"\n\
             [[dimensions]]\nname = \"replenishment_policy\"\npath = \"gen/replenishment_policy.csv\"\n\
             [[sources]]\ntype = \"kafka\"\nbrokers = \"{}\"\ngroup_id = \"bench\"\nstart_from = \"earliest\"\n",
            broker.addr
        ));
        replay = Some(
            std::process::Command::new(BIN)
                .args([
                    "replay",
                    "--brokers",
                    &broker.addr,
                    "--create-topics",
                    "--partitions",
                    "4",
                ])
                .args(["--rate", &rate.to_string()])
                .arg(&data)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("replay"),
        );
        // The topics must exist before the consumer starts.
        std::thread::sleep(Duration::from_secs(3));
        _broker = Some(broker);
    } else {
        config.push_str(&format!(
            "[[sources]]\ntype = \"generator\"\nstores = 50\nskus = 400\nmembers = 20000\nrate = {rate}\n"
        ));
    }
    if let Some(r) = &refresh {
        config.push_str(&format!("[engine.refresh]\nstockout_risk = \"{r}\"\n"));
    }
    std::fs::write(dir.path().join("storepulse.toml"), config).expect("config");
    let server = Server::start(BIN, &dir.path().join("storepulse.toml"));
    let pg = server.pg.clone().expect("pg address");
    let base = server.base.clone();
    std::thread::sleep(Duration::from_secs_f64(warmup));
    let keys: Arc<Vec<(String, String)>> = Arc::new(
        http_rows(&base, "SELECT store_id, sku FROM stockout_risk")
            .into_iter()
            .map(|r| {
                (
                    r["store_id"].as_str().expect("store").to_string(),
                    r["sku"].as_str().expect("sku").to_string(),
                )
            })
            .collect(),
    );
    println!(
        "serving under ingest ({source}): target {rate:.0} events/s, {} (store, sku) keys in stockout_risk, {clients} clients, {secs:.0} s per scenario{}",
        keys.len(),
        refresh.as_ref().map(|r| format!(", stockout_risk refreshed every {r}")).unwrap_or_default()
    );
    println!("| scenario | queries/s | p50 ms | p99 ms | max ms | ingest events/s | errors |");
    println!("|---|---|---|---|---|---|---|");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut o = rt.block_on(pg_scenario(
        "pgwire point lookup",
        &pg,
        &base,
        keys.clone(),
        true,
        clients,
        secs,
    ));
    report(&mut o);
    let mut o = rt.block_on(pg_scenario(
        "pgwire aggregate",
        &pg,
        &base,
        keys.clone(),
        false,
        clients,
        secs,
    ));
    report(&mut o);
    let mut o = http_scenario(
        "HTTP point lookup",
        &base,
        keys.clone(),
        true,
        clients,
        secs,
    );
    report(&mut o);
    let mut o = http_scenario("HTTP aggregate", &base, keys, false, clients, secs);
    report(&mut o);
    drop(server);
    if let Some(mut r) = replay {
        let _ = r.kill();
        let _ = r.wait();
    }
}
