//! The serving side of storepulse: what BI tools connect to.
//!
//! * [`pg`]: the Postgres wire protocol (pgwire through
//!   `datafusion-postgres`): `psql`, Grafana's PostgreSQL data source,
//!   psycopg, JDBC, tokio-postgres with prepared statements. Every query
//!   runs through [`storepulse_engine::EngineHandle::run_read_only`], so it
//!   reads one consistent snapshot of the views, is read-only, and is
//!   bounded by [`config::ServingConfig`]'s timeout, row limit and memory
//!   pool. SCRAM-SHA-256 password authentication and TLS are optional
//!   on loopback and required beyond it (see [`config::check_exposure`]).
//! * [`http`]: the HTTP API (axum): queries in JSON, CSV, Arrow IPC and
//!   Parquet through the same engine call and limits, view listing, the
//!   runtime's endpoints (health, alerts, lake actions, metrics, through
//!   [`http::Operations`], which the binary implements), the OpenAPI
//!   document and the embedded dashboard.
//! * [`tls`]: rustls server configuration from PEM files, shared by the
//!   pgwire listener and the HTTP API.
//! * [`config`]: `[serving]`, `[http]`, `[pg]` and `[tls]` of
//!   `storepulse.toml`.

pub mod config;
pub mod error;
pub mod http;
pub mod metric_names;
pub mod pg;
pub mod tls;

pub use config::{HttpConfig, PgConfig, ServingConfig, TlsConfig};
pub use error::ServeError;
pub use pg::PgServer;
