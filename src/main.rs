//! `storepulse`: the binary. Parses the command line, wires sources, the
//! engine and the HTTP API together. `anyhow` lives here only.

mod checkpoint;
mod config;
mod dashboard;
mod engine_runtime;
mod lake;
mod metric_names;
mod openapi;
mod pipeline;
mod server;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use storepulse_engine::{Engine, EngineConfig, EngineHandle};
use storepulse_ingest::{
    gen::ChainConfig, source::GeneratorSource, DeadLetterSink, JsonlDeadLetterSink,
};
use tokio::sync::watch;

use crate::{
    config::{Config, SourceConfig},
    pipeline::PipelineState,
    server::AppState,
};

#[derive(Parser, Debug)]
#[command(
    name = "storepulse",
    version,
    about = "Real-time retail analytics: events → continuous SQL views → answers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run everything embedded: a live synthetic chain, the starter views and
    /// the HTTP API. No Kafka, no config file.
    Demo {
        /// Number of stores in the synthetic chain.
        #[arg(long, default_value_t = 20)]
        stores: usize,
        /// Target events per second.
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        /// Stop after this long (e.g. `30s`, `10m`); runs until Ctrl-C if absent.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// HTTP address (`127.0.0.1:0` picks a free port).
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// Postgres wire protocol address (`psql -h 127.0.0.1 -p 5433`).
        #[arg(long, default_value = "127.0.0.1:5433")]
        pg: SocketAddr,
        /// Directory for dead letters, late events and dimension files.
        #[arg(long, default_value = "data/demo")]
        data_dir: PathBuf,
    },
    /// Run the pipeline described by a TOML config file.
    Run {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// With `until_eof`: exit once every source has finished.
        #[arg(long)]
        exit_when_done: bool,
        /// Serve the Postgres wire protocol here (overrides `[pg] listen`).
        #[arg(long)]
        pg: Option<SocketAddr>,
    },
    /// Write a deterministic synthetic chain dataset (JSONL per stream plus
    /// dimension CSVs).
    Gen {
        /// Number of stores.
        #[arg(long, default_value_t = 50)]
        stores: usize,
        /// Number of SKUs.
        #[arg(long, default_value_t = 400)]
        skus: usize,
        /// Number of members.
        #[arg(long, default_value_t = 20000)]
        members: usize,
        /// Days of event time to simulate.
        #[arg(long, default_value_t = 3)]
        days: u32,
        /// Random seed: same seed, same bytes.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Shape of the data: `default`; `grocery` (weighed produce in grams
        /// with per-gram prices to six decimals and the till's rounded line
        /// `amount`, a long tail of rarely sold SKUs); `cold-start` (sales
        /// only: no stock counts or movements yet).
        #[arg(long, value_enum, default_value_t = GenProfile::Default)]
        profile: GenProfile,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Publish a dataset (`storepulse gen` output, or any `<stream>.jsonl`
    /// files of the event contract) to Kafka: one message per line, keyed by
    /// store_id, idempotent producer.
    Replay {
        /// Directory holding `<stream>.jsonl` files.
        dir: PathBuf,
        /// Bootstrap brokers, `host:port[,host:port]`.
        #[arg(long)]
        brokers: String,
        /// Events per second over all streams (default: as fast as possible).
        #[arg(long)]
        rate: Option<f64>,
        /// Topic names are `<prefix><stream>`.
        #[arg(long, default_value = "storepulse.")]
        topic_prefix: String,
        /// Create missing topics (the stream topics and the dead-letter
        /// topic) before publishing.
        #[arg(long)]
        create_topics: bool,
        /// Partitions of created topics.
        #[arg(long, default_value_t = 8)]
        partitions: i32,
        /// Replication factor of created topics.
        #[arg(long, default_value_t = 1)]
        replication: i32,
        /// librdkafka producer property `KEY=VALUE` (TLS, SASL,
        /// compression); repeatable.
        #[arg(long = "property", short = 'X', value_parser = parse_property)]
        properties: Vec<(String, String)>,
        /// Bound on reaching the brokers.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Run SQL against a running server and print the answer.
    Query {
        /// The SQL.
        sql: String,
        /// Server URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        server: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Csv)]
        format: OutputFormat,
        /// Bearer token (`[http] token` or `admin_token` of the server).
        #[arg(long, env = "STOREPULSE_HTTP_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutputFormat {
    Csv,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,datafusion=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Gen {
            stores,
            skus,
            members,
            days,
            seed,
            profile,
            out,
        } => gen(
            ChainConfig {
                stores,
                skus,
                members,
                seed,
                profile: profile.into(),
                ..Default::default()
            },
            days,
            out,
        ),
        Command::Query {
            sql,
            server,
            format,
            token,
        } => query(&sql, &server, format, token.as_deref()),
        Command::Replay {
            dir,
            brokers,
            rate,
            topic_prefix,
            create_topics,
            partitions,
            replication,
            properties,
            timeout,
        } => {
            if let Some(r) = rate {
                anyhow::ensure!(r.is_finite() && r > 0.0, "--rate must be positive");
            }
            let opts = storepulse_kafka::replay::ReplayOptions {
                brokers,
                topic_prefix,
                rate,
                properties: properties.into_iter().collect(),
                timeout,
                progress: true,
            };
            runtime()?.block_on(replay(
                dir,
                opts,
                create_topics.then_some((partitions, replication)),
            ))
        }
        Command::Demo {
            stores,
            rate,
            duration,
            http,
            pg,
            data_dir,
        } => runtime()?.block_on(demo(stores, rate, duration, http, pg, data_dir)),
        Command::Run {
            config,
            exit_when_done,
            pg,
        } => {
            let mut cfg = Config::load(&config)?;
            if pg.is_some() {
                cfg.pg.listen = pg;
            }
            runtime()?.block_on(run(cfg, exit_when_done))
        }
    }
}

/// Stack of the main runtime's threads. Client SQL is parsed and planned
/// on the engine's SQL threads (`storepulse_engine::sqlrt`), but executing
/// a legal statement near `[serving] max_expression_depth` (and
/// `datafusion-postgres`' own parse of it) still recurses on these; 16 MiB
/// of address space leaves a wide margin over the default 2 MiB.
const WORKER_STACK_BYTES: usize = 16 << 20;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("storepulse")
        .thread_stack_size(WORKER_STACK_BYTES)
        .build()
        .context("cannot start the async runtime")
}

/// `storepulse gen --profile`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum GenProfile {
    Default,
    Grocery,
    ColdStart,
}

impl From<GenProfile> for storepulse_ingest::gen::Profile {
    fn from(p: GenProfile) -> Self {
        match p {
            GenProfile::Default => Self::Default,
            GenProfile::Grocery => Self::Grocery,
            GenProfile::ColdStart => Self::ColdStart,
        }
    }
}

fn gen(cfg: ChainConfig, days: u32, out: PathBuf) -> anyhow::Result<()> {
    let bar = ProgressBar::new(days as u64 * 24);
    bar.set_style(
        ProgressStyle::with_template("{spinner} simulating {bar:40} {pos}/{len} hours ({eta})")
            .expect("valid template"),
    );
    let summary = storepulse_ingest::gen::write_dataset(cfg, days, &out, &mut |done, _| {
        bar.set_position(done / 3_600_000);
    })?;
    bar.finish_and_clear();
    for (stream, n) in &summary.events {
        println!("{stream:>16}: {n} events");
    }
    println!(
        "{:>16}: {} events written to {}",
        "total",
        summary.total(),
        out.display()
    );
    Ok(())
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got '{s}'"))
}

async fn replay(
    dir: PathBuf,
    opts: storepulse_kafka::replay::ReplayOptions,
    create: Option<(i32, i32)>,
) -> anyhow::Result<()> {
    use storepulse_kafka::{config, replay};
    let inputs = replay::dataset_inputs(&dir)?;
    if let Some((partitions, replication)) = create {
        let mut topics: Vec<String> = storepulse_ingest::StreamKind::ALL
            .iter()
            .map(|k| config::topic_name(&opts.topic_prefix, *k))
            .collect();
        topics.push(config::DEFAULT_DEAD_LETTER_TOPIC.to_string());
        storepulse_kafka::admin::ensure_topics(
            &opts.brokers,
            &opts.properties,
            &topics,
            partitions,
            replication,
            opts.timeout,
        )
        .await?;
    }
    let report = tokio::task::spawn_blocking(move || replay::replay(&inputs, &opts))
        .await
        .context("replay task panicked")??;
    for (stream, n) in &report.per_stream {
        println!("{:>16}: {n} events", stream.name());
    }
    println!(
        "{:>16}: {} events ({} bytes) published in {:.1}s ({:.0} events/s)",
        "total",
        report.events,
        report.bytes,
        report.seconds,
        report.events as f64 / report.seconds.max(1e-9)
    );
    Ok(())
}

fn query(sql: &str, server: &str, format: OutputFormat, token: Option<&str>) -> anyhow::Result<()> {
    let url = format!("{}/api/v1/query", server.trim_end_matches('/'));
    let accept = match format {
        OutputFormat::Csv => "text/csv",
        OutputFormat::Json => "application/json",
    };
    let mut req = ureq::post(&url);
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    let resp = req
        .header("Accept", accept)
        .header("Content-Type", "application/sql")
        .config()
        .http_status_as_error(false)
        .build()
        .send(sql)
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let body = resp.into_body().read_to_string()?;
    if !status.is_success() {
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(body);
        anyhow::bail!("query failed ({status}): {msg}");
    }
    print!("{body}");
    Ok(())
}

fn install_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ])
        .ok()?
        .install_recorder()
        .ok()
}

/// Everything `demo` and `run` share once the config is known.
async fn serve(
    cfg: Config,
    gens_override: Vec<GeneratorSource>,
    stop_after: Option<Duration>,
    exit_when_done: bool,
) -> anyhow::Result<()> {
    let metrics = install_metrics();
    // Counters that may stay at zero are shown from the start (a dashboard
    // can tell "none" from "not reported").
    for k in storepulse_ingest::StreamKind::ALL {
        metrics::counter!(crate::metric_names::INGEST_DEAD_LETTERS_TOTAL, "stream" => k.name())
            .increment(0);
        metrics::counter!(crate::metric_names::ENGINE_LATE_EVENTS_TOTAL, "stream" => k.name())
            .increment(0);
        metrics::counter!(crate::metric_names::ENGINE_DUPLICATE_EVENTS_TOTAL, "stream" => k.name())
            .increment(0);
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("data_dir: cannot create {}", cfg.data_dir.display()))?;
    let mut engine_cfg: EngineConfig = cfg.engine.clone();
    engine_cfg.data_dir = Some(cfg.data_dir.clone());
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
            .execute_sql(&rule.to_sql())
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
    let serving = engine.serving_context().clone();
    let handle = EngineHandle::new(engine);
    let checkpointer = checkpoints.map(|(store, restored)| {
        Arc::new(checkpoint::Checkpointer::new(
            store,
            handle.clone(),
            cfg.checkpoint.interval,
            restored.as_ref(),
        ))
    });
    // With checkpoints, Kafka commits only what a checkpoint holds.
    let commit = checkpointer
        .as_ref()
        .map_or_else(|| applied.clone(), |c| c.commit_positions());
    let alerts = if alert_defs.is_empty() {
        None
    } else {
        let m = storepulse_alerts::AlertManager::new(
            handle.clone(),
            &alert_defs,
            cfg.alerts.clone(),
            &cfg.data_dir,
        )
        .context("alerts")?;
        serving.register_table(
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
        Some(Arc::new(m))
    };
    let mut lake = lake::LakeParts::open(&cfg.lake, &cfg.reports, &cfg.data_dir, &handle)
        .await
        .context("lake")?;
    let dlq_path = cfg.data_dir.join("dead_letters.jsonl");
    let dead_letters: Arc<dyn DeadLetterSink> = Arc::new(JsonlDeadLetterSink::open(&dlq_path)?);
    let mut sources = pipeline::build_sources(
        &cfg.sources,
        cfg.pipeline.batch_size,
        (cfg.until_eof
            && cfg.alerts.bounded_evaluation == storepulse_alerts::BoundedEvaluation::EventTime)
            .then_some(cfg.pipeline.replay_max_drift),
        cfg.until_eof,
        applied,
        commit,
    )
    .await?;
    sources.gens.extend(gens_override);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    if let Some(l) = &mut lake {
        l.start(&shutdown_rx);
    }
    let lake = lake.map(Arc::new);
    let state = Arc::new(PipelineState::default());
    let app = AppState {
        lake: lake.clone(),
        engine: handle.clone(),
        pipeline: state.clone(),
        metrics,
        kafka: sources.kafka.iter().map(|k| k.status()).collect(),
        alerts: alerts.clone(),
        checkpoint: checkpointer.clone(),
    };
    let limits = cfg.serving.limits();
    let tls = |alpn: &[&[u8]]| {
        cfg.tls
            .as_ref()
            .map(|t| storepulse_serve::tls::server_config(t, alpn))
            .transpose()
    };
    let pg = match cfg.pg.listen {
        Some(addr) => Some(
            storepulse_serve::PgServer::bind(handle.clone(), &cfg.pg, addr, limits, tls(&[])?)
                .await?,
        ),
        None => None,
    };
    let pg_addr = pg.as_ref().map(|p| p.local_addr()).transpose()?;
    let listener = std::net::TcpListener::bind(cfg.http.listen)
        .with_context(|| format!("http.listen: cannot bind {}", cfg.http.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let https = if cfg.http.tls {
        tls(&[b"h2", b"http/1.1"])?
    } else {
        None
    };
    let scheme = if https.is_some() { "https" } else { "http" };
    // From here on SIGINT / SIGTERM stop the process gracefully.
    let mut signals = StopSignals::new()?;
    tracing::info!(
        url = %format!("{scheme}://{addr}/"),
        pg = %pg_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        views,
        dead_letters = %dlq_path.display(),
        "storepulse listening; try: curl -s {scheme}://{addr}/api/v1/query -d 'SELECT * FROM sales_by_store_hourly LIMIT 5'{}",
        pg_addr.map(|a| format!(" or psql -h {} -p {}", a.ip(), a.port())).unwrap_or_default()
    );
    tokio::spawn(pipeline::watch_dimensions(watched, shutdown_rx.clone()));
    // Applying batches and refreshing views is CPU work: it runs on its own
    // thread so that it never stalls the runtime serving queries.
    let engine_rt = engine_runtime::EngineRuntime::start()?;
    engine_rt.spawn(pipeline::refresh_views(handle.clone(), shutdown_rx.clone()));
    if cfg.sql.builtin {
        tokio::spawn(pipeline::watch_stock_quality(
            handle.clone(),
            shutdown_rx.clone(),
        ));
    }
    if let Some(c) = &checkpointer {
        engine_rt.spawn(c.clone().run(shutdown_rx.clone()));
    }
    let alert_task = alerts
        .clone()
        .map(|m| tokio::spawn(m.run(shutdown_rx.clone())));
    let pg_task = pg.map(|p| {
        let mut stop = shutdown_rx.clone();
        tokio::spawn(p.run(async move {
            let _ = stop.wait_for(|s| *s).await;
        }))
    });
    let router = server::router(
        app,
        server::Auth::from_config(&cfg.http),
        limits,
        server::Access::from_config(&cfg.http),
    );
    let server_handle = axum_server::Handle::new();
    let server = {
        let h = server_handle.clone();
        tokio::spawn(async move {
            let service = router.into_make_service();
            match https {
                Some(tls) => {
                    axum_server::from_tcp_rustls(
                        listener,
                        axum_server::tls_rustls::RustlsConfig::from_config(tls),
                    )?
                    .handle(h)
                    .serve(service)
                    .await
                }
                None => {
                    axum_server::from_tcp(listener)?
                        .handle(h)
                        .serve(service)
                        .await
                }
            }
        })
    };
    {
        let mut stop = shutdown_rx.clone();
        let h = server_handle.clone();
        tokio::spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            h.graceful_shutdown(Some(Duration::from_secs(10)));
        });
    }
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
    let deadline = async {
        match stop_after {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let mut pipeline_result = None;
    tokio::select! {
        sig = signals.recv() => tracing::info!(signal = sig, "shutting down"),
        _ = deadline => tracing::info!("duration reached: shutting down"),
        r = &mut pipeline_task => {
            let r = r.context("pipeline task panicked")?;
            let failed = r.is_err();
            pipeline_result = Some(r);
            if !failed {
                // Every batch is applied: the refreshed views recompute and
                // the rules evaluate the final views before the health
                // shows `finished`, so that what a client then reads is
                // final.
                if let Err(e) = handle.refresh_all().await {
                    metrics::counter!(crate::metric_names::ENGINE_VIEW_REFRESH_ERRORS_TOTAL).increment(1);
                    tracing::warn!(error = %e, "refreshing a view failed");
                }
                if let Some(m) = &alerts {
                    m.evaluate_all().await;
                }
                state.finish();
            }
            if failed || exit_when_done || !cfg.until_eof {
                // fall through to shutdown
            } else {
                tracing::info!("input finished; still serving queries until Ctrl-C");
                let sig = signals.recv().await;
                tracing::info!(signal = sig, "shutting down");
            }
        }
    }
    if let (Some(m), Some(Ok(()))) = (&alerts, &pipeline_result) {
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
    if pipeline_result.is_none() {
        pipeline_result = Some(pipeline_task.await.context("pipeline task panicked")?);
    }
    if let Some(c) = &checkpointer {
        // Sources are stopped and the last batch applied: the final state
        // is what the next start resumes from.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        match c.take(Some(deadline)).await {
            Ok(m) => {
                tracing::info!(checkpoint = %m.id, bytes = m.bytes(), "final checkpoint written")
            }
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "final checkpoint failed; the next start resumes from the previous one"
            ),
        }
    }
    if let Some(l) = &lake {
        // Sources are stopped: everything the engine accepted goes to the
        // archive before exit.
        l.flush(Duration::from_secs(60)).await;
    }
    server.await.context("server task panicked")??;
    if let Some(t) = pg_task {
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
    pipeline_result.unwrap_or(Ok(()))
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

async fn demo(
    stores: usize,
    rate: f64,
    duration: Option<Duration>,
    http: SocketAddr,
    pg: SocketAddr,
    data_dir: PathBuf,
) -> anyhow::Result<()> {
    anyhow::ensure!(stores > 0, "--stores must be at least 1");
    anyhow::ensure!(rate > 0.0, "--rate must be positive");
    let chain = ChainConfig {
        stores,
        skus: 300,
        members: 5000,
        ..Default::default()
    };
    let dimensions = pipeline::write_chain_dimensions(&chain, &data_dir.join("dimensions"))?;
    // Alerts go to the log and to <data_dir>/alerts.jsonl.
    let alerts = storepulse_alerts::AlertsConfig {
        sinks: vec![
            storepulse_alerts::SinkConfig::Log { name: "log".into() },
            storepulse_alerts::SinkConfig::Jsonl {
                name: "file".into(),
                path: data_dir.join("alerts.jsonl"),
            },
        ],
        ..Default::default()
    };
    let cfg = Config {
        alerts,
        data_dir,
        until_eof: false,
        engine: EngineConfig::default(),
        http: config::HttpConfig {
            listen: http,
            ..Default::default()
        }
        .with_env(),
        sql: config::SqlConfig::default(),
        pipeline: config::PipelineConfig::default(),
        dimensions,
        retail: Default::default(),
        sources: Vec::<SourceConfig>::new(),
        lake: Default::default(),
        checkpoint: Default::default(),
        reports: Vec::new(),
        serving: Default::default(),
        pg: storepulse_serve::PgConfig {
            listen: Some(pg),
            ..Default::default()
        }
        .with_env(),
        tls: None,
    };
    cfg.validate_serving()?;
    let generator = GeneratorSource {
        chain,
        rate: Some(rate),
        tick: Duration::from_millis(200),
    };
    serve(cfg, vec![generator], duration, true).await
}

async fn run(cfg: Config, exit_when_done: bool) -> anyhow::Result<()> {
    serve(cfg, Vec::new(), None, exit_when_done).await
}
