//! Mutual TLS between two workloads using only what their agents served, with a
//! verifier that checks SPIFFE IDs the way Envoy's SAN matchers do.

use std::sync::Arc;

use crate::uri_sans;

/// A verifier for SPIFFE peers: the chain must verify to `roots` and the leaf must
/// carry exactly `expected` as its URI SAN. (DNS names play no part.)
#[derive(Debug)]
pub struct SpiffePeer {
    roots: Vec<rustls::pki_types::TrustAnchor<'static>>,
    expected: String,
}

impl SpiffePeer {
    fn check(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
        server: bool,
    ) -> Result<(), rustls::Error> {
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("{e:?}")))?;
        let usage = if server {
            webpki::KeyUsage::server_auth()
        } else {
            webpki::KeyUsage::client_auth()
        };
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.roots,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("chain: {e:?}")))?;
        let pem = signet_spiffe::pem_cert(end_entity);
        let ids = uri_sans(&pem);
        if ids != vec![self.expected.clone()] {
            return Err(rustls::Error::General(format!(
                "peer is {ids:?}, want {}",
                self.expected
            )));
        }
        Ok(())
    }
}

/// ring's signature algorithms, for both verifiers below.
pub fn algorithms() -> rustls::crypto::WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

impl rustls::client::danger::ServerCertVerifier for SpiffePeer {
    fn verify_server_cert(
        &self,
        ee: &rustls::pki_types::CertificateDer<'_>,
        im: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.check(ee, im, now, true)
            .map(|_| rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &algorithms())
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &algorithms())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        algorithms().supported_schemes()
    }
}

impl rustls::server::danger::ClientCertVerifier for SpiffePeer {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        ee: &rustls::pki_types::CertificateDer<'_>,
        im: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.check(ee, im, now, false)
            .map(|_| rustls::server::danger::ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &algorithms())
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &algorithms())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// The certificates of a PEM string, DER.
pub fn certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    ::pem::parse_many(pem)
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents().into())
        .collect()
}

/// A verifier trusting `roots_pem` and expecting `expected`.
pub fn peer(roots_pem: &str, expected: &str) -> Arc<SpiffePeer> {
    Arc::new(SpiffePeer {
        roots: certs(roots_pem)
            .iter()
            .map(|c| webpki::anchor_from_trusted_cert(c).unwrap().to_owned())
            .collect(),
        expected: expected.into(),
    })
}

/// One mutual TLS handshake: server `srv` expects `client_id`, client `cli` expects
/// `server_id`. Ok when both sides accepted each other.
pub async fn handshake(
    srv: &(String, String, String),
    cli: &(String, String, String),
    server_id: &str,
    client_id: &str,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = |pem: &str| {
        rustls::pki_types::PrivateKeyDer::Pkcs8(::pem::parse(pem).unwrap().into_contents().into())
    };
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(peer(&srv.2, client_id))
        .with_single_cert(certs(&srv.0), key(&srv.1))
        .unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(peer(&cli.2, server_id))
        .with_client_auth_cert(certs(&cli.0), key(&cli.1))
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| format!("server: {e}"))?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)
            .await
            .map_err(|e| format!("server read: {e}"))?;
        tls.write_all(b"pong")
            .await
            .map_err(|e| format!("server write: {e}"))?;
        tls.shutdown().await.ok();
        Ok::<_, String>(())
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("workload.invalid").unwrap();
    let client_result = async {
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("client: {e}"))?;
        tls.write_all(b"ping")
            .await
            .map_err(|e| format!("client write: {e}"))?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)
            .await
            .map_err(|e| format!("client read: {e}"))?;
        assert_eq!(&buf, b"pong");
        Ok::<_, String>(())
    }
    .await;
    let server_result = server_side.await.unwrap();
    client_result.and(server_result)
}

/// Whether `leaf_chain_pem` verifies (client auth) to `roots_pem` now.
pub fn verifies(leaf_chain_pem: &str, roots_pem: &str) -> bool {
    let chain = certs(leaf_chain_pem);
    let anchors: Vec<_> = certs(roots_pem)
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).unwrap().to_owned())
        .collect();
    let ee = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain[1..],
        rustls::pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .is_ok()
}
