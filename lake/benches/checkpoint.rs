//! Checkpoint cost and restore time for a state of `BENCH_CKPT_KEYS`
//! (default 1,000,000) keys (issue #8).
//!
//! One materialized view keyed by device (`count`, `sum`, `max`, `avg` per
//! key) over `BENCH_CKPT_KEYS` IoT readings, each a distinct device and a
//! distinct `event_id` (so the de-duplication set holds as many ids). Each
//! of `BENCH_REPEAT` (3) rounds takes a checkpoint (capture under the
//! engine lock, then encode and write to a local directory through
//! `CheckpointStore`), then restores it into a new engine (read, decode,
//! import) and checks a lookup. Reports the median of each phase and the
//! bytes written. Then the **catch-up** after a crash is measured on the
//! last restored engine: `BENCH_CKPT_CATCHUP` (default 1,000,000: one 10 s
//! checkpoint interval at 100,000 events/s) further readings for existing
//! devices, decoded from JSON and applied in micro-batches of 8,192, as a
//! restarted process re-reads them from its sources (broker fetch not
//! included). Recovery time = restore + catch-up.
//!
//! **Incremental** (the default `[checkpoint] incremental = true`): after
//! a whole checkpoint is stored, `BENCH_CKPT_CHANGED` (default 10,000: 1 %)
//! existing devices get a reading and an incremental checkpoint is taken
//! and written (the view as a delta of the changed keys; the
//! de-duplication set is still written whole), then restored through its
//! chain. Reported beside the whole one.
//!
//! `cargo bench --workspace --bench checkpoint` (`-p storepulse-lake` builds
//! the dependencies again with that package's features)

use std::time::{Duration, Instant};

use storepulse_engine::{Engine, EngineConfig};
use storepulse_ingest::StreamKind;
use storepulse_lake::{CheckpointConfig, CheckpointStore};

const VIEW: &str = "CREATE MATERIALIZED VIEW per_device AS
SELECT device_id, count(*) AS readings, sum(value) AS total, max(value) AS hottest, avg(value) AS mean
FROM iot_readings GROUP BY device_id";

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn engine() -> Engine {
    let mut e = Engine::new(EngineConfig {
        dedup_horizon: Duration::from_secs(365 * 86_400),
        ..Default::default()
    })
    .unwrap();
    e.execute_sql(VIEW).await.unwrap();
    e
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let keys = env_usize("BENCH_CKPT_KEYS", 1_000_000);
    let repeat = env_usize("BENCH_REPEAT", 3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut e = engine().await;
        let t = Instant::now();
        let chunk = 50_000;
        let base = 1_767_600_000_000i64;
        for (n, start) in (0..keys).step_by(chunk).enumerate() {
            let lines: Vec<String> = (start..(start + chunk).min(keys))
                .map(|i| {
                    format!(
                        r#"{{"event_id":"e{i}","ts":{},"store_id":"S{}","device_id":"d{i}","metric":"fridge_temp_c","value":{}.5}}"#,
                        base + i as i64,
                        i % 500,
                        i % 9
                    )
                })
                .collect();
            let msg = storepulse_testkit::json_message(StreamKind::IotReadings, &lines, "p0", n as u64 + 1)
                .unwrap()
                .unwrap();
            e.apply(msg, 0).await.unwrap();
        }
        eprintln!("loaded {keys} keys in {:.1} s", t.elapsed().as_secs_f64());
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(
            &CheckpointConfig {
                keep: 2,
                ..Default::default()
            },
            dir.path(),
        )
        .unwrap();
        let (mut capture, mut write, mut read, mut import) = (vec![], vec![], vec![], vec![]);
        let mut bytes = 0;
        let mut restored = None;
        for _ in 0..repeat {
            let t = Instant::now();
            let cp = e.checkpoint().unwrap();
            capture.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let m = store.write(&cp, None).await.unwrap();
            write.push(t.elapsed().as_secs_f64());
            bytes = m.bytes();
            e.checkpoint_stored(&cp);
            drop(cp);
            let t = Instant::now();
            let (_, cp) = store.latest().await.unwrap().unwrap();
            read.push(t.elapsed().as_secs_f64());
            let mut fresh = engine().await;
            let t = Instant::now();
            fresh.restore(cp, 0).unwrap();
            import.push(t.elapsed().as_secs_f64());
            let out = fresh
                .execute_sql("SELECT readings FROM per_device WHERE device_id = 'd7'")
                .await
                .unwrap();
            assert_eq!(out[0].batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
            assert_eq!(fresh.views()[0].groups, Some(keys));
            restored = Some(fresh);
        }
        // Incremental: 1 % of the keys change after the stored image.
        let changed = env_usize("BENCH_CKPT_CHANGED", 10_000);
        let lines: Vec<String> = (0..changed)
            .map(|j| {
                format!(
                    r#"{{"event_id":"u{j}","ts":{},"store_id":"S{}","device_id":"d{}","metric":"fridge_temp_c","value":7.5}}"#,
                    base + (keys + j) as i64,
                    j % 500,
                    (j * 7919) % keys
                )
            })
            .collect();
        let msg = storepulse_testkit::json_message(StreamKind::IotReadings, &lines, "p2", 1)
            .unwrap()
            .unwrap();
        e.apply(msg, 0).await.unwrap();
        let t = Instant::now();
        let cp = e.checkpoint_incremental().unwrap();
        let inc_capture = t.elapsed().as_secs_f64();
        assert!(cp.meta.views[0].delta, "the view is written as a delta");
        let view_rows = cp.views[0].rows();
        let t = Instant::now();
        let m = store.write(&cp, None).await.unwrap();
        let inc_write = t.elapsed().as_secs_f64();
        let inc_view_bytes: u64 = m
            .files
            .iter()
            .filter(|(f, _)| f.starts_with("views/"))
            .map(|(_, n)| n)
            .sum();
        e.checkpoint_stored(&cp);
        drop(cp);
        let t = Instant::now();
        let (_, cp) = store.latest().await.unwrap().unwrap();
        let mut fresh = engine().await;
        fresh.restore(cp, 0).unwrap();
        let inc_restore = t.elapsed().as_secs_f64();
        assert_eq!(fresh.views()[0].groups, Some(keys));
        drop(fresh);

        // Catch-up: what arrived after the checkpoint, re-read after a crash.
        let mut fresh = restored.expect("at least one round");
        let catchup = env_usize("BENCH_CKPT_CATCHUP", 1_000_000);
        let batch = 8192;
        let lines: Vec<Vec<String>> = (0..catchup)
            .step_by(batch)
            .map(|start| {
                (start..(start + batch).min(catchup))
                    .map(|j| {
                        format!(
                            r#"{{"event_id":"c{j}","ts":{},"store_id":"S{}","device_id":"d{}","metric":"fridge_temp_c","value":{}.25}}"#,
                            base + (keys + j) as i64,
                            j % 500,
                            (j * 7919) % keys,
                            j % 7
                        )
                    })
                    .collect()
            })
            .collect();
        let t = Instant::now();
        for (n, chunk) in lines.iter().enumerate() {
            let msg = storepulse_testkit::json_message(StreamKind::IotReadings, chunk, "p1", n as u64 + 1)
                .unwrap()
                .unwrap();
            fresh.apply(msg, 0).await.unwrap();
        }
        let catchup_s = t.elapsed().as_secs_f64();
        let out = fresh
            .execute_sql("SELECT sum(readings) AS n FROM per_device")
            .await
            .unwrap();
        let n = out[0].batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Int64Array>()
            .map(|a| a.value(0));
        assert_eq!(n, Some((keys + catchup) as i64), "every caught-up reading counted");
        let (c, w, r, i) = (median(capture), median(write), median(read), median(import));
        println!("| keys | capture (engine locked) | encode + write | checkpoint total | bytes | bytes/key | read + decode | import | restore total |");
        println!("|---|---|---|---|---|---|---|---|---|");
        println!(
            "| {keys} | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} MB | {:.1} | {:.0} ms | {:.0} ms | {:.0} ms |",
            c * 1e3,
            w * 1e3,
            (c + w) * 1e3,
            bytes as f64 / 1e6,
            bytes as f64 / keys as f64,
            r * 1e3,
            i * 1e3,
            (r + i) * 1e3
        );
        println!();
        println!("| incremental, changed keys | view rows written | capture (engine locked) | encode + write | checkpoint total | bytes (view part) | restore through the chain |");
        println!("|---|---|---|---|---|---|---|");
        println!(
            "| {changed} | {view_rows} | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} MB ({:.2} MB) | {:.0} ms |",
            inc_capture * 1e3,
            inc_write * 1e3,
            (inc_capture + inc_write) * 1e3,
            m.bytes() as f64 / 1e6,
            inc_view_bytes as f64 / 1e6,
            inc_restore * 1e3
        );
        println!();
        println!("| catch-up events | catch-up | catch-up rate | recovery (restore + catch-up) |");
        println!("|---|---|---|---|");
        println!(
            "| {catchup} | {:.2} s | {:.0} events/s | {:.2} s |",
            catchup_s,
            catchup as f64 / catchup_s,
            r + i + catchup_s
        );
    });
}
