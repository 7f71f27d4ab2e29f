//! Cost of the raw-event archive (issue #6).
//!
//! The foundation harness (decode on one thread, the engine with the three
//! foundation views on another, 8,192-event batches of `sales` receipts)
//! runs twice over the same events: without the lake, then with every
//! accepted batch handed to the archive (local file system lake in a temp
//! directory, default settings: zstd, 128 MiB files, 1 GiB buffer), as the
//! pipeline does, until everything is flushed to Parquet. A third run feeds
//! the decoded batches to the archive alone (its own throughput).
//!
//! `cargo bench --bench archive` (env: `BENCH_EVENTS`, default 2,000,000;
//! `BENCH_SPAN_DAYS`, the days of event time the receipts cover, default 3;
//! 1460 is a four-year backfill;
//! `BENCH_REPEAT`, pairs of lake off/on runs, default 3;
//! `BENCH_ARCHIVE_COMPRESSION`, the archive codec of the pairs, default the
//! configured default `lz4_raw`; `BENCH_ARCHIVE_DIR` to write somewhere other
//! than the temp directory). The archive-alone run is repeated for each
//! codec in `BENCH_ARCHIVE_CODECS` (default `lz4_raw,zstd(1),snappy,uncompressed`).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::{decode_thread, generate_over, percentile, VIEWS};
use storepulse_engine::{Engine, EngineConfig};
use storepulse_ingest::SourceMessage;
use storepulse_lake::{ArchiveConfig, Archiver, Lake, LakeConfig};

mod common;

fn lake(dir: &std::path::Path) -> Lake {
    Lake::open(
        &LakeConfig {
            url: Some(dir.display().to_string()),
            ..Default::default()
        },
        dir,
    )
    .expect("lake")
}

struct Run {
    eps: f64,
    lat: Vec<Duration>,
    flush_s: f64,
}

async fn streaming(lines: Arc<Vec<String>>, archive: Option<&Archiver>) -> Run {
    let mut engine = Engine::new(EngineConfig {
        allowed_lateness: Duration::from_secs(30 * 86_400),
        ..Default::default()
    })
    .expect("engine");
    engine.execute_sql(VIEWS).await.expect("views");
    let started = Instant::now();
    let rx = decode_thread(lines.clone());
    let mut lat = Vec::new();
    while let Ok((batch, t)) = rx.recv() {
        let r = engine
            .apply(SourceMessage::Batch(batch), 0)
            .await
            .expect("apply");
        if let (Some(a), Some(rows)) = (archive, r.accepted_rows) {
            a.archive("sales", rows).await.expect("archive");
        }
        lat.push(t.elapsed());
    }
    let mut flush_s = 0.0;
    if let Some(a) = archive {
        let t = Instant::now();
        assert!(a.flush(Duration::from_secs(600)).await, "flushed");
        flush_s = t.elapsed().as_secs_f64();
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    Run {
        eps: lines.len() as f64 / secs,
        lat,
        flush_s,
    }
}

fn dir_bytes(dir: &std::path::Path) -> (u64, usize) {
    let mut total = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                total.0 += e.metadata().map(|m| m.len()).unwrap_or(0);
                total.1 += 1;
            }
        }
    }
    total
}

fn print(name: &str, r: &Run) {
    println!(
        "{name:<34} {:>10.0} events/s   batch latency p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms{}",
        r.eps,
        percentile(&r.lat, 0.5),
        percentile(&r.lat, 0.99),
        percentile(&r.lat, 1.0),
        if r.flush_s > 0.0 {
            format!("   (final flush {:.2} s, included)", r.flush_s)
        } else {
            String::new()
        }
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = std::env::var("BENCH_ARCHIVE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| tmp.path().to_path_buf());
    let days: u64 = std::env::var("BENCH_SPAN_DAYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    println!("generating {n} receipts over {days} days of event time (JSON, in memory)...");
    let lines = Arc::new(generate_over(n, 7, false, days));

    // This machine's speed drifts by ±20 % between runs: lake off and on
    // alternate `BENCH_REPEAT` times (default 3) and the medians compare.
    let repeat: usize = std::env::var("BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let codec = |name: &str| ArchiveConfig {
        compression: name
            .parse()
            .expect("BENCH_ARCHIVE_COMPRESSION: a parquet codec"),
        ..ArchiveConfig::default()
    };
    let pair_codec =
        std::env::var("BENCH_ARCHIVE_COMPRESSION").unwrap_or_else(|_| "lz4_raw".into());
    let dir = base.join("with-views");
    let (mut offs, mut ons) = (Vec::new(), Vec::new());
    for i in 0..repeat {
        offs.push(streaming(lines.clone(), None).await);
        let _ = std::fs::remove_dir_all(&dir);
        let a = Archiver::start(lake(&dir), codec(&pair_codec));
        ons.push(streaming(lines.clone(), Some(&a)).await);
        assert_eq!(a.buffered_bytes(), 0);
        println!(
            "pair {}: lake off {:.0} events/s, lake on {:.0} events/s",
            i + 1,
            offs[i].eps,
            ons[i].eps
        );
    }
    let median = |mut v: Vec<Run>| {
        v.sort_by(|a, b| a.eps.total_cmp(&b.eps));
        v.swap_remove(v.len() / 2)
    };
    let (off, on) = (median(offs), median(ons));
    let (bytes, files) = dir_bytes(&dir);

    // The archive alone: decoded batches straight in, once per codec.
    let rx = decode_thread(lines.clone());
    let mut rows = 0usize;
    let mut decoded = Vec::new();
    while let Ok((b, _)) = rx.recv() {
        rows += b.batch.num_rows();
        decoded.push(b.batch);
    }
    let codecs = std::env::var("BENCH_ARCHIVE_CODECS")
        .unwrap_or_else(|_| "lz4_raw,zstd(1),snappy,uncompressed".into());
    let mut alone = Vec::new();
    for name in codecs.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let dir2 = base.join(format!("alone-{}", name.replace(['(', ')'], "")));
        let _ = std::fs::remove_dir_all(&dir2);
        let a = Archiver::start(lake(&dir2), codec(name));
        let t = Instant::now();
        for b in &decoded {
            a.archive("sales", b.clone()).await.expect("archive");
        }
        assert!(a.flush(Duration::from_secs(600)).await);
        let secs = t.elapsed().as_secs_f64();
        alone.push((name.to_string(), secs, dir_bytes(&dir2).0));
    }

    println!(
        "\n## archive cost: decode + 3 continuous views, {n} receipts over {days} days (medians of {repeat} runs)"
    );
    print("lake off", &off);
    print("lake on (archive every batch)", &on);
    println!(
        "archiving cost                      {:>9.1} % of ingest throughput",
        (1.0 - on.eps / off.eps) * 100.0
    );
    println!(
        "archive output                      {files} files, {:.1} MB Parquet ({pair_codec}), {:.1} bytes/event",
        bytes as f64 / 1e6,
        bytes as f64 / n as f64
    );
    for (name, secs, bytes) in alone {
        println!(
            "archive alone, {name:<14}       {:>10.0} events/s ({rows} rows = receipt lines, {secs:.2} s), {:.1} bytes/event",
            n as f64 / secs,
            bytes as f64 / n as f64
        );
    }
}
