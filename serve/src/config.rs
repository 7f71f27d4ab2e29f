//! `[serving]`, `[http]`, `[pg]` and `[tls]` of `storepulse.toml`.
//!
//! ```toml
//! [serving]
//! timeout = "30s"             # per request (parse, plan, run, encode), HTTP and pgwire
//! max_rows = 1000000          # result rows per query
//! max_result_bytes = "256 MiB" # result size per query
//! memory_limit = "2 GiB"      # DataFusion memory pool shared by all queries and results
//! max_sql_bytes = "1 MiB"     # SQL text per request
//! max_statements = 100        # statements per request
//! max_expression_depth = 1000 # nesting of expressions and subqueries
//!
//! [pg]
//! listen = "127.0.0.1:5433"
//! user = "storepulse"
//! password = "..."         # or STOREPULSE_PG_PASSWORD; required beyond loopback
//! tls = true               # needs [tls]
//! max_connections = 100    # authenticated sessions
//! max_startup_connections = 256 # sockets still logging in
//! startup_timeout = "10s"  # to finish TLS and authentication
//!
//! [tls]
//! cert = "server.crt"      # PEM chain
//! key = "server.key"       # PEM private key (PKCS#8, PKCS#1 or SEC1)
//! ```

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use bytesize::ByteSize;
use serde::Deserialize;
use storepulse_engine::{QueryLimits, SqlLimits};

use crate::ServeError;

/// `[serving]`: limits of every analyst request (HTTP and pgwire). Each
/// limit is answered with a clear error, never a crash; the server, ingest
/// and other clients go on.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServingConfig {
    /// A request running longer than this is cancelled (pgwire SQLSTATE
    /// 57014, HTTP 408): parsing, planning, execution and encoding the
    /// answer, all statements of a script together. A pgwire client's `SET
    /// statement_timeout` may lower it, not raise it.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// A result with more rows than this is refused (SQLSTATE 54000, HTTP
    /// 413); execution stops as soon as it is passed.
    pub max_rows: usize,
    /// A result larger than this is refused (SQLSTATE 54000, HTTP 413):
    /// its Arrow bytes while collecting, and over HTTP its encoded body.
    /// Absent: unbounded (the memory limit still holds).
    pub max_result_bytes: Option<ByteSize>,
    /// The memory pool of the serving context, shared by all concurrent
    /// queries, their collected results (until encoded), cursors, reports
    /// and snapshots: a query needing more fails with "Resources
    /// exhausted" (SQLSTATE 53200, HTTP 413). Absent: unbounded.
    pub memory_limit: Option<ByteSize>,
    /// SQL text longer than this is refused before parsing (SQLSTATE 54001,
    /// HTTP 400 `too_complex`).
    pub max_sql_bytes: ByteSize,
    /// A request with more statements than this is refused before any runs
    /// (SQLSTATE 54001, HTTP 400 `too_complex`).
    pub max_statements: usize,
    /// A statement whose expressions and subqueries nest deeper than this
    /// is refused before planning (SQLSTATE 54001, HTTP 400 `too_complex`).
    pub max_expression_depth: usize,
}

impl Default for ServingConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            max_rows: 1_000_000,
            max_result_bytes: Some(ByteSize::mib(256)),
            memory_limit: Some(ByteSize::gib(2)),
            max_sql_bytes: ByteSize::mib(1),
            max_statements: SqlLimits::DEFAULT.max_statements,
            max_expression_depth: SqlLimits::DEFAULT.max_expression_depth,
        }
    }
}

impl ServingConfig {
    /// The per-request limits.
    pub fn limits(&self) -> QueryLimits {
        QueryLimits {
            timeout: Some(self.timeout),
            max_rows: Some(self.max_rows),
            max_result_bytes: self.max_result_bytes.map(bytes),
            sql: SqlLimits {
                max_sql_bytes: bytes(self.max_sql_bytes),
                max_statements: self.max_statements.max(1),
                max_expression_depth: self.max_expression_depth.max(1),
            },
            deadline: None,
        }
    }

    /// The memory pool size in bytes.
    pub fn memory_limit_bytes(&self) -> Option<usize> {
        self.memory_limit.map(bytes)
    }
}

fn bytes(b: ByteSize) -> usize {
    usize::try_from(b.as_u64()).unwrap_or(usize::MAX)
}

/// `[pg]`: the Postgres wire protocol listener.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PgConfig {
    /// Address to listen on (`127.0.0.1:0` picks a free port); absent: no
    /// pgwire listener (`--pg` on the command line sets it).
    pub listen: Option<SocketAddr>,
    /// The user name clients log in with (when a password is set).
    pub user: String,
    /// The password (SCRAM-SHA-256). `STOREPULSE_PG_PASSWORD` overrides it.
    /// Required when `listen` is not a loopback address.
    pub password: Option<String>,
    /// Authenticated sessions at most; one more is refused with SQLSTATE
    /// 53300 `too many connections` when it has authenticated (sockets
    /// still logging in do not take these slots).
    pub max_connections: usize,
    /// Sockets still negotiating TLS or authenticating at most; beyond it a
    /// new socket gets 53300 at once.
    pub max_startup_connections: usize,
    /// A socket that has not finished TLS and authentication within this is
    /// closed.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Offer TLS (needs `[tls]`); clients may still connect in clear text
    /// unless they require TLS (`sslmode=require`).
    pub tls: bool,
}

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            listen: None,
            user: "storepulse".into(),
            password: None,
            max_connections: 100,
            max_startup_connections: 256,
            startup_timeout: Duration::from_secs(10),
            tls: false,
        }
    }
}

impl PgConfig {
    /// Applies `STOREPULSE_PG_PASSWORD` if set.
    pub fn with_env(mut self) -> Self {
        if let Ok(p) = std::env::var("STOREPULSE_PG_PASSWORD") {
            if !p.is_empty() {
                self.password = Some(p);
            }
        }
        self
    }
}

/// `[tls]`: the server certificate for HTTPS and pgwire TLS.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// `[http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// Bearer token of analysts: read-only queries and every GET.
    /// `STOREPULSE_HTTP_TOKEN` overrides it. With no token at all, requests
    /// need none (allowed on loopback only).
    #[serde(default)]
    pub token: Option<String>,
    /// Bearer token of operators: also `CREATE [MATERIALIZED] VIEW`,
    /// `DROP VIEW`, `CREATE ALERT`, snapshots and reports on demand.
    /// `STOREPULSE_ADMIN_TOKEN` overrides it.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Serve HTTPS with `[tls]`.
    #[serde(default)]
    pub tls: bool,
    /// Host names the server answers to (the `Host` header, without port;
    /// `"*"`: any). Default: on a loopback `listen`, `localhost`,
    /// `127.0.0.1` and `::1` only (so a web page cannot reach it through a
    /// rebound DNS name); beyond loopback, any (tokens are required there).
    #[serde(default)]
    pub allowed_hosts: Option<Vec<String>>,
    /// Origins of web pages allowed to call the API (CORS), e.g.
    /// `["https://bi.example.com"]`. Default: none (same origin only).
    #[serde(default)]
    pub cors_allowed_origins: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("valid address"),
            token: None,
            admin_token: None,
            tls: false,
            allowed_hosts: None,
            cors_allowed_origins: Vec::new(),
        }
    }
}

impl HttpConfig {
    /// Applies `STOREPULSE_HTTP_TOKEN` and `STOREPULSE_ADMIN_TOKEN`.
    pub fn with_env(mut self) -> Self {
        for (var, slot) in [
            ("STOREPULSE_HTTP_TOKEN", &mut self.token),
            ("STOREPULSE_ADMIN_TOKEN", &mut self.admin_token),
        ] {
            if let Ok(v) = std::env::var(var) {
                if !v.is_empty() {
                    *slot = Some(v);
                }
            }
        }
        self
    }
}

/// Refuses a listener beyond loopback without credentials: `what` names
/// the config key (`pg.listen`), `secret` the credential that must be set.
pub fn check_exposure(
    what: &str,
    addr: SocketAddr,
    has_secret: bool,
    secret: &str,
) -> Result<(), ServeError> {
    if !addr.ip().is_loopback() && !has_secret {
        return Err(ServeError::Config(format!(
            "{what} = {addr} listens beyond loopback: set {secret} (anyone who can reach the port could otherwise query the chain's data)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposure_needs_a_secret_beyond_loopback() {
        let lo: SocketAddr = "127.0.0.1:5433".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:5433".parse().unwrap();
        assert!(check_exposure("pg.listen", lo, false, "pg.password").is_ok());
        assert!(check_exposure("pg.listen", any, true, "pg.password").is_ok());
        let e = check_exposure("pg.listen", any, false, "pg.password").unwrap_err();
        assert!(e.to_string().contains("pg.password"), "{e}");
        assert!(e.to_string().contains("0.0.0.0:5433"), "{e}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = toml_like::<ServingConfig>("{\"timeout\": \"1s\", \"max_row\": 3}");
        assert!(e.contains("max_row"), "{e}");
    }

    fn toml_like<T: serde::de::DeserializeOwned + std::fmt::Debug>(json: &str) -> String {
        serde_json::from_str::<T>(json).unwrap_err().to_string()
    }
}
