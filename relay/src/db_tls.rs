//! TLS to the database, as libpq does it. The URL's `sslmode` decides whether: `disable` never,
//! `prefer` (the default) when the server offers it, `require` always. `--database-ca-file`
//! decides how much is checked: with it, the server's certificate must chain to one of its CAs
//! and name the host (libpq's `verify-full`); without it, the connection is encrypted but the
//! certificate is not checked (libpq's `prefer` and `require` without a root certificate).
//! Unix sockets never use TLS.

use std::path::Path;
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How the relay's connections to the database are protected, for the start-up log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbTls {
    /// sslmode=disable, or Unix sockets
    Off,
    /// TLS when the server offers it (sslmode=prefer) or always (require); the certificate
    /// checked against --database-ca-file or not
    On { required: bool, verified: bool },
}

impl std::fmt::Display for DbTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbTls::Off => f.write_str("off"),
            DbTls::On { required, verified } => write!(
                f,
                "{}, certificate {}",
                if *required {
                    "required"
                } else {
                    "when the server offers it"
                },
                if *verified {
                    "verified"
                } else {
                    "not verified"
                }
            ),
        }
    }
}

/// The pool manager for `pg`, with TLS as its sslmode and `ca_file` ask.
pub fn manager(
    pg: tokio_postgres::Config,
    ca_file: Option<&Path>,
    config: ManagerConfig,
) -> Result<(Manager, DbTls), String> {
    let over_tcp = pg.get_hosts().iter().all(|h| matches!(h, Host::Tcp(_)));
    if pg.get_ssl_mode() == SslMode::Disable || !over_tcp {
        return Ok((Manager::from_config(pg, NoTls, config), DbTls::Off));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS to the database: {e}"))?;
    let required = pg.get_ssl_mode() == SslMode::Require;
    let (tls, verified) = match ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in crate::config::read_pem_certificates("--database-ca-file", path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("--database-ca-file {}: {e}", path.display()))?;
            }
            let tls = builder.with_root_certificates(roots).with_no_client_auth();
            (tls, true)
        }
        None => {
            let tls = builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
                .with_no_client_auth();
            (tls, false)
        }
    };
    let connector = MakeRustlsConnect::new(tls);
    Ok((
        Manager::from_config(pg, connector, config),
        DbTls::On { required, verified },
    ))
}

/// Accepts any server certificate but still checks that the server holds its key (the
/// handshake signatures), as libpq does when it encrypts without a root certificate.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_of(url: &str, ca_file: Option<&Path>) -> Result<DbTls, String> {
        let pg = crate::db::parse_database_url(url).unwrap();
        manager(pg, ca_file, ManagerConfig::default()).map(|(_, how)| how)
    }

    #[test]
    fn sslmode_and_the_socket_kind_decide_whether_tls_is_used() {
        let on = |required, verified| Ok(DbTls::On { required, verified });
        assert_eq!(tls_of("host=db.internal", None), on(false, false));
        assert_eq!(
            tls_of("host=db.internal sslmode=require", None),
            on(true, false)
        );
        assert_eq!(
            tls_of("host=db.internal sslmode=disable", None),
            Ok(DbTls::Off)
        );
        assert_eq!(
            tls_of("host=/run/postgresql sslmode=require", None),
            Ok(DbTls::Off)
        );
        assert_eq!(
            tls_of("postgresql://relay@db.internal/quota", None),
            on(false, false)
        );
    }
}
