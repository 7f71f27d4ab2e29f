//! Shared by the bench harnesses: the synthetic receipt generator, the
//! three foundation views, percentiles and memory readings.
#![allow(dead_code)] // each harness uses a subset

use std::{
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use storepulse_ingest::{source::Position, EventDecoder, RawRecord, SourceBatch, StreamKind};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The three foundation views (issue #2).
pub(crate) const VIEWS: &str = "
CREATE MATERIALIZED VIEW hourly AS
SELECT store_id, sku, date_bin(INTERVAL '1 hour', ts) AS window_start,
       sum(qty) AS units, sum(qty * unit_price) AS revenue
FROM sales GROUP BY store_id, sku, date_bin(INTERVAL '1 hour', ts);
CREATE MATERIALIZED VIEW hopping AS
SELECT store_id, sku, window_start, sum(qty) AS units, count(*) AS lines
FROM (SELECT *, unnest(hop(ts, INTERVAL '1 hour', INTERVAL '24 hours')) AS window_start FROM sales)
GROUP BY store_id, sku, window_start;
CREATE MATERIALIZED VIEW members AS
SELECT member_id, count(*) AS lines, sum(qty * unit_price) AS spend, max(ts) AS last_seen
FROM sales WHERE member_id IS NOT NULL GROUP BY member_id;
";

/// `n` receipts over ~3 days, 1,000 stores × 1,000 SKUs, 200,000 members.
pub(crate) fn generate(n: usize, seed: u64, all_keys: bool) -> Vec<String> {
    generate_over(n, seed, all_keys, 3)
}

/// [`generate`] with the receipts spread evenly over `days` days of event
/// time (a multi-year backfill: `days` = 1460).
#[allow(dead_code)] // not every bench spreads its events
pub(crate) fn generate_over(n: usize, seed: u64, all_keys: bool, days: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let start = 1_767_571_200_000i64;
    let step = (days.max(1) as i64 * 86_400_000) / n.max(1) as i64;
    (0..n)
        .map(|i| {
            let (store, sku) = if all_keys {
                (i % 1000, (i / 1000) % 1000)
            } else {
                // Long tail: low SKU numbers sell more.
                let u: f64 = rng.random();
                (rng.random_range(0..1000), ((u * u * u) * 1000.0) as usize)
            };
            let ts = start + i as i64 * step + rng.random_range(0..60_000);
            let member = if rng.random_bool(0.4) {
                format!(r#","member_id":"M{:06}""#, rng.random_range(0..200_000))
            } else {
                String::new()
            };
            let extra = if rng.random_bool(0.2) {
                format!(r#",{{"sku":"P{:04}","qty":1,"unit_price":2.50}}"#, rng.random_range(0..1000))
            } else {
                String::new()
            };
            format!(
                r#"{{"event_id":"e{i}","ts":{ts},"store_id":"S{store:04}","receipt_id":"r{i}"{member},"channel":"pos","lines":[{{"sku":"P{sku:04}","qty":{},"unit_price":{}.{:02}}}{extra}]}}"#,
                rng.random_range(1..4),
                rng.random_range(1..20),
                rng.random_range(0..100)
            )
        })
        .collect()
}

/// A memory figure of this process from /proc/self/status, in MB
/// (`VmHWM`: peak resident set; `VmRSS`: current).
pub(crate) fn proc_status_mb(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The `p` percentile of sorted durations, in milliseconds.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Events per decoded batch.
pub(crate) const BATCH: usize = 8192;

pub(crate) fn records(chunk: &[String]) -> Vec<RawRecord<'_>> {
    chunk
        .iter()
        .map(|l| RawRecord {
            bytes: l.as_bytes(),
            position: 0,
        })
        .collect()
}

/// Decodes `lines` on a separate thread, in batches, into a channel.
pub(crate) fn decode_thread(lines: Arc<Vec<String>>) -> mpsc::Receiver<(SourceBatch, Instant)> {
    let (tx, rx) = mpsc::sync_channel(8);
    std::thread::spawn(move || {
        let mut dec = EventDecoder::new(StreamKind::Sales, "bench");
        for (c, chunk) in lines.chunks(BATCH).enumerate() {
            let t = Instant::now();
            let recs = records(chunk);
            let out = dec.decode(&recs).expect("decode");
            assert!(out.dead_letters.is_empty());
            let batch = SourceBatch {
                stream: StreamKind::Sales,
                batch: out.batch.expect("rows"),
                events: out.events,
                bytes: chunk.iter().map(|l| l.len()).sum(),
                position: Position {
                    partition: "bench".into(),
                    next_offset: c as u64,
                },
            };
            if tx.send((batch, t)).is_err() {
                return;
            }
        }
    });
    rx
}

/// CPU time (user + system) a process has used so far, in seconds, from
/// `/proc/PID/stat` (`pid` 0: this process). NaN when it is gone.
pub(crate) fn cpu_secs(pid: u32) -> f64 {
    let path = if pid == 0 {
        "/proc/self/stat".to_string()
    } else {
        format!("/proc/{pid}/stat")
    };
    let Ok(stat) = std::fs::read_to_string(path) else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name: state is field 3, utime
    // 14 and stime 15, in USER_HZ (100 on Linux) ticks.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}
