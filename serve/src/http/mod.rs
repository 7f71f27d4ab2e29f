//! The HTTP API: SQL queries (JSON, CSV, Arrow IPC, Parquet), view listing,
//! health, alerts, lake actions, Prometheus metrics, the OpenAPI document
//! and the embedded dashboard.
//!
//! * `access`: bearer tokens per role, `Host` and `Origin` checks, the DDL
//!   policy of a request.
//! * `query`: `/api/v1/query` within `[serving]` limits, answer encoding.
//! * `catalog`: `/api/v1/views`.
//! * `ops`: health, alerts, snapshots, reports and metrics, answered by
//!   the runtime through [`Operations`].
//! * `assets`: the dashboard's files and the OpenAPI document.
//!
//! The dashboard's static files, `/livez` and the OpenAPI document need no
//! token; everything else does (when tokens are configured).

mod access;
mod assets;
mod catalog;
mod ops;
mod query;

use std::{net::TcpListener, sync::Arc, time::Duration};

use axum::{
    extract::DefaultBodyLimit,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Extension, Json, Router,
};
use serde_json::json;
use storepulse_engine::{EngineHandle, QueryLimits};

pub use ops::{OpError, Operations, RuntimeHealth};

use crate::config::HttpConfig;
use access::{Access, Auth};

/// Shared state of the HTTP handlers.
#[derive(Clone)]
struct AppState {
    /// The engine.
    engine: EngineHandle,
    /// The runtime's parts (health, alerts, lake).
    ops: Arc<dyn Operations>,
}

/// A JSON error answer: `{"error": message, "code": code}`.
fn error(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({"error": message, "code": code}))).into_response()
}

/// The API's routes: the tokens of `config` guard everything but the
/// dashboard's files, `/livez` and the OpenAPI document; `limits` bound
/// every query; `Host` and `Origin` are checked on every route.
pub fn router(
    engine: EngineHandle,
    ops: Arc<dyn Operations>,
    config: &HttpConfig,
    limits: QueryLimits,
) -> Router {
    let (state, auth, access) = (
        AppState { engine, ops },
        Auth::from_config(config),
        Access::from_config(config),
    );
    // A JSON body escapes the SQL; room for that and the wrapper.
    let body_limit = limits.sql.max_sql_bytes.saturating_mul(2).max(64 << 10);
    let guarded = Router::new()
        .route(
            "/api/v1/query",
            post(query::query)
                .get(query::query_get)
                .layer(DefaultBodyLimit::max(body_limit)),
        )
        .route("/api/v1/views", get(catalog::views))
        .route("/api/v1/health", get(ops::health))
        .route("/api/v1/alerts", get(ops::alerts))
        .route(
            "/api/v1/snapshots",
            post(ops::take_snapshot).get(ops::list_snapshots),
        )
        .route("/api/v1/reports/{name}", post(ops::run_report))
        .route("/metrics", get(ops::metrics))
        .layer(axum::middleware::from_fn_with_state(
            auth,
            access::authenticate,
        ))
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
        .route("/", get(assets::index))
        .route("/assets/{file}", get(assets::asset))
        .route("/livez", get(|| async { "ok" }))
        .route("/api/v1/openapi.json", get(assets::openapi))
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
            access::check_access,
        ));
    match cors {
        Some(c) => router.layer(c),
        None => router,
    }
}

/// Serves `router` on `listener` (HTTPS with `tls`) until `stop` resolves,
/// then lets requests in flight finish for up to 10 s.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = axum_server::Handle::new();
    {
        let h = handle.clone();
        tokio::spawn(async move {
            stop.await;
            h.graceful_shutdown(Some(Duration::from_secs(10)));
        });
    }
    let service = router.into_make_service();
    match tls {
        Some(tls) => {
            axum_server::from_tcp_rustls(
                listener,
                axum_server::tls_rustls::RustlsConfig::from_config(tls),
            )?
            .handle(handle)
            .serve(service)
            .await
        }
        None => {
            axum_server::from_tcp(listener)?
                .handle(handle)
                .serve(service)
                .await
        }
    }
}
