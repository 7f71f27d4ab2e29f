//! The composition root of `run` and `demo`: builds the engine from the
//! config (dimensions, views, rules, the run-time catalog, a checkpoint),
//! starts alerting, the lake, the sources, the pgwire and HTTP listeners and
//! the background tasks, waits for the end (a signal, `--duration`, or a
//! bounded run finishing) and shuts everything down in order.
//!
//! [`serve`] reads top to bottom as those steps; each is a function here.

use std::{net::TcpListener, sync::Arc, time::Duration};

use anyhow::Context;
use storepulse_alerts::AlertManager;
use storepulse_engine::{AlertDefinition, Engine, EngineConfig, EngineHandle};
use storepulse_ingest::{source::Source, DeadLetterSink, JsonlDeadLetterSink, StreamKind};
use storepulse_serve::PgServer;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    checkpoint::{self, Checkpointer},
    config::Config,
    engine_runtime::EngineRuntime,
    lake::LakeParts,
    metric_names,
    pipeline::{self, PipelineState, WatchedDimension},
    runtime::Runtime,
};

/// Runs the process `cfg` describes. `extra_sources` run beside the
/// configured ones (the demo's generator); `stop_after` bounds the run
/// (`demo --duration`); with `exit_when_done` a bounded run exits when its
/// input is finished instead of serving until a signal.
pub(crate) async fn serve(
    cfg: Config,
    extra_sources: Vec<Box<dyn Source>>,
    stop_after: Option<Duration>,
    exit_when_done: bool,
) -> anyhow::Result<()> {
    let metrics = install_metrics();
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("data_dir: cannot create {}", cfg.data_dir.display()))?;
    let (mut engine, watched) = build_engine(&cfg).await?;
    let checkpoints = if cfg.checkpoint.enabled {
        let store = storepulse_lake::CheckpointStore::open(&cfg.checkpoint, &cfg.data_dir)?;
        let restored = checkpoint::restore(&mut engine, &store).await?;
        Some((store, restored))
    } else {
        None
    };
    let views = engine.views().len();
    let applied = engine.positions().clone();
    let alert_defs = engine.alerts().to_vec();
    let handle = EngineHandle::new(engine);
    let checkpointer = checkpoints.map(|(store, restored)| {
        Arc::new(Checkpointer::new(
            store,
            handle.clone(),
            cfg.checkpoint.interval,
            cfg.checkpoint.incremental,
            restored.as_ref(),
        ))
    });
    // With checkpoints, Kafka commits only what a checkpoint holds.
    let commit = checkpointer
        .as_ref()
        .map_or_else(|| applied.clone(), |c| c.commit_positions());
    let alerts = start_alerts(&cfg, &handle, &alert_defs)?;
    let mut lake = LakeParts::open(&cfg.lake, &cfg.reports, &cfg.data_dir, &handle)
        .await
        .context("lake")?;
    let dlq_path = cfg.data_dir.join("dead_letters.jsonl");
    let dead_letters: Arc<dyn DeadLetterSink> = Arc::new(JsonlDeadLetterSink::open(&dlq_path)?);
    let mut sources = pipeline::build_sources(
        &cfg.sources,
        cfg.pipeline.batch_size,
        cfg.pipeline.decode_threads,
        (cfg.until_eof
            && cfg.alerts.bounded_evaluation == storepulse_alerts::BoundedEvaluation::EventTime)
            .then_some(cfg.pipeline.replay_max_drift),
        cfg.until_eof,
        applied,
        commit,
    )
    .await?;
    sources.list.extend(extra_sources);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    if let Some(l) = &mut lake {
        l.start(&shutdown_rx);
    }
    let lake = lake.map(Arc::new);
    let state = Arc::new(PipelineState::default());
    let runtime = Arc::new(Runtime {
        lake: lake.clone(),
        pipeline: state.clone(),
        metrics,
        kafka: std::mem::take(&mut sources.kafka),
        alerts: alerts.clone(),
        checkpoint: checkpointer.clone(),
    });
    let listeners = Listeners::bind(&cfg, &handle).await?;
    // From here on SIGINT / SIGTERM stop the process gracefully.
    let mut signals = StopSignals::new()?;
    listeners.announce(views, &dlq_path);

    let engine_rt = spawn_background(&cfg, &handle, watched, &checkpointer, &shutdown_rx)?;
    let alert_task = alerts
        .clone()
        .map(|m| tokio::spawn(m.run(shutdown_rx.clone())));
    let servers = listeners.spawn(&cfg, &handle, runtime, &shutdown_rx);
    let mut pipeline_task = engine_rt.spawn(pipeline::run(
        tokio::runtime::Handle::current(),
        handle.clone(),
        sources,
        dead_letters,
        cfg.pipeline.channel_capacity,
        shutdown_rx,
        state.clone(),
        lake.as_ref().and_then(|l| l.archiver.clone()),
        alerts.clone().filter(|_| cfg.until_eof),
    ));

    let finished = wait_for_end(
        &cfg,
        &handle,
        &alerts,
        &state,
        &mut signals,
        &mut pipeline_task,
        stop_after,
        exit_when_done,
    )
    .await?;
    if let (Some(m), Some(Ok(()))) = (&alerts, &finished) {
        // Bounded run finished (and its rules evaluated the final views
        // then): deliver what is in the outbox before stopping (the outbox
        // keeps anything undelivered for the next start).
        let timeout = cfg.alerts.retry_max_delay.max(Duration::from_secs(10));
        if !m.wait_delivered(timeout).await {
            tracing::warn!(
                pending = m.outbox().pending().unwrap_or(0),
                "alerts not all delivered before exit; kept in the outbox"
            );
        }
    }
    let _ = shutdown_tx.send(true);
    if let Some(t) = alert_task {
        let _ = t.await;
    }
    // What alerting cost in this run (the same figures as the health's
    // `alerts.rules`).
    for h in alerts.iter().flat_map(|m| m.rule_health()) {
        tracing::info!(
            rule = %h.name, evaluations = h.evaluations, failures = h.consecutive_failures,
            seconds = h.evaluation_seconds, last_ms = h.last_duration_ms, "alert rule totals"
        );
    }
    let result = match finished {
        Some(r) => r,
        None => pipeline_task.await.context("pipeline task panicked")?,
    };
    shut_down(&handle, &checkpointer, &lake, servers).await?;
    result
}

/// The Prometheus recorder, with the counters that may stay at zero shown
/// from the start (a dashboard can tell "none" from "not reported").
fn install_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ])
        .ok()?
        .install_recorder()
        .ok();
    for k in StreamKind::ALL {
        metrics::counter!(metric_names::INGEST_DEAD_LETTERS_TOTAL, "stream" => k.name())
            .increment(0);
        metrics::counter!(metric_names::ENGINE_LATE_EVENTS_TOTAL, "stream" => k.name())
            .increment(0);
        metrics::counter!(metric_names::ENGINE_DUPLICATE_EVENTS_TOTAL, "stream" => k.name())
            .increment(0);
    }
    handle
}

/// The engine with its dimension tables, the built-in and configured
/// views, the alert rules and the views created at run time; fails with
/// the file (and statement) at fault.
async fn build_engine(cfg: &Config) -> anyhow::Result<(Engine, Vec<WatchedDimension>)> {
    let mut engine_cfg: EngineConfig = cfg.engine.clone();
    engine_cfg.data_dir = Some(cfg.data_dir.clone());
    if cfg.sql.builtin {
        // A lot leaves `stock_lots` 90 days after its last movement unless
        // the operator sets its retention (every delivery of a perishable
        // is a new lot: the view would otherwise grow for ever).
        engine_cfg
            .state_ttl
            .entry("stock_lots".to_string())
            .or_insert(humantime_serde::Serde::from(Duration::from_secs(
                90 * 86_400,
            )));
    }
    engine_cfg.query_memory_limit = cfg.serving.memory_limit_bytes();
    let mut engine = Engine::new(engine_cfg)?;
    let watched = pipeline::load_dimensions(&mut engine, &cfg.dimensions).await?;
    if cfg.sql.builtin {
        for (file, sql) in storepulse_sql::builtin::scripts(&cfg.retail)? {
            engine
                .execute_sql(&sql)
                .await
                .with_context(|| format!("built-in views {file}"))?;
        }
    }
    for f in &cfg.sql.files {
        let sql =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        engine
            .execute_sql(&sql)
            .await
            .with_context(|| format!("in {}", f.display()))?;
    }
    if cfg.sql.builtin && cfg.alerts.builtin {
        let (file, sql) = storepulse_sql::builtin::alert_script(&cfg.retail)?;
        engine
            .execute_sql(&sql)
            .await
            .with_context(|| format!("built-in alerts {file}"))?;
    }
    for (i, rule) in cfg.alerts.rules.iter().enumerate() {
        engine
            .define_alert(&rule.name, &rule.query, rule.options())
            .await
            .with_context(|| format!("alerts.rules[{i}] ({})", rule.name))?;
    }
    // Views created at run time (over HTTP) come back, in order.
    if let Some(sql) = storepulse_engine::catalog::read(&cfg.data_dir)? {
        engine.execute_sql(&sql).await.with_context(|| {
            format!(
                "{} (views created at run time; edit or remove the statement that fails)",
                storepulse_engine::catalog::catalog_path(&cfg.data_dir).display()
            )
        })?;
    }
    if let Some(name) = engine.unknown_refresh_views().first() {
        anyhow::bail!(
            "engine.refresh: no query-time view named '{name}' (CREATE VIEW {name} ... in the loaded scripts)"
        );
    }
    if let Some(name) = engine.unknown_state_ttl_views().first() {
        anyhow::bail!(
            "engine.state_ttl: no materialized view named '{name}' (CREATE MATERIALIZED VIEW {name} ... in the loaded scripts)"
        );
    }
    Ok((engine, watched))
}

/// The alert manager over the defined rules (`None` without rules), with
/// `alert_history` registered for queries.
fn start_alerts(
    cfg: &Config,
    handle: &EngineHandle,
    defs: &[AlertDefinition],
) -> anyhow::Result<Option<Arc<AlertManager>>> {
    if defs.is_empty() {
        return Ok(None);
    }
    let m = AlertManager::new(handle.clone(), defs, cfg.alerts.clone(), &cfg.data_dir)
        .context("alerts")?;
    handle.serving_context().register_table(
        "alert_history",
        Arc::new(storepulse_alerts::HistoryTable {
            outbox: m.outbox().clone(),
        }),
    )?;
    tracing::info!(
        rules = m.rules().len(),
        sinks = cfg.alerts.sinks.len(),
        "alerting enabled"
    );
    Ok(Some(Arc::new(m)))
}

/// The bound listeners: pgwire (optional) and HTTP(S).
struct Listeners {
    pg: Option<PgServer>,
    http: TcpListener,
    https: Option<Arc<storepulse_serve::tls::ServerConfig>>,
}

/// The serving tasks, joined at shutdown.
struct Servers {
    http: JoinHandle<std::io::Result<()>>,
    pg: Option<JoinHandle<()>>,
}

impl Listeners {
    /// Binds `[pg] listen` and `[http] listen` (a taken port fails the
    /// start naming the key).
    async fn bind(cfg: &Config, handle: &EngineHandle) -> anyhow::Result<Self> {
        let tls = |alpn: &[&[u8]]| {
            cfg.tls
                .as_ref()
                .map(|t| storepulse_serve::tls::server_config(t, alpn))
                .transpose()
        };
        let pg = match cfg.pg.listen {
            Some(addr) => Some(
                PgServer::bind(
                    handle.clone(),
                    &cfg.pg,
                    addr,
                    cfg.serving.limits(),
                    tls(&[])?,
                )
                .await?,
            ),
            None => None,
        };
        let http = TcpListener::bind(cfg.http.listen)
            .with_context(|| format!("http.listen: cannot bind {}", cfg.http.listen))?;
        http.set_nonblocking(true)?;
        let https = if cfg.http.tls {
            tls(&[b"h2", b"http/1.1"])?
        } else {
            None
        };
        Ok(Self { pg, http, https })
    }

    /// Logs where the server listens, with a first query to try.
    fn announce(&self, views: usize, dead_letters: &std::path::Path) {
        let scheme = if self.https.is_some() {
            "https"
        } else {
            "http"
        };
        let addr = self.http.local_addr().ok();
        let addr = addr.map(|a| a.to_string()).unwrap_or_default();
        let pg_addr = self.pg.as_ref().and_then(|p| p.local_addr().ok());
        tracing::info!(
            url = %format!("{scheme}://{addr}/"),
            pg = %pg_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
            views,
            dead_letters = %dead_letters.display(),
            "storepulse listening; try: curl -s {scheme}://{addr}/api/v1/query -d 'SELECT * FROM sales_by_store_hourly LIMIT 5'{}",
            pg_addr.map(|a| format!(" or psql -h {} -p {}", a.ip(), a.port())).unwrap_or_default()
        );
    }

    /// Serves pgwire and HTTP until `shutdown` turns true.
    fn spawn(
        self,
        cfg: &Config,
        handle: &EngineHandle,
        runtime: Arc<Runtime>,
        shutdown: &watch::Receiver<bool>,
    ) -> Servers {
        let stopped = |mut stop: watch::Receiver<bool>| async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let pg = self
            .pg
            .map(|p| tokio::spawn(p.run(stopped(shutdown.clone()))));
        let router = storepulse_serve::http::router(
            handle.clone(),
            runtime,
            &cfg.http,
            cfg.serving.limits(),
        );
        let http = tokio::spawn(storepulse_serve::http::serve(
            self.http,
            self.https,
            router,
            stopped(shutdown.clone()),
        ));
        Servers { http, pg }
    }
}

/// Starts what runs beside the pipeline until `shutdown`: dimension
/// reloads, view refreshes, stock-quality gauges and checkpoints. Returns
/// the engine's own runtime, where the pipeline is to run too.
fn spawn_background(
    cfg: &Config,
    handle: &EngineHandle,
    watched: Vec<WatchedDimension>,
    checkpointer: &Option<Arc<Checkpointer>>,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<EngineRuntime> {
    tokio::spawn(pipeline::watch_dimensions(watched, shutdown.clone()));
    // Applying batches and refreshing views is CPU work: it runs on its own
    // thread so that it never stalls the runtime serving queries.
    let engine_rt = EngineRuntime::start()?;
    engine_rt.spawn(pipeline::refresh_views(handle.clone(), shutdown.clone()));
    if cfg.sql.builtin {
        tokio::spawn(pipeline::watch_stock_quality(
            handle.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(c) = checkpointer {
        engine_rt.spawn(c.clone().run(shutdown.clone()));
    }
    Ok(engine_rt)
}

/// Waits for a stop signal, `stop_after`, or the pipeline's end. When a
/// bounded run's pipeline ends well, the refreshed views recompute and the
/// rules evaluate the final views before the health shows `finished`, so
/// that what a client then reads is final; unless `exit_when_done`, the
/// process then serves until a signal. Returns the pipeline's result if it
/// ended.
#[allow(clippy::too_many_arguments)]
async fn wait_for_end(
    cfg: &Config,
    handle: &EngineHandle,
    alerts: &Option<Arc<AlertManager>>,
    state: &PipelineState,
    signals: &mut StopSignals,
    pipeline_task: &mut JoinHandle<anyhow::Result<()>>,
    stop_after: Option<Duration>,
    exit_when_done: bool,
) -> anyhow::Result<Option<anyhow::Result<()>>> {
    let deadline = async {
        match stop_after {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        sig = signals.recv() => tracing::info!(signal = sig, "shutting down"),
        _ = deadline => tracing::info!("duration reached: shutting down"),
        r = pipeline_task => {
            let r = r.context("pipeline task panicked")?;
            let failed = r.is_err();
            if !failed {
                if let Err(e) = handle.refresh_all().await {
                    metrics::counter!(metric_names::ENGINE_VIEW_REFRESH_ERRORS_TOTAL).increment(1);
                    tracing::warn!(error = %e, "refreshing a view failed");
                }
                if let Some(m) = alerts {
                    m.evaluate_all().await;
                }
                state.finish();
            }
            if !(failed || exit_when_done || !cfg.until_eof) {
                tracing::info!("input finished; still serving queries until Ctrl-C");
                let sig = signals.recv().await;
                tracing::info!(signal = sig, "shutting down");
            }
            return Ok(Some(r));
        }
    }
    Ok(None)
}

/// After the sources stopped: the final checkpoint (what the next start
/// resumes from), the archive flushed, the servers drained, the stream
/// totals logged.
async fn shut_down(
    handle: &EngineHandle,
    checkpointer: &Option<Arc<Checkpointer>>,
    lake: &Option<Arc<LakeParts>>,
    servers: Servers,
) -> anyhow::Result<()> {
    if let Some(c) = checkpointer {
        let started = std::time::Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        match c.take(Some(deadline)).await {
            Ok(m) => tracing::info!(
                checkpoint = %m.id, bytes = m.bytes(), delta_views = m.chains.len(),
                seconds = started.elapsed().as_secs_f64(), "final checkpoint written"
            ),
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "final checkpoint failed; the next start resumes from the previous one"
            ),
        }
    }
    if let Some(l) = lake {
        // Everything the engine accepted goes to the archive before exit.
        l.flush(Duration::from_secs(60)).await;
    }
    servers.http.await.context("server task panicked")??;
    if let Some(t) = servers.pg {
        let _ = t.await;
    }
    let engine = handle.lock().await;
    for s in engine.streams() {
        if s.accepted_events + s.duplicate_events + s.late_events > 0 {
            tracing::info!(
                stream = %s.stream, accepted = s.accepted_events, duplicates = s.duplicate_events,
                late = s.late_events, "stream totals"
            );
        }
    }
    // What the state came to: capacity planning reads these (the same
    // figures as `GET /api/v1/views`).
    for v in engine.views() {
        if let (Some(groups), Some(bytes)) = (v.groups, v.state_bytes) {
            tracing::info!(
                view = %v.name, groups, state_bytes = bytes,
                bytes_per_group = bytes.checked_div(groups).unwrap_or(0),
                output_bytes = v.output_bytes.unwrap_or(0), "view state"
            );
        }
    }
    tracing::info!(
        state_bytes = engine.state_bytes(),
        output_bytes = engine.output_bytes(),
        "engine state"
    );
    Ok(())
}

/// Ctrl-C (SIGINT) and SIGTERM (what `docker stop` and Kubernetes send)
/// start a graceful shutdown. The listeners are registered when created: a
/// signal that arrives while nothing awaits it (say during the final alert
/// evaluation of a bounded run) is kept for the next [`StopSignals::recv`]
/// instead of being lost.
struct StopSignals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
                term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Waits for the next stop signal and names it.
    async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.int.recv() => "SIGINT",
                _ = self.term.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}
