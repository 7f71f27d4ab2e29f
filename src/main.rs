//! `storepulse`: the binary. Parses the command line and runs a command;
//! `run` and `demo` go to the composition root in `app.rs`. `anyhow`
//! lives here only.

mod app;
mod checkpoint;
mod config;
mod engine_runtime;
mod lake;
mod metric_names;
mod pipeline;
mod runtime;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use storepulse_engine::EngineConfig;
use storepulse_ingest::{gen::ChainConfig, source::GeneratorSource};

use crate::config::{Config, SourceConfig};

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
        /// Number of stores (default 50; 450 with `--profile grocery-chain`).
        #[arg(long)]
        stores: Option<usize>,
        /// Number of SKUs in the catalogue (default 400; 90,000 with
        /// `--profile grocery-chain`).
        #[arg(long)]
        skus: Option<usize>,
        /// Number of members (default 20,000; 200,000 with
        /// `--profile grocery-chain`).
        #[arg(long)]
        members: Option<usize>,
        /// Multiplier on every store's receipt rate (a positive number).
        #[arg(long, default_value_t = 1.0, value_parser = parse_intensity)]
        intensity: f64,
        /// Send no stock counts (no opening stock-take either): stock known
        /// only from movements.
        #[arg(long)]
        no_stock_counts: bool,
        /// Share of SKUs whose chain price changes on a given day (06:00
        /// UTC; about one store in ten keeps the old price for 6 to 72 h),
        /// a number in [0, 1].
        #[arg(long, default_value_t = 0.003, value_parser = parse_share)]
        price_changes: f64,
        /// The stores' IANA time zone (`stores.csv` `timezone`, e.g.
        /// Asia/Shanghai): opening hours and the daily and weekly curves
        /// run on its wall clock. Default: UTC.
        #[arg(long, value_parser = parse_timezone)]
        timezone: Option<chrono_tz::Tz>,
        /// Days of event time to simulate.
        #[arg(long, default_value_t = 3)]
        days: u32,
        /// Random seed: same seed, same bytes.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Shape of the data: `default`; `grocery` (weighed produce in grams
        /// with per-gram prices to six decimals and the till's rounded line
        /// `amount`, a long tail of rarely sold SKUs); `cold-start` (sales
        /// only: no stock counts or movements yet); `grocery-chain` (a real
        /// chain's size and shape: 450 stores carrying slices of a
        /// 90,000-SKU catalogue, ~1.5 M receipt lines a year in baskets of
        /// 1 to 40 lines, most pairs selling a few times a year, no IoT;
        /// use `--days 1460` for four years).
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

/// The process allocator (feature `mimalloc`, on by default; see Cargo.toml).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process unless the operator
/// asked for them (`MIMALLOC_ALLOW_THP=1`). mimalloc marks its arenas
/// `MADV_HUGEPAGE`, and the engine's state grows and shrinks in large
/// blocks: every purged and re-used 2 MiB page is zeroed again by the
/// kernel. On the grocery-chain year that zeroing was 30 % of all CPU
/// (system time 19 s of 48 s); with huge pages off the run took 31 s
/// instead of 36 s at the same peak RSS (BENCHMARKS.md, sixth slice).
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
            eprintln!("storepulse: could not turn transparent huge pages off: {e}");
        }
    }
}

fn main() -> anyhow::Result<()> {
    disable_transparent_huge_pages();
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
            intensity,
            no_stock_counts,
            price_changes,
            timezone,
            days,
            seed,
            profile,
            out,
        } => {
            let base = ChainConfig::for_profile(profile.into());
            gen(
                ChainConfig {
                    stores: stores.unwrap_or(base.stores),
                    skus: skus.unwrap_or(base.skus),
                    members: members.unwrap_or(base.members),
                    seed,
                    intensity,
                    stock_counts: !no_stock_counts,
                    price_changes_per_sku_day: price_changes,
                    timezone,
                    ..base
                },
                days,
                out,
            )
        }
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
    GroceryChain,
}

impl From<GenProfile> for storepulse_ingest::gen::Profile {
    fn from(p: GenProfile) -> Self {
        match p {
            GenProfile::Default => Self::Default,
            GenProfile::Grocery => Self::Grocery,
            GenProfile::ColdStart => Self::ColdStart,
            GenProfile::GroceryChain => Self::GroceryChain,
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

fn parse_intensity(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "expected a positive number such as 0.5 or 2, got '{s}'"
        )),
    }
}

fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "expected a share between 0 and 1 such as 0.003, got '{s}'"
        )),
    }
}

fn parse_timezone(s: &str) -> Result<chrono_tz::Tz, String> {
    s.parse()
        .map_err(|_| format!("unknown time zone '{s}' (IANA names, e.g. Asia/Shanghai, UTC)"))
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
        http: storepulse_serve::HttpConfig {
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
    app::serve(cfg, vec![Box::new(generator)], duration, true).await
}

async fn run(cfg: Config, exit_when_done: bool) -> anyhow::Result<()> {
    app::serve(cfg, Vec::new(), None, exit_when_done).await
}
