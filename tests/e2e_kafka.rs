//! End-to-end against a real Kafka-protocol broker process (`tansu`, memory
//! storage, loopback only): `storepulse replay` publishes a generated
//! dataset, `storepulse run` consumes it with a Kafka source, and the HTTP
//! answers equal the batch oracle. Two processes in one consumer group split
//! the partitions and together give the same rows as one. A broker that is
//! not there fails the start quickly, naming it.
//!
//! Needs `tansu` on PATH or in ~/.cargo/bin (`.ci/run` installs it).

use std::{
    collections::{BTreeSet, HashSet},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use storepulse_ingest::StreamKind;
use storepulse_testkit::process::{free_port, tansu_bin, Server, Tansu};

const BIN: &str = env!("CARGO_BIN_EXE_storepulse");
const PARTITIONS: usize = 4;

/// A tansu broker for this test (installed by `.ci/run`).
fn broker() -> Tansu {
    let bin = tansu_bin().expect(
        "tansu not found: install it with `cargo install tansu --locked --features dynostore` \
         (bash .ci/run does)",
    );
    Tansu::start(&bin)
}

fn gen(out: &Path) {
    storepulse_testkit::process::gen_dataset(BIN, out, [8, 40, 300, 1], 21);
}

fn replay(broker: &Tansu, data: &Path, prefix: &str) -> u64 {
    let out = Command::new(BIN)
        .arg("replay")
        .arg(data)
        .args([
            "--brokers",
            &broker.addr,
            "--create-topics",
            "--topic-prefix",
            prefix,
        ])
        .args(["--partitions", &PARTITIONS.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "replay failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "           total: N events (...)"
    let total = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("total: "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no total in: {stdout}"));
    let lines: u64 = std::fs::read_dir(data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .map(|p| std::fs::read_to_string(p).unwrap().lines().count() as u64)
        .sum();
    assert_eq!(total, lines, "replay published every line once");
    total
}

fn config(
    dir: &Path,
    name: &str,
    broker: &Tansu,
    group: &str,
    prefix: &str,
    until_eof: bool,
) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
data_dir = "state-{name}"
until_eof = {until_eof}
[engine]
# No event is late: processes with different partitions see different
# watermarks, and the comparison here is about partitions, not lateness.
allowed_lateness = "30d"
[http]
listen = "127.0.0.1:0"
[[sources]]
type = "kafka"
brokers = "{}"
group_id = "{group}"
topic_prefix = "{prefix}"
batch_linger = "20ms"
connect_timeout = "10s"
"#,
            broker.addr
        ),
    )
    .unwrap();
    path
}

/// Rows of a view as sorted strings.
fn rows(server: &Server, sql: &str) -> Vec<String> {
    let mut v: Vec<String> = server.rows(sql).iter().map(|r| r.to_string()).collect();
    v.sort();
    v
}

fn accepted(server: &Server) -> u64 {
    server.get("/api/v1/health")["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["accepted_events"].as_u64().unwrap())
        .sum()
}

const VIEWS: [&str; 3] = [
    "SELECT store_id, window_start, receipts, units, CAST(revenue AS VARCHAR) AS revenue FROM sales_by_store_hourly",
    "SELECT * FROM stock_movement_totals",
    "SELECT store_id, sku, window_start, units FROM sku_sales_24h",
];

#[test]
fn replay_to_a_real_broker_then_run_matches_the_oracle_and_a_group_splits_the_work() {
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gen");
    gen(&data);
    let published = replay(&broker, &data, "storepulse.");

    // One process, until the end of every partition.
    // One process. Not `until_eof`: tansu 0.6 answers ListOffsets with a
    // high watermark below the partition's last offset, so "the end" is
    // instead "every published message applied" (read from /api/v1/health).
    let one = Server::start(
        BIN,
        &config(dir.path(), "one", &broker, "e2e-one", "storepulse.", false),
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    let health = loop {
        let h = one.get("/api/v1/health");
        let applied: u64 = h["positions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["next_offset"].as_u64().unwrap())
            .sum();
        if applied == published {
            break h;
        }
        assert!(applied < published, "{h}");
        assert!(Instant::now() < deadline, "not every message applied: {h}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        health["kafka"][0]["assigned"].as_array().unwrap().len(),
        StreamKind::ALL.len() * PARTITIONS
    );
    // Against the batch oracle (nothing late with 30 d lateness).
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let script: String = storepulse_testkit::builtin_script();
    let dims = storepulse_engine::DimensionKind::ALL.map(|k| (k.name(), k.schema()));
    let want = rt.block_on(storepulse_testkit::oracle_views(
        &script,
        &data,
        &HashSet::new(),
        &dims,
    ));
    for view in [
        "sales_by_store_hourly",
        "stock_movement_totals",
        "member_activity",
    ] {
        let (status, body) = one.query(&format!("SELECT * FROM {view}"), "text/csv");
        assert_eq!(status, 200);
        let got: BTreeSet<String> = String::from_utf8(body)
            .unwrap()
            .lines()
            .skip(1)
            .map(str::to_string)
            .collect();
        assert_eq!(
            got.len(),
            want[view].len(),
            "{view}: row count vs the oracle"
        );
    }
    let single: Vec<Vec<String>> = VIEWS.iter().map(|q| rows(&one, q)).collect();
    let total = accepted(&one);
    assert!(total > 1000, "{total}");
    // Exact values: the oracle's sales_by_store_hourly, through the same
    // normalisation as the engine tests.
    let got = rt.block_on(async {
        let (_, body) = one.query(
            "SELECT * FROM sales_by_store_hourly",
            "application/vnd.apache.arrow.stream",
        );
        let reader =
            arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None).unwrap();
        let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
        storepulse_testkit::normalize(&batches)
    });
    assert_eq!(
        got, want["sales_by_store_hourly"],
        "streamed view differs from the batch oracle"
    );
    assert!(one.stop().success());

    // Two processes in one group: both join (on fresh, empty topics) and
    // split the partitions, then the dataset arrives.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    for k in storepulse_ingest::StreamKind::ALL {
        std::fs::write(empty.join(format!("{}.jsonl", k.name())), "").unwrap();
    }
    assert_eq!(replay(&broker, &empty, "two."), 0);
    let a = Server::start(
        BIN,
        &config(dir.path(), "a", &broker, "e2e-two", "two.", false),
    );
    let b = Server::start(
        BIN,
        &config(dir.path(), "b", &broker, "e2e-two", "two.", false),
    );
    let assigned = |s: &Server| -> BTreeSet<String> {
        s.get("/api/v1/health")["kafka"][0]["assigned"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let (pa, pb) = loop {
        let (pa, pb) = (assigned(&a), assigned(&b));
        if pa.len() + pb.len() == StreamKind::ALL.len() * PARTITIONS
            && pa.is_disjoint(&pb)
            && !pa.is_empty()
            && !pb.is_empty()
        {
            break (pa, pb);
        }
        assert!(
            Instant::now() < deadline,
            "group did not settle: {pa:?} {pb:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    replay(&broker, &data, "two.");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (ta, tb) = (accepted(&a), accepted(&b));
        if ta + tb == total {
            break;
        }
        assert!(ta + tb <= total, "double counted: {ta} + {tb} > {total}");
        assert!(
            Instant::now() < deadline,
            "group did not catch up: {ta} + {tb} of {total}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        (assigned(&a), assigned(&b)),
        (pa, pb),
        "no rebalance while consuming"
    );
    // Partitions are keyed by store: the union of both processes' rows is
    // the single process's rows.
    for (i, q) in VIEWS.iter().enumerate() {
        let mut union = rows(&a, q);
        union.extend(rows(&b, q));
        union.sort();
        assert_eq!(union, single[i], "{q}: two processes differ from one");
    }
    assert!(a.stop().success());
    assert!(b.stop().success());
}

#[test]
fn an_unreachable_broker_fails_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(); // nothing listens there
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[sources]]\ntype = 'kafka'\nbrokers = '127.0.0.1:{port}'\nconnect_timeout = '2s'\n[http]\nlisten = '127.0.0.1:0'\n"
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot reach Kafka brokers '127.0.0.1:{port}'")),
        "{err}"
    );
}
