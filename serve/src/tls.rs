//! rustls server configuration from PEM files (`[tls]`), with the ring
//! crypto provider chosen explicitly (no process-wide default needed).

use std::sync::Arc;

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

use crate::{ServeError, TlsConfig};

/// The rustls server configuration this module builds.
pub use rustls::ServerConfig;

/// Loads the certificate chain and key into a rustls server config
/// advertising `alpn` (e.g. `h2`, `http/1.1` for HTTPS; none for pgwire).
pub fn server_config(
    cfg: &TlsConfig,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    let bad = |path: &std::path::Path, message: String| ServeError::Tls {
        path: path.to_path_buf(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .map_err(|e| bad(&cfg.cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&cfg.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(bad(&cfg.cert, "no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| bad(&cfg.key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&cfg.cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(&cfg.key, format!("does not match the certificate: {e}")))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}
