//! Wiring sources to the engine: one task per source partition feeding a
//! bounded channel (backpressure), one loop applying messages to the engine
//! and ticking watermarks so idle partitions stop holding them back.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context;
use storepulse_engine::{DimensionData, DimensionSource, Engine, EngineHandle};
use storepulse_ingest::{
    gen::ChainConfig,
    source::{FileFormat, FileSource, GeneratorSource, Source, SourceContext},
    AppliedPositions, DeadLetterSink, SourceMessage, StreamKind,
};
use storepulse_kafka::{KafkaSource, KafkaStatus};
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};

use crate::config::{DimensionConfig, SourceConfig};

/// Lifecycle of the pipeline, shown by `GET /api/v1/health`.
#[derive(Debug, Default)]
pub(crate) struct PipelineState(AtomicU8);

impl PipelineState {
    const RUNNING: u8 = 0;
    const FINISHED: u8 = 1;
    const FAILED: u8 = 2;
    const STOPPED: u8 = 3;

    /// `running`, `finished`, `failed` or `stopped`.
    pub(crate) fn name(&self) -> &'static str {
        match self.0.load(Ordering::SeqCst) {
            Self::RUNNING => "running",
            Self::FINISHED => "finished",
            Self::FAILED => "failed",
            _ => "stopped",
        }
    }
    fn set(&self, v: u8) {
        self.0.store(v, Ordering::SeqCst);
    }

    /// Marks a bounded run `finished`: every source ended, every batch is
    /// applied and the alert rules evaluated the final views (so what
    /// `/api/v1/alerts` shows then is final).
    pub(crate) fn finish(&self) {
        self.set(Self::FINISHED);
    }
}

/// The runnable sources of a config.
#[derive(Default)]
pub(crate) struct Sources {
    /// Every source, whatever its kind.
    pub(crate) list: Vec<Box<dyn Source>>,
    /// The Kafka sources' status handles (`/api/v1/health`).
    pub(crate) kafka: Vec<KafkaStatus>,
}

/// Expands the configured sources into runnable ones. File sources resume
/// at their position in `applied` (restored from a checkpoint); Kafka
/// sources commit the offsets in `commit` (the engine's applied positions,
/// or with checkpoints the last checkpoint's). Kafka sources connect
/// here (bounded by their `connect_timeout`), so an unreachable broker, a
/// bad property or a missing topic fails the start with a clear error.
pub(crate) async fn build_sources(
    sources: &[SourceConfig],
    batch_size: usize,
    decode_threads: usize,
    align: Option<Duration>,
    until_eof: bool,
    applied: Arc<AppliedPositions>,
    commit: Arc<AppliedPositions>,
) -> anyhow::Result<Sources> {
    let mut out = Sources::default();
    let mut files: Vec<FileSource> = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        match s {
            SourceConfig::Kafka(k) => {
                let (k, commit) = ((**k).clone(), commit.clone());
                let src =
                    tokio::task::spawn_blocking(move || KafkaSource::connect(k, until_eof, commit))
                        .await
                        .context("Kafka connect task panicked")?
                        .with_context(|| format!("sources[{i}] (kafka)"))?;
                out.kafka.push(src.status());
                out.list.push(Box::new(src));
            }
            SourceConfig::File {
                stream,
                path,
                format,
            } => files.push(FileSource {
                stream: *stream,
                path: path.clone(),
                format: match format {
                    Some(f) => *f,
                    None => FileFormat::from_path(path)?,
                },
                batch_size,
                decode_threads,
                resume_from: applied.get(&path.display().to_string()).unwrap_or(0),
                align: None,
            }),
            SourceConfig::Dataset { dir } => {
                let mut found = 0;
                for k in StreamKind::ALL {
                    let path = dir.join(format!("{}.jsonl", k.name()));
                    if path.is_file() {
                        found += 1;
                        let resume_from = applied.get(&path.display().to_string()).unwrap_or(0);
                        files.push(FileSource {
                            stream: k,
                            path,
                            format: FileFormat::Jsonl,
                            batch_size,
                            decode_threads,
                            resume_from,
                            align: None,
                        });
                    }
                }
                if found == 0 {
                    anyhow::bail!("dataset {} holds no <stream>.jsonl file", dir.display());
                }
            }
            SourceConfig::Generator {
                stores,
                skus,
                members,
                seed,
                rate,
            } => out.list.push(Box::new(GeneratorSource {
                chain: ChainConfig {
                    stores: *stores,
                    skus: *skus,
                    members: *members,
                    seed: *seed,
                    ..Default::default()
                },
                rate: *rate,
                tick: Duration::from_millis(200),
            })),
        }
    }
    // The files of a backtest advance together on event time.
    if let Some(drift) = align.filter(|_| files.len() > 1) {
        let a = storepulse_ingest::align::Alignment::new(files.len(), drift);
        for (member, f) in files.iter_mut().enumerate() {
            f.align = Some(storepulse_ingest::align::AlignSlot {
                alignment: a.clone(),
                member,
            });
        }
    }
    out.list
        .extend(files.into_iter().map(|f| Box::new(f) as Box<dyn Source>));
    Ok(out)
}

/// Loads dimension tables into the engine (a bad file fails the start with
/// its name and line) and returns what the reload task watches.
pub(crate) async fn load_dimensions(
    engine: &mut Engine,
    dims: &[DimensionConfig],
) -> anyhow::Result<Vec<WatchedDimension>> {
    let mut watched = Vec::new();
    for d in dims {
        let source = DimensionSource {
            table: d.name.clone(),
            location: d.path.clone(),
        };
        let version = source.version().await?;
        let (schema, batches) = source.load().await?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        let data = engine.register_dimension(&d.name, batches, schema)?;
        tracing::info!(table = %d.name, rows, location = %d.path, "dimension table loaded");
        if !d.reload_interval.is_zero() {
            watched.push(WatchedDimension {
                source,
                data,
                version,
                interval: d.reload_interval,
            });
        }
    }
    Ok(watched)
}

/// A dimension table whose file is checked for changes.
pub(crate) struct WatchedDimension {
    source: DimensionSource,
    data: DimensionData,
    version: String,
    interval: Duration,
}

/// Recomputes the refreshed query-time views (`[engine] refresh`) as they
/// fall due, until `shutdown`; failures are logged and counted in
/// `storepulse_engine_view_refresh_errors_total` (queries then recompute).
pub(crate) async fn refresh_views(handle: EngineHandle, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = handle.refresh_due().await {
            metrics::counter!(crate::metric_names::ENGINE_VIEW_REFRESH_ERRORS_TOTAL).increment(1);
            tracing::warn!(error = %e, "refreshing a view failed");
        }
    }
}

/// The largest event time of a batch message (`None` for other messages).
fn max_event_time(msg: &SourceMessage) -> Option<i64> {
    use datafusion::arrow::{array::AsArray, datatypes::TimestampMillisecondType};
    let SourceMessage::Batch(b) = msg else {
        return None;
    };
    let ts = b.batch.column_by_name("ts")?;
    datafusion::arrow::compute::max(ts.as_primitive_opt::<TimestampMillisecondType>()?)
}

/// How often [`watch_stock_quality`] reads `stock_on_hand`.
const STOCK_QUALITY_EVERY: Duration = Duration::from_secs(60);

/// Publishes the stock model's data-quality figures until `shutdown`:
/// `storepulse_retail_stock_unknown_pairs` ((store, SKU) pairs with no count
/// and no opening balance), `storepulse_retail_stock_anomaly_pairs` (pairs
/// whose derived on-hand is below zero, see `stock_anomalies`) and
/// `storepulse_retail_stock_anomaly_gap_units` (the units missing to bring
/// them to zero). Built-in views only.
pub(crate) async fn watch_stock_quality(handle: EngineHandle, mut shutdown: watch::Receiver<bool>) {
    use datafusion::arrow::{array::AsArray, datatypes::Float64Type};
    // One row of doubles: the gauges' values.
    const SQL: &str = "SELECT \
        CAST(count(*) FILTER (WHERE stock_status = 'unknown') AS DOUBLE), \
        CAST(count(*) FILTER (WHERE on_hand < 0) AS DOUBLE), \
        CAST(coalesce(sum(-on_hand) FILTER (WHERE on_hand < 0), 0) AS DOUBLE) \
        FROM stock_on_hand";
    loop {
        match handle.query_at(SQL).await {
            Ok((out, _)) => {
                if let Some(row) = out.batches.iter().find(|b| b.num_rows() > 0) {
                    let value = |i: usize| row.column(i).as_primitive::<Float64Type>().value(0);
                    metrics::gauge!(crate::metric_names::RETAIL_STOCK_UNKNOWN_PAIRS).set(value(0));
                    metrics::gauge!(crate::metric_names::RETAIL_STOCK_ANOMALY_PAIRS).set(value(1));
                    metrics::gauge!(crate::metric_names::RETAIL_STOCK_ANOMALY_GAP_UNITS)
                        .set(value(2));
                }
            }
            Err(e) => tracing::debug!(error = %e, "stock quality figures unavailable"),
        }
        tokio::select! {
            _ = tokio::time::sleep(STOCK_QUALITY_EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Reloads changed dimension files until `shutdown`. A file that fails to
/// load (or changes its columns) keeps the previous rows; the error is
/// logged and counted in `storepulse_dimensions_reload_errors_total`.
pub(crate) async fn watch_dimensions(
    watched: Vec<WatchedDimension>,
    mut shutdown: watch::Receiver<bool>,
) {
    if watched.is_empty() {
        return;
    }
    let tick = watched
        .iter()
        .map(|w| w.interval)
        .min()
        .unwrap_or(Duration::from_secs(10));
    let mut due: Vec<std::time::Instant> =
        watched.iter().map(|_| std::time::Instant::now()).collect();
    let mut watched = watched;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = shutdown.changed() => return,
        }
        let now = std::time::Instant::now();
        for (w, due) in watched.iter_mut().zip(due.iter_mut()) {
            if now < *due {
                continue;
            }
            *due = now + w.interval;
            let table = w.source.table.clone();
            let result = async {
                let version = w.source.version().await?;
                if version == w.version {
                    return Ok::<_, anyhow::Error>(None);
                }
                let (schema, batches) = w.source.load().await?;
                let rows = w
                    .data
                    .replace(&schema, batches)
                    .map_err(|e| anyhow::anyhow!("dimension table '{table}': {e}"))?;
                w.version = version;
                Ok(Some(rows))
            }
            .await;
            match result {
                Ok(None) => {}
                Ok(Some(rows)) => {
                    metrics::counter!(crate::metric_names::DIMENSIONS_RELOADS_TOTAL, "table" => table.clone())
                        .increment(1);
                    tracing::info!(table = %table, rows, location = %w.source.location, "dimension table reloaded");
                }
                Err(e) => {
                    metrics::counter!(crate::metric_names::DIMENSIONS_RELOAD_ERRORS_TOTAL, "table" => table.clone())
                        .increment(1);
                    tracing::error!(table = %table, error = %format!("{e:#}"), "dimension reload failed; keeping the previous rows");
                }
            }
        }
    }
}

/// Writes the generator's dimension tables as CSV under `dir` and returns
/// their configs (the demo's stores, products, policies and prices).
pub(crate) fn write_chain_dimensions(
    chain: &ChainConfig,
    dir: &Path,
) -> anyhow::Result<Vec<DimensionConfig>> {
    let cfg_start = chain.start_ms;
    let chain = storepulse_ingest::gen::Chain::new(chain.clone());
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut out = Vec::new();
    for (name, text) in [
        ("stores", chain.stores_csv()),
        ("products", chain.products_csv()),
        ("replenishment_policy", chain.policy_csv()),
        // A year of head office's price changes (the demo runs for hours).
        ("prices", chain.prices_csv(cfg_start + 400 * 86_400_000)),
    ] {
        let path = dir.join(format!("{name}.csv"));
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        out.push(DimensionConfig {
            name: name.to_string(),
            path: path.display().to_string(),
            reload_interval: Duration::from_secs(10),
        });
    }
    Ok(out)
}

/// Runs sources into the engine until they end (bounded) or `shutdown`.
/// The source tasks are spawned on `io` (the main runtime); this loop, which
/// applies batches, runs wherever it is polled (the engine thread, see
/// `engine_runtime.rs`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    io: tokio::runtime::Handle,
    handle: EngineHandle,
    sources: Sources,
    dead_letters: Arc<dyn DeadLetterSink>,
    channel_capacity: usize,
    shutdown: watch::Receiver<bool>,
    state: Arc<PipelineState>,
    archive: Option<storepulse_lake::Archiver>,
    event_time_alerts: Option<Arc<storepulse_alerts::AlertManager>>,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::channel::<SourceMessage>(channel_capacity.max(1));
    let mut tasks = JoinSet::new();
    for source in sources.list {
        let ctx = SourceContext {
            tx: tx.clone(),
            dead_letters: dead_letters.clone(),
            shutdown: shutdown.clone(),
        };
        let what = source.describe();
        tasks.spawn_on(
            async move {
                source
                    .run(ctx)
                    .await
                    .map_err(|e| anyhow::anyhow!(e).context(what))
            },
            &io,
        );
    }
    drop(tx);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut events = 0u64;
    let started = std::time::Instant::now();
    let result: anyhow::Result<()> = async {
        loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    // A bounded run evaluates the rules along event time:
                    // at the end of each `every` cell, before a batch that
                    // may leave it (AlertManager::before_batch).
                    if let Some(m) = &event_time_alerts {
                        if let Some(max_ts) = max_event_time(&msg) {
                            let as_of = handle.lock().await.as_of();
                            m.before_batch(as_of, max_ts).await;
                        }
                    }
                    let (report, epoch) = {
                        let mut e = handle.lock().await;
                        let r = e.apply(msg, EngineHandle::now_ms()).await?;
                        (r, e.epoch())
                    };
                    events += report.accepted;
                    if report.accepted > 0 {
                        handle.notify_changed(epoch);
                    }
                    // Outside the engine lock: waits while the archive
                    // buffer is full, which backs up the channel and pauses
                    // the sources (queries keep being served).
                    if let (Some(a), Some(stream)) = (&archive, report.stream) {
                        if let Some(rows) = report.accepted_rows {
                            a.archive(stream.name(), rows).await?;
                        }
                        if let Some(rows) = report.late_rows {
                            a.archive("late_events", rows).await?;
                        }
                    }
                }
                _ = tick.tick() => {
                    handle.lock().await.tick(EngineHandle::now_ms());
                }
                Some(done) = tasks.join_next() => {
                    done.context("source task panicked")??;
                }
            }
        }
        while let Some(done) = tasks.join_next().await {
            done.context("source task panicked")??;
        }
        Ok(())
    }
    .await;
    match &result {
        Ok(()) if *shutdown.borrow() => state.set(PipelineState::STOPPED),
        Ok(()) => {
            // `finished` is set by the caller once the alert rules have
            // evaluated the final views ([`PipelineState::finish`]).
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                events,
                seconds = secs,
                events_per_sec = (events as f64 / secs.max(1e-9)) as u64,
                "all sources finished; every window is closed (watermark final)"
            );
        }
        Err(e) => {
            state.set(PipelineState::FAILED);
            tracing::error!(error = %format!("{e:#}"), "pipeline failed");
        }
    }
    result
}
