//! The HTTP client CRM sinks share: rustls with the webpki roots (no system TLS library), and a
//! timeout so a hung API call is retried rather than waited on forever.

use crate::error::{Error, Result};
use std::sync::Arc;
use std::time::Duration;

/// A client for one sink.
pub fn client() -> Result<reqwest::Client> {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("TLS: {e}")))?
        .with_root_certificates(rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() })
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| Error::config(format!("HTTP client: {e}")))
}
