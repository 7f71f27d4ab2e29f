//! The query surface under attack, through the real binary while it
//! ingests a live generated chain (issue: hardening the query surface).
//! Each attack is answered with its documented error; after each the
//! process is up and the engine's accepted-event counters keep growing.
//!
//! * Deep statements (2,000 to 100,000-term chains) over HTTP and pgwire
//!   (simple and extended protocol): 400 `too_complex` / SQLSTATE 54001.
//! * pgwire `SET`: settings of the shared serving context are refused
//!   (42501); client settings work and stay on their connection.
//! * Results over `max_result_bytes`, empty and oversized bodies, bad query
//!   strings: JSON errors.
//! * Browsers: DDL never by GET or a `text/plain` POST; a foreign `Host`
//!   (DNS rebinding) or `Origin` is refused.
//! * `CREATE ALERT` at run time is refused; a rule failing at every
//!   evaluation shows in `/api/v1/health` as a fault.
//! * pgwire sockets that never log in: closed after `startup_timeout`, kept
//!   out of the session slots, capped by `max_startup_connections`; a client
//!   over `max_connections` gets 53300.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use serde_json::Value;
use storepulse_testkit::process::Server;
use tokio_postgres::{error::SqlState, Client, NoTls};

const BIN: &str = env!("CARGO_BIN_EXE_storepulse");
const TOKEN: &str = "analyst-secret";
const ADMIN: &str = "admin-secret";
const PASSWORD: &str = "pg-secret";

fn start(dir: &std::path::Path) -> Server {
    let config = dir.join("storepulse.toml");
    std::fs::write(
        &config,
        format!(
            r#"
data_dir = "{}"
[http]
listen = "127.0.0.1:0"
token = "{TOKEN}"
admin_token = "{ADMIN}"
[pg]
listen = "127.0.0.1:0"
password = "{PASSWORD}"
max_connections = 4
max_startup_connections = 12
startup_timeout = "8s"
[serving]
timeout = "10s"
memory_limit = "512 MiB"
max_result_bytes = "32 MiB"
[lake]
enabled = false
[checkpoint]
enabled = false
[[sources]]
type = "generator"
stores = 4
skus = 40
members = 200
rate = 2000.0
[[alerts.sinks]]
name = "log"
type = "log"
[[alerts.rules]]
name = "broken"
query = "SELECT store_id FROM sales_by_store_hourly WHERE CAST(store_id AS INT) > 0"
key = "store_id"
every = "1s"
sinks = "log"
"#,
            dir.join("state").display()
        ),
    )
    .unwrap();
    Server::start(BIN, &config)
}

/// One HTTP/1.1 exchange on a raw socket (to send any `Host`, `Origin` or
/// content type): (status, JSON body).
fn raw(base: &str, request_line: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
    let addr = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{request_line} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    // Written from another thread while this one reads: a server may
    // answer an oversized body (413) before it has all of it and close, so
    // the write can fail with a broken pipe; the answer is what counts.
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(req.as_bytes());
    });
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        assert!(!out.is_empty(), "no answer: {e}");
    }
    writer.join().unwrap();
    let text = String::from_utf8_lossy(&out);
    let status: u16 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    // Chunked bodies: the JSON object is between the first '{' and last '}'.
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) => serde_json::from_str(&body[a..=b]).unwrap_or(Value::Null),
        _ => Value::Null,
    };
    (status, json)
}

fn post_sql(server: &Server, token: &str, content_type: &str, sql: &str) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    raw(
        &server.base,
        "POST /api/v1/query",
        &[("Authorization", &auth), ("Content-Type", content_type)],
        sql,
    )
}

/// Accepted events over all streams, from `/api/v1/health`.
fn accepted(server: &Server) -> u64 {
    let h = get_health(server);
    h["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["accepted_events"].as_u64().unwrap())
        .sum()
}

fn get_health(server: &Server) -> Value {
    let auth = format!("Bearer {TOKEN}");
    raw(
        &server.base,
        "GET /api/v1/health",
        &[("Authorization", &auth)],
        "",
    )
    .1
}

/// Waits (bounded) until the engine has accepted more than `before` events.
fn still_ingesting(server: &Server, before: u64, after: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = accepted(server);
        if now > before {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "ingest stopped after {after}: {}",
            get_health(server)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn chain(n: usize) -> String {
    let mut s = String::from("SELECT 1");
    for _ in 1..n {
        s.push_str("+1");
    }
    s
}

async fn pg(server: &Server) -> Result<Client, tokio_postgres::Error> {
    let addr = server.pg.as_ref().unwrap();
    let (host, port) = addr.split_once(':').unwrap();
    let (client, conn) = tokio_postgres::connect(
        &format!("host={host} port={port} user=storepulse password={PASSWORD}"),
        NoTls,
    )
    .await?;
    tokio::spawn(conn);
    Ok(client)
}

fn code(e: &tokio_postgres::Error) -> SqlState {
    e.code()
        .cloned()
        .unwrap_or_else(|| panic!("no SQLSTATE: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_queries_get_their_errors_and_the_server_keeps_ingesting() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut seen = still_ingesting(&server, 0, "start");

    // 1. Deep statements, HTTP.
    for n in [2_000, 10_000, 100_000] {
        let (status, v) = post_sql(&server, TOKEN, "application/sql", &chain(n));
        assert_eq!(
            (status, v["code"].as_str()),
            (400, Some("too_complex")),
            "{n}: {v}"
        );
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("expression depth exceeds 1000"),
            "{v}"
        );
    }
    let (status, v) = raw(
        &server.base,
        &format!(
            "GET /api/v1/query?sql={}",
            chain(2_000).replace(' ', "%20").replace('+', "%2B")
        ),
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        "",
    );
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("too_complex")),
        "{v}"
    );
    seen = still_ingesting(&server, seen, "deep HTTP statements");

    // 2. Deep statements, pgwire: simple and extended protocol.
    let client = pg(&server).await.unwrap();
    for n in [2_000, 10_000, 100_000] {
        let e = client.simple_query(&chain(n)).await.unwrap_err();
        assert_eq!(code(&e), SqlState::STATEMENT_TOO_COMPLEX, "{n}: {e}");
        let e = client.prepare(&chain(n)).await.unwrap_err();
        assert_eq!(code(&e), SqlState::STATEMENT_TOO_COMPLEX, "{n}: {e}");
    }
    let row = client.query_one("SELECT 1 + 1 AS two", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 2);
    seen = still_ingesting(&server, seen, "deep pgwire statements");

    // 3. SET: shared settings refused, client settings per connection.
    for set in [
        "SET datafusion.runtime.memory_limit = '1K'",
        "SET datafusion.runtime.temp_directory = '/tmp/storepulse-spill'",
        "SET datafusion.execution.batch_size = 1",
        "SET work_mem = '1GB'",
    ] {
        let e = client.simple_query(set).await.unwrap_err();
        assert_eq!(code(&e), SqlState::INSUFFICIENT_PRIVILEGE, "{set}: {e}");
        let e = client.prepare(set).await.unwrap_err();
        assert_eq!(code(&e), SqlState::INSUFFICIENT_PRIVILEGE, "{set}: {e}");
    }
    // Every other client still runs with the server's limits.
    let (status, v) = post_sql(
        &server,
        TOKEN,
        "application/sql",
        "SELECT count(*) AS n FROM generate_series(1, 100000)",
    );
    assert_eq!(status, 200, "{v}");
    for set in [
        "SET extra_float_digits = 3",
        "SET application_name = 'hostile-test'",
        "SET DateStyle = ISO",
        "SET client_encoding = 'UTF8'",
        "SET search_path = public",
        "SET TIME ZONE 'UTC'",
        "SET statement_timeout = 5000",
    ] {
        client
            .simple_query(set)
            .await
            .unwrap_or_else(|e| panic!("{set}: {e}"));
    }
    let e = client
        .simple_query("SET search_path = nope")
        .await
        .unwrap_err();
    assert_eq!(code(&e), SqlState::INVALID_SCHEMA_NAME, "{e}");
    let show = |rows: Vec<tokio_postgres::SimpleQueryMessage>| {
        rows.into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .unwrap()
    };
    let mine = show(client.simple_query("SHOW application_name").await.unwrap());
    assert_eq!(mine, "hostile-test");
    let other = pg(&server).await.unwrap();
    let theirs = show(other.simple_query("SHOW application_name").await.unwrap());
    assert_ne!(theirs, "hostile-test", "settings stay on their connection");
    drop(other);

    // 4. A result over max_result_bytes: the documented error, and the
    //    server answers the next query.
    let huge = "SELECT repeat('x', 1000000) AS s FROM generate_series(1, 150)";
    let (status, v) = post_sql(&server, TOKEN, "application/sql", huge);
    assert_eq!(
        (status, v["code"].as_str()),
        (413, Some("result_limit")),
        "{v}"
    );
    let e = client.simple_query(huge).await.unwrap_err();
    assert_eq!(code(&e), SqlState::PROGRAM_LIMIT_EXCEEDED, "{e}");
    seen = still_ingesting(&server, seen, "huge results");

    // 5. Bodies and query strings: JSON errors, never a dropped connection.
    for body in [";", "-- just a comment", " ; ; "] {
        let (status, v) = post_sql(&server, TOKEN, "application/sql", body);
        assert_eq!(status, 400, "{body:?}: {v}");
        assert!(v["error"].is_string(), "{body:?}: {v}");
    }
    let big = format!("SELECT '{}'", "x".repeat(3 << 20));
    let (status, v) = post_sql(&server, TOKEN, "application/sql", &big);
    assert_eq!(
        (status, v["code"].as_str()),
        (413, Some("request_too_large")),
        "{v}"
    );
    let (status, v) = raw(
        &server.base,
        "GET /api/v1/query?sql=SELECT%201&bogus=1",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        "",
    );
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("bad_request")),
        "{v}"
    );

    // 6. Browsers: no DDL by GET or by a form-like POST, no foreign Host or
    //    Origin; the admin's JSON/SQL POST still defines views.
    let ddl = "CREATE VIEW hostile_v AS SELECT 1 AS one";
    let admin = format!("Bearer {ADMIN}");
    let (status, v) = raw(
        &server.base,
        "GET /api/v1/query?sql=CREATE%20VIEW%20hostile_v%20AS%20SELECT%201",
        &[("Authorization", &admin)],
        "",
    );
    assert_eq!(
        (status, v["code"].as_str()),
        (403, Some("read_only")),
        "{v}"
    );
    assert!(v["error"].as_str().unwrap().contains("never GET"), "{v}");
    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        let (status, v) = post_sql(&server, ADMIN, ct, ddl);
        assert_eq!(
            (status, v["code"].as_str()),
            (403, Some("read_only")),
            "{ct}: {v}"
        );
        assert!(v["error"].as_str().unwrap().contains("Content-Type"), "{v}");
    }
    let (status, v) = raw(
        &server.base,
        "POST /api/v1/query",
        &[
            ("Authorization", &admin),
            ("Content-Type", "application/sql"),
            ("Origin", "http://evil.example"),
        ],
        ddl,
    );
    assert_eq!(
        (status, v["code"].as_str()),
        (403, Some("cross_origin")),
        "{v}"
    );
    let (status, v) = raw(
        &server.base,
        "GET /api/v1/health",
        &[
            ("Authorization", &admin),
            ("Host", "rebound.evil.example:8080"),
        ],
        "",
    );
    assert_eq!(
        (status, v["code"].as_str()),
        (421, Some("host_not_allowed")),
        "{v}"
    );
    let same_origin = server.base.clone();
    let (status, v) = raw(
        &server.base,
        "POST /api/v1/query",
        &[
            ("Authorization", &admin),
            ("Content-Type", "application/sql"),
            ("Origin", &same_origin),
        ],
        ddl,
    );
    assert_eq!(status, 200, "same origin, admin, application/sql: {v}");

    // 7. CREATE ALERT at run time is refused; the failing rule is a fault.
    let (status, v) = post_sql(
        &server,
        ADMIN,
        "application/sql",
        "CREATE ALERT later AS SELECT store_id FROM stores WITH (key = 'store_id')",
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("configured at start"),
        "{v}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let health = loop {
        let h = get_health(&server);
        let faults = h["faults"].as_array().unwrap();
        if faults
            .iter()
            .any(|f| f.as_str().unwrap().contains("alert rule broken"))
        {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "the failing rule never became a fault: {h}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(health["status"], "degraded", "{health}");
    let rule = health["alerts"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "broken")
        .unwrap();
    assert!(
        rule["consecutive_failures"].as_u64().unwrap() >= 3,
        "{health}"
    );
    assert!(
        rule["last_error"].as_str().unwrap().contains("Cast"),
        "{health}"
    );

    // 8. Sockets that never log in.
    let pg_addr = server.pg.clone().unwrap();
    let silent: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(&pg_addr).unwrap())
        .collect();
    // They hold no session slot: real clients log in past them ...
    let mut sessions = vec![client];
    while sessions.len() < 4 {
        sessions.push(pg(&server).await.expect("a free session slot"));
    }
    // ... up to max_connections; the next gets 53300.
    let Err(e) = pg(&server).await else {
        panic!("a fifth session past max_connections = 4");
    };
    assert_eq!(code(&e), SqlState::TOO_MANY_CONNECTIONS, "{e}");
    drop(sessions);
    // Past the startup cap (12 sockets logging in), 53300 at once; the
    // others are closed at their startup timeout (8 s).
    let more: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(&pg_addr).unwrap())
        .collect();
    let mut refused = 0;
    for mut s in more {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        if String::from_utf8_lossy(&buf).contains("53300") {
            refused += 1;
        }
    }
    assert!(
        refused >= 4,
        "{refused} of 8 sockets past the startup cap got 53300"
    );
    // The silent ones are closed after startup_timeout: EOF.
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).unwrap(), 0, "closed by the server");
    }
    let client = pg(&server).await.expect("slots free again");
    client.simple_query("SELECT 1").await.unwrap();
    still_ingesting(&server, seen, "the socket attacks");
    assert_eq!(get_health(&server)["pipeline"], "running");
}
