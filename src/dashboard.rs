//! The live web dashboard, embedded in the binary: `index.html`, its script
//! and style, and the vendored Chart.js (MIT, `scripts/vendor-dashboard.sh`
//! pins and re-fetches it). The page polls the HTTP API; nothing is served
//! from outside the binary.

use axum::{
    extract::Path,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
};

/// The page.
pub(crate) const INDEX: &str = include_str!("dashboard/index.html");

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
pub(crate) async fn asset(Path(file): Path<String>) -> Response {
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
