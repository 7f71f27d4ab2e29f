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
//! First an ingest-only scenario (no queries) gives the rate the engine
//! reaches with the machine to itself. Each query scenario runs closed-loop
//! (a client sends its next query when the last is answered: the most the
//! server answers); with `BENCH_SERVING_QPS=N` the four run again paced at
//! N queries/s over all clients, latency counted from each query's
//! scheduled send time (no coordinated omission: a stall is charged to
//! every query it delays).
//!
//! Reports queries/s, latency p50/p99/max, the ingest rate over each
//! scenario (events ingested per `/api/v1/health`: accepted, late and
//! duplicates) and the CPU cores each process used (`/proc/PID/stat`),
//! then the late events, engine state, largest views, stream watermarks
//! and checkpoint cost at the end. With `BENCH_SERVING_REFRESH=1s` the
//! config adds `[engine.refresh] stockout_risk = "1s"` (bounded staleness;
//! docs/views.md). `BENCH_SERVING_LATENESS` (default `1d`) sets
//! `allowed_lateness`.
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

use common::{cpu_secs, percentile};
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

fn health(base: &str) -> serde_json::Value {
    let body = ureq::get(&format!("{base}/api/v1/health"))
        .call()
        .expect("health")
        .into_body()
        .read_to_string()
        .expect("body");
    serde_json::from_str(&body).expect("json")
}

/// Sum of a per-stream counter in `/api/v1/health`.
fn stream_total(h: &serde_json::Value, field: &str) -> u64 {
    h["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .map(|s| s[field].as_u64().unwrap_or(0))
        .sum()
}

/// Events the engine has ingested: accepted, late (to `late_events`) and
/// duplicates (counted, not applied) alike.
fn accepted(base: &str) -> u64 {
    let h = health(base);
    ["accepted_events", "late_events", "duplicate_events"]
        .iter()
        .map(|f| stream_total(&h, f))
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
    /// CPU cores used over the scenario: storepulse, broker, replay, clients.
    cores: [f64; 4],
}

fn report(o: &mut Outcome) {
    o.lat.sort();
    println!(
        "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {} | {:.2} / {:.2} / {:.2} / {:.2} |",
        o.name,
        o.queries as f64 / o.secs,
        percentile(&o.lat, 0.50),
        percentile(&o.lat, 0.99),
        o.lat.last().unwrap_or(&Duration::ZERO).as_secs_f64() * 1000.0,
        o.ingest_eps,
        o.errors,
        o.cores[0],
        o.cores[1],
        o.cores[2],
        o.cores[3],
    );
}

/// How hard a scenario asks: clients, optional pacing (gap between one
/// client's queries), seconds.
#[derive(Clone, Copy)]
struct Load {
    clients: usize,
    pace: Option<Duration>,
    secs: f64,
}

/// The processes whose CPU time a scenario reports.
struct Procs {
    pids: [u32; 4],
}

impl Procs {
    fn cpu(&self) -> [f64; 4] {
        self.pids.map(cpu_secs)
    }

    /// Runs `f` and fills in the CPU cores each process used meanwhile.
    fn measure(&self, f: impl FnOnce() -> Outcome) -> Outcome {
        let (before, t) = (self.cpu(), Instant::now());
        let mut o = f();
        let (after, wall) = (self.cpu(), t.elapsed().as_secs_f64());
        for i in 0..4 {
            o.cores[i] = (after[i] - before[i]) / wall;
        }
        o
    }
}

/// Ingest alone, no queries: what the engine accepts when it has the
/// machine to itself (with the broker and the replay).
fn idle_scenario(base: &str, secs: f64) -> Outcome {
    let before = accepted(base);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let secs = started.elapsed().as_secs_f64();
    Outcome {
        name: "ingest only (no queries)",
        queries: 0,
        secs,
        lat: Vec::new(),
        ingest_eps: (accepted(base) - before) as f64 / secs,
        errors: 0,
        cores: [0.0; 4],
    }
}

async fn pg_scenario(
    name: &'static str,
    addr: &str,
    base: &str,
    keys: Arc<Vec<(String, String)>>,
    point: bool,
    load: Load,
) -> Outcome {
    let Load {
        clients,
        pace,
        secs,
    } = load;
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
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                // Paced: latency counts from the scheduled send time, so a
                // slow answer delays (and charges) the ones behind it.
                let t = match pace {
                    Some(gap) => {
                        tokio::time::sleep_until(next.into()).await;
                        let t = next;
                        next += gap;
                        t
                    }
                    None => Instant::now(),
                };
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
        cores: [0.0; 4],
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
    load: Load,
) -> Outcome {
    let Load {
        clients,
        pace,
        secs,
    } = load;
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
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let t = match pace {
                        Some(gap) => {
                            std::thread::sleep(next.saturating_duration_since(Instant::now()));
                            let t = next;
                            next += gap;
                            t
                        }
                        None => Instant::now(),
                    };
                    let sql = if point {
                        let (s, k) = &keys[rng.random_range(0..keys.len())];
                        POINT
                            .replace("$1", &format!("'{s}'"))
                            .replace("$2", &format!("'{k}'"))
                    } else {
                        AGG.to_string()
                    };
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
        cores: [0.0; 4],
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
    // The replay compresses the chain's time (~1 simulated day per second
    // at 100k events/s), so one day of event-time lateness keeps the
    // offline stores' uploads (hours late) on time while the ledgers hold
    // about one simulated day (~87k events); BENCH_SERVING_LATENESS=3650d
    // holds every event (state then grows through the run). For the same
    // reason the window views (per minute, 15 minutes, sliding 24 hours)
    // keep two simulated days of windows (`state_ttl`), as a deployment would keep a few days
    // at the chain's real pace, instead of the whole replayed history.
    let lateness = std::env::var("BENCH_SERVING_LATENESS").unwrap_or_else(|_| "1d".into());
    // Watermark alignment: the consumer reads partitions at about the same
    // message rate, so when it falls behind a partition with more stores
    // runs days behind in event time (and the ledgers hold those days).
    // BENCH_SERVING_DRIFT=off turns it off.
    let drift = match std::env::var("BENCH_SERVING_DRIFT").as_deref() {
        Ok("off") => String::new(),
        Ok(d) => format!("max_watermark_drift = \"{d}\"\n"),
        Err(_) => "max_watermark_drift = \"1d\"\n".into(),
    };
    let qps = std::env::var("BENCH_SERVING_QPS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok());
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
        let scenarios = if qps.is_some() { 9.0 } else { 5.0 };
        let events = rate * (warmup + scenarios * secs + 10.0);
        let days = (events / 87_000.0).ceil() as usize + 1; // ~87k events per day at 50 stores
        let data = dir.path().join("gen");
        gen_dataset(BIN, &data, [50, 400, 20000, days], 7);
        config.push_str(&format!(
            "[engine]\nallowed_lateness = \"{lateness}\"\n\
             state_ttl = {{ sales_per_minute = \"2d\", fridge_temp_15m = \"2d\", sku_sales_24h = \"2d\" }}\n\
             [[dimensions]]\nname = \"stores\"\npath = \"gen/stores.csv\"\n\
             [[dimensions]]\nname = \"products\"\npath = \"gen/products.csv\"\n\
             [[dimensions]]\nname = \"replenishment_policy\"\npath = \"gen/replenishment_policy.csv\"\n\
             [[dimensions]]\nname = \"prices\"\npath = \"gen/prices.csv\"\n\
             [[sources]]\ntype = \"kafka\"\nbrokers = \"{}\"\ngroup_id = \"bench\"\nstart_from = \"earliest\"\n{drift}",
            broker.addr,
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
    println!(
        "| scenario | queries/s | p50 ms | p99 ms | max ms | ingest events/s | errors | CPU cores: storepulse / broker / replay / clients |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let procs = Procs {
        pids: [
            server.pid(),
            _broker.as_ref().map_or(u32::MAX, Tansu::pid),
            replay.as_ref().map_or(u32::MAX, std::process::Child::id),
            0,
        ],
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    report(&mut procs.measure(|| idle_scenario(&base, secs)));
    // Closed loop (each client sends its next query when the last is
    // answered: the most the server answers), then, with
    // BENCH_SERVING_QPS, paced at that many queries/s over all clients.
    let paces =
        std::iter::once(None).chain(qps.map(|q| Some(Duration::from_secs_f64(clients as f64 / q))));
    for pace in paces {
        let load = Load {
            clients,
            pace,
            secs,
        };
        let label =
            |closed: &'static str, paced: &'static str| if pace.is_some() { paced } else { closed };
        report(&mut procs.measure(|| {
            rt.block_on(pg_scenario(
                label("pgwire point lookup", "pgwire point lookup (paced)"),
                &pg,
                &base,
                keys.clone(),
                true,
                load,
            ))
        }));
        report(&mut procs.measure(|| {
            rt.block_on(pg_scenario(
                label("pgwire aggregate", "pgwire aggregate (paced)"),
                &pg,
                &base,
                keys.clone(),
                false,
                load,
            ))
        }));
        report(&mut procs.measure(|| {
            http_scenario(
                label("HTTP point lookup", "HTTP point lookup (paced)"),
                &base,
                keys.clone(),
                true,
                load,
            )
        }));
        report(&mut procs.measure(|| {
            http_scenario(
                label("HTTP aggregate", "HTTP aggregate (paced)"),
                &base,
                keys.clone(),
                false,
                load,
            )
        }));
    }
    let h = health(&base);
    println!(
        "ingested {} events: {} late (to late_events, allowed_lateness {lateness}), {} duplicates; engine state {:.0} MB",
        stream_total(&h, "accepted_events") + stream_total(&h, "late_events") + stream_total(&h, "duplicate_events"),
        stream_total(&h, "late_events"),
        stream_total(&h, "duplicate_events"),
        h["state_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
    );
    for st in h["streams"].as_array().into_iter().flatten() {
        println!(
            "stream {}: watermark {}, partitions {}",
            st["stream"], st["watermark"], st["partitions"]
        );
    }
    let views: serde_json::Value = serde_json::from_str(
        &ureq::get(&format!("{base}/api/v1/views"))
            .call()
            .expect("views")
            .into_body()
            .read_to_string()
            .expect("body"),
    )
    .expect("json");
    let mut by_state: Vec<(String, f64, u64)> = views["views"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            Some((
                v["name"].as_str()?.to_string(),
                v["state_bytes"].as_f64()? / 1e6,
                v["groups"].as_u64().unwrap_or(0),
            ))
        })
        .collect();
    by_state.sort_by(|a, b| b.1.total_cmp(&a.1));
    let listed: Vec<String> = by_state
        .iter()
        .take(6)
        .map(|(n, mb, g)| format!("{n} {mb:.0} MB ({g} groups)"))
        .collect();
    println!("largest views: {}", listed.join(", "));
    let metrics = ureq::get(&format!("{base}/metrics"))
        .call()
        .expect("metrics")
        .into_body()
        .read_to_string()
        .expect("body");
    let metric = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let (n, sum) = (
        metric("storepulse_checkpoint_duration_seconds_count"),
        metric("storepulse_checkpoint_duration_seconds_sum"),
    );
    println!(
        "checkpoints: {n:.0} taken, mean {:.0} ms, last {:.0} MB",
        sum / n * 1000.0,
        metric("storepulse_checkpoint_bytes") / 1e6
    );
    drop(server);
    if let Some(mut r) = replay {
        let _ = r.kill();
        let _ = r.wait();
    }
}
