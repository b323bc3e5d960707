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
    /// checked against --database-ca-file or not; a client certificate presented or not
    On {
        required: bool,
        verified: bool,
        client_cert: bool,
    },
}

impl std::fmt::Display for DbTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbTls::Off => f.write_str("off"),
            DbTls::On {
                required,
                verified,
                client_cert,
            } => write!(
                f,
                "{}, certificate {}{}",
                if *required {
                    "required"
                } else {
                    "when the server offers it"
                },
                if *verified {
                    "verified"
                } else {
                    "not verified"
                },
                if *client_cert {
                    ", client certificate presented"
                } else {
                    ""
                }
            ),
        }
    }
}

/// The files that shape TLS to the database: the CAs that vouch for the server, and the
/// client certificate with its key that the relay presents.
#[derive(Debug, Default, Clone, Copy)]
pub struct TlsFiles<'a> {
    pub ca: Option<&'a Path>,
    pub client: Option<(&'a Path, &'a Path)>,
}

/// How connections to the database are made: in the clear, or over TLS with this connector.
#[derive(Clone)]
pub enum Connector {
    Plain,
    Tls(MakeRustlsConnect),
}

/// The pool manager for `pg`, with TLS as its sslmode and `files` ask.
pub fn manager(
    pg: tokio_postgres::Config,
    files: TlsFiles<'_>,
    config: ManagerConfig,
) -> Result<(Manager, DbTls), String> {
    let (connector, tls) = connector(&pg, files)?;
    let manager = match connector {
        Connector::Plain => Manager::from_config(pg, NoTls, config),
        Connector::Tls(tls) => Manager::from_config(pg, tls, config),
    };
    Ok((manager, tls))
}

/// The connector for `pg`, with TLS as its sslmode and `files` ask (for [`manager`], and for
/// the notifier's own connection).
pub fn connector(
    pg: &tokio_postgres::Config,
    files: TlsFiles<'_>,
) -> Result<(Connector, DbTls), String> {
    let over_tcp = pg.get_hosts().iter().all(|h| matches!(h, Host::Tcp(_)));
    if pg.get_ssl_mode() == SslMode::Disable || !over_tcp {
        if files.client.is_some() {
            // libpq would ignore it and the database then refuse the login, less clearly
            return Err(
                "--database-cert-file needs TLS to the database, but the database URL \
                        names a Unix socket or sslmode=disable"
                    .into(),
            );
        }
        return Ok((Connector::Plain, DbTls::Off));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS to the database: {e}"))?;
    let required = pg.get_ssl_mode() == SslMode::Require;
    let (builder, verified) = match files.ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in crate::config::read_pem_certificates("--database-ca-file", path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("--database-ca-file {}: {e}", path.display()))?;
            }
            (builder.with_root_certificates(roots), true)
        }
        None => (
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider))),
            false,
        ),
    };
    let tls = match files.client {
        Some((cert_file, key_file)) => {
            let chain = crate::config::read_pem_certificates("--database-cert-file", cert_file)?;
            let key = crate::config::read_pem_private_key("--database-key-file", key_file)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                format!(
                    "--database-key-file {}: not the key of --database-cert-file: {e}",
                    key_file.display()
                )
            })?
        }
        None => builder.with_no_client_auth(),
    };
    Ok((
        Connector::Tls(MakeRustlsConnect::new(tls)),
        DbTls::On {
            required,
            verified,
            client_cert: files.client.is_some(),
        },
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

    fn tls_of(url: &str, files: TlsFiles<'_>) -> Result<DbTls, String> {
        let pg = crate::db::parse_database_url(url).unwrap();
        manager(pg, files, ManagerConfig::default()).map(|(_, how)| how)
    }

    #[test]
    fn sslmode_and_the_socket_kind_decide_whether_tls_is_used() {
        let on = |required, verified| {
            Ok(DbTls::On {
                required,
                verified,
                client_cert: false,
            })
        };
        let tls_of = |url| tls_of(url, TlsFiles::default());
        assert_eq!(tls_of("host=db.internal"), on(false, false));
        assert_eq!(tls_of("host=db.internal sslmode=require"), on(true, false));
        assert_eq!(tls_of("host=db.internal sslmode=disable"), Ok(DbTls::Off));
        assert_eq!(
            tls_of("host=/run/postgresql sslmode=require"),
            Ok(DbTls::Off)
        );
        assert_eq!(
            tls_of("postgresql://relay@db.internal/quota"),
            on(false, false)
        );
    }

    #[test]
    fn a_client_certificate_needs_tls_and_readable_files() {
        let missing = Path::new("/nonexistent/relay.pem");
        let client = |url| {
            tls_of(
                url,
                TlsFiles {
                    ca: None,
                    client: Some((missing, missing)),
                },
            )
        };
        for url in ["host=db.internal sslmode=disable", "host=/run/postgresql"] {
            let err = client(url).unwrap_err();
            assert!(
                err.contains("--database-cert-file needs TLS"),
                "{url}: {err}"
            );
        }
        let err = client("host=db.internal").unwrap_err();
        assert!(
            err.starts_with("--database-cert-file /nonexistent/relay.pem: cannot read it"),
            "{err}"
        );
    }
}
