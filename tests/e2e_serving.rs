//! The serving side through the real binary, on one generated chain:
//!
//! * HTTP: bearer tokens (none, wrong, analyst, admin), read-only analysts,
//!   the timeout, row and memory limits, JSON / CSV / Arrow IPC / Parquet
//!   answers agreeing with each other, the OpenAPI document against the
//!   routes, `/metrics` parsed for the documented names.
//! * pgwire: SCRAM login (right and wrong password), `psql` (Debian
//!   `postgresql-client`), tokio-postgres with prepared statements (binary
//!   results) agreeing with the HTTP answers, Grafana's catalog queries and
//!   every panel of `dashboards/grafana/storepulse.json`, read-only
//!   enforcement (SQLSTATE 42501) and the limits (57014, 54000, 53200).
//! * The web dashboard in headless Chromium at phone width: no console
//!   errors, charts hold data, the at-risk table fills, no horizontal
//!   overflow; screenshots are saved under `CARGO_TARGET_TMPDIR`.

use std::{
    collections::BTreeSet,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use storepulse_testkit::process::{gen_with, Server};
use tokio_postgres::{error::SqlState, NoTls};

const BIN: &str = env!("CARGO_BIN_EXE_storepulse");
const TOKEN: &str = "analyst-secret";
const ADMIN: &str = "admin-secret";
const PASSWORD: &str = "pg-secret";

struct Http {
    base: String,
}

struct Answer {
    status: u16,
    body: Vec<u8>,
    content_type: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

impl Http {
    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        accept: &str,
    ) -> Answer {
        let url = format!("{}{path}", self.base);
        let auth = token.map(|t| format!("Bearer {t}"));
        let resp = match method {
            "GET" => {
                let mut r = ureq::get(&url).header("Accept", accept);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.config().http_status_as_error(false).build().call()
            }
            _ => {
                let mut r = ureq::post(&url)
                    .header("Accept", accept)
                    .header("Content-Type", "application/sql");
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.config()
                    .http_status_as_error(false)
                    .build()
                    .send(body.unwrap_or(""))
            }
        }
        .expect("HTTP request");
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = resp
            .into_body()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .expect("body");
        Answer {
            status,
            body,
            content_type,
        }
    }

    fn sql(&self, token: &str, sql: &str, accept: &str) -> Answer {
        self.call("POST", "/api/v1/query", Some(token), Some(sql), accept)
    }

    fn rows(&self, sql: &str) -> Vec<Value> {
        let a = self.sql(TOKEN, sql, "application/json");
        assert_eq!(a.status, 200, "{sql}: {}", String::from_utf8_lossy(&a.body));
        a.json()["rows"].as_array().expect("rows").clone()
    }

    fn expect_error(&self, token: &str, sql: &str, status: u16, code: &str) -> Value {
        let a = self.sql(token, sql, "application/json");
        let v = a.json();
        assert_eq!(
            (a.status, v["code"].as_str()),
            (status, Some(code)),
            "{sql}: {v}"
        );
        v
    }
}

fn start(dir: &Path) -> (Server, Http) {
    // A price change for one SKU in five a day: stores lagging behind one
    // fill the price deviations panel.
    gen_with(
        BIN,
        &dir.join("gen"),
        &[
            "--stores",
            "16",
            "--skus",
            "60",
            "--members",
            "400",
            "--days",
            "3",
            "--seed",
            "11",
            "--price-changes",
            "0.2",
        ],
    );
    let config = format!(
        r#"
until_eof = true
[http]
listen = "127.0.0.1:0"
token = "{TOKEN}"
admin_token = "{ADMIN}"
[pg]
listen = "127.0.0.1:0"
password = "{PASSWORD}"
[serving]
timeout = "10s"
max_rows = 50000
memory_limit = "256 MiB"
[lake]
enabled = false
# A short excess-cover threshold so a small chain has transfers to show.
# ... and low-stock alerts without waiting (alert_history has rows).
[retail]
transfer_excess_cover = "1d"
low_stock_for = "0s"
[[alerts.sinks]]
name = "file"
type = "jsonl"
path = "alerts.jsonl"
[[dimensions]]
name = "stores"
path = "gen/stores.csv"
[[dimensions]]
name = "products"
path = "gen/products.csv"
[[dimensions]]
name = "replenishment_policy"
path = "gen/replenishment_policy.csv"
[[dimensions]]
name = "prices"
path = "gen/prices.csv"
[[sources]]
type = "dataset"
dir = "gen"
"#
    );
    std::fs::write(dir.join("storepulse.toml"), config).unwrap();
    let server = Server::start(BIN, &dir.join("storepulse.toml"));
    let http = Http {
        base: server.base.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let h = http.call(
            "GET",
            "/api/v1/health",
            Some(TOKEN),
            None,
            "application/json",
        );
        assert_eq!(h.status, 200);
        match h.json()["pipeline"].as_str() {
            Some("finished") => break,
            Some("running") => assert!(Instant::now() < deadline, "pipeline did not finish"),
            other => panic!("pipeline {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Rules evaluate on the last applied batch; wait for their first
    // notifications (the Grafana panel over alert_history needs rows).
    while http.rows("SELECT count(*) AS n FROM alert_history")[0]["n"] == 0 {
        assert!(Instant::now() < deadline, "no alert notified");
        std::thread::sleep(Duration::from_millis(200));
    }
    (server, http)
}

#[test]
fn serving_over_http_pgwire_grafana_and_the_dashboard() {
    let dir = tempfile::tempdir().unwrap();
    let (server, http) = start(dir.path());
    let pg_addr = server.pg.clone().expect("pgwire address in the log line");

    http_auth_and_read_only(&http);
    http_limits(&http);
    http_formats_agree(&http);
    openapi_documents_every_route(&http);
    let cities = http
        .rows("SELECT DISTINCT city FROM stores ORDER BY city")
        .iter()
        .map(|r| r["city"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(pgwire(&http, &pg_addr, &cities));
    psql(&http, &pg_addr);
    metrics_have_the_documented_names(&http);
    dashboard_in_headless_chromium(&http);
    // Nothing the tests did may have crashed the server.
    let h = http.call(
        "GET",
        "/api/v1/health",
        Some(TOKEN),
        None,
        "application/json",
    );
    assert_eq!(h.status, 200);
    drop(server);
}

fn http_auth_and_read_only(http: &Http) {
    for token in [None, Some("wrong")] {
        let a = http.call("GET", "/api/v1/views", token, None, "application/json");
        assert_eq!(a.status, 401, "token {token:?}");
        assert_eq!(a.json()["code"], "unauthorized");
    }
    assert_eq!(
        http.call("GET", "/api/v1/views", Some(TOKEN), None, "")
            .status,
        200
    );
    assert_eq!(http.call("GET", "/metrics", None, None, "").status, 401);
    // Public: the page, its assets, liveness, the OpenAPI document.
    for path in [
        "/",
        "/assets/app.js",
        "/assets/chart.umd.min.js",
        "/livez",
        "/api/v1/openapi.json",
    ] {
        assert_eq!(http.call("GET", path, None, None, "").status, 200, "{path}");
    }
    // Analysts read; they do not define views, write files or read the
    // server's files.
    let ddl = "CREATE MATERIALIZED VIEW analyst_view AS SELECT store_id, count(*) AS n FROM sales GROUP BY store_id";
    let e = http.expect_error(TOKEN, ddl, 403, "read_only");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("CREATE MATERIALIZED VIEW"),
        "{e}"
    );
    for sql in [
        "COPY (SELECT * FROM stores) TO '/tmp/storepulse-copy.csv'",
        "CREATE EXTERNAL TABLE passwd (line TEXT) STORED AS CSV LOCATION '/etc/passwd'",
        "CREATE TABLE t AS SELECT 1 AS a",
        "INSERT INTO stores VALUES ('x', 'x', 'x', 'x')",
    ] {
        let e = http.expect_error(TOKEN, sql, 403, "read_only");
        assert!(
            e["error"].as_str().unwrap().contains("permission denied"),
            "{sql}: {e}"
        );
    }
    assert!(!Path::new("/tmp/storepulse-copy.csv").exists());
    // The admin token may.
    let a = http.sql(ADMIN, ddl, "application/json");
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    // (A view created after the input ended starts empty: no backfill.)
    assert_eq!(
        http.rows("SELECT count(*) AS n FROM analyst_view")[0]["n"],
        0
    );
    let views = http
        .call("GET", "/api/v1/views", Some(TOKEN), None, "")
        .json();
    assert!(
        views["views"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "analyst_view"),
        "{views}"
    );
    // ... and snapshots are the admin's too.
    let a = http.call("POST", "/api/v1/snapshots", Some(TOKEN), None, "");
    assert_eq!(
        (a.status, a.json()["code"].as_str()),
        (403, Some("read_only"))
    );
}

fn http_limits(http: &Http) {
    let e = http.expect_error(
        TOKEN,
        "SELECT * FROM generate_series(1, 100000)",
        413,
        "row_limit",
    );
    assert!(e["error"].as_str().unwrap().contains("50000"), "{e}");
    let started = Instant::now();
    let e = http.expect_error(
        TOKEN,
        "SELECT count(*) FROM generate_series(1, 100000000000) a CROSS JOIN generate_series(1, 1000) b",
        408,
        "query_timeout",
    );
    assert!(e["error"].as_str().unwrap().contains("10s"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let e = http.expect_error(
        TOKEN,
        "SELECT v % 40000000 AS k, count(*) AS n FROM generate_series(1, 80000000) t(v) GROUP BY v % 40000000 ORDER BY n DESC LIMIT 1",
        413,
        "memory_limit",
    );
    assert!(
        e["error"].as_str().unwrap().contains("Resources exhausted"),
        "{e}"
    );
    // Bad SQL names the position.
    let e = http.expect_error(TOKEN, "SELECT nope FROM stockout_risk", 400, "user_error");
    assert!(e["error"].as_str().unwrap().contains("nope"), "{e}");
}

fn http_formats_agree(http: &Http) {
    let sql = "SELECT store_id, sku, on_hand, p_stockout FROM stockout_risk ORDER BY store_id, sku";
    let json = http.rows(sql);
    assert!(json.len() > 50, "{} rows", json.len());
    let csv = http.sql(TOKEN, sql, "text/csv");
    assert_eq!(csv.content_type, "text/csv");
    let text = String::from_utf8(csv.body).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "store_id,sku,on_hand,p_stockout");
    assert_eq!(lines.len(), json.len() + 1);
    let first = format!(
        "{},{},{}",
        json[0]["store_id"].as_str().unwrap(),
        json[0]["sku"].as_str().unwrap(),
        json[0]["on_hand"]
    );
    assert!(lines[1].starts_with(&first), "{} vs {first}", lines[1]);

    let arrow = http.sql(TOKEN, sql, "application/vnd.apache.arrow.stream");
    let reader =
        arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(arrow.body), None).unwrap();
    let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
    assert_eq!(
        batches.iter().map(|b| b.num_rows()).sum::<usize>(),
        json.len()
    );

    for (how, path) in [
        ("accept", "/api/v1/query"),
        ("param", "/api/v1/query?format=parquet"),
    ] {
        let accept = if how == "accept" {
            "application/vnd.apache.parquet"
        } else {
            ""
        };
        let pq = http.call("POST", path, Some(TOKEN), Some(sql), accept);
        assert_eq!(pq.status, 200, "{how}");
        assert_eq!(pq.content_type, "application/vnd.apache.parquet", "{how}");
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            bytes::Bytes::from(pq.body),
        )
        .unwrap()
        .build()
        .unwrap();
        let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
        assert_eq!(
            batches.iter().map(|b| b.num_rows()).sum::<usize>(),
            json.len(),
            "{how}"
        );
        let on_hand = batches[0]
            .column_by_name("on_hand")
            .unwrap()
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .expect("on_hand is Int64")
            .value(0);
        assert_eq!(Some(on_hand), json[0]["on_hand"].as_i64(), "{how}");
    }
    // GET with ?sql= answers the same.
    let url = format!("/api/v1/query?format=csv&sql={}", urlencode(sql));
    let a = http.call("GET", &url, Some(TOKEN), None, "");
    assert_eq!(String::from_utf8(a.body).unwrap(), text);
    let a = http.call(
        "GET",
        "/api/v1/query?sql=SELECT%201&format=xml",
        Some(TOKEN),
        None,
        "",
    );
    assert_eq!(
        (a.status, a.json()["code"].as_str()),
        (400, Some("bad_request"))
    );
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The router's routes (method, path); each must be in the document, and
/// each documented GET must answer something other than the router's 404.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/"),
    ("get", "/assets/{file}"),
    ("get", "/livez"),
    ("get", "/api/v1/openapi.json"),
    ("post", "/api/v1/query"),
    ("get", "/api/v1/query"),
    ("get", "/api/v1/views"),
    ("get", "/api/v1/health"),
    ("get", "/api/v1/alerts"),
    ("get", "/api/v1/snapshots"),
    ("post", "/api/v1/snapshots"),
    ("post", "/api/v1/reports/{name}"),
    ("get", "/metrics"),
];

fn openapi_documents_every_route(http: &Http) {
    let doc = http
        .call("GET", "/api/v1/openapi.json", None, None, "")
        .json();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    for (method, path) in ROUTES {
        let op = &paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} not documented"))[*method];
        assert!(op.is_object(), "{method} {path} not documented");
        assert!(
            op["summary"].as_str().is_some_and(|s| !s.is_empty()),
            "{method} {path}"
        );
        assert!(op["responses"].is_object(), "{method} {path}");
    }
    let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(
        documented,
        ROUTES.len(),
        "documented operations that are not routes"
    );
    for (path, item) in paths {
        if item.get("get").is_none() || path.contains('{') || path == "/api/v1/query" {
            continue;
        }
        let a = http.call("GET", path, Some(ADMIN), None, "");
        // A handler's own 404 (the lake is off here) is JSON with a code;
        // the router's is not.
        if a.status == 404 {
            assert_eq!(a.json()["code"], "lake_disabled", "GET {path}");
        }
        assert!(a.status < 500, "GET {path}: {}", a.status);
    }
    let a = http.call("GET", "/assets/nope.js", None, None, "");
    assert_eq!(a.status, 404);
    let a = http.call("POST", "/api/v1/reports/nope", Some(ADMIN), None, "");
    assert_eq!(
        (a.status, a.json()["code"].as_str()),
        (404, Some("lake_disabled"))
    );
}

async fn connect(
    addr: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let conn = format!("host={host} port={port} user=storepulse password={password} dbname=storepulse connect_timeout=10");
    let (client, connection) = tokio_postgres::connect(&conn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The server's whole message (tokio-postgres' `Display` says only `db error`).
fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| format!("{}: {}", d.code().code(), d.message()))
        .unwrap_or_else(|| e.to_string())
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<SqlState> {
    e.as_db_error().map(|d| d.code().clone())
}

async fn pgwire(http: &Http, addr: &str, cities: &[String]) {
    let Err(e) = connect(addr, "wrong").await else {
        panic!("wrong password accepted");
    };
    assert!(
        e.to_string().contains("password") || sqlstate(&e) == Some(SqlState::INVALID_PASSWORD),
        "{e}"
    );
    let pg = connect(addr, PASSWORD).await.expect("login");

    // Simple protocol: the same count as HTTP.
    let want = http.rows("SELECT count(*) AS n FROM stockout_risk")[0]["n"]
        .as_i64()
        .unwrap();
    let rows = pg
        .simple_query("SELECT count(*) AS n FROM stockout_risk")
        .await
        .unwrap();
    let got: i64 = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .unwrap();
    assert_eq!(got, want);

    // A cursor over the extended protocol (how psycopg's named cursors and
    // drivers with a fetch size read): DECLARE, then FETCH in pieces.
    let mut pg = pg;
    {
        let tx = pg.transaction().await.unwrap();
        tx.execute(
            "DECLARE risk CURSOR FOR SELECT store_id, sku FROM stockout_risk ORDER BY store_id, sku",
            &[],
        )
        .await
        .unwrap();
        let mut keys = Vec::new();
        loop {
            let rows = tx.query("FETCH 50 FROM risk", &[]).await.unwrap();
            keys.extend(
                rows.iter()
                    .map(|r| format!("{}|{}", r.get::<_, &str>(0), r.get::<_, &str>(1))),
            );
            if rows.len() < 50 {
                break;
            }
        }
        tx.execute("CLOSE risk", &[]).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(keys.len() as i64, want, "every row through the cursor");
        assert!(
            keys.windows(2).all(|w| w[0] < w[1]),
            "in the cursor's order"
        );
    }
    let pg = pg;
    let e = pg.simple_query("FETCH 1 FROM risk").await.unwrap_err();
    assert_eq!(
        sqlstate(&e),
        Some(SqlState::INVALID_CURSOR_NAME),
        "{}",
        db_message(&e)
    );
    // A cursor's rows are held in the serving memory pool (memory_limit
    // 256 MiB here; the query's reservation is handed to the cursor, so the
    // rows count once): cursors of ~90 MB each stop fitting with 53200, and
    // closing one makes room again. (A failure prints the pool's top
    // consumers: the server's message names them.)
    let big = "SELECT repeat('x', 30000) AS s FROM range(3000)";
    let mut open = 0;
    let full = loop {
        match pg
            .simple_query(&format!("DECLARE m{open} CURSOR FOR {big}"))
            .await
        {
            Ok(_) => open += 1,
            Err(e) => break e,
        }
        assert!(open < 6, "{open} cursors of ~90 MB within 256 MiB");
    };
    assert!(open >= 1, "one cursor fits: {}", db_message(&full));
    assert_eq!(
        sqlstate(&full),
        Some(SqlState::OUT_OF_MEMORY),
        "{}",
        db_message(&full)
    );
    pg.simple_query("CLOSE m0").await.unwrap();
    pg.simple_query(&format!("DECLARE again CURSOR FOR {big}"))
        .await
        .expect("room after CLOSE");
    let rows = pg.simple_query("FETCH ALL FROM again").await.unwrap();
    assert_eq!(row_count(&rows), 3000);
    pg.simple_query("CLOSE ALL").await.unwrap();

    // Extended protocol, prepared statement with parameters, binary rows.
    let sample = http.rows(
        "SELECT store_id, sku, on_hand, p_stockout, suggested_order_qty FROM stockout_risk ORDER BY p_stockout DESC, store_id, sku LIMIT 5",
    );
    let stmt = pg
        .prepare("SELECT on_hand, p_stockout, suggested_order_qty FROM stockout_risk WHERE store_id = $1 AND sku = $2")
        .await
        .unwrap();
    for r in &sample {
        let (store, sku) = (r["store_id"].as_str().unwrap(), r["sku"].as_str().unwrap());
        let rows = pg.query(&stmt, &[&store, &sku]).await.unwrap();
        assert_eq!(rows.len(), 1, "{store} {sku}");
        assert_eq!(Some(rows[0].get::<_, i64>(0)), r["on_hand"].as_i64());
        let p: f64 = rows[0].get(1);
        assert!(
            (p - r["p_stockout"].as_f64().unwrap()).abs() < 1e-9,
            "{p} vs {}",
            r["p_stockout"]
        );
        assert_eq!(
            Some(rows[0].get::<_, i64>(2)),
            r["suggested_order_qty"].as_i64()
        );
    }

    // Read-only: every write is refused with insufficient_privilege.
    for sql in [
        "CREATE TABLE t (a INT)",
        "INSERT INTO stores VALUES ('x', 'x', 'x', 'x')",
        "COPY stores TO '/tmp/storepulse-pg-copy.csv'",
        "CREATE MATERIALIZED VIEW v AS SELECT store_id, count(*) FROM sales GROUP BY store_id",
        "DROP VIEW stockout_risk",
        "CREATE VIEW v AS SELECT 1",
    ] {
        for extended in [false, true] {
            let e = if extended {
                pg.execute(sql, &[]).await.err()
            } else {
                pg.batch_execute(sql).await.err()
            }
            .unwrap_or_else(|| panic!("{sql} was accepted"));
            assert_eq!(
                sqlstate(&e),
                Some(SqlState::INSUFFICIENT_PRIVILEGE),
                "{sql} (extended {extended}): {e:?}"
            );
            let msg = e.as_db_error().unwrap().message().to_string();
            assert!(
                msg.contains("permission denied") && msg.contains("read-only"),
                "{msg}"
            );
        }
    }
    assert!(!Path::new("/tmp/storepulse-pg-copy.csv").exists());
    // The views are all still there.
    assert_eq!(
        http.rows("SELECT count(*) AS n FROM stockout_risk")[0]["n"].as_i64(),
        Some(want)
    );

    // Limits.
    let e = pg
        .simple_query("SELECT * FROM generate_series(1, 100000)")
        .await
        .unwrap_err();
    assert_eq!(
        sqlstate(&e),
        Some(SqlState::PROGRAM_LIMIT_EXCEEDED),
        "{e:?}"
    );
    pg.batch_execute("SET statement_timeout = 500")
        .await
        .unwrap();
    let started = Instant::now();
    let e = pg
        .simple_query("SELECT count(*) FROM generate_series(1, 100000000000) a CROSS JOIN generate_series(1, 1000) b")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), Some(SqlState::QUERY_CANCELED), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    pg.batch_execute("SET statement_timeout = 0").await.unwrap();
    let e = pg
        .simple_query("SELECT v % 40000000 AS k, count(*) AS n FROM generate_series(1, 80000000) t(v) GROUP BY v % 40000000 ORDER BY n DESC LIMIT 1")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), Some(SqlState::OUT_OF_MEMORY), "{e:?}");
    // The session still works after errors.
    assert!(pg.simple_query("SELECT 1").await.is_ok());

    // Grafana's PostgreSQL data source: its health check and the catalog
    // queries of its query builder.
    for sql in GRAFANA_CATALOG {
        let rows = pg
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        assert!(row_count(&rows) > 0, "no rows: {sql}");
    }
    // Every panel of the provisioned dashboard.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/dashboards/grafana/storepulse.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let city_list = cities
        .iter()
        .map(|c| format!("'{}'", c.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(",");
    let mut pg_panels = 0;
    for panel in dash["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        assert!(
            panel["description"].as_str().is_some_and(|d| d.len() > 20),
            "panel {title} has no description"
        );
        for t in panel["targets"].as_array().unwrap() {
            let Some(sql) = t["rawSql"].as_str() else {
                continue;
            };
            pg_panels += 1;
            let sql = grafana_macros(sql, &city_list);
            let rows = pg
                .simple_query(&sql)
                .await
                .unwrap_or_else(|e| panic!("panel {title}: {e:?}\n{sql}"));
            assert!(
                row_count(&rows) > 0,
                "panel {title} returned no rows:\n{sql}"
            );
        }
    }
    assert!(pg_panels >= 6, "{pg_panels} SQL panels");
    let var = dash["templating"]["list"][0]["query"].as_str().unwrap();
    let rows = pg.simple_query(var).await.unwrap();
    assert_eq!(row_count(&rows), cities.len());
}

/// What Grafana substitutes before sending a panel's SQL: `$__timeFilter`
/// (here a range covering the dataset) and the multi-value `$city` (all).
fn grafana_macros(sql: &str, cities: &str) -> String {
    let mut out = sql.replace("$city", cities);
    while let Some(i) = out.find("$__timeFilter(") {
        let end = i + out[i..].find(')').unwrap();
        let col = &out[i + "$__timeFilter(".len()..end];
        let expanded = format!("{col} BETWEEN '2000-01-01T00:00:00Z' AND '2100-01-01T00:00:00Z'");
        out.replace_range(i..=end, &expanded);
    }
    out
}

fn row_count(msgs: &[tokio_postgres::SimpleQueryMessage]) -> usize {
    msgs.iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count()
}

/// Grafana's PostgreSQL data source: `SELECT 1` is its health check; the
/// others are its query builder's table and column lists.
const GRAFANA_CATALOG: &[&str] = &[
    "SELECT 1",
    "SELECT current_database()",
    "SELECT quote_ident(table_name) AS \"table\" FROM information_schema.tables WHERE quote_ident(table_schema) NOT IN ('information_schema', 'pg_catalog', '_timescaledb_cache', '_timescaledb_catalog', '_timescaledb_internal', '_timescaledb_config', 'timescaledb_information', 'timescaledb_experimental') ORDER BY table_name",
    "SELECT quote_ident(column_name) AS \"column\", data_type AS \"type\" FROM information_schema.columns WHERE quote_ident(table_name) = 'stockout_risk'",
];

fn psql(http: &Http, addr: &str) {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let run = |args: &[&str], password: &str| {
        Command::new("psql")
            .args([
                "-h",
                host,
                "-p",
                port,
                "-U",
                "storepulse",
                "-d",
                "storepulse",
                "-X",
                "-A",
                "-t",
            ])
            .args(args)
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGSSLMODE", "disable")
            .output()
            .expect("psql (Debian postgresql-client, installed by .ci/run)")
    };
    // Succeeds: its stdout.
    let ok = |args: &[&str]| {
        let out = run(args, PASSWORD);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // Fails: its stderr.
    let fails = |args: &[&str], password: &str| {
        let out = run(args, password);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let out = ok(&["-c", "SELECT count(*) FROM transfer_suggestions"]);
    let want = http.rows("SELECT count(*) AS n FROM transfer_suggestions")[0]["n"]
        .as_i64()
        .unwrap();
    assert_eq!(out.trim(), want.to_string());
    let out = ok(&[
        "-c",
        "SELECT segment, count(*) FROM member_rfm GROUP BY segment ORDER BY segment",
    ]);
    let lines = out.lines().filter(|l| l.contains('|')).count();
    let want = http.rows("SELECT count(DISTINCT segment) AS n FROM member_rfm")[0]["n"]
        .as_i64()
        .unwrap();
    assert_eq!(lines as i64, want);
    // psql's FETCH_COUNT reads through a cursor (BEGIN; DECLARE ... NO
    // SCROLL CURSOR FOR ...; FETCH FORWARD 7 ... until short; CLOSE;
    // COMMIT): the same rows as without it.
    let hourly = "SELECT store_id, window_start, receipts, revenue FROM sales_by_store_hourly \
                  ORDER BY store_id, window_start";
    let plain = ok(&["-c", hourly]);
    let fetched = ok(&["-v", "FETCH_COUNT=7", "-c", hourly]);
    let rows = plain.lines().count();
    assert!(rows > 7 * 3, "several FETCHes: {rows} rows");
    assert_eq!(fetched, plain);
    // Explicit FETCH counts and CLOSE; a SCROLL cursor is refused clearly.
    let out = ok(&[
        "-c",
        "BEGIN",
        "-c",
        &format!("DECLARE c NO SCROLL CURSOR FOR {hourly}"),
        "-c",
        "FETCH 2 FROM c",
        "-c",
        "FETCH FORWARD 3 FROM c",
        "-c",
        "CLOSE c",
        "-c",
        "COMMIT",
    ]);
    let first5: Vec<&str> = plain.lines().take(5).collect();
    let got: Vec<&str> = out.lines().filter(|l| l.contains('|')).collect();
    assert_eq!(got, first5, "FETCH 2 then 3: the first five rows");
    let err = fails(&["-c", "DECLARE s SCROLL CURSOR FOR SELECT 1"], PASSWORD);
    assert!(err.contains("SCROLL cursor is not supported"), "{err}");
    let err = fails(&["-c", "DROP VIEW stockout_risk"], PASSWORD);
    assert!(err.contains("permission denied"), "{err}");
    let err = fails(&["-c", "SELECT 1"], "wrong").to_lowercase();
    assert!(err.contains("password authentication failed"), "{err}");
}

/// The names `docs/serving.md` lists (the Kafka ones need a Kafka source;
/// `tests/e2e_kafka.rs` runs one).
const METRICS: &[&str] = &[
    "storepulse_engine_events_total",
    "storepulse_engine_bytes_total",
    "storepulse_engine_watermark_lag_seconds",
    "storepulse_engine_late_events_total",
    "storepulse_engine_duplicate_events_total",
    "storepulse_ingest_dead_letters_total",
    "storepulse_engine_view_state_bytes",
    "storepulse_engine_view_groups",
    "storepulse_engine_view_output_bytes",
    "storepulse_engine_batch_duration_seconds_bucket",
    "storepulse_alerts_notifications_total",
    "storepulse_alerts_active",
    "storepulse_alerts_evaluations_total",
    "storepulse_alerts_evaluation_duration_seconds_count",
    "storepulse_query_duration_seconds_bucket",
    "storepulse_query_errors_total",
    "storepulse_http_auth_failures_total",
    "storepulse_pg_connections",
];

fn metrics_have_the_documented_names(http: &Http) {
    let a = http.call("GET", "/metrics", Some(TOKEN), None, "");
    assert_eq!(a.status, 200);
    assert!(a.content_type.starts_with("text/plain"));
    let text = String::from_utf8(a.body).unwrap();
    let mut names = BTreeSet::new();
    let mut series = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (name_labels, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let name = name_labels.split('{').next().unwrap();
        assert!(name.starts_with("storepulse_"), "{line}");
        names.insert(name.to_string());
        series.push((name_labels.to_string(), value));
    }
    for m in METRICS {
        assert!(names.contains(*m), "{m} missing from /metrics:\n{names:?}");
    }
    let has = |prefix: &str| {
        series
            .iter()
            .any(|(n, v)| n.starts_with(prefix) && *v > 0.0)
    };
    assert!(has(
        "storepulse_query_duration_seconds_count{interface=\"pgwire\"}"
    ));
    assert!(has(
        "storepulse_query_duration_seconds_count{interface=\"http\"}"
    ));
    assert!(has(
        "storepulse_query_errors_total{interface=\"pgwire\",kind=\"read_only\"}"
    ));
    assert!(has("storepulse_engine_events_total{stream=\"sales\"}"));
    // The Prometheus panels of the Grafana dashboard use only known names.
    let dash = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dashboards/grafana/storepulse.json"
    ))
    .unwrap();
    for word in dash.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("storepulse_") && !word.starts_with("storepulse_kafka_") {
            let base = word.trim_end_matches("_bucket");
            assert!(
                names.iter().any(|n| n == word || n.starts_with(base)),
                "dashboard metric {word} not in /metrics"
            );
        }
    }
}

fn chromium() -> &'static str {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c;
        }
    }
    panic!("headless Chromium not found (Debian `chromium`, installed by .ci/run)");
}

fn dashboard_in_headless_chromium(http: &Http) {
    let browser = chromium();
    let url = format!("{}/#token={TOKEN}", http.base);
    let profile = tempfile::tempdir().unwrap();
    let common = |width: u32| {
        let mut c = Command::new(browser);
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=20000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--window-size={width},1800"));
        c
    };
    let out = common(390)
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    let console: Vec<&str> = log.lines().filter(|l| l.contains("CONSOLE")).collect();
    assert!(
        !console
            .iter()
            .any(|l| l.contains("Uncaught") || l.contains("Error") || l.contains("error")),
        "console errors:\n{}",
        console.join("\n")
    );
    let body = dom
        .split("<body")
        .nth(1)
        .and_then(|b| b.split('>').next())
        .unwrap_or_else(|| panic!("no body in DOM:\n{dom}\n{log}"));
    let attr = |name: &str| -> Option<String> {
        let key = format!("{name}=\"");
        body.find(&key)
            .map(|i| body[i + key.len()..].split('"').next().unwrap().to_string())
    };
    assert_eq!(
        attr("data-ready").as_deref(),
        Some("1"),
        "dashboard not ready: <body{body}>\n{log}"
    );
    assert_eq!(attr("data-errors").as_deref(), Some("0"), "<body{body}>");
    for chart in [
        "data-chart-sales-points",
        "data-chart-turnover-points",
        "data-chart-rfm-points",
    ] {
        let n: usize = attr(chart)
            .unwrap_or_else(|| panic!("{chart} missing: <body{body}>"))
            .parse()
            .unwrap();
        assert!(n > 0, "{chart} = {n}");
    }
    // The open minute is drawn as partial, not as a drop to zero.
    assert!(
        attr("data-sales-partial").is_some_and(|m| !m.is_empty()),
        "open minute not marked: <body{body}>"
    );
    let risk: usize = attr("data-risk-table-rows")
        .expect("risk rows")
        .parse()
        .unwrap();
    let want = http.rows("SELECT count(*) AS n FROM stockout_risk WHERE suggested_order_qty > 0")[0]
        ["n"]
        .as_u64()
        .unwrap() as usize;
    assert_eq!(risk, want.min(15));
    // Store sync: the stores furthest behind, one row per store.
    let sync: usize = attr("data-sync-table-rows")
        .expect("sync rows")
        .parse()
        .unwrap();
    let stores = http.rows("SELECT count(DISTINCT store_id) AS n FROM store_sync_status")[0]["n"]
        .as_u64()
        .unwrap() as usize;
    assert!(stores > 0);
    assert_eq!(sync, stores.min(10));
    // Prices: the stores still charging another price, worst first.
    let prices: usize = attr("data-price-table-rows")
        .expect("price rows")
        .parse()
        .unwrap();
    let off = http.rows("SELECT count(*) AS n FROM price_deviations WHERE still_mismatched")[0]["n"]
        .as_u64()
        .unwrap() as usize;
    assert!(off > 0, "no store lags behind a price change");
    assert_eq!(prices, off.min(10));
    assert!(dom.matches("<tr class=\"row\">").count() >= risk);
    assert_eq!(
        attr("data-overflow").as_deref(),
        Some("false"),
        "horizontal overflow at phone width"
    );
    // Screenshots as test artifacts.
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR"));
    for (name, width) in [
        ("dashboard-phone.png", 390),
        ("dashboard-desktop.png", 1280),
    ] {
        let path = shots.join(name);
        let _ = std::fs::remove_file(&path);
        let out = common(width)
            .arg(format!("--screenshot={}", path.display()))
            .arg(&url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let png = std::fs::read(&path).expect("screenshot written");
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 20_000,
            "{name}: {} bytes",
            png.len()
        );
        eprintln!("screenshot: {}", path.display());
    }
}

/// HTTPS and pgwire TLS from one `[tls]` certificate (self-signed for
/// 127.0.0.1, made by the `openssl` CLI), checked with clients that verify
/// it: curl `--cacert` and psql `sslmode=verify-full`.
#[test]
fn tls_for_https_and_pgwire() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .args(["-days", "1", "-subj", "/CN=storepulse-test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl CLI");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        dir.path().join("storepulse.toml"),
        format!(
            "[http]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\ntls = true\n\
             [pg]\nlisten = \"127.0.0.1:0\"\npassword = \"{PASSWORD}\"\ntls = true\n\
             [tls]\ncert = \"server.crt\"\nkey = \"server.key\"\n[lake]\nenabled = false\n\
             [[sources]]\ntype = \"generator\"\nstores = 2\nskus = 10\nmembers = 10\nrate = 50\n"
        ),
    )
    .unwrap();
    let server = Server::start(BIN, &dir.path().join("storepulse.toml"));
    assert!(server.base.starts_with("https://"), "{}", server.base);
    let curl = |extra: &[&str]| {
        Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-H",
                &format!("Authorization: Bearer {TOKEN}"),
            ])
            .args(extra)
            .output()
            .expect("curl")
    };
    let out = curl(&[
        "--cacert",
        cert.to_str().unwrap(),
        &format!("{}/api/v1/health", server.base),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let health: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(health["status"], "ok");
    // Without the CA the certificate is not trusted; plain HTTP is not served.
    assert!(!curl(&[&format!("{}/livez", server.base)]).status.success());
    let plain = server.base.replace("https://", "http://");
    let out = curl(&[&format!("{plain}/livez")]);
    assert!(!out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("ok"));

    let (host, port) = server.pg.as_deref().unwrap().rsplit_once(':').unwrap();
    let conn = format!(
        "host={host} port={port} user=storepulse dbname=storepulse sslmode=verify-full sslrootcert={}",
        cert.display()
    );
    let out = Command::new("psql")
        .args([&conn, "-X", "-A", "-t", "-c", "SELECT 1 + 1"])
        .env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
}
