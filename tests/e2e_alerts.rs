//! Alerts through the real binary: a generated chain runs to the end of its
//! files; the built-in `low_stock` rule must reach a webhook started by this
//! test (HMAC-signed, each alert once) with a sensible order, and the JSONL
//! sink must hold the same notifications.

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    sync::{Arc, Mutex},
};

use axum::{body::Bytes, extract::State, http::HeaderMap, http::StatusCode, routing::post, Router};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_storepulse");
const SECRET: &str = "e2e-secret";

fn gen(out: &Path) {
    storepulse_testkit::process::gen_dataset(BIN, out, [6, 60, 300, 3], 5);
}

/// One accepted request: signature valid, its notifications.
type Request = (bool, Vec<Value>);

#[derive(Clone, Default)]
struct Hook {
    /// Accepted requests.
    got: Arc<Mutex<Vec<Request>>>,
    /// Requests refused so far (the first two are).
    refused: Arc<Mutex<usize>>,
}

async fn hook(State(h): State<Hook>, headers: HeaderMap, body: Bytes) -> StatusCode {
    {
        let mut r = h.refused.lock().unwrap();
        if *r < 2 {
            *r += 1;
            return StatusCode::BAD_GATEWAY;
        }
    }
    let sig = headers
        .get("x-storepulse-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let ok = storepulse_alerts::verify(SECRET, &body, sig);
    let batch: Vec<Value> = serde_json::from_slice(&body).unwrap();
    h.got.lock().unwrap().push((ok, batch));
    StatusCode::OK
}

#[test]
fn low_stock_alerts_reach_the_webhook_once_with_a_sensible_order() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gen");
    gen(&data);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let h = Hook::default();
    let url = rt.block_on(async {
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(h.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/hook")
    });
    let jsonl = dir.path().join("alerts.jsonl");
    let config = dir.path().join("storepulse.toml");
    std::fs::write(
        &config,
        format!(
            r#"
data_dir = "state"
until_eof = true
[http]
listen = "127.0.0.1:0"
[pipeline]
replay_max_drift = "3h"
[[dimensions]]
name = "stores"
path = "gen/stores.csv"
[[dimensions]]
name = "products"
path = "gen/products.csv"
[[dimensions]]
name = "replenishment_policy"
path = "gen/replenishment_policy.csv"
[[sources]]
type = "dataset"
dir = "gen"
[retail]
low_stock_for = "0s"
[alerts]
retry_max_delay = "500ms"
bounded_evaluation = "event_time"
[[alerts.sinks]]
name = "hook"
type = "webhook"
url = "{url}"
secret = "{SECRET}"
[[alerts.sinks]]
name = "file"
type = "jsonl"
path = "{}"
[[alerts.rules]]
name = "stores_selling"
query = "SELECT store_id, sum(receipts) AS receipts FROM sales_by_store_hourly GROUP BY store_id"
key = "store_id"
severity = "info"
renotify = "0s"
sinks = "file"
"#,
            jsonl.display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["run", "--exit-when-done", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env("RUST_LOG", "info,librdkafka=warn")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run failed:\n{log}");
    assert!(log.contains("alerting enabled"), "{log}");
    assert!(
        log.contains("alert delivery failed; retrying"),
        "the two refused requests were retried:\n{log}"
    );

    let got = h.got.lock().unwrap().clone();
    assert!(
        got.iter().all(|(ok, _)| *ok),
        "every request signed correctly"
    );
    let notes: Vec<Value> = got.into_iter().flat_map(|(_, b)| b).collect();
    // Each (id, state, sequence) exactly once.
    let mut seen = BTreeMap::new();
    for n in &notes {
        let k = (
            n["alert_id"].as_str().unwrap().to_string(),
            n["state"].as_str().unwrap().to_string(),
            n["sequence"].as_u64().unwrap(),
        );
        *seen.entry(k).or_insert(0) += 1;
    }
    assert!(seen.values().all(|c| *c == 1), "duplicates: {seen:?}");
    let low: Vec<&Value> = notes
        .iter()
        .filter(|n| n["rule"] == "low_stock" && n["state"] == "firing")
        .collect();
    assert!(
        !low.is_empty(),
        "no low_stock alert in {} notifications:\n{log}",
        notes.len()
    );
    // A backtest (`bounded_evaluation = "event_time"`) evaluates along event
    // time: alerts fire at the event times the data reached them, spread
    // over the dataset, not all at its end. (A drift of 3 h keeps the
    // evaluations coarse: the debug build takes 20 s here, 4.5 min at 10 m.
    // The sparse purchase-order file, one batch per morning, must still wait
    // for the others: before it did, every alert came at the end.)
    let notified: std::collections::BTreeSet<i64> = notes
        .iter()
        .filter(|n| n["rule"] == "low_stock")
        .map(|n| n["notified_at"].as_i64().unwrap())
        .collect();
    let (first, last) = (notified.first().unwrap(), notified.last().unwrap());
    assert!(
        notified.len() > 3 && last - first > 3_600_000,
        "low_stock notified at {} distinct event times over {} h",
        notified.len(),
        (last - first) / 3_600_000
    );
    for n in &low {
        let r = &n["row"];
        let qty = r["suggested_order_qty"].as_i64().unwrap();
        let pack = r["case_pack"].as_i64().unwrap();
        let on_hand = r["on_hand"].as_f64().unwrap();
        let rop = r["reorder_point"].as_f64().unwrap();
        assert!(r["p_stockout"].as_f64().unwrap() > 0.8, "{r}");
        assert!(
            qty > 0 && qty % pack == 0,
            "order {qty} in cases of {pack}: {r}"
        );
        assert!(
            on_hand + qty as f64 >= rop,
            "the order lifts stock to the reorder point: {r}"
        );
        assert_eq!(
            n["alert_key"].as_str().unwrap(),
            format!(
                "{}|{}",
                r["store_id"].as_str().unwrap(),
                r["sku"].as_str().unwrap()
            )
        );
    }
    // The JSONL sink got exactly the same notifications.
    let lines: Vec<Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids = |v: &[Value]| {
        let mut x: Vec<String> = v
            .iter()
            .map(|n| format!("{}/{}/{}", n["alert_id"], n["state"], n["sequence"]))
            .collect();
        x.sort();
        x
    };
    // A rule from the config, routed to the file sink only.
    let (config_rule, rest): (Vec<Value>, Vec<Value>) = lines
        .into_iter()
        .partition(|n| n["rule"] == "stores_selling");
    assert_eq!(config_rule.len(), 6, "one per store: {config_rule:?}");
    assert!(config_rule.iter().all(|n| n["severity"] == "info"));
    assert!(
        notes.iter().all(|n| n["rule"] != "stores_selling"),
        "not routed to the webhook"
    );
    assert_eq!(ids(&rest), ids(&notes));
}

/// When a bounded run shows `finished`, what it serves is final: the
/// refreshed `stockout_risk` (refreshed hourly here) reflects the final
/// engine clock, and every `low_stock` key whose condition holds on it is
/// firing in `/api/v1/alerts` and in the JSONL sink. Data-triggered
/// evaluations are held off (`min_interval = "1h"`, the rule's timer is
/// 10 s), so without the final refresh and evaluation both would lag.
#[test]
fn a_finished_bounded_run_shows_the_alerts_of_its_final_views() {
    use std::collections::BTreeSet;
    use storepulse_testkit::process::Server;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gen");
    gen(&data);
    let jsonl = dir.path().join("alerts.jsonl");
    let config = dataset_config(
        dir.path(),
        &data,
        &jsonl,
        "[engine]\nrefresh = { stockout_risk = \"1h\" }\n[alerts]\nmin_interval = \"1h\"\n",
    );
    let s = Server::start(BIN, &config);
    s.wait_finished(std::time::Duration::from_secs(300));
    let clock = s.rows("SELECT as_of FROM engine_clock");
    let as_of = s.rows("SELECT DISTINCT as_of FROM stockout_risk");
    assert_eq!(as_of, clock, "the refreshed view reflects the final clock");
    let holding: BTreeSet<String> = s
        .rows(
            "SELECT store_id, sku FROM stockout_risk \
             WHERE (p_stockout > 0.8 OR on_hand < min_stock) AND suggested_order_qty > 0",
        )
        .iter()
        .map(|r| {
            format!(
                "{}|{}",
                r["store_id"].as_str().unwrap(),
                r["sku"].as_str().unwrap()
            )
        })
        .collect();
    let firing: BTreeSet<String> = s.get("/api/v1/alerts")["active"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["rule"] == "low_stock" && a["state"] == "firing")
        .map(|a| a["alert_key"].as_str().unwrap().to_string())
        .collect();
    assert!(
        holding.len() > 5,
        "the dataset makes low_stock hold: {holding:?}"
    );
    let missing: Vec<&String> = holding.difference(&firing).collect();
    assert!(
        missing.is_empty(),
        "holding on the final views but not firing when finished: {missing:?}"
    );
    // Firing keys no longer holding are those kept by `keep_firing_for`.
    let (status, log) = s.stop_with("-TERM");
    assert!(status.success(), "{}", log.join("\n"));
    let notified: BTreeSet<String> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|n| n["rule"] == "low_stock" && n["state"] == "firing")
        .map(|n| n["alert_key"].as_str().unwrap().to_string())
        .collect();
    assert!(
        holding.is_subset(&notified),
        "every holding key notified: {:?}",
        holding.difference(&notified).collect::<Vec<_>>()
    );
}

/// Cold start (#22): a chain that starts before its first stock-take sends
/// sales only. Its stock is unknown, not minus the units sold: no
/// probability, no order, no anomaly and no `low_stock` alert for any
/// (store, SKU) — where the same dataset with its counts fires (the test
/// above).
#[test]
fn a_chain_without_stock_counts_has_unknown_stock_and_no_replenishment_alerts() {
    use storepulse_testkit::process::Server;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gen");
    // The generator's cold-start profile: the same chain, sales only.
    storepulse_testkit::process::gen_with(
        BIN,
        &data,
        &[
            "--stores",
            "6",
            "--skus",
            "60",
            "--members",
            "300",
            "--days",
            "3",
            "--seed",
            "5",
            "--profile",
            "cold-start",
        ],
    );
    for stream in ["stock_counts", "stock_movements"] {
        let text = std::fs::read_to_string(data.join(format!("{stream}.jsonl"))).unwrap();
        assert!(text.is_empty(), "{stream} is empty in a cold start");
    }
    let jsonl = dir.path().join("alerts.jsonl");
    let config = dataset_config(dir.path(), &data, &jsonl, "");
    let s = Server::start(BIN, &config);
    s.wait_finished(std::time::Duration::from_secs(300));
    let r = &s.rows(
        "SELECT count(*) AS pairs, count(*) FILTER (WHERE stock_status = 'unknown') AS unknown, \
         count(on_hand) AS known, count(p_stockout) AS with_p, \
         count(suggested_order_qty) AS with_order, min(units_per_hour) AS min_rate, \
         max(units_per_hour) AS max_rate FROM stockout_risk",
    )[0];
    assert!(r["pairs"].as_u64().unwrap() > 50, "{r}");
    assert_eq!(r["unknown"], r["pairs"], "{r}");
    for c in ["known", "with_p", "with_order"] {
        assert_eq!(r[c].as_u64(), Some(0), "{c}: {r}");
    }
    assert!(
        r["max_rate"].as_f64().unwrap() > 0.0,
        "the sales are there: {r}"
    );
    assert_eq!(
        s.rows("SELECT count(*) AS n FROM stock_anomalies")[0]["n"].as_u64(),
        Some(0),
        "unknown stock is not an anomaly either"
    );
    let alerts = s.get("/api/v1/alerts");
    assert!(
        alerts["active"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["rule"] != "low_stock"),
        "{alerts}"
    );
    let (status, log) = s.stop_with("-TERM");
    assert!(status.success(), "{}", log.join("\n"));
    let low = std::fs::read_to_string(&jsonl)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"low_stock\""))
        .count();
    assert_eq!(low, 0, "no replenishment alert on unknown stock");
}

/// A bounded run over the dataset in `data` (state under `dir/state`,
/// `low_stock_for = "0s"`, a JSONL sink at `jsonl`) plus `extra` TOML.
fn dataset_config(dir: &Path, data: &Path, jsonl: &Path, extra: &str) -> std::path::PathBuf {
    let config = dir.join("storepulse.toml");
    std::fs::write(
        &config,
        format!(
            r#"
data_dir = "{state}"
until_eof = true
[http]
listen = "127.0.0.1:0"
{dataset}
[retail]
low_stock_for = "0s"
{extra}
[[alerts.sinks]]
name = "file"
type = "jsonl"
path = "{file}"
"#,
            state = dir.join("state").display(),
            file = jsonl.display(),
            dataset = storepulse_testkit::process::dataset_toml(data),
        ),
    )
    .unwrap();
    config
}
