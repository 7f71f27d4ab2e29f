//! The metric names storepulse-serve records, in one place (each is recorded
//! where its comment says; `/metrics` renders them in the Prometheus
//! text format). Names follow `storepulse_<component>_<name>_<unit>`.

/// `storepulse_http_auth_failures_total` (counter), recorded in `http/access.rs`.
pub const HTTP_AUTH_FAILURES_TOTAL: &str = "storepulse_http_auth_failures_total";
/// `storepulse_http_refused_total` (counter, by `reason`), recorded in `http/access.rs`.
pub const HTTP_REFUSED_TOTAL: &str = "storepulse_http_refused_total";
/// `storepulse_pg_auth_failures_total` (counter), recorded in `pg/startup.rs`.
pub const PG_AUTH_FAILURES_TOTAL: &str = "storepulse_pg_auth_failures_total";
/// `storepulse_pg_connections` (gauge), recorded in `pg/mod.rs`, `pg/startup.rs`.
pub const PG_CONNECTIONS: &str = "storepulse_pg_connections";
/// `storepulse_pg_connections_refused_total` (counter), recorded in `pg/mod.rs`, `pg/startup.rs`.
pub const PG_CONNECTIONS_REFUSED_TOTAL: &str = "storepulse_pg_connections_refused_total";
/// `storepulse_pg_cursors` (gauge), recorded in `pg/cursors.rs`.
pub const PG_CURSORS: &str = "storepulse_pg_cursors";
/// `storepulse_pg_startup_timeouts_total` (counter), recorded in `pg/mod.rs`.
pub const PG_STARTUP_TIMEOUTS_TOTAL: &str = "storepulse_pg_startup_timeouts_total";
/// `storepulse_query_duration_seconds` (histogram), recorded in `pg/query.rs`, `http/query.rs`.
pub const QUERY_DURATION_SECONDS: &str = "storepulse_query_duration_seconds";
/// `storepulse_query_errors_total` (counter), recorded in `pg/query.rs`, `pg/session.rs`, `http/query.rs`.
pub const QUERY_ERRORS_TOTAL: &str = "storepulse_query_errors_total";
