//! Ordinary (non-replication) connections for catalog queries and the snapshot, with TLS.

use crate::config::{PgConnection, TlsMode};
use crate::error::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::config::SslMode;
use tokio_postgres::Client;

use super::values::SESSION_OPTIONS;

/// Opens a connection and drives it in the background.
pub async fn connect(conn: &PgConnection, application_name: &str) -> Result<Client> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&conn.host)
        .port(conn.port)
        .user(&conn.user)
        .dbname(&conn.dbname)
        .application_name(application_name)
        .options(SESSION_OPTIONS)
        .connect_timeout(Duration::from_secs(10))
        .keepalives_idle(Duration::from_secs(30))
        .ssl_mode(match conn.tls {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
    if let Some(pw) = &conn.password {
        cfg.password(pw.expose());
    }
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(conn)?);
    let (client, connection) = cfg.connect(tls).await.map_err(|e| connect_error(conn, &e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

/// Classifies a failed connection attempt with a message an operator can act on.
pub fn connect_error(conn: &PgConnection, e: &tokio_postgres::Error) -> Error {
    let target = conn.display_target();
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        return Error::config(match code {
            c if c.starts_with("28") => {
                format!("cannot log in to {target}: {} (check the user and password)", db.message())
            }
            "3D000" => format!("database `{}` does not exist on {}:{}", conn.dbname, conn.host, conn.port),
            _ => format!("cannot connect to {target}: {}", db.message()),
        });
    }
    let detail = std::error::Error::source(e).map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
    Error::config(format!("cannot connect to {target}: {detail} (is the server running and reachable?)"))
}

/// Starts a read-only REPEATABLE READ transaction: one snapshot for every statement in it.
pub async fn repeatable_read<'a>(client: &'a mut Client, context: &str) -> Result<tokio_postgres::Transaction<'a>> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(|e| query_error(context, e))
}

/// Maps a query error. Connection failures and the server's transient refusals are retryable:
/// a deadlock or serialization failure (class 40), lock timeouts (55P03), resource shortage (53),
/// shutdown or crash of the server (57P0x), connection exceptions (08). Everything else is
/// permanent.
pub fn query_error(context: &str, e: tokio_postgres::Error) -> Error {
    let Some(db) = e.as_db_error().filter(|_| !e.is_closed()) else { return Error::retryable(context, e) };
    let code = db.code().code();
    let message = format!("{} ({code})", db.message());
    let transient =
        ["40", "53", "08"].iter().any(|class| code.starts_with(class)) || code == "55P03" || code.starts_with("57P0");
    if transient {
        Error::retryable(context, message)
    } else {
        Error::permanent(context, message)
    }
}

/// The rustls configuration for a TLS mode, following libpq: `require` encrypts without
/// checking the certificate, `verify-ca` checks the chain, `verify-full` also the host name.
pub fn tls_config(conn: &PgConnection) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("TLS setup: {e}")))?;
    let config = match conn.tls {
        TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth(),
        TlsMode::VerifyCa | TlsMode::VerifyFull => {
            let roots = Arc::new(root_store(conn)?);
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| Error::config(format!("TLS setup: {e}")))?;
            if conn.tls == TlsMode::VerifyFull {
                builder.with_webpki_verifier(webpki).with_no_client_auth()
            } else {
                builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainOnly(webpki))).with_no_client_auth()
            }
        }
    };
    Ok(config)
}

fn root_store(conn: &PgConnection) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    match &conn.root_cert {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| Error::config(format!("cannot read sslrootcert {}: {e}", path.display())))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| Error::config(format!("sslrootcert {}: {e}", path.display())))?;
                roots.add(cert).map_err(|e| Error::config(format!("sslrootcert {}: {e}", path.display())))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(roots)
}

/// `sslmode=require`: encryption without authentication of the server, as libpq does it.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Quotes an identifier for SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal for SQL.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// `"schema"."table"`.
pub fn qualified(table: &crate::event::TableId) -> String {
    format!("{}.{}", quote_ident(&table.schema), quote_ident(&table.name))
}
