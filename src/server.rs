//! The HTTP API: SQL queries (JSON, CSV, Arrow IPC, Parquet), view listing,
//! health, alerts, lake actions, Prometheus metrics, the OpenAPI document
//! and the embedded dashboard.
//!
//! Authentication is a bearer token per role ([`Auth`]): analysts'
//! requests are read-only; operators' (the admin token) may also define
//! views and trigger snapshots and reports. With no token configured (only
//! allowed on loopback) every request is the operator's. The dashboard's
//! static files, `/livez` and the OpenAPI document need no token.
//!
//! Browsers are kept out of the operator's powers ([`Access`]): a `Host`
//! outside the allow-list is refused (DNS rebinding), so is a request whose
//! `Origin` is neither this server nor a configured CORS origin, and view
//! DDL runs only from a POST whose content type a page cannot send
//! cross-site without a CORS preflight (`application/json`,
//! `application/sql`), never from a GET.

use std::{sync::Arc, time::Instant};

use axum::{
    body::Bytes,
    extract::{
        rejection::{BytesRejection, QueryRejection},
        DefaultBodyLimit, Path, Query, Request, State,
    },
    http::{header, HeaderMap, StatusCode},
    middleware::Next,
    response::{Html, IntoResponse, Response},
    routing::{get, post},
    Extension, Json, Router,
};
use datafusion::{arrow::array::RecordBatch, datasource::TableType};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;
use storepulse_engine::{Ddl, EngineError, EngineHandle, ErrorKind, QueryLimits, QueryOutput};

use crate::pipeline::PipelineState;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub(crate) struct AppState {
    /// The engine.
    pub(crate) engine: EngineHandle,
    /// Lifecycle of the ingest pipeline.
    pub(crate) pipeline: Arc<PipelineState>,
    /// Prometheus renderer.
    pub(crate) metrics: Option<PrometheusHandle>,
    /// Kafka sources' assignment and backpressure state.
    pub(crate) kafka: Vec<storepulse_kafka::KafkaStatus>,
    /// The alert manager (`None` if no rule is defined).
    pub(crate) alerts: Option<Arc<storepulse_alerts::AlertManager>>,
    /// The lake (`None` with `[lake] enabled = false`).
    pub(crate) lake: Option<Arc<crate::lake::LakeParts>>,
    /// The checkpointer (`None` with `[checkpoint] enabled = false`).
    pub(crate) checkpoint: Option<Arc<crate::checkpoint::Checkpointer>>,
}

/// Who a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Read-only queries and every GET.
    Analyst,
    /// Also view DDL, snapshots and reports on demand.
    Admin,
}

/// The bearer tokens of `[http]`.
#[derive(Clone, Default)]
pub(crate) struct Auth {
    token: Option<String>,
    admin_token: Option<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("admin_token", &self.admin_token.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Auth {
    /// From `[http] token` / `admin_token` (environment already applied).
    pub(crate) fn from_config(c: &crate::config::HttpConfig) -> Self {
        Self {
            token: c.token.clone(),
            admin_token: c.admin_token.clone(),
        }
    }

    fn role(&self, headers: &HeaderMap) -> Option<Role> {
        if self.token.is_none() && self.admin_token.is_none() {
            return Some(Role::Admin);
        }
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))?
            .trim()
            .as_bytes();
        let matches = |t: &Option<String>| {
            t.as_ref()
                .is_some_and(|t| bool::from(subtle::ConstantTimeEq::ct_eq(t.as_bytes(), given)))
        };
        if matches(&self.admin_token) {
            Some(Role::Admin)
        } else if matches(&self.token) {
            Some(Role::Analyst)
        } else {
            None
        }
    }
}

async fn authenticate(State(auth): State<Auth>, mut req: Request, next: Next) -> Response {
    match auth.role(req.headers()) {
        Some(role) => {
            req.extensions_mut().insert(role);
            next.run(req).await
        }
        None => {
            metrics::counter!(crate::metric_names::HTTP_AUTH_FAILURES_TOTAL).increment(1);
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token (Authorization: Bearer <[http] token>)".into(),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"storepulse\""),
            );
            r
        }
    }
}

fn require_admin(role: Role) -> Result<(), Box<Response>> {
    if role == Role::Admin {
        Ok(())
    } else {
        Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "read_only",
            "permission denied: this needs the admin token ([http] admin_token)".into(),
        )))
    }
}

/// Which hosts and origins the server answers (`[http] allowed_hosts`,
/// `cors_allowed_origins`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Access {
    /// Host names (without port) accepted in `Host`; `None`: any.
    hosts: Option<Vec<String>>,
    /// Origins other pages may call the API from (CORS), exactly as
    /// browsers send them (`https://bi.example.com`).
    cors_origins: Vec<String>,
}

impl Access {
    /// From `[http]`: the configured hosts, else loopback names when
    /// listening on loopback (where no token may be set, so a rebound DNS
    /// name must not reach it) and any host beyond it (tokens required).
    pub(crate) fn from_config(c: &crate::config::HttpConfig) -> Self {
        let hosts = match &c.allowed_hosts {
            Some(h) if h.iter().any(|h| h == "*") => None,
            Some(h) => Some(h.iter().map(|h| normalize_host(h)).collect()),
            None if c.listen.ip().is_loopback() => Some(
                ["localhost", "127.0.0.1", "::1"]
                    .iter()
                    .map(|h| h.to_string())
                    .collect(),
            ),
            None => None,
        };
        Self {
            hosts,
            cors_origins: c.cors_allowed_origins.clone(),
        }
    }

    fn host_allowed(&self, host: Option<&str>) -> bool {
        match (&self.hosts, host) {
            (None, _) => true,
            (Some(list), Some(h)) => list.contains(&normalize_host(h)),
            (Some(_), None) => false,
        }
    }
}

/// `Host: [::1]:8080` → `::1`; `LocalHost:80` → `localhost`.
fn normalize_host(h: &str) -> String {
    let h = h.trim();
    let name = if let Some(rest) = h.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if h.matches(':').count() == 1 {
        h.split(':').next().unwrap_or(h)
    } else {
        h
    };
    name.to_ascii_lowercase()
}

/// Refuses a `Host` outside the allow-list and a cross-site `Origin`.
async fn check_access(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if !access.host_allowed(host.as_deref()) {
        metrics::counter!(crate::metric_names::HTTP_REFUSED_TOTAL, "reason" => "host").increment(1);
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            "host_not_allowed",
            format!(
                "Host {} is not served here ([http] allowed_hosts; on loopback only localhost, 127.0.0.1 and [::1])",
                host.as_deref().unwrap_or("(none)")
            ),
        );
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("null");
        let same = origin.split_once("://").is_some_and(|(_, authority)| {
            Some(authority.to_ascii_lowercase()) == host.as_ref().map(|h| h.to_ascii_lowercase())
        });
        if !same && !access.cors_origins.iter().any(|o| o == origin) {
            metrics::counter!(crate::metric_names::HTTP_REFUSED_TOTAL, "reason" => "origin")
                .increment(1);
            return error(
                StatusCode::FORBIDDEN,
                "cross_origin",
                format!(
                    "requests from pages on {origin} are refused ([http] cors_allowed_origins)"
                ),
            );
        }
    }
    next.run(req).await
}

/// The API's routes: `auth` guards everything but the dashboard's files,
/// `/livez` and the OpenAPI document; `limits` bound every query; `access`
/// checks `Host` and `Origin` on every route.
pub(crate) fn router(state: AppState, auth: Auth, limits: QueryLimits, access: Access) -> Router {
    // A JSON body escapes the SQL; room for that and the wrapper.
    let body_limit = limits.sql.max_sql_bytes.saturating_mul(2).max(64 << 10);
    let guarded = Router::new()
        .route(
            "/api/v1/query",
            post(query)
                .get(query_get)
                .layer(DefaultBodyLimit::max(body_limit)),
        )
        .route("/api/v1/views", get(views))
        .route("/api/v1/health", get(health))
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/snapshots", post(take_snapshot).get(list_snapshots))
        .route("/api/v1/reports/{name}", post(run_report))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(auth, authenticate))
        .layer(Extension(limits));
    let cors = (!access.cors_origins.is_empty()).then(|| {
        let origins: Vec<header::HeaderValue> = access
            .cors_origins
            .iter()
            .filter_map(|o| header::HeaderValue::from_str(o).ok())
            .collect();
        tower_http::cors::CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT])
    });
    let router = Router::new()
        .route("/", get(index))
        .route("/assets/{file}", get(crate::dashboard::asset))
        .route("/livez", get(|| async { "ok" }))
        .route("/api/v1/openapi.json", get(openapi))
        .merge(guarded)
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint (see /api/v1/openapi.json)".into(),
            )
        })
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(access),
            check_access,
        ));
    match cors {
        Some(c) => router.layer(c),
        None => router,
    }
}

/// Whether this request may run view DDL: the admin's, by POST, with a
/// content type a browser cannot send cross-site without a preflight.
fn ddl_policy(role: Role, post: bool, headers: &HeaderMap) -> Ddl {
    if role != Role::Admin {
        return Ddl::Refused("it needs the admin token; this request is read-only");
    }
    if !post {
        return Ddl::Refused("statements that change views need POST, never GET");
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ct.starts_with("application/json") || ct.starts_with("application/sql") {
        Ddl::Allowed
    } else {
        Ddl::Refused(
            "statements that change views need Content-Type: application/json or application/sql \
             (a web page cannot send those to another site without a CORS preflight)",
        )
    }
}

/// A rejected query string or body, as a JSON error.
fn rejection(status: StatusCode, what: &str, text: String) -> Response {
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "request_too_large"
    } else {
        "bad_request"
    };
    error(status, code, format!("{what}: {text}"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryRequest {
    sql: String,
}

/// `?format=` and `?sql=` of `GET /api/v1/query`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryParams {
    sql: Option<String>,
    format: Option<String>,
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({"error": message, "code": code}))).into_response()
}

/// Answer formats, chosen by the `Accept` header.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Json,
    Csv,
    Arrow,
    Parquet,
}

/// The answer format: `?format=` wins over the `Accept` header.
fn format_of(headers: &HeaderMap, param: Option<&str>) -> Result<Format, Box<Response>> {
    if let Some(p) = param {
        return match p {
            "json" => Ok(Format::Json),
            "csv" => Ok(Format::Csv),
            "arrow" => Ok(Format::Arrow),
            "parquet" => Ok(Format::Parquet),
            other => Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("format={other}: expected json, csv, arrow or parquet"),
            ))),
        };
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    Ok(if accept.contains("text/csv") {
        Format::Csv
    } else if accept.contains("application/vnd.apache.arrow") {
        Format::Arrow
    } else if accept.contains("application/vnd.apache.parquet") {
        Format::Parquet
    } else {
        Format::Json
    })
}

/// `GET /api/v1/query?sql=...&format=...` (links, spreadsheets' web
/// queries): the same as the POST, read-only for everyone.
async fn query_get(
    State(app): State<AppState>,
    Extension(role): Extension<Role>,
    Extension(limits): Extension<QueryLimits>,
    params: Result<Query<QueryParams>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let params = match params {
        Ok(Query(p)) => p,
        Err(e) => return rejection(e.status(), "query string", e.body_text()),
    };
    let Some(sql) = params.sql.clone() else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "missing ?sql=".into(),
        );
    };
    let ddl = ddl_policy(role, false, &headers);
    run_query(&app, ddl, &limits, sql, &headers, params.format.as_deref()).await
}

/// `POST /api/v1/query`: the SQL as `{"sql": ...}` (JSON) or the plain body.
async fn query(
    State(app): State<AppState>,
    Extension(role): Extension<Role>,
    Extension(limits): Extension<QueryLimits>,
    params: Result<Query<QueryParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let params = match params {
        Ok(Query(p)) => p,
        Err(e) => return rejection(e.status(), "query string", e.body_text()),
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => return rejection(e.status(), "request body", e.body_text()),
    };
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    let sql = if is_json {
        match serde_json::from_slice::<QueryRequest>(&body) {
            Ok(r) => r.sql,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("request body: {e} (expected {{\"sql\": \"...\"}})"),
                )
            }
        }
    } else {
        match String::from_utf8(body.to_vec()) {
            Ok(s) => s,
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "body is not UTF-8".into(),
                )
            }
        }
    };
    let ddl = ddl_policy(role, true, &headers);
    run_query(&app, ddl, &limits, sql, &headers, params.format.as_deref()).await
}

/// HTTP status and error code of a failed query.
fn status_of(e: &EngineError) -> (StatusCode, &'static str) {
    match e.kind() {
        ErrorKind::ReadOnly => (StatusCode::FORBIDDEN, "read_only"),
        ErrorKind::Timeout => (StatusCode::REQUEST_TIMEOUT, "query_timeout"),
        ErrorKind::RowLimit => (StatusCode::PAYLOAD_TOO_LARGE, "row_limit"),
        ErrorKind::ResultLimit => (StatusCode::PAYLOAD_TOO_LARGE, "result_limit"),
        ErrorKind::MemoryLimit => (StatusCode::PAYLOAD_TOO_LARGE, "memory_limit"),
        ErrorKind::TooComplex => (StatusCode::BAD_REQUEST, "too_complex"),
        ErrorKind::User => (StatusCode::BAD_REQUEST, "user_error"),
        ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
    }
}

/// Runs a request's SQL and encodes the last statement's rows, all within
/// the request's one deadline; encoding runs on a blocking thread and stops
/// at the deadline or the result-size limit.
async fn run_query(
    app: &AppState,
    ddl: Ddl,
    limits: &QueryLimits,
    sql: String,
    headers: &HeaderMap,
    format: Option<&str>,
) -> Response {
    let started = Instant::now();
    let format = match format_of(headers, format) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    if sql.trim().is_empty() {
        return error(StatusCode::BAD_REQUEST, "bad_request", "empty SQL".into());
    }
    let limits = limits.start();
    let result = limits
        .within(async {
            let out = app
                .engine
                .query_with(&sql, &limits, ddl)
                .await?
                .pop()
                .ok_or(EngineError::Sql(storepulse_sql::SqlError::Empty))?;
            tokio::task::spawn_blocking(move || encode(out, format, started, &limits))
                .await
                .map_err(|e| EngineError::Internal(format!("encoding the answer: {e}")))?
        })
        .await;
    metrics::histogram!(crate::metric_names::QUERY_DURATION_SECONDS, "interface" => "http")
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(r) => r,
        Err(e) => {
            let (status, code) = status_of(&e);
            metrics::counter!(crate::metric_names::QUERY_ERRORS_TOTAL, "interface" => "http", "kind" => e.kind().as_str())
                .increment(1);
            tracing::info!(error = %e, code, "query failed");
            error(status, code, e.to_string())
        }
    }
}

/// A response body that refuses to grow past `[serving] max_result_bytes`.
struct Body {
    buf: Vec<u8>,
    max: usize,
    exceeded: bool,
}

impl std::io::Write for Body {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.max {
            self.exceeded = true;
            return Err(std::io::Error::other("result too large"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Encodes `out` as `format`: checks the deadline between batches and the
/// encoded size as it grows.
fn encode(
    out: QueryOutput,
    format: Format,
    started: Instant,
    limits: &QueryLimits,
) -> Result<Response, EngineError> {
    let max = limits.max_result_bytes.unwrap_or(usize::MAX);
    let mut body = Body {
        buf: Vec::new(),
        max,
        exceeded: false,
    };
    let written = write_body(&out, format, started, limits, &mut body);
    if body.exceeded {
        return Err(EngineError::ResultTooLarge(max));
    }
    let content_type = written?;
    Ok(([(header::CONTENT_TYPE, content_type)], body.buf).into_response())
}

/// Writes the answer into `body`; returns its content type.
fn write_body(
    out: &QueryOutput,
    format: Format,
    started: Instant,
    limits: &QueryLimits,
    body: &mut Body,
) -> Result<&'static str, EngineError> {
    let batches: &[RecordBatch] = &out.batches;
    let fail =
        |e: &dyn std::fmt::Display| EngineError::Internal(format!("encoding the answer: {e}"));
    Ok(match format {
        Format::Csv => {
            let mut w = arrow_csv::WriterBuilder::new()
                .with_header(true)
                .build(body);
            if batches.is_empty() {
                w.write(&RecordBatch::new_empty(out.schema.clone()))?;
            }
            for b in batches {
                limits.check_deadline()?;
                w.write(b)?;
            }
            "text/csv"
        }
        Format::Arrow => {
            let mut w = arrow_ipc::writer::StreamWriter::try_new(body, &out.schema)?;
            for b in batches {
                limits.check_deadline()?;
                w.write(b)?;
            }
            w.finish()?;
            "application/vnd.apache.arrow.stream"
        }
        Format::Parquet => {
            let props = parquet::file::properties::WriterProperties::builder()
                .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
                .build();
            let mut w = parquet::arrow::ArrowWriter::try_new(body, out.schema.clone(), Some(props))
                .map_err(|e| fail(&e))?;
            for b in batches {
                limits.check_deadline()?;
                w.write(b).map_err(|e| fail(&e))?;
            }
            w.close().map_err(|e| fail(&e))?;
            "application/vnd.apache.parquet"
        }
        Format::Json => {
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            let columns: Vec<_> = out
                .schema
                .fields()
                .iter()
                .map(|f| json!({"name": f.name(), "type": f.data_type().to_string()}))
                .collect();
            use std::io::Write;
            body.write_all(b"{\"columns\":").map_err(|e| fail(&e))?;
            serde_json::to_writer(&mut *body, &columns).map_err(|e| fail(&e))?;
            body.write_all(b",\"rows\":").map_err(|e| fail(&e))?;
            if rows == 0 {
                body.write_all(b"[]").map_err(|e| fail(&e))?;
            } else {
                let mut w = arrow_json::WriterBuilder::new()
                    .with_explicit_nulls(true)
                    .build::<_, arrow_json::writer::JsonArray>(&mut *body);
                for b in batches {
                    limits.check_deadline()?;
                    w.write(b)?;
                }
                w.finish()?;
            }
            write!(
                body,
                ",\"row_count\":{rows},\"elapsed_ms\":{:.3}}}",
                started.elapsed().as_secs_f64() * 1000.0
            )
            .map_err(|e| fail(&e))?;
            "application/json"
        }
    })
}

async fn views(State(app): State<AppState>) -> Response {
    let mut list: Vec<serde_json::Value> = app
        .engine
        .lock()
        .await
        .views()
        .into_iter()
        .map(|v| {
            json!({
                "name": v.name, "kind": v.kind, "streams": v.streams,
                "columns": v.columns.iter().map(|(n, t)| json!({"name": n, "type": t})).collect::<Vec<_>>(),
                "groups": v.groups, "state_bytes": v.state_bytes, "sql": v.sql,
            })
        })
        .collect();
    let ctx = app.engine.lock().await.serving_context().clone();
    let known: Vec<String> = list
        .iter()
        .map(|v| v["name"].as_str().unwrap_or("").to_string())
        .collect();
    if let Some(schema) = ctx.catalog("datafusion").and_then(|c| c.schema("public")) {
        let mut names = schema.table_names();
        names.sort();
        for name in names {
            if known.contains(&name) {
                continue;
            }
            if let Ok(Some(t)) = schema.table(&name).await {
                let kind = match t.table_type() {
                    TableType::View => "view",
                    TableType::Temporary => "stream",
                    TableType::Base => "table",
                };
                let columns: Vec<_> = t
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| json!({"name": f.name(), "type": f.data_type().to_string()}))
                    .collect();
                list.push(json!({"name": name, "kind": kind, "columns": columns, "sql": t.get_table_definition()}));
            }
        }
    }
    Json(json!({ "views": list })).into_response()
}

/// `GET /api/v1/alerts`: pending and firing alerts, the rules and the
/// outbox backlog.
/// Query of `GET /api/v1/alerts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertsQuery {
    /// Active alerts listed at most (firing first; default 1000, at most
    /// 100000); the totals are always exact.
    limit: Option<usize>,
}

async fn alerts(
    State(app): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<AlertsQuery>,
) -> Response {
    let Some(m) = &app.alerts else {
        return Json(json!({"active": [], "active_total": 0, "rules": [], "outbox_pending": 0}))
            .into_response();
    };
    let limit = q.limit.unwrap_or(1_000).min(100_000);
    let rules: Vec<serde_json::Value> = m
        .rules()
        .iter()
        .map(|r| {
            json!({
                "name": r.name, "sql": r.sql, "key": r.key,
                "every_ms": r.every.as_millis() as u64, "for_ms": r.for_.as_millis() as u64,
                "keep_firing_for_ms": r.keep_firing_for.as_millis() as u64,
                "renotify_ms": r.renotify.as_millis() as u64,
                "severity": r.severity.as_str(), "sinks": r.sinks,
                "group_by": r.group_by, "group_wait_ms": r.group_wait.as_millis() as u64,
                "group_interval_ms": r.group_interval.as_millis() as u64,
                "max_notifications_per_evaluation": r.max_notifications,
            })
        })
        .collect();
    let (active, pending, firing) = m.active_page(limit).await;
    Json(json!({
        "active": active,
        "active_total": pending + firing,
        "active_pending": pending,
        "active_firing": firing,
        "rules": rules,
        "outbox_pending": m.outbox().pending().unwrap_or(0),
    }))
    .into_response()
}

async fn health(State(app): State<AppState>) -> Response {
    // What is failing now (the engine keeps serving meanwhile): "degraded"
    // with one line per fault, so a probe or a person sees it at once.
    let mut faults: Vec<String> = Vec::new();
    for k in &app.kafka {
        if let Some((0, known)) = k.brokers_up().filter(|(_, known)| *known > 0) {
            let last = k.last_error().map(|(_, m)| m).unwrap_or_default();
            faults.push(format!(
                "kafka {}: none of {known} brokers reachable (librdkafka retries; last error: {last})",
                k.brokers
            ));
        }
    }
    let sinks = app
        .alerts
        .as_ref()
        .map(|a| a.sink_health())
        .unwrap_or_default();
    for h in sinks.iter().filter(|h| h.consecutive_failures > 0) {
        faults.push(format!(
            "alert sink {}: {} failed deliveries in a row (retrying; notifications wait in the outbox): {}",
            h.name,
            h.consecutive_failures,
            h.last_error.as_deref().unwrap_or("")
        ));
    }
    let rules = app
        .alerts
        .as_ref()
        .map(|a| a.rule_health())
        .unwrap_or_default();
    for h in rules
        .iter()
        .filter(|h| h.consecutive_failures >= storepulse_alerts::RuleHealth::FAULT_AFTER)
    {
        faults.push(format!(
            "alert rule {}: {} evaluations failed in a row (it fires nothing meanwhile): {}",
            h.name,
            h.consecutive_failures,
            h.last_error.as_deref().unwrap_or("")
        ));
    }
    if let Some(e) = app.lake.as_ref().and_then(|l| l.lake.status().last_error()) {
        faults.push(format!("lake {}: {}", e.op, e.message));
    }
    let checkpoint = app.checkpoint.as_ref().map(|c| c.status());
    if let Some(e) = checkpoint.as_ref().and_then(|c| c.error.as_ref()) {
        faults.push(format!("checkpoint: {e} (retried at the next interval)"));
    }
    let outbox_pending = app.alerts.as_ref().and_then(|a| a.outbox().pending().ok());
    let engine = app.engine.lock().await;
    Json(json!({
        "status": if faults.is_empty() { "ok" } else { "degraded" },
        "faults": faults,
        "pipeline": app.pipeline.name(),
        "epoch": engine.epoch(),
        "state_bytes": engine.state_bytes(),
        "streams": engine.streams(),
        "kafka": app.kafka.iter().map(|k| json!({
            "brokers": k.brokers,
            "group_id": k.group_id,
            "brokers_up": k.brokers_up().map(|(u, _)| u),
            "brokers_known": k.brokers_up().map(|(_, n)| n),
            "last_error": k.last_error().map(|(at, m)| json!({"at_ms": at, "message": m})),
            "assigned": k.assigned(),
            "paused": k.paused(),
            "pending_batches": k.pending_batches(),
            "lag_messages": k.lag_messages(),
        })).collect::<Vec<_>>(),
        "alerts": app.alerts.as_ref().map(|_| json!({
            "outbox_pending": outbox_pending,
            "sinks": sinks,
            "rules": rules,
        })),
        "positions": engine.positions().snapshot(),
        "lake": app.lake.as_ref().map(|l| l.lake.status().to_json(&l.lake.url())),
        "checkpoint": checkpoint,
    }))
    .into_response()
}

fn lake_of(app: &AppState) -> Result<&Arc<crate::lake::LakeParts>, Box<Response>> {
    app.lake.as_ref().ok_or_else(|| {
        Box::new(error(
            StatusCode::NOT_FOUND,
            "lake_disabled",
            "the lake is disabled ([lake] enabled = false)".into(),
        ))
    })
}

/// `POST /api/v1/snapshots`: snapshot every configured view now; answers
/// the committed manifest.
async fn take_snapshot(State(app): State<AppState>, Extension(role): Extension<Role>) -> Response {
    if let Err(r) = require_admin(role) {
        return *r;
    }
    let lake = match lake_of(&app) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    match lake
        .snapshotter
        .take(std::time::Duration::from_secs(60))
        .await
    {
        Ok(m) => Json(m).into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "snapshot_failed",
            e.to_string(),
        ),
    }
}

/// `GET /api/v1/snapshots`: committed snapshots, oldest first.
async fn list_snapshots(State(app): State<AppState>) -> Response {
    let lake = match lake_of(&app) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    match lake.snapshotter.manifests().await {
        Ok(m) => Json(json!({ "snapshots": m })).into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "lake_unavailable",
            e.to_string(),
        ),
    }
}

/// `POST /api/v1/reports/{name}`: run a configured report now.
async fn run_report(
    State(app): State<AppState>,
    Extension(role): Extension<Role>,
    Path(name): Path<String>,
) -> Response {
    if let Err(r) = require_admin(role) {
        return *r;
    }
    let lake = match lake_of(&app) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    if !lake.reporter.names().contains(&name) {
        return error(
            StatusCode::NOT_FOUND,
            "unknown_report",
            format!("no report named '{name}' in [[reports]]"),
        );
    }
    match lake
        .reporter
        .run_one(&name, std::time::Duration::from_secs(60))
        .await
    {
        Ok(o) => Json(o).into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "report_failed",
            e.to_string(),
        ),
    }
}

async fn metrics(State(app): State<AppState>) -> Response {
    match &app.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed").into_response(),
    }
}

async fn index() -> Html<&'static str> {
    Html(crate::dashboard::INDEX)
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::DOCUMENT,
    )
        .into_response()
}
