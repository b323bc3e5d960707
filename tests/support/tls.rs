//! TLS for the end-to-end tests: a CA of the test's own, certificates it issues, PEM files,
//! and an https front for the mock upstream.
use crate::Server;

/// A CA of the test's own and a certificate it issued for 127.0.0.1 and localhost.
pub struct TestPki {
    pub ca_pem: String,
    pub cert: rcgen::Certificate,
    pub key: rcgen::KeyPair,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

pub fn test_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "pg_quota test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    TestPki { ca_pem: ca.pem(), cert, key, ca, ca_key }
}

impl TestPki {
    /// A client certificate for the role `cn`, issued by this CA: its PEM and its key's PEM.
    pub fn client(&self, cn: &str) -> (String, String) {
        use rcgen::{CertificateParams, DnType, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Writes `pem` to a file of its own; returns its path.
pub fn pem_file(name: &str, pem: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("pgq-e2e-{name}-{}.pem", std::process::id()));
    std::fs::write(&path, pem).unwrap();
    path
}

/// An https front for the mock upstream, as a real upstream would be: TLS with the
/// certificate of `pki`, relaying the decrypted bytes to the mock. Returns its base URL.
pub async fn https_front(mock: &Server, pki: &TestPki) -> String {
    use tokio_rustls::rustls::{self, pki_types::PrivateKeyDer};

    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![pki.cert.der().clone()],
            PrivateKeyDer::Pkcs8(pki.key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = format!("https://{}", listener.local_addr().unwrap());
    let backend = mock.url.trim_start_matches("http://").to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, backend) = (acceptor.clone(), backend.clone());
            tokio::spawn(async move {
                // a client that rejects the certificate ends here
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut plain = tokio::net::TcpStream::connect(&backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    front
}
