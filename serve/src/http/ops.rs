//! The runtime's endpoints: health, alerts, snapshots, reports and metrics.
//!
//! What they report lives in parts the serving crate does not own (the
//! pipeline, Kafka sources, the alert manager, the lake, the checkpointer):
//! the binary implements [`Operations`] over them, and these handlers turn
//! its answers into HTTP (status codes, error codes, admin checks).

use axum::{
    extract::{Path, Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Extension, Json,
};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{
    access::{require_admin, Role},
    error, AppState,
};

/// What the running process answers beyond the engine's own state.
#[async_trait::async_trait]
pub trait Operations: Send + Sync + 'static {
    /// The runtime's part of `GET /api/v1/health`.
    async fn health(&self) -> RuntimeHealth;
    /// `GET /api/v1/alerts`: at most `limit` active alerts (firing first),
    /// exact totals, the rules and the outbox backlog.
    async fn alerts(&self, limit: usize) -> Value;
    /// `POST /api/v1/snapshots`: snapshot every configured view now; the
    /// committed manifest.
    async fn take_snapshot(&self) -> Result<Value, OpError>;
    /// `GET /api/v1/snapshots`: committed snapshots, oldest first.
    async fn list_snapshots(&self) -> Result<Value, OpError>;
    /// `POST /api/v1/reports/{name}`: run a configured report now.
    async fn run_report(&self, name: &str) -> Result<Value, OpError>;
    /// `GET /metrics` in the Prometheus text format (`None`: no recorder).
    fn render_metrics(&self) -> Option<String>;
}

/// The runtime's part of `GET /api/v1/health`.
#[derive(Debug, Default)]
pub struct RuntimeHealth {
    /// What is failing now, one line each (the answer says `degraded`).
    pub faults: Vec<String>,
    /// Lifecycle of the ingest pipeline (`running`, `finished`, ...).
    pub pipeline: &'static str,
    /// Status of each part, merged into the answer (`kafka`, `alerts`,
    /// `lake`, `checkpoint`).
    pub parts: Map<String, Value>,
}

/// Why an operation was not done.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// `[lake] enabled = false`.
    #[error("the lake is disabled ([lake] enabled = false)")]
    LakeDisabled,
    /// No such report in `[[reports]]`.
    #[error("no report named '{0}' in [[reports]]")]
    UnknownReport(String),
    /// The operation ran and failed (the lake unreachable, say).
    #[error("{message}")]
    Failed {
        /// Stable error code of the answer (`snapshot_failed`).
        code: &'static str,
        /// What failed.
        message: String,
    },
}

impl IntoResponse for OpError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            OpError::LakeDisabled => (StatusCode::NOT_FOUND, "lake_disabled"),
            OpError::UnknownReport(_) => (StatusCode::NOT_FOUND, "unknown_report"),
            OpError::Failed { code, .. } => (StatusCode::SERVICE_UNAVAILABLE, *code),
        };
        error(status, code, self.to_string())
    }
}

fn answer(r: Result<Value, OpError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Query of `GET /api/v1/alerts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AlertsQuery {
    /// Active alerts listed at most (firing first; default 1000, at most
    /// 100000); the totals are always exact.
    limit: Option<usize>,
}

/// `GET /api/v1/alerts`.
pub(super) async fn alerts(State(app): State<AppState>, Query(q): Query<AlertsQuery>) -> Response {
    let limit = q.limit.unwrap_or(1_000).min(100_000);
    Json(app.ops.alerts(limit).await).into_response()
}

/// `GET /api/v1/health`: `ok` or `degraded` with one line per fault (the
/// engine keeps serving meanwhile), the engine's epoch, state and streams,
/// applied positions and each part's status.
pub(super) async fn health(State(app): State<AppState>) -> Response {
    let runtime = app.ops.health().await;
    let engine = app.engine.lock().await;
    let mut body = json!({
        "status": if runtime.faults.is_empty() { "ok" } else { "degraded" },
        "faults": runtime.faults,
        "pipeline": runtime.pipeline,
        "epoch": engine.epoch(),
        "state_bytes": engine.state_bytes(),
        "streams": engine.streams(),
        "positions": engine.positions().snapshot(),
    });
    if let Some(obj) = body.as_object_mut() {
        obj.extend(runtime.parts);
    }
    Json(body).into_response()
}

/// `POST /api/v1/snapshots` (admin).
pub(super) async fn take_snapshot(
    State(app): State<AppState>,
    Extension(role): Extension<Role>,
) -> Response {
    if let Err(r) = require_admin(role) {
        return *r;
    }
    answer(app.ops.take_snapshot().await)
}

/// `GET /api/v1/snapshots`.
pub(super) async fn list_snapshots(State(app): State<AppState>) -> Response {
    answer(app.ops.list_snapshots().await)
}

/// `POST /api/v1/reports/{name}` (admin).
pub(super) async fn run_report(
    State(app): State<AppState>,
    Extension(role): Extension<Role>,
    Path(name): Path<String>,
) -> Response {
    if let Err(r) = require_admin(role) {
        return *r;
    }
    answer(app.ops.run_report(&name).await)
}

/// `GET /metrics`.
pub(super) async fn metrics(State(app): State<AppState>) -> Response {
    match app.ops.render_metrics() {
        Some(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed").into_response(),
    }
}
