//! The lake through the real binary.
//!
//! * Local lake: a generated chain runs to its end; the archive, a snapshot
//!   and reports are read back by DuckDB (Python package) and compared
//!   with storepulse's own answers (`history.*`, `snapshots.*`, the live
//!   views) and with the engine's accepted counts.
//! * S3 (moto's server on loopback): storepulse starts while the S3 server
//!   is down, reports the fault with the object's URL, and once the server
//!   and bucket appear the archive catches up with nothing lost; then
//!   snapshots, reports and retention on S3.

use std::{path::Path, time::Duration, time::Instant};

use serde_json::Value;
use storepulse_testkit::process::{free_port, gen_dataset, python, Moto, Server};

const BIN: &str = env!("CARGO_BIN_EXE_storepulse");

fn dims_and_dataset() -> &'static str {
    r#"
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
"#
}

fn post(base: &str, path: &str) -> (u16, Value) {
    let resp = ureq::post(&format!("{base}{path}"))
        .config()
        .http_status_as_error(false)
        .build()
        .send_empty()
        .expect("POST");
    let status = resp.status().as_u16();
    let body = resp.into_body().read_to_string().expect("body");
    (status, serde_json::from_str(&body).expect("JSON"))
}

/// Accepted + late events per the engine (what the archive must hold).
fn expected_archive(health: &Value) -> (u64, Vec<(String, u64)>) {
    let mut per = Vec::new();
    let mut late = 0;
    for s in health["streams"].as_array().unwrap() {
        per.push((
            s["stream"].as_str().unwrap().to_string(),
            s["accepted_events"].as_u64().unwrap(),
        ));
        late += s["late_events"].as_u64().unwrap();
    }
    (late, per)
}

/// Waits (after the pipeline finished) until every accepted row is
/// durably archived: nothing buffered, no file pending.
fn wait_archived(s: &Server, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let h = s.get("/api/v1/health");
        let a = &h["lake"]["archive"];
        if a["rows"].as_u64() > Some(0) && a["pending_files"] == 0 && a["buffered_bytes"] == 0 {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "archive did not catch up: {}",
            h["lake"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every accepted event is in `history.<stream>` exactly once (sales: one
/// row per receipt line), late rows in `history.late_events`, and the
/// archive's row count is the sum.
fn assert_archived_once(s: &Server, per_stream: &[(String, u64)], late: u64, health: &Value) {
    let mut rows_total = 0;
    for (stream, accepted) in per_stream {
        let key = if stream == "sales" {
            "event_id || '#' || CAST(line_no AS VARCHAR)"
        } else {
            "event_id"
        };
        let got = s.rows(&format!(
            "SELECT count(*) AS n, count(DISTINCT event_id) AS events, count(DISTINCT {key}) AS keys FROM history.{stream}"
        ));
        assert_eq!(
            got[0]["events"], *accepted,
            "history.{stream} holds every accepted event"
        );
        assert_eq!(
            got[0]["n"], got[0]["keys"],
            "history.{stream}: no row archived twice"
        );
        rows_total += got[0]["n"].as_u64().unwrap();
    }
    let got = s.rows("SELECT count(*) AS n FROM history.late_events");
    assert_eq!(
        got[0]["n"], late,
        "history.late_events holds every late row"
    );
    assert_eq!(
        health["lake"]["archive"]["rows"],
        rows_total + late,
        "archive row count"
    );
}

/// Rows of `sql` as arrays of the named columns.
fn rows(s: &Server, sql: &str, cols: &[&str]) -> Vec<Vec<Value>> {
    s.rows(sql)
        .into_iter()
        .map(|r| cols.iter().map(|c| r[*c].clone()).collect())
        .collect()
}

const DUCKDB: &str = r#"
import duckdb, json, sys
lake, queries = sys.argv[1], json.loads(sys.argv[2])
con = duckdb.connect()
out = {}
for name, sql in queries.items():
    sql = sql.replace("LAKE", lake)
    out[name] = [[int(v) if isinstance(v, (int, float)) or type(v).__name__ == "Decimal" else v for v in r] for r in con.execute(sql).fetchall()]
print(json.dumps(out, default=str))
"#;

#[test]
fn local_lake_is_read_back_by_duckdb_and_matches_storepulse() {
    let dir = tempfile::tempdir().unwrap();
    gen_dataset(BIN, &dir.path().join("gen"), [5, 40, 200, 2], 11);
    let config = dir.path().join("storepulse.toml");
    std::fs::write(
        &config,
        format!(
            r#"
data_dir = "state"
until_eof = true
[http]
listen = "127.0.0.1:0"
[lake]
url = "lake"
[lake.archive]
max_file_age = "1s"
[lake.snapshots]
interval = "0s"
views = ["sales_by_store_hourly", "stock_on_hand"]
[[reports]]
name = "stock"
sql = "SELECT store_id, sku, on_hand FROM stock_on_hand ORDER BY store_id, sku"
schedule = "0 6 * * *"
timezone = "Europe/Berlin"
format = "xlsx"
[[reports]]
name = "sales"
sql = "SELECT store_id, sum(units) AS units FROM sales_by_store_hourly GROUP BY store_id ORDER BY store_id"
every = "1h"
format = "csv"
{}"#,
            dims_and_dataset()
        ),
    )
    .unwrap();
    let s = Server::start(BIN, &config);
    let health = s.wait_finished(Duration::from_secs(120));
    let (late, per_stream) = expected_archive(&health);
    let total: u64 = per_stream.iter().map(|(_, n)| n).sum::<u64>() + late;
    assert!(total > 5_000, "a real dataset: {total}");
    let health = wait_archived(&s, Duration::from_secs(60));
    assert_eq!(health["lake"]["healthy"], true, "{}", health["lake"]);
    assert_eq!(health["status"], "ok", "recovered: {}", health["faults"]);
    assert_archived_once(&s, &per_stream, late, &health);

    let (status, manifest) = post(&s.base, "/api/v1/snapshots");
    assert_eq!(status, 200, "{manifest}");
    assert_eq!(manifest["files"].as_array().unwrap().len(), 2);
    let (status, report) = post(&s.base, "/api/v1/reports/stock");
    assert_eq!(status, 200, "{report}");
    let (status, csv) = post(&s.base, "/api/v1/reports/sales");
    assert_eq!(status, 200, "{csv}");
    let (status, _) = post(&s.base, "/api/v1/reports/nope");
    assert_eq!(status, 404);

    // storepulse's own answers.
    let lake = dir.path().join("lake");
    let mut queries = serde_json::Map::new();
    for (stream, n) in &per_stream {
        if *n > 0 {
            queries.insert(
                stream.clone(),
                format!("SELECT count(DISTINCT event_id) FROM read_parquet('LAKE/events/{stream}/*/*.parquet', hive_partitioning=true)").into(),
            );
        }
    }
    let sales_sql = "SELECT store_id, count(*) AS lines, sum(qty) AS units, CAST(round(sum(qty * unit_price) * 100) AS BIGINT) AS cents FROM {} GROUP BY store_id ORDER BY store_id";
    queries.insert(
        "sales_by_store".into(),
        sales_sql
            .replace(
                "{}",
                "read_parquet('LAKE/events/sales/*/*.parquet', hive_partitioning=true)",
            )
            .into(),
    );
    let snap_cols = "store_id, receipts, units, CAST(round(revenue * 100) AS BIGINT) AS cents";
    queries.insert(
        "snapshot".into(),
        format!("SELECT {snap_cols}, epoch_ns(window_start) // 1000000000 AS w FROM read_parquet('LAKE/views/sales_by_store_hourly/*/*.parquet', hive_partitioning=true) WHERE snapshot_ts = (SELECT max(snapshot_ts) FROM read_parquet('LAKE/views/sales_by_store_hourly/*/*.parquet')) ORDER BY store_id, w").into(),
    );
    queries.insert(
        "report".into(),
        format!(
            "SELECT * FROM read_csv('LAKE/{}', hive_partitioning=false) ORDER BY store_id",
            csv["path"].as_str().unwrap()
        )
        .into(),
    );
    queries.insert(
        "per_date".into(),
        "SELECT CAST(date AS VARCHAR) AS date, count(*) FROM read_parquet('LAKE/events/sales/*/*.parquet', hive_partitioning=true) GROUP BY date ORDER BY date".into(),
    );
    let duck: Value = serde_json::from_str(&python(
        DUCKDB,
        &[lake.to_str().unwrap(), &Value::Object(queries).to_string()],
    ))
    .unwrap();

    for (stream, n) in &per_stream {
        if *n > 0 {
            assert_eq!(
                duck[stream],
                serde_json::json!([[n]]),
                "DuckDB counts {stream}"
            );
        }
    }
    let sp_sales = rows(
        &s,
        &sales_sql.replace("{}", "history.sales"),
        &["store_id", "lines", "units", "cents"],
    );
    assert_eq!(
        duck["sales_by_store"],
        serde_json::json!(sp_sales),
        "sales by store over the archive"
    );
    assert_eq!(sp_sales.len(), 5);

    let snap_sp_sql = format!("SELECT {snap_cols}, to_unixtime(window_start) AS w FROM snapshots.sales_by_store_hourly ORDER BY store_id, w");
    let cols = ["store_id", "receipts", "units", "cents", "w"];
    let from_snapshot = rows(&s, &snap_sp_sql, &cols);
    let live = rows(&s, &format!("SELECT {snap_cols}, to_unixtime(window_start) AS w FROM sales_by_store_hourly ORDER BY store_id, w"), &cols);
    assert_eq!(
        from_snapshot, live,
        "snapshots.* = the live view (bounded run, nothing changes)"
    );
    assert_eq!(
        duck["snapshot"],
        serde_json::json!(live),
        "DuckDB reads the same snapshot"
    );

    let report_rows = rows(&s, "SELECT store_id, sum(units) AS units FROM sales_by_store_hourly GROUP BY store_id ORDER BY store_id", &["store_id", "units"]);
    assert_eq!(
        duck["report"],
        serde_json::json!(report_rows),
        "the CSV report"
    );

    // Date partitions in storepulse prune like DuckDB sees them.
    for d in duck["per_date"].as_array().unwrap() {
        let date = d[0].as_str().unwrap();
        let n = rows(
            &s,
            &format!("SELECT count(*) AS n FROM history.sales WHERE date = '{date}'"),
            &["n"],
        );
        assert_eq!(n[0][0], d[1], "history.sales on {date}");
    }

    // The XLSX report is a workbook on disk with one row per stock line.
    let xlsx = lake.join(report["path"].as_str().unwrap());
    let bytes = std::fs::read(&xlsx).unwrap();
    assert_eq!(&bytes[..2], b"PK", "an XLSX (zip) file");
    assert!(report["rows"].as_u64().unwrap() > 0);
    assert!(Path::new(&xlsx)
        .to_str()
        .unwrap()
        .contains("/reports/stock/date="));

    // Snapshots are listed.
    let listed = s.get("/api/v1/snapshots");
    assert_eq!(listed["snapshots"][0]["id"], manifest["id"]);
    let _ = s.stop();
}

#[test]
fn s3_outage_then_catch_up_loses_nothing_and_serves_the_lake() {
    let dir = tempfile::tempdir().unwrap();
    gen_dataset(BIN, &dir.path().join("gen"), [4, 30, 100, 1], 3);
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let config = dir.path().join("storepulse.toml");
    std::fs::write(
        &config,
        format!(
            r#"
data_dir = "state"
until_eof = true
[http]
listen = "127.0.0.1:0"
[lake]
url = "s3://storepulse-lake/chain-a"
retry_max_delay = "300ms"
retention_interval = "1s"
[lake.s3]
endpoint = "{endpoint}"
region = "us-east-1"
access_key_id = "test"
secret_access_key = "env:STOREPULSE_TEST_S3_SECRET"
allow_http = true
[lake.archive]
max_file_age = "500ms"
[lake.snapshots]
interval = "0s"
views = ["stock_movement_totals"]
[[lake.retention]]
prefix = "events/"
# The generated chain starts on 2026-01-05: kept; 2020 partitions go.
keep = "1000d"
[[reports]]
name = "movements"
sql = "SELECT store_id, sum(movements) AS movements FROM stock_movement_totals GROUP BY store_id ORDER BY store_id"
every = "1h"
format = "parquet"
{}"#,
            dims_and_dataset()
        ),
    )
    .unwrap();
    // The secret comes from the environment (`env:NAME`); the child
    // inherits it.
    std::env::set_var("STOREPULSE_TEST_S3_SECRET", "test");
    let s = Server::start(BIN, &config);
    let health = s.wait_finished(Duration::from_secs(120));
    let (late, per_stream) = expected_archive(&health);

    // The store is down: the fault is visible with the object's URL, and
    // the events wait in the buffer.
    let deadline = Instant::now() + Duration::from_secs(60);
    let fault = loop {
        let h = s.get("/api/v1/health");
        // Retention's LIST fails first; the archive's PUT retries follow.
        let put_failing = h["lake"]["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("PUT "));
        if h["lake"]["healthy"] == false
            && put_failing
            && h["lake"]["archive"]["pending_files"].as_u64() > Some(0)
        {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "outage not reported: {}",
            h["lake"]
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let msg = fault["lake"]["last_error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("PUT s3://storepulse-lake/chain-a/events/"),
        "{msg}"
    );
    assert_eq!(fault["lake"]["archive"]["rows"], 0);
    assert!(fault["lake"]["archive"]["buffered_bytes"].as_u64() > Some(0));
    assert_eq!(fault["status"], "degraded", "{fault}");
    assert!(
        fault["faults"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().starts_with("lake ")),
        "{}",
        fault["faults"]
    );
    // Queries are still answered during the outage.
    assert!(!s.rows("SELECT * FROM stock_on_hand LIMIT 5").is_empty());
    let (status, err) = post(&s.base, "/api/v1/snapshots");
    assert_eq!(status, 503, "{err}");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("s3://storepulse-lake/chain-a/views/"),
        "{err}"
    );

    // The S3 server comes up, without the bucket at first.
    let moto = Moto::start(port);
    moto.create_bucket("storepulse-lake");
    let health = wait_archived(&s, Duration::from_secs(120));
    assert_eq!(health["lake"]["healthy"], true, "{}", health["lake"]);
    assert!(
        health["lake"]["errors"].as_u64() > Some(0),
        "the outage was counted"
    );
    assert_archived_once(&s, &per_stream, late, &health);

    // Snapshot and report on S3, read back through storepulse.
    let (status, manifest) = post(&s.base, "/api/v1/snapshots");
    assert_eq!(status, 200, "{manifest}");
    let live = s.rows("SELECT store_id, sku, kind, qty, movements FROM stock_movement_totals ORDER BY store_id, sku, kind");
    let snap = s.rows("SELECT store_id, sku, kind, qty, movements FROM snapshots.stock_movement_totals ORDER BY store_id, sku, kind");
    assert!(!live.is_empty());
    assert_eq!(live, snap);
    let (status, report) = post(&s.base, "/api/v1/reports/movements");
    assert_eq!(status, 200, "{report}");
    let listing = ureq::get(&format!(
        "{endpoint}/storepulse-lake?list-type=2&prefix=chain-a/reports/"
    ))
    .call()
    .unwrap()
    .into_body()
    .read_to_string()
    .unwrap();
    assert!(
        listing.contains(&format!(
            "<Key>chain-a/{}</Key>",
            report["path"].as_str().unwrap()
        )),
        "{listing}"
    );

    // Retention on S3: an old partition goes, a current one stays.
    let old = format!(
        "{endpoint}/storepulse-lake/chain-a/events/sales/date=2020-01-01/hour=00/part-old.parquet"
    );
    ureq::put(&old).send("x").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ureq::get(&old)
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap()
        .status()
        != 404
    {
        assert!(Instant::now() < deadline, "old partition not deleted");
        std::thread::sleep(Duration::from_millis(100));
    }
    let count = s.rows("SELECT count(DISTINCT event_id) AS n FROM history.sales");
    let sales = per_stream.iter().find(|(k, _)| k == "sales").unwrap().1;
    assert_eq!(count[0]["n"], sales, "retention kept current partitions");
    let _ = s.stop();
    drop(moto);
}
