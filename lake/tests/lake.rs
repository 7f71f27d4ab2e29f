//! The lake on the local file system, in process: the archive (day
//! partitions, size rolling, one file per day in a backfill, read back as
//! `history.*` with partition pruning, earlier hourly files still read), an object-store outage that pauses ingest and loses nothing,
//! snapshots (consistent, manifest-gated), retention and reports.

use std::{
    fmt,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use async_trait::async_trait;
use bytesize::ByteSize;
use datafusion::arrow::{
    array::{AsArray, RecordBatch},
    datatypes::Int64Type,
};
use futures::stream::BoxStream;
use object_store::{
    local::LocalFileSystem, path::Path, CopyOptions, GetOptions, GetResult, ListResult,
    MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload,
    PutResult,
};
use storepulse_engine::{late::late_events_schema, Engine, EngineConfig, EngineHandle};
use storepulse_ingest::StreamKind;
use storepulse_lake::{
    register_lake_tables, snapshot::snapshot_views, ArchiveConfig, Archiver, Lake, LakeConfig,
    ReportConfig, ReportFormat, Reporter, RetentionRule, Snapshotter,
};

const HOUR: i64 = 3_600_000;
/// 2026-01-05 08:00:00 UTC.
const T0: i64 = 1_767_600_000_000;

const SQL: &str = "
CREATE MATERIALIZED VIEW temps AS
SELECT device_id, count(*) AS readings, max(value) AS hottest FROM iot_readings GROUP BY device_id;
CREATE VIEW hot AS SELECT device_id, hottest FROM temps WHERE hottest > 5;
";

async fn engine() -> EngineHandle {
    let mut e = Engine::new(EngineConfig::default()).unwrap();
    e.execute_sql(SQL).await.unwrap();
    EngineHandle::new(e)
}

/// One reading per minute from `devices` devices, starting at `start`.
fn readings(seq: u64, start: i64, minutes: i64, devices: usize) -> Vec<String> {
    (0..minutes)
        .flat_map(|m| {
            (0..devices).map(move |d| {
                format!(
                    r#"{{"event_id":"e{seq}-{m}-{d}","ts":{},"store_id":"S1","device_id":"d{d}","metric":"fridge_temp_c","value":{}}}"#,
                    start + m * 60_000,
                    (m as usize + d) % 9
                )
            })
        })
        .collect()
}

/// Applies `lines` and archives what the engine accepted (as the pipeline
/// does).
async fn ingest(h: &EngineHandle, a: &Archiver, lines: &[String], seq: u64) -> u64 {
    let msg = storepulse_testkit::json_message(StreamKind::IotReadings, lines, "p0", seq)
        .unwrap()
        .unwrap();
    let r = h.lock().await.apply(msg, 0).await.unwrap();
    if let Some(rows) = r.accepted_rows {
        a.archive("iot_readings", rows).await.unwrap();
    }
    r.accepted
}

fn local(dir: &std::path::Path) -> Lake {
    let cfg = LakeConfig {
        url: Some(dir.join("lake").display().to_string()),
        retry_max_delay: Duration::from_millis(200),
        ..Default::default()
    };
    Lake::open(&cfg, dir).unwrap()
}

fn register(
    lake: &Lake,
    h: &EngineHandle,
    views: &[(String, datafusion::arrow::datatypes::SchemaRef)],
) {
    let streams: Vec<_> = StreamKind::ALL
        .iter()
        .map(|k| (k.name().to_string(), k.schema()))
        .chain([("late_events".to_string(), late_events_schema())])
        .collect();
    register_lake_tables(lake, h.serving_context(), &streams, views).unwrap();
}

async fn one_i64(h: &EngineHandle, sql: &str) -> i64 {
    let out = h.query(sql).await.unwrap();
    let b: &RecordBatch = &out[0].batches[0];
    b.column(0).as_primitive::<Int64Type>().value(0)
}

/// Rows in a Parquet file, from its footer.
fn parquet_rows(file: &[u8]) -> i64 {
    use parquet::file::reader::FileReader;
    parquet::file::reader::SerializedFileReader::new(bytes::Bytes::copy_from_slice(file))
        .unwrap()
        .metadata()
        .file_metadata()
        .num_rows()
}

fn small_files() -> ArchiveConfig {
    ArchiveConfig {
        target_file_size: ByteSize::kib(4),
        max_file_age: Duration::from_secs(3600),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_partitions_by_day_rolls_by_size_and_reads_back_as_history() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local(dir.path());
    let h = engine().await;
    register(&lake, &h, &[]);
    let a = Archiver::start(lake.clone(), small_files());
    let mut accepted = 0;
    // 3 hours, 60 batches of 20 devices × 3 minutes.
    for i in 0..60u64 {
        let lines = readings(i, T0 + i as i64 * 180_000, 3, 20);
        accepted += ingest(&h, &a, &lines, (i + 1) * 60).await;
    }
    assert_eq!(accepted, 3600);
    assert!(a.flush(Duration::from_secs(30)).await, "flushed");
    assert_eq!(a.buffered_bytes(), 0);

    let files = lake.list("events/iot_readings").await.unwrap();
    let mut dirs: Vec<String> = files
        .iter()
        .map(|m| {
            let rel = lake.relative(&m.location).to_string();
            assert!(rel.ends_with(".parquet") && rel.contains("/part-"), "{rel}");
            rel.rsplit_once('/').unwrap().0.to_string()
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    assert_eq!(dirs, ["events/iot_readings/date=2026-01-05"]);
    assert!(
        files.len() > 6,
        "4 KiB target: several files per day, got {}",
        files.len()
    );
    let status = lake.status().to_json(&lake.url());
    assert_eq!(status["archive"]["rows"], 3600);
    assert_eq!(status["archive"]["files"], files.len());

    // history.iot_readings answers like the live view.
    assert_eq!(
        one_i64(&h, "SELECT count(*) FROM history.iot_readings").await,
        3600
    );
    let live = h
        .query("SELECT device_id, readings, hottest FROM temps ORDER BY device_id")
        .await
        .unwrap();
    let hist = h
        .query("SELECT device_id, count(*) AS readings, max(value) AS hottest FROM history.iot_readings GROUP BY device_id ORDER BY device_id")
        .await
        .unwrap();
    assert_eq!(
        storepulse_testkit::normalize(&live[0].batches),
        storepulse_testkit::normalize(&hist[0].batches)
    );
    assert_eq!(
        one_i64(
            &h,
            "SELECT count(*) FROM history.iot_readings WHERE date = '2026-01-05' \
             AND ts >= '2026-01-05T09:00:00Z' AND ts < '2026-01-05T10:00:00Z'"
        )
        .await,
        1200
    );

    // A file of the earlier hourly layout (`date=/hour=/`) is still read,
    // with its date as partition value.
    let first = lake.relative(&files[0].location).to_string();
    let old = std::fs::read(dir.path().join("lake").join(&first)).unwrap();
    let old_rows = parquet_rows(&old);
    lake.put(
        &lake.path("events/iot_readings/date=2025-12-31/hour=07/part-old.parquet"),
        bytes::Bytes::from(old),
    )
    .await
    .unwrap();
    assert_eq!(
        one_i64(
            &h,
            "SELECT count(*) FROM history.iot_readings WHERE date = '2025-12-31'"
        )
        .await,
        old_rows
    );
    assert_eq!(
        one_i64(&h, "SELECT count(*) FROM history.iot_readings").await,
        3600 + old_rows
    );

    // Files written after the first query are listed (no stale listing
    // cache). Pruning: an unreadable file in another date partition is never opened
    // by a query filtering on date, and breaks one that reads everything.
    let bad = lake.path("events/iot_readings/date=2020-01-01/part-bad.parquet");
    lake.put(&bad, bytes::Bytes::from_static(b"not parquet"))
        .await
        .unwrap();
    assert_eq!(
        one_i64(
            &h,
            "SELECT count(*) FROM history.iot_readings WHERE date >= '2026-01-01'"
        )
        .await,
        3600
    );
    let err = h
        .query("SELECT count(*) FROM history.iot_readings")
        .await
        .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("parquet"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_close_at_max_file_age_at_low_rates() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local(dir.path());
    let h = engine().await;
    let a = Archiver::start(
        lake.clone(),
        ArchiveConfig {
            max_file_age: Duration::from_millis(300),
            ..Default::default()
        },
    );
    ingest(&h, &a, &readings(0, T0, 1, 3), 3).await;
    // No flush: the age limit alone must close and store the file.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while lake.status().to_json("")["archive"]["rows"] != 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "file not closed by age"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lake.list("events/iot_readings").await.unwrap().len(), 1);
}

/// A backfill: 40 days of history arriving as fast as it can be read.
/// Each day becomes one file (not one per hour), however many batches it
/// came in, and at most MAX_OPEN_FILES are open at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_over_many_days_writes_one_file_per_day() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local(dir.path());
    let h = engine().await;
    register(&lake, &h, &[]);
    let a = Archiver::start(lake.clone(), ArchiveConfig::default());
    // 240 batches 4 hours apart from 2026-01-05 08:00: 6 batches a day
    // (4 on the first, 2 on the last), 41 dates.
    let mut accepted = 0;
    for i in 0..240u64 {
        let lines = readings(i, T0 + i as i64 * 4 * HOUR, 3, 20);
        accepted += ingest(&h, &a, &lines, (i + 1) * 60).await;
    }
    assert_eq!(accepted, 240 * 60);
    assert!(a.flush(Duration::from_secs(30)).await, "flushed");

    let files = lake.list("events/iot_readings").await.unwrap();
    let mut dates: Vec<String> = files
        .iter()
        .map(|m| {
            let rel = lake.relative(&m.location).to_string();
            let dir = rel.rsplit_once('/').unwrap().0.to_string();
            assert_eq!(dir.split('/').count(), 3, "{rel}");
            dir
        })
        .collect();
    dates.sort();
    let n = dates.len();
    dates.dedup();
    assert_eq!(dates.len(), 41, "{dates:?}");
    assert_eq!(n, 41, "one file per day");
    assert_eq!(dates[0], "events/iot_readings/date=2026-01-05");
    assert_eq!(dates[40], "events/iot_readings/date=2026-02-14");
    assert_eq!(
        one_i64(&h, "SELECT count(*) FROM history.iot_readings").await,
        240 * 60
    );
    assert_eq!(
        one_i64(
            &h,
            "SELECT count(*) FROM history.iot_readings WHERE date = '2026-01-10'"
        )
        .await,
        6 * 60
    );
}

/// A local store whose writes fail while `down` is set.
#[derive(Debug)]
struct FlakyStore {
    inner: LocalFileSystem,
    down: AtomicBool,
    failed: AtomicUsize,
}

impl fmt::Display for FlakyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FlakyStore({})", self.inner)
    }
}

impl FlakyStore {
    fn check(&self) -> object_store::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(object_store::Error::Generic {
                store: "flaky",
                source: "connection refused (injected)".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for FlakyStore {
    async fn put_opts(
        &self,
        l: &Path,
        p: PutPayload,
        o: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.check()?;
        self.inner.put_opts(l, p, o).await
    }
    async fn put_multipart_opts(
        &self,
        l: &Path,
        o: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.check()?;
        self.inner.put_multipart_opts(l, o).await
    }
    async fn get_opts(&self, l: &Path, o: GetOptions) -> object_store::Result<GetResult> {
        self.inner.get_opts(l, o).await
    }
    fn delete_stream(
        &self,
        l: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(l)
    }
    fn list(&self, p: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(p)
    }
    async fn list_with_delimiter(&self, p: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(p).await
    }
    async fn copy_opts(&self, f: &Path, t: &Path, o: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(f, t, o).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_pauses_ingest_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    std::fs::create_dir_all(&root).unwrap();
    let flaky = Arc::new(FlakyStore {
        inner: LocalFileSystem::new(),
        down: AtomicBool::new(true),
        failed: AtomicUsize::new(0),
    });
    let lake = Lake::with_store(
        flaky.clone(),
        url::Url::parse("file:///").unwrap(),
        Path::from_absolute_path(std::fs::canonicalize(&root).unwrap()).unwrap(),
        Duration::from_millis(100),
    );
    let h = engine().await;
    register(&lake, &h, &[]);
    // A 1 MiB buffer and small files: the outage fills it quickly.
    let a = Archiver::start(
        lake.clone(),
        ArchiveConfig {
            target_file_size: ByteSize::kib(4),
            max_buffer: ByteSize::mib(1),
            ..Default::default()
        },
    );
    let (h2, a2) = (h.clone(), a.clone());
    let feeder = tokio::spawn(async move {
        let mut accepted = 0;
        for i in 0..200u64 {
            let lines = readings(i, T0 + i as i64 * 60_000, 1, 100);
            accepted += ingest(&h2, &a2, &lines, (i + 1) * 100).await;
        }
        accepted
    });
    // The buffer fills and the feeder blocks (the pipeline would stop
    // reading its channel and the sources pause).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = lake.status().to_json("");
        if s["healthy"] == false && s["archive"]["ingest_waiting"] == true {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "outage not reported: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let applied_during_outage = h.lock().await.epoch();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !feeder.is_finished(),
        "ingest is held back while the store is down"
    );
    assert_eq!(
        h.lock().await.epoch(),
        applied_during_outage,
        "nothing more is applied while the buffer is full"
    );
    assert!(a.buffered_bytes() > 900 * 1024, "the buffer is full");
    let last_error = lake.status().last_error().expect("fault reported");
    assert_eq!(last_error.op, "PUT");
    assert!(
        last_error.message.contains("file:///") && last_error.message.contains("injected"),
        "{}",
        last_error.message
    );
    assert!(
        lake.list("events").await.unwrap().is_empty(),
        "nothing written while down"
    );

    // The store comes back: everything is archived exactly once.
    flaky.down.store(false, Ordering::SeqCst);
    let accepted = feeder.await.unwrap();
    assert_eq!(accepted, 20_000);
    assert!(a.flush(Duration::from_secs(30)).await);
    assert!(lake.status().last_error().is_none(), "fault cleared");
    assert!(
        flaky.failed.load(Ordering::SeqCst) > 1,
        "writes were retried"
    );
    assert_eq!(
        one_i64(&h, "SELECT count(*) FROM history.iot_readings").await,
        20_000
    );
    assert_eq!(
        one_i64(
            &h,
            "SELECT count(DISTINCT event_id) FROM history.iot_readings"
        )
        .await,
        20_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_consistent_and_only_committed_ones_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local(dir.path());
    let h = engine().await;
    let views = snapshot_views(&h, &[]).await.unwrap();
    let names: Vec<&str> = views.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["hot", "temps"]);
    register(&lake, &h, &views);
    let s = Snapshotter::new(lake.clone(), h.clone(), views);
    let a = Archiver::start(lake.clone(), ArchiveConfig::default());
    ingest(&h, &a, &readings(0, T0, 10, 5), 50).await;
    let m1 = s.take(Duration::from_secs(10)).await.unwrap();
    ingest(&h, &a, &readings(1, T0 + HOUR, 10, 8), 130).await;
    let m2 = s.take(Duration::from_secs(10)).await.unwrap();
    assert!(m2.epoch > m1.epoch);
    assert_eq!(m1.files.len(), 2);
    assert_eq!(m1.files.iter().find(|f| f.view == "temps").unwrap().rows, 5);
    assert_eq!(m2.files.iter().find(|f| f.view == "temps").unwrap().rows, 8);

    // The latest snapshot equals the live view.
    let live = h
        .query("SELECT device_id, readings, hottest FROM temps")
        .await
        .unwrap();
    let snap = h
        .query("SELECT device_id, readings, hottest FROM snapshots.temps WHERE snapshot_ts = (SELECT max(snapshot_ts) FROM snapshots.temps)")
        .await
        .unwrap();
    assert_eq!(
        storepulse_testkit::normalize(&live[0].batches),
        storepulse_testkit::normalize(&snap[0].batches)
    );
    assert_eq!(
        one_i64(&h, "SELECT count(*) FROM snapshots.temps").await,
        13
    );
    assert_eq!(
        one_i64(&h, "SELECT count(DISTINCT snapshot_ts) FROM snapshots.hot").await,
        2
    );

    // A file without a manifest (a snapshot being written, or abandoned) is
    // not read; `date` prunes.
    let date = m2.files[0]
        .path
        .split('/')
        .nth(2)
        .unwrap()
        .strip_prefix("date=")
        .unwrap()
        .to_string();
    let orphan = m2.files.iter().find(|f| f.view == "temps").unwrap();
    let copy = lake.path(&orphan.path.replace(&m2.id, "20991231T000000000Z"));
    let bytes = lake.get(&lake.path(&orphan.path)).await.unwrap();
    let batches: Vec<RecordBatch> =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
    let mut out = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, batches[0].schema(), None).unwrap();
    for b in &batches {
        // The uncommitted snapshot's own snapshot_ts: 2099-12-31.
        let last = b.num_columns() - 1;
        let ts = datafusion::arrow::array::Int64Array::from(vec![4_102_358_400_000; b.num_rows()]);
        let ts = datafusion::arrow::compute::cast(&ts, b.column(last).data_type()).unwrap();
        let mut cols = b.columns().to_vec();
        cols[last] = ts;
        w.write(&RecordBatch::try_new(b.schema(), cols).unwrap())
            .unwrap();
    }
    w.close().unwrap();
    lake.put(&copy, out.into()).await.unwrap();
    assert_eq!(
        one_i64(&h, "SELECT count(*) FROM snapshots.temps WHERE snapshot_ts > TIMESTAMP '2099-01-01T00:00:00Z'").await,
        0
    );
    assert_eq!(
        one_i64(&h, "SELECT count(*) FROM snapshots.temps").await,
        13
    );
    assert_eq!(
        one_i64(
            &h,
            &format!("SELECT count(*) FROM snapshots.temps WHERE date = '{date}'")
        )
        .await,
        13
    );
    assert_eq!(
        one_i64(
            &h,
            "SELECT count(*) FROM snapshots.temps WHERE date = '1999-01-01'"
        )
        .await,
        0
    );
    let manifests = s.manifests().await.unwrap();
    assert_eq!(manifests, vec![m1, m2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_date_partitions_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local(dir.path());
    let put = |rel: &'static str| {
        let lake = lake.clone();
        async move {
            lake.put(&lake.path(rel), bytes::Bytes::from_static(b"x"))
                .await
                .unwrap()
        }
    };
    put("events/sales/date=2026-10-01/part-a.parquet").await;
    put("events/sales/date=2026-10-01/hour=01/part-b.parquet").await;
    put("events/sales/date=2026-11-21/part-c.parquet").await;
    put("events/iot_readings/date=2026-09-30/hour=23/part-d.parquet").await;
    put("events/README.txt").await;
    put("views/temps/date=2026-10-01/20261001T000000000Z.parquet").await;
    put("views/_manifest/20261001T000000000Z.json").await;
    put("views/temps/date=2026-11-21/20261121T000000000Z.parquet").await;
    put("views/_manifest/20261121T000000000Z.json").await;
    put("reports/daily/date=2026-10-01/daily-20261001T060000.csv").await;
    let now = chrono::DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z")
        .unwrap()
        .to_utc();
    let rules = vec![
        RetentionRule {
            prefix: "events/".into(),
            keep: Duration::from_secs(30 * 86_400),
        },
        RetentionRule {
            prefix: "views".into(),
            keep: Duration::from_secs(7 * 86_400),
        },
    ];
    let report = storepulse_lake::retention::apply(&lake, &rules, now)
        .await
        .unwrap();
    let mut left: Vec<String> = lake
        .list("")
        .await
        .unwrap()
        .iter()
        .map(|m| lake.relative(&m.location).to_string())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "events/README.txt",
            "events/sales/date=2026-11-21/part-c.parquet",
            "reports/daily/date=2026-10-01/daily-20261001T060000.csv",
            "views/_manifest/20261121T000000000Z.json",
            "views/temps/date=2026-11-21/20261121T000000000Z.parquet",
        ]
    );
    assert_eq!(report.objects, 5);
    assert_eq!(report.partitions.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_written_as_csv_parquet_and_xlsx() {
    use calamine::{Data, Reader, Xlsx};
    let dir = tempfile::tempdir().unwrap();
    let lake = local(dir.path());
    let h = engine().await;
    let a = Archiver::start(lake.clone(), ArchiveConfig::default());
    ingest(&h, &a, &readings(0, T0, 10, 4), 40).await;
    let sql = "SELECT device_id, readings, hottest, TIMESTAMP '2026-01-05 08:30:00' AS at FROM temps ORDER BY device_id";
    let report = |name: &str, format| ReportConfig {
        name: name.into(),
        sql: sql.into(),
        schedule: Some("0 6 * * *".into()),
        every: None,
        timezone: "Europe/Berlin".into(),
        format,
    };
    let r = Reporter::new(
        lake.clone(),
        h.clone(),
        &[
            report("csv", ReportFormat::Csv),
            report("pq", ReportFormat::Parquet),
            report("xl", ReportFormat::Xlsx),
        ],
    )
    .await
    .unwrap();
    let csv = r.run_one("csv", Duration::from_secs(10)).await.unwrap();
    assert!(
        csv.path.starts_with("reports/csv/date=") && csv.path.ends_with(".csv"),
        "{}",
        csv.path
    );
    let text = String::from_utf8(lake.get(&lake.path(&csv.path)).await.unwrap().to_vec()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "device_id,readings,hottest,at");
    assert_eq!(lines.len(), 5);
    assert!(lines[1].starts_with("d0,10,"), "{}", lines[1]);

    let pq = r.run_one("pq", Duration::from_secs(10)).await.unwrap();
    let bytes = lake.get(&lake.path(&pq.path)).await.unwrap();
    let rows: usize = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap().num_rows())
        .sum();
    assert_eq!((pq.rows, rows), (4, 4));

    let xl = r.run_one("xl", Duration::from_secs(10)).await.unwrap();
    let bytes = lake.get(&lake.path(&xl.path)).await.unwrap();
    let mut wb: Xlsx<_> = Xlsx::new(std::io::Cursor::new(bytes.to_vec())).unwrap();
    let sheet = wb.worksheet_range_at(0).unwrap().unwrap();
    assert_eq!(sheet.get_size(), (5, 4));
    assert_eq!(sheet.get((0, 0)), Some(&Data::String("device_id".into())));
    assert_eq!(sheet.get((1, 0)), Some(&Data::String("d0".into())));
    assert_eq!(sheet.get((1, 1)), Some(&Data::Float(10.0)));
    // Timestamps (UTC) become Excel date-times in the report's time zone:
    // 08:30 UTC is 09:30 in Berlin in January.
    match sheet.get((1, 3)) {
        Some(Data::DateTime(d)) => {
            assert_eq!(d.as_datetime().unwrap().to_string(), "2026-01-05 09:30:00")
        }
        other => panic!("expected a date-time, got {other:?}"),
    }

    // A report that is not a query is refused at start, naming it.
    let bad = Reporter::new(
        lake.clone(),
        h.clone(),
        &[ReportConfig {
            sql: "SELECT nope FROM temps".into(),
            ..report("bad", ReportFormat::Csv)
        }],
    )
    .await
    .unwrap_err();
    assert!(
        bad.to_string().starts_with("reports[0] (bad).sql:"),
        "{bad}"
    );
    assert!(bad.to_string().contains("nope"), "{bad}");
}

#[test]
fn bad_lake_urls_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let open = |url: &str| {
        Lake::open(
            &LakeConfig {
                url: Some(url.into()),
                ..Default::default()
            },
            dir.path(),
        )
        .unwrap_err()
        .to_string()
    };
    assert!(
        open("gs://bucket/x").contains("unsupported scheme"),
        "{}",
        open("gs://bucket/x")
    );
    assert!(open("s3:///x").contains("no bucket"));
    let e = Lake::open(
        &LakeConfig {
            url: Some("s3://b/p".into()),
            s3: storepulse_lake::S3Config {
                access_key_id: Some("env:STOREPULSE_TEST_SURELY_UNSET".into()),
                ..Default::default()
            },
            ..Default::default()
        },
        dir.path(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(
            "lake.s3.access_key_id: environment variable STOREPULSE_TEST_SURELY_UNSET is not set"
        ),
        "{e}"
    );
}

/// Applies `lines` to the engine only.
async fn apply(h: &EngineHandle, lines: &[String], seq: u64) {
    let msg = storepulse_testkit::json_message(StreamKind::IotReadings, lines, "p0", seq)
        .unwrap()
        .unwrap();
    h.lock().await.apply(msg, 0).await.unwrap();
}

async fn temps(h: &EngineHandle) -> Vec<String> {
    let out = h
        .query("SELECT device_id, readings, hottest FROM temps ORDER BY device_id")
        .await
        .unwrap();
    storepulse_testkit::normalize(&out[0].batches)
}

/// Checkpoints under `<dir>/checkpoints`, the newest `keep` kept.
fn checkpoints_keeping(dir: &std::path::Path, keep: usize) -> storepulse_lake::CheckpointStore {
    let cfg = storepulse_lake::CheckpointConfig {
        keep,
        ..Default::default()
    };
    storepulse_lake::CheckpointStore::open(&cfg, dir).unwrap()
}

#[tokio::test]
async fn checkpoints_keep_the_newest_and_skip_incomplete_or_damaged_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = checkpoints_keeping(dir.path(), 2);
    let h = engine().await;
    let mut states = Vec::new();
    for i in 0..4u64 {
        apply(
            &h,
            &readings(i, T0 + i as i64 * HOUR, 5, 3 + i as usize),
            i + 1,
        )
        .await;
        let cp = h.lock().await.checkpoint().unwrap();
        let m = store.write(&cp, None).await.unwrap();
        assert_eq!(m.sequence, i + 1);
        assert_eq!(m.positions, vec![("p0".to_string(), i + 1)]);
        states.push(temps(&h).await);
    }
    let listed = store.list().await.unwrap();
    assert_eq!(
        listed.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        vec![4, 3],
        "keep = 2"
    );
    let root = dir.path().join("checkpoints");
    // A crash while writing the 5th: files but no manifest. Ignored.
    std::fs::create_dir_all(root.join("ckpt-000000000005/views")).unwrap();
    std::fs::write(root.join("ckpt-000000000005/engine.json"), b"{").unwrap();
    let (m, cp) = store.latest().await.unwrap().unwrap();
    assert_eq!(m.sequence, 4);
    let restored = engine().await;
    restored.lock().await.restore(cp, 0).unwrap();
    assert_eq!(temps(&restored).await, states[3]);
    // The newest is damaged (a view file cut short): the one before is used.
    let view = root.join("ckpt-000000000004/views/temps.arrow");
    let bytes = std::fs::read(&view).unwrap();
    std::fs::write(&view, &bytes[..bytes.len() / 2]).unwrap();
    let (m, cp) = store.latest().await.unwrap().unwrap();
    assert_eq!(m.sequence, 3, "damaged checkpoint skipped");
    let restored = engine().await;
    restored.lock().await.restore(cp, 0).unwrap();
    assert_eq!(temps(&restored).await, states[2]);
    assert_eq!(restored.lock().await.positions().get("p0"), Some(3));
    // The next checkpoint takes sequence 6 and prunes the incomplete 5.
    let cp = h.lock().await.checkpoint().unwrap();
    assert_eq!(store.write(&cp, None).await.unwrap().sequence, 6);
    assert!(!root.join("ckpt-000000000005").join("engine.json").exists());
}

/// An incremental checkpoint of `h` written to `store` (the engine told).
async fn take(
    h: &EngineHandle,
    store: &storepulse_lake::CheckpointStore,
) -> (
    storepulse_engine::EngineCheckpoint,
    storepulse_lake::CheckpointManifest,
) {
    let cp = h.lock().await.checkpoint_incremental().unwrap();
    let m = store.write(&cp, None).await.unwrap();
    h.lock().await.checkpoint_stored(&cp);
    (cp, m)
}

#[tokio::test]
async fn incremental_checkpoints_write_what_changed_and_restore_through_their_chains() {
    let dir = tempfile::tempdir().unwrap();
    let store = checkpoints_keeping(dir.path(), 2);
    let root = dir.path().join("checkpoints");
    let h = engine().await;
    // 200 devices, then rounds that each touch 3 of them.
    apply(&h, &readings(0, T0, 2, 200), 1).await;
    let (cp, m) = take(&h, &store).await;
    assert!(!cp.meta.views[0].delta, "the first image is whole");
    assert!(m.chains.is_empty());
    let whole_bytes = m.bytes();
    let mut written = Vec::new();
    for i in 1..=5u64 {
        apply(&h, &readings(i, T0 + i as i64 * HOUR, 1, 3), i + 1).await;
        let (cp, m) = take(&h, &store).await;
        assert!(cp.meta.views[0].delta, "round {i}: a delta");
        assert_eq!(cp.views[0].rows(), 3, "round {i}: only the changed devices");
        assert_eq!(cp.meta.views[0].groups, 200);
        let (_, chain) = &m.chains[0];
        assert_eq!(chain.len(), 1 + i as usize, "whole image + {i} deltas");
        assert!(chain[0].0.starts_with("ckpt-000000000001/"), "{chain:?}");
        assert!(m.bytes() < whole_bytes, "{} vs {whole_bytes}", m.bytes());
        assert!(m.restore_bytes() > m.bytes());
        written.push(m);
    }
    // keep = 2, but the chain reads the whole image and every delta.
    for s in 1..=6 {
        assert!(root
            .join(format!("ckpt-00000000000{s}/_manifest.json"))
            .exists());
    }
    // A restore reads the chain: the same rows as the live engine.
    let (m, cp) = store.latest().await.unwrap().unwrap();
    assert_eq!(m.sequence, 6);
    let restored = engine().await;
    restored.lock().await.restore(cp, 0).unwrap();
    assert_eq!(temps(&restored).await, temps(&h).await);
    // The restored engine goes on: its next checkpoint extends the chain
    // with what changed since the restore (not the whole state again).
    apply(&restored, &readings(9, T0 + 9 * HOUR, 1, 2), 9).await;
    let (cp, m) = take(&restored, &store).await;
    assert!(cp.meta.views[0].delta && cp.views[0].rows() == 2);
    assert_eq!(m.chains[0].1.len(), 7, "the restored chain + 1");
    let (_, cp) = store.latest().await.unwrap().unwrap();
    let again = engine().await;
    again.lock().await.restore(cp, 0).unwrap();
    assert_eq!(temps(&again).await, temps(&restored).await);

    // After `checkpoint_reset` (what a failed write does) the next image
    // is whole, and the store drops the old chain once nothing kept reads
    // it.
    h.lock().await.checkpoint_reset();
    let (cp, m) = take(&h, &store).await;
    assert!(!cp.meta.views[0].delta && m.chains.is_empty());
    let (_, m) = take(&h, &store).await;
    assert!(m.chains[0].1[0].0.starts_with("ckpt-000000000008/"));
    for s in 1..=7 {
        let dir = root.join(format!("ckpt-00000000000{s}"));
        assert!(!dir.join("_manifest.json").exists(), "old chain pruned");
        assert!(
            !dir.join("views/temps.arrow").exists()
                && !dir.join("views/temps.delta.arrow").exists()
        );
    }

    // A damaged chain file: the checkpoint is skipped for an older one.
    let base = root.join("ckpt-000000000008/views/temps.arrow");
    let bytes = std::fs::read(&base).unwrap();
    std::fs::write(&base, &bytes[..bytes.len() / 2]).unwrap();
    assert!(
        store.latest().await.unwrap().is_none(),
        "both read the damaged image"
    );
}

#[tokio::test]
async fn a_delta_without_an_image_to_build_on_is_refused() {
    use storepulse_lake::{CheckpointConfig, CheckpointStore};
    let dir = tempfile::tempdir().unwrap();
    let open = |sub: &str| {
        CheckpointStore::open(
            &CheckpointConfig {
                url: Some(dir.path().join(sub).display().to_string()),
                ..Default::default()
            },
            dir.path(),
        )
        .unwrap()
    };
    let h = engine().await;
    apply(&h, &readings(0, T0, 2, 50), 1).await;
    let cp = h.lock().await.checkpoint_incremental().unwrap();
    open("a").write(&cp, None).await.unwrap();
    h.lock().await.checkpoint_stored(&cp);
    apply(&h, &readings(1, T0 + HOUR, 1, 2), 2).await;
    let cp = h.lock().await.checkpoint_incremental().unwrap();
    assert!(cp.meta.views[0].delta);
    // Another root has no image of the view: the write names it.
    let err = open("b").write(&cp, None).await.unwrap_err().to_string();
    assert!(
        err.contains("view temps is written as a delta, but the newest checkpoint in")
            && err.contains("has no image of it to build on"),
        "{err}"
    );
}

#[tokio::test]
async fn a_view_no_longer_materialized_drops_its_checkpointed_state() {
    // `hot` was materialized when the checkpoint was taken (as the built-in
    // latest_stock_count was before it became a view over sku_activity).
    let mut before = Engine::new(EngineConfig::default()).unwrap();
    before
        .execute_sql(
            "CREATE MATERIALIZED VIEW temps AS SELECT device_id, count(*) AS readings, max(value) AS hottest FROM iot_readings GROUP BY device_id;
             CREATE MATERIALIZED VIEW hot AS SELECT device_id, max(value) AS hottest FROM iot_readings GROUP BY device_id",
        )
        .await
        .unwrap();
    let h = EngineHandle::new(before);
    apply(&h, &readings(0, T0, 3, 12), 1).await;
    let cp = h.lock().await.checkpoint().unwrap();
    assert_eq!(cp.meta.views.len(), 2);
    let now = engine().await;
    now.lock().await.restore(cp, 0).unwrap();
    assert_eq!(temps(&now).await, temps(&h).await);
    let rows = |h: EngineHandle| async move {
        let out = h
            .query("SELECT device_id, hottest FROM hot WHERE hottest > 5 ORDER BY device_id")
            .await
            .unwrap();
        storepulse_testkit::normalize(&out[0].batches)
    };
    assert_eq!(rows(now.clone()).await, rows(h.clone()).await);
}

#[tokio::test]
async fn a_checkpoint_into_a_changed_view_is_refused_naming_it() {
    let h = engine().await;
    apply(&h, &readings(0, T0, 3, 2), 1).await;
    let cp = h.lock().await.checkpoint().unwrap();
    let mut other = Engine::new(EngineConfig::default()).unwrap();
    other
        .execute_sql(
            "CREATE MATERIALIZED VIEW temps AS SELECT device_id, avg(value) AS mean FROM iot_readings GROUP BY device_id",
        )
        .await
        .unwrap();
    let err = other.restore(cp, 0).unwrap_err().to_string();
    assert!(
        err.contains("view temps") && err.contains("definition changed"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_fails_checkpoints_until_it_returns() {
    use storepulse_lake::CheckpointStore;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    std::fs::create_dir_all(&root).unwrap();
    let flaky = Arc::new(FlakyStore {
        inner: LocalFileSystem::new(),
        down: AtomicBool::new(true),
        failed: AtomicUsize::new(0),
    });
    let lake = Lake::with_store(
        flaky.clone(),
        url::Url::parse("file:///").unwrap(),
        Path::from_absolute_path(std::fs::canonicalize(&root).unwrap()).unwrap(),
        Duration::from_millis(20),
    );
    let store = CheckpointStore::with_lake(lake, 2);
    let h = engine().await;
    apply(&h, &readings(0, T0, 3, 2), 1).await;
    let cp = h.lock().await.checkpoint().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    let err = store.write(&cp, Some(deadline)).await.unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    assert!(flaky.failed.load(Ordering::SeqCst) >= 2, "retried");
    assert!(store.latest().await.unwrap().is_none(), "nothing complete");
    flaky.down.store(false, Ordering::SeqCst);
    let m = store.write(&cp, None).await.unwrap();
    let (latest, _) = store.latest().await.unwrap().unwrap();
    assert_eq!(latest, m);
}
