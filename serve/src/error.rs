//! Typed errors of the serving side.

use std::path::PathBuf;

/// Errors starting the serving side (configuration, TLS, binding).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener beyond loopback without credentials, or similar.
    #[error("{0}")]
    Config(String),
    /// A TLS certificate or key file cannot be used.
    #[error("tls: {path}: {message}")]
    Tls {
        /// The PEM file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The listener cannot bind.
    #[error("{what}: cannot bind {addr}: {source}")]
    Bind {
        /// The config key (`pg.listen`).
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}
