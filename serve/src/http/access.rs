//! Who a request is and whether it may reach the server at all.
//!
//! Authentication is a bearer token per role ([`Auth`]): analysts'
//! requests are read-only; operators' (the admin token) may also define
//! views and trigger snapshots and reports. With no token configured (only
//! allowed on loopback) every request is the operator's.
//!
//! Browsers are kept out of the operator's powers ([`Access`]): a `Host`
//! outside the allow-list is refused (DNS rebinding), so is a request whose
//! `Origin` is neither this server nor a configured CORS origin, and view
//! DDL runs only from a POST whose content type a page cannot send
//! cross-site without a CORS preflight (`application/json`,
//! `application/sql`), never from a GET ([`ddl_policy`]).

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, StatusCode},
    middleware::Next,
    response::Response,
};
use storepulse_engine::Ddl;

use super::error;
use crate::{config::HttpConfig, metric_names};

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
    pub(crate) fn from_config(c: &HttpConfig) -> Self {
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

pub(super) async fn authenticate(
    State(auth): State<Auth>,
    mut req: Request,
    next: Next,
) -> Response {
    match auth.role(req.headers()) {
        Some(role) => {
            req.extensions_mut().insert(role);
            next.run(req).await
        }
        None => {
            metrics::counter!(metric_names::HTTP_AUTH_FAILURES_TOTAL).increment(1);
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

pub(super) fn require_admin(role: Role) -> Result<(), Box<Response>> {
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
    pub(super) cors_origins: Vec<String>,
}

impl Access {
    /// From `[http]`: the configured hosts, else loopback names when
    /// listening on loopback (where no token may be set, so a rebound DNS
    /// name must not reach it) and any host beyond it (tokens required).
    pub(crate) fn from_config(c: &HttpConfig) -> Self {
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
pub(super) async fn check_access(
    State(access): State<Arc<Access>>,
    req: Request,
    next: Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if !access.host_allowed(host.as_deref()) {
        metrics::counter!(metric_names::HTTP_REFUSED_TOTAL, "reason" => "host").increment(1);
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
            metrics::counter!(metric_names::HTTP_REFUSED_TOTAL, "reason" => "origin").increment(1);
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

/// Whether this request may run view DDL: the admin's, by POST, with a
/// content type a browser cannot send cross-site without a preflight.
pub(super) fn ddl_policy(role: Role, post: bool, headers: &HeaderMap) -> Ddl {
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
