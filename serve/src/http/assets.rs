//! What the server serves from its own binary: the live web dashboard
//! (`dashboard/`: `index.html`, its script and style, and the vendored
//! Chart.js, MIT, which `scripts/vendor-dashboard.sh` pins and re-fetches)
//! and the OpenAPI 3.1 document of the API (`openapi.json`;
//! `tests/e2e_serving.rs` checks that every documented path answers and
//! every route is documented). The page polls the HTTP API; nothing is
//! served from outside the binary.

use axum::{
    extract::Path,
    http::{header, StatusCode},
    response::{Html, IntoResponse, Response},
};

/// The page.
const INDEX: &str = include_str!("dashboard/index.html");

/// The OpenAPI document.
const OPENAPI: &str = include_str!("openapi.json");

/// `GET /`: the dashboard.
pub(super) async fn index() -> Html<&'static str> {
    Html(INDEX)
}

/// `GET /api/v1/openapi.json`.
pub(super) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// `(name, content type, bytes)` of every asset.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("dashboard/app.css"),
    ),
    (
        "chart.umd.min.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/vendor/chart.umd.min.js"),
    ),
];

/// `GET /assets/{file}`.
pub(super) async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                // Assets change with the binary: revalidate, do not pin.
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}
