//! Streaming against the best batch engine on the hourly shape (issue #23,
//! target 2).
//!
//! One JSONL file of `sales` receipts (several lines each) spread over
//! years of event time, and one tumbling sum per store and hour over it:
//!
//! * the real `storepulse` binary, `run --exit-when-done` over the file with
//!   that one view, in three configurations: the lake off with one decode
//!   thread (the reader before parallel decoding), the lake off with the
//!   default decode threads, and the default config (raw archive on);
//! * DuckDB (the Python package the lake tests already use) over the same
//!   file and the same aggregation, with as many threads as cores.
//!
//! Each is run `BENCH_REPEAT` times, alternating; the medians are printed
//! with the process wall time (storepulse: start to exit, including the
//! final checkpoint; DuckDB: the query alone, without the interpreter's
//! start), the CPU seconds (from `/usr/bin/time` when present) and the
//! ratio to DuckDB. Both count the groups, and the bench fails if they
//! differ.
//!
//! `cargo bench --bench hourly` (env: `BENCH_RECEIPTS`, default 622,072,
//! the issue's public data set; `BENCH_SPAN_DAYS`, default 1,460;
//! `BENCH_REPEAT`, default 3; `BENCH_HOURLY_DIR` to keep the files
//! somewhere other than a temp directory). DuckDB is skipped, with a note,
//! when `python3 -c 'import duckdb'` fails.

use std::{
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const STORES: usize = 450;
const SKUS: usize = 92_000;

const VIEW: &str = "CREATE MATERIALIZED VIEW store_hourly AS
SELECT store_id, date_bin(INTERVAL '1 hour', ts) AS window_start,
       sum(qty) AS units, sum(qty * unit_price) AS revenue, count(*) AS lines
FROM sales GROUP BY store_id, date_bin(INTERVAL '1 hour', ts);
";

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// Writes `n` receipts in event-time order over `days`: 450 stores, 1 to
/// 18 lines (mean ~9.5) over a long tail of 92,000 SKUs, prices with two
/// decimals, 40 % with a member. Returns the number of lines.
fn write_receipts(path: &Path, n: usize, days: u64) -> usize {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path).expect("create"));
    let start = 1_609_459_200_000i64; // 2021-01-01
    let step = (days.max(1) as i64 * 86_400_000) / n.max(1) as i64;
    let mut lines = 0;
    let mut line = String::with_capacity(2048);
    for i in 0..n {
        let store = rng.random_range(0..STORES);
        let ts = start + i as i64 * step + rng.random_range(0..step.max(1));
        line.clear();
        line.push_str(&format!(
            r#"{{"event_id":"r{i}","ts":{ts},"store_id":"S{store:04}","receipt_id":"r{i}","#
        ));
        if rng.random_bool(0.4) {
            line.push_str(&format!(
                r#""member_id":"M{:07}","#,
                rng.random_range(0..1_000_000)
            ));
        }
        line.push_str(r#""channel":"pos","lines":["#);
        let k = rng.random_range(1..=18);
        for j in 0..k {
            let u: f64 = rng.random();
            let sku = ((u * u * u) * SKUS as f64) as usize;
            if j > 0 {
                line.push(',');
            }
            line.push_str(&format!(
                r#"{{"sku":"P{sku:06}","qty":{},"unit_price":{}.{:02}}}"#,
                rng.random_range(1..4),
                rng.random_range(0..30),
                rng.random_range(0..100)
            ));
        }
        lines += k;
        line.push_str("]}\n");
        out.write_all(line.as_bytes()).expect("write");
    }
    out.flush().expect("flush");
    lines
}

/// One timed run: wall seconds, CPU seconds (NaN when unknown), groups.
struct Timed {
    wall: f64,
    cpu: f64,
    groups: u64,
}

fn have_time() -> bool {
    Path::new("/usr/bin/time").exists()
}

/// `cmd` under `/usr/bin/time -f "%U %S"` when present; the CPU seconds are
/// the last line of its stderr.
fn timed(bin: &str, args: &[&str]) -> (f64, f64, String) {
    let mut cmd = if have_time() {
        let mut c = Command::new("/usr/bin/time");
        c.args(["-f", "cpu %U %S", bin]);
        c
    } else {
        Command::new(bin)
    };
    let started = Instant::now();
    let out = cmd.args(args).output().expect("run");
    let wall = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{bin} {args:?} failed: {}\n{}",
        out.status,
        stderr.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    let cpu = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("cpu "))
        .map_or(f64::NAN, |l| {
            l.split_whitespace()
                .filter_map(|v| v.parse::<f64>().ok())
                .sum()
        });
    (wall, cpu, stderr)
}

struct Variant {
    label: &'static str,
    lake: bool,
    decode_threads: Option<usize>,
}

fn storepulse(dir: &Path, v: &Variant, run: usize) -> Timed {
    let data = dir.join(format!("data-{run}"));
    let _ = std::fs::remove_dir_all(&data);
    let mut cfg = format!(
        "data_dir = {:?}\nuntil_eof = true\n[sql]\nbuiltin = false\nfiles = [{:?}]\n\
         [alerts]\nbuiltin = false\n[http]\nlisten = \"127.0.0.1:0\"\n[[sources]]\ntype = \"file\"\nstream = \"sales\"\npath = {:?}\n",
        data,
        dir.join("store_hourly.sql"),
        dir.join("sales.jsonl"),
    );
    if !v.lake {
        cfg.push_str("[lake]\nenabled = false\n");
    }
    if let Some(t) = v.decode_threads {
        cfg.push_str(&format!("[pipeline]\ndecode_threads = {t}\n"));
    }
    let path = dir.join("hourly.toml");
    std::fs::write(&path, cfg).expect("config");
    let bin = env!("CARGO_BIN_EXE_storepulse");
    let (wall, cpu, log) = timed(
        bin,
        &[
            "run",
            "-c",
            path.to_str().expect("utf-8 path"),
            "--exit-when-done",
        ],
    );
    // The exit log: `view state view=store_hourly groups=N ...`.
    let groups = log
        .lines()
        .filter(|l| l.contains("view state") && l.contains("store_hourly"))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("groups="))
                .and_then(|g| g.parse().ok())
        })
        .unwrap_or_else(|| panic!("no `view state` line for store_hourly in:\n{log}"));
    let _ = std::fs::remove_dir_all(&data);
    Timed { wall, cpu, groups }
}

const DUCKDB: &str = r#"
import duckdb, os, sys, time
con = duckdb.connect()
con.execute(f"SET threads = {os.cpu_count()}")
t = time.time()
groups, units = con.execute("""
SELECT count(*), sum(units) FROM (
  SELECT store_id, time_bucket(INTERVAL 1 hour, epoch_ms(ts)) AS window_start,
         sum(l.qty) AS units, sum(l.qty * l.unit_price) AS revenue, count(*) AS lines
  FROM (SELECT store_id, ts, unnest(lines) AS l
        FROM read_json(?, format = 'newline_delimited',
             columns = {'store_id': 'VARCHAR', 'ts': 'BIGINT',
                        'lines': 'STRUCT(sku VARCHAR, qty BIGINT, unit_price DECIMAL(18,4))[]'}))
  GROUP BY ALL)""", [sys.argv[1]]).fetchone()
print(f"duckdb {time.time() - t:.4f} {groups} {units}")
"#;

fn duckdb(dir: &Path) -> Option<Timed> {
    let script = dir.join("hourly_duckdb.py");
    std::fs::write(&script, DUCKDB).expect("script");
    let file = dir.join("sales.jsonl");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&file)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "DuckDB skipped: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find_map(|l| l.strip_prefix("duckdb "))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let wall: f64 = f.first()?.parse().ok()?;
    // The query's CPU is not separable from the interpreter's: not reported.
    Some(Timed {
        wall,
        cpu: f64::NAN,
        groups: f.get(1)?.parse().ok()?,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let receipts = env_or("BENCH_RECEIPTS", 622_072) as usize;
    let days = env_or("BENCH_SPAN_DAYS", 1_460);
    let repeat = env_or("BENCH_REPEAT", 3).max(1) as usize;
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir: PathBuf = std::env::var_os("BENCH_HOURLY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("store_hourly.sql"), VIEW).expect("view");
    let started = Instant::now();
    let lines = write_receipts(&dir.join("sales.jsonl"), receipts, days);
    let bytes = std::fs::metadata(dir.join("sales.jsonl"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "hourly shape: {receipts} receipts, {lines} lines over {days} days, {STORES} stores, \
         {:.0} MB of JSONL (written in {:.1} s); {} cores; {repeat} runs each, medians",
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let variants = [
        Variant {
            label: "storepulse, lake off, 1 decode thread",
            lake: false,
            decode_threads: Some(1),
        },
        Variant {
            label: "storepulse, lake off, default decode threads",
            lake: false,
            decode_threads: None,
        },
        Variant {
            label: "storepulse, default config (archive on)",
            lake: true,
            decode_threads: None,
        },
    ];
    let mut results: Vec<Vec<Timed>> = (0..=variants.len()).map(|_| Vec::new()).collect();
    let mut have_duckdb = true;
    for run in 0..repeat {
        for (i, v) in variants.iter().enumerate() {
            results[i].push(storepulse(&dir, v, run));
        }
        if have_duckdb {
            match duckdb(&dir) {
                Some(t) => results[variants.len()].push(t),
                None => have_duckdb = false,
            }
        }
    }
    let groups: Vec<u64> = results.iter().flatten().map(|t| t.groups).collect();
    assert!(
        groups.windows(2).all(|w| w[0] == w[1]),
        "the engines disagree on the number of (store, hour) groups: {groups:?}"
    );
    let duck = (!results[variants.len()].is_empty())
        .then(|| median(results[variants.len()].iter().map(|t| t.wall).collect()));
    println!(
        "{} groups\n| engine | wall s | receipts/s | lines/s | CPU s | wall / DuckDB |",
        groups[0]
    );
    println!("|---|---|---|---|---|---|");
    let labels = variants
        .iter()
        .map(|v| v.label)
        .chain(std::iter::once("DuckDB (batch, query only)"));
    for (label, runs) in labels.zip(&results) {
        if runs.is_empty() {
            continue;
        }
        let wall = median(runs.iter().map(|t| t.wall).collect());
        let cpu = median(runs.iter().map(|t| t.cpu).collect());
        let all: Vec<String> = runs.iter().map(|t| format!("{:.2}", t.wall)).collect();
        println!(
            "| {label} | {wall:.2} ({}) | {:.0} | {:.0} | {} | {} |",
            all.join(", "),
            receipts as f64 / wall,
            lines as f64 / wall,
            if cpu.is_nan() {
                "—".to_string()
            } else {
                format!("{cpu:.2}")
            },
            duck.map_or("—".to_string(), |d| format!("{:.2} ×", wall / d)),
        );
    }
}
