//! The OpenAPI 3.1 document of the HTTP API (`GET /api/v1/openapi.json`),
//! kept in `openapi.json` beside this file. `tests/e2e_serving.rs` checks
//! that every documented path answers and every route is documented.

/// The document.
pub(crate) const DOCUMENT: &str = include_str!("openapi.json");
