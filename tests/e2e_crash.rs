//! Crash equivalence of the real binary (issue #8): a generated chain is
//! read from its files by `storepulse run` with checkpoints every 200 ms;
//! the process is killed with SIGKILL at three random points of its
//! progress and restarted each time (restoring the newest checkpoint and
//! resuming the files at its positions). The final contents of every
//! materialized view and of `stockout_risk` must equal those of an
//! uninterrupted run, the alerts firing at the end must be the same at the
//! webhook, and the last stop (SIGTERM) must be graceful: exit 0 after a
//! final checkpoint.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{body::Bytes, extract::State, http::StatusCode, routing::post, Router};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use storepulse_testkit::process::{gen_dataset, Server};

const BIN: &str = env!("CARGO_BIN_EXE_storepulse");

/// Notifications received by the webhook.
type Received = Arc<Mutex<Vec<Value>>>;

async fn hook(State(got): State<Received>, body: Bytes) -> StatusCode {
    let batch: Vec<Value> = serde_json::from_slice(&body).unwrap();
    got.lock().unwrap().extend(batch);
    StatusCode::OK
}

fn config(dir: &Path, data: &Path, state: &str, url: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{state}.toml"));
    let d = data.display();
    std::fs::write(
        &path,
        format!(
            r#"
data_dir = "{state_dir}"
until_eof = true
[http]
listen = "127.0.0.1:0"
[pipeline]
batch_size = 50
[checkpoint]
interval = "200ms"
keep = 2
[[dimensions]]
name = "stores"
path = "{d}/stores.csv"
[[dimensions]]
name = "products"
path = "{d}/products.csv"
[[dimensions]]
name = "replenishment_policy"
path = "{d}/replenishment_policy.csv"
[[sources]]
type = "dataset"
dir = "{d}"
[retail]
low_stock_for = "0s"
[alerts]
retry_max_delay = "200ms"
[[alerts.sinks]]
name = "hook"
type = "webhook"
url = "{url}"
"#,
            state_dir = dir.join(state).display(),
        ),
    )
    .unwrap();
    path
}

fn accepted(s: &Server) -> u64 {
    s.get("/api/v1/health")["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["accepted_events"].as_u64().unwrap())
        .sum()
}

/// Every materialized view and `stockout_risk`, rows sorted.
fn contents(s: &Server) -> BTreeMap<String, Vec<String>> {
    let views = s.get("/api/v1/views");
    let mut names: Vec<String> = views["views"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["kind"] == "materialized")
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    names.push("stockout_risk".into());
    names
        .into_iter()
        .map(|n| {
            let mut rows: Vec<String> = s
                .rows(&format!("SELECT * FROM {n}"))
                .iter()
                .map(|r| r.to_string())
                .collect();
            rows.sort();
            (n, rows)
        })
        .collect()
}

/// Stops with SIGTERM; asserts a graceful exit with a final checkpoint.
fn stop_gracefully(s: Server) {
    let (status, log) = s.stop_with("-TERM");
    assert!(
        status.success(),
        "SIGTERM: exit {status:?}\n{}",
        log.join("\n")
    );
    assert!(
        log.iter().any(|l| l.contains("final checkpoint written")),
        "{}",
        log.join("\n")
    );
}

/// Alert keys whose last notification is `firing`, per rule.
fn firing(notes: &[Value]) -> BTreeSet<String> {
    let mut last: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for n in notes {
        let id = format!("{}/{}", n["rule"], n["alert_key"]);
        let seq = n["sequence"].as_u64().unwrap_or(0);
        let state = n["state"].as_str().unwrap_or("").to_string();
        let e = last.entry(id).or_insert((0, String::new()));
        if seq >= e.0 {
            *e = (seq, state);
        }
    }
    last.into_iter()
        .filter(|(_, (_, s))| s == "firing")
        .map(|(k, _)| k)
        .collect()
}

#[test]
fn sigkill_at_random_points_and_restart_equals_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gen");
    gen_dataset(BIN, &data, [8, 80, 400, 6], 11);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let hook_at = |got: Received| {
        rt.block_on(async {
            let app = Router::new().route("/hook", post(hook)).with_state(got);
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
            format!("http://{addr}/hook")
        })
    };

    // The uninterrupted run.
    let clean_got = Received::default();
    let clean_cfg = config(dir.path(), &data, "clean", &hook_at(clean_got.clone()));
    let s = Server::start(BIN, &clean_cfg);
    s.wait_finished(Duration::from_secs(300));
    let total = accepted(&s);
    let want = contents(&s);
    stop_gracefully(s);
    assert!(total > 10_000, "a dataset worth crashing: {total} events");
    assert!(want["sales_by_store_hourly"].len() > 100);

    // The crashed run: SIGKILL at three random points of progress.
    let got = Received::default();
    let cfg = config(dir.path(), &data, "crashed", &hook_at(got.clone()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(std::process::id() as u64);
    let mut points: Vec<u64> = (0..3)
        .map(|_| (total as f64 * rng.random_range(0.15..0.9)) as u64)
        .collect();
    points.sort_unstable();
    let mut restored = 0;
    for (i, at) in points.iter().enumerate() {
        let s = Server::start(BIN, &cfg);
        let ckpt = |s: &Server| s.get("/api/v1/health")["checkpoint"]["last_id"].clone();
        let first = ckpt(&s);
        let deadline = Instant::now() + Duration::from_secs(300);
        // Kill at the chosen progress, once this incarnation has written a
        // checkpoint of its own (else the kill tests nothing new).
        while (accepted(&s) < *at && s.get("/api/v1/health")["pipeline"] == "running")
            || ckpt(&s) == first
        {
            assert!(Instant::now() < deadline, "no progress to {at}");
            std::thread::sleep(Duration::from_millis(10));
        }
        let log = s.log_lines().join("\n");
        if log.contains("state restored from checkpoint") {
            restored += 1;
        }
        assert!(
            i > 0 || !log.contains("restored"),
            "the first start has nothing to restore"
        );
        drop(s); // SIGKILL
    }
    assert_eq!(
        restored, 2,
        "the second and third starts restored a checkpoint"
    );
    let s = Server::start(BIN, &cfg);
    let h = s.wait_finished(Duration::from_secs(300));
    assert!(h["checkpoint"]["last_id"].is_string(), "{h}");
    let after = contents(&s);
    assert_eq!(
        accepted(&s),
        total,
        "accepted events: nothing lost or doubled"
    );
    for (view, rows) in &want {
        assert_eq!(
            after.get(view),
            Some(rows),
            "view {view} differs after three SIGKILLs and restarts"
        );
    }
    stop_gracefully(s);

    // Alerts: the same `low_stock` keys are firing at the end (a function
    // of the final stock). Rules over transient conditions with a
    // wall-clock `keep_firing_for` (cold_chain) depend on when evaluations
    // happened to run, in two uninterrupted runs alike, so they are not
    // compared.
    let low = |got: &Received| -> BTreeSet<String> {
        firing(&got.lock().unwrap())
            .into_iter()
            .filter(|k| k.starts_with("\"low_stock\""))
            .collect()
    };
    let (clean, crashed) = (low(&clean_got), low(&got));
    assert!(
        clean.len() > 10,
        "the uninterrupted run fired low_stock alerts: {clean:?}"
    );
    assert_eq!(crashed, clean, "low_stock alerts firing at the end");
    // No notification reached the webhook twice.
    let notes = got.lock().unwrap().clone();
    let mut seen = BTreeMap::new();
    for n in &notes {
        *seen
            .entry(format!(
                "{}/{}/{}",
                n["alert_id"], n["state"], n["sequence"]
            ))
            .or_insert(0) += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}");

    // A third start restores the final checkpoint and reads nothing more.
    let s = Server::start(BIN, &cfg);
    s.wait_finished(Duration::from_secs(120));
    assert_eq!(accepted(&s), total);
    assert_eq!(contents(&s), want, "restored from the final checkpoint");
    drop(s);
}
