//! `POST` and `GET /api/v1/query`: SQL in, rows out as JSON, CSV, Arrow
//! IPC or Parquet (chosen by `?format=` or `Accept`). Every request runs
//! within its `[serving]` limits and one deadline that also bounds
//! encoding; failures map to an HTTP status and a stable `code`
//! ([`status_of`], exhaustive over [`ErrorKind`]).

use std::time::Instant;

use axum::{
    body::Bytes,
    extract::{
        rejection::{BytesRejection, QueryRejection},
        Query, State,
    },
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Extension,
};
use datafusion::arrow::array::RecordBatch;
use serde::Deserialize;
use serde_json::json;
use storepulse_engine::{Ddl, EngineError, ErrorKind, QueryLimits, QueryOutput};

use super::{
    access::{ddl_policy, Role},
    error, AppState,
};
use crate::metric_names;

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
pub(super) struct QueryParams {
    sql: Option<String>,
    format: Option<String>,
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
pub(super) async fn query_get(
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
pub(super) async fn query(
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
    metrics::histogram!(metric_names::QUERY_DURATION_SECONDS, "interface" => "http")
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(r) => r,
        Err(e) => {
            let (status, code) = status_of(&e);
            metrics::counter!(metric_names::QUERY_ERRORS_TOTAL, "interface" => "http", "kind" => e.kind().as_str())
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
