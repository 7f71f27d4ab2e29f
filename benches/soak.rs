//! Soak test (issue #8; a bench, not run in CI): the real binary ingests
//! the live generator at a steady rate for `SOAK_SECS` (default 1,800 s =
//! 30 minutes) with every built-in view and alert rule, checkpoints every
//! 10 s, the lake archive and a dashboard-like query load, while the
//! process's resident set size (`VmRSS` of `/proc/<pid>/status`) is sampled
//! every `SOAK_SAMPLE_SECS` (10).
//!
//! The generator's event time is the wall clock, so the engine's
//! time-bounded state settles once the longest horizon has passed: the run
//! sets `allowed_lateness = "5m"` (the retail ledgers keep every row younger
//! than the watermark minus the lateness, so their state is proportional to
//! event rate × lateness: at the default 1 h and ~4,000 events/s they grew
//! to 2 GB in 20 minutes, still filling their window) and
//! `dedup_horizon = "10m"` (the default 24 h would keep growing the
//! de-duplication set for a day: that is its bound, not a leak; see
//! docs/checkpoints.md "Bounded state"), and gives the member views a
//! 10-minute `state_ttl`: the generator's shoppers get a new local card id
//! at every store they visit, so the member key space grows all day (a
//! first soak without the TTL grew `member_activity` by ~9 KB per new card;
//! BENCHMARKS.md). The verdict is taken after a
//! warm-up of a third of the run (at least the horizon): a least-squares
//! line through the remaining RSS samples must rise by less than 10 % of
//! their mean over that window, else the bench fails.
//!
//! Writes the samples to `<SOAK_OUT>/soak.csv` and a plot to
//! `<SOAK_OUT>/soak_rss.svg` (`SOAK_OUT` defaults to `target/soak`).
//!
//! `cargo bench --bench soak` (`SOAK_RATE`, default 20,000 events/s).

use std::{
    io::Write,
    path::PathBuf,
    time::{Duration, Instant},
};

use plotters::prelude::*;
use storepulse_testkit::process::Server;

const BIN: &str = env!("CARGO_BIN_EXE_storepulse");

fn env_num(key: &str, default: f64) -> f64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `VmRSS` of process `pid`, in MB.
fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// One sample.
struct Sample {
    secs: f64,
    rss_mb: f64,
    state_mb: f64,
    accepted: u64,
    query_ms: f64,
}

/// Least-squares slope of `y` over `x`.
fn slope(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let var: f64 = x.iter().map(|a| (a - mx) * (a - mx)).sum();
    if var == 0.0 {
        0.0
    } else {
        cov / var
    }
}

fn plot(path: &std::path::Path, samples: &[Sample], warmup: f64) {
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).expect("plot");
    let minutes = samples.last().map_or(1.0, |s| s.secs / 60.0).max(1.0);
    let top = samples
        .iter()
        .map(|s| s.rss_mb.max(s.state_mb))
        .fold(0.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "storepulse soak: resident memory over time",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..minutes, 0.0..top.max(1.0))
        .expect("plot");
    chart
        .configure_mesh()
        .x_desc("minutes")
        .y_desc("MB")
        .draw()
        .expect("plot");
    chart
        .draw_series(LineSeries::new(
            samples.iter().map(|s| (s.secs / 60.0, s.rss_mb)),
            &BLUE,
        ))
        .expect("plot")
        .label("RSS (VmRSS)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            samples.iter().map(|s| (s.secs / 60.0, s.state_mb)),
            &RED,
        ))
        .expect("plot")
        .label("engine state (views + dedup)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(warmup / 60.0, 0.0), (warmup / 60.0, top)],
            BLACK.mix(0.3),
        )))
        .expect("plot")
        .label("end of warm-up");
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .expect("plot");
    root.present().expect("plot");
}

fn main() {
    let secs = env_num("SOAK_SECS", 1800.0);
    let rate = env_num("SOAK_RATE", 20_000.0);
    let every = Duration::from_secs_f64(env_num("SOAK_SAMPLE_SECS", 10.0));
    let out = PathBuf::from(std::env::var("SOAK_OUT").unwrap_or_else(|_| "target/soak".into()));
    std::fs::create_dir_all(&out).expect("SOAK_OUT");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        r#"data_dir = "{data}"
[http]
listen = "127.0.0.1:0"
[engine]
allowed_lateness = "5m"
dedup_horizon = "10m"
state_ttl = {{ member_activity = "10m", member_purchases = "10m", member_identity = "10m" }}
[checkpoint]
interval = "10s"
[alerts]
[[alerts.sinks]]
name = "file"
type = "jsonl"
path = "{alerts}"
[[sources]]
type = "generator"
stores = 50
skus = 400
members = 20000
rate = {rate}
"#,
        data = dir.path().join("data").display(),
        alerts = dir.path().join("alerts.jsonl").display(),
    );
    let path = dir.path().join("storepulse.toml");
    std::fs::write(&path, config).expect("config");
    let server = Server::start(BIN, &path);
    let pid = server.pid();
    eprintln!(
        "soak: {secs} s at {rate} events/s, sampling every {every:?} (pid {pid}, data in {})",
        dir.path().display()
    );
    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut next = started;
    while started.elapsed().as_secs_f64() < secs {
        next += every;
        // A dashboard's reads between samples.
        let q = Instant::now();
        for sql in [
            "SELECT category, count(*), sum(suggested_order_qty) FROM stockout_risk GROUP BY category",
            "SELECT segment, count(*) FROM member_rfm GROUP BY segment",
            "SELECT * FROM sales_by_store_hourly ORDER BY window_start DESC LIMIT 50",
        ] {
            server.rows(sql);
        }
        let query_ms = q.elapsed().as_secs_f64() * 1000.0 / 3.0;
        let h = server.get("/api/v1/health");
        assert_eq!(h["pipeline"], "running", "the pipeline stopped: {h}");
        let accepted: u64 = h["streams"]
            .as_array()
            .expect("streams")
            .iter()
            .filter_map(|s| s["accepted_events"].as_u64())
            .sum();
        let s = Sample {
            secs: started.elapsed().as_secs_f64(),
            rss_mb: rss_mb(pid),
            state_mb: h["state_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
            accepted,
            query_ms,
        };
        eprintln!(
            "soak: {:>6.0} s  rss {:>7.1} MB  state {:>7.1} MB  accepted {:>11}  query {:>6.1} ms",
            s.secs, s.rss_mb, s.state_mb, s.accepted, s.query_ms
        );
        samples.push(s);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let faults = server.get("/api/v1/health")["faults"].clone();
    drop(server);

    let mut csv = std::fs::File::create(out.join("soak.csv")).expect("csv");
    writeln!(csv, "seconds,rss_mb,state_mb,accepted_events,query_ms").expect("csv");
    for s in &samples {
        writeln!(
            csv,
            "{:.1},{:.1},{:.2},{},{:.2}",
            s.secs, s.rss_mb, s.state_mb, s.accepted, s.query_ms
        )
        .expect("csv");
    }
    let warmup = (secs / 3.0).max(600.0f64.min(secs / 2.0));
    plot(&out.join("soak_rss.svg"), &samples, warmup);

    let after: Vec<&Sample> = samples.iter().filter(|s| s.secs >= warmup).collect();
    assert!(after.len() >= 3, "too short a run for a verdict");
    let x: Vec<f64> = after.iter().map(|s| s.secs).collect();
    let y: Vec<f64> = after.iter().map(|s| s.rss_mb).collect();
    let mean = y.iter().sum::<f64>() / y.len() as f64;
    let window = x[x.len() - 1] - x[0];
    let rise = slope(&x, &y) * window;
    let state: Vec<f64> = after.iter().map(|s| s.state_mb).collect();
    let state_rise = slope(&x, &state) * window;
    let first = &after[0];
    let last = after[after.len() - 1];
    let eps = (last.accepted - first.accepted) as f64 / window;
    let peak = samples.iter().map(|s| s.rss_mb).fold(0.0, f64::max);
    let mut q: Vec<f64> = samples.iter().map(|s| s.query_ms).collect();
    q.sort_by(f64::total_cmp);
    println!("soak ({secs:.0} s at a target of {rate:.0} events/s; verdict over {window:.0} s after a {warmup:.0} s warm-up)");
    println!(
        "  ingest                 {eps:>10.0} events/s ({} events in all)",
        samples.last().map_or(0, |s| s.accepted)
    );
    println!("  RSS mean / peak        {mean:>10.1} / {peak:.1} MB");
    println!(
        "  RSS trend over window  {rise:>+10.1} MB ({:+.1} % of the mean)",
        100.0 * rise / mean
    );
    println!(
        "  state trend            {state_rise:>+10.1} MB (mean {:.1} MB)",
        state.iter().sum::<f64>() / state.len() as f64
    );
    println!(
        "  dashboard query mean   {:>10.1} ms (p50 {:.1}, max {:.1})",
        q.iter().sum::<f64>() / q.len() as f64,
        q[q.len() / 2],
        q[q.len() - 1]
    );
    println!("  faults at the end      {faults}");
    println!(
        "  samples: {}, plot: {}",
        out.join("soak.csv").display(),
        out.join("soak_rss.svg").display()
    );
    assert!(
        rise.abs() < 0.10 * mean,
        "RSS is not flat: {rise:+.1} MB over {window:.0} s (mean {mean:.1} MB)"
    );
    println!("  verdict                flat");
}
