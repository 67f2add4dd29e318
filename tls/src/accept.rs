//! A server's side: the configuration chosen per ClientHello so the hybrid group wins
//! whenever a client offers it, and what a handshake settled on or why it failed.
//!
//! rustls picks the key-exchange group in the client's order of preference. A client
//! that lists X25519 before X25519MLKEM768 would get X25519 from one configuration;
//! so a client that lists the hybrid group at all is served from a configuration
//! that holds it alone (TLS 1.3), and is asked for that share by a HelloRetryRequest
//! if it sent none. Every other client gets the policy's whole list.

use std::sync::Arc;

use rustls::{
    CipherSuite, CommonState, NamedGroup, ProtocolVersion, ServerConfig, SupportedProtocolVersion,
    crypto::CryptoProvider, server::ClientHello, version::TLS13,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{LazyConfigAcceptor, server::TlsStream};

use crate::{hybrid::X25519MLKEM768, policy::CompliancePolicy};

/// The server configurations of one listener under one policy.
#[derive(Debug, Clone)]
pub struct ServerConfigs {
    /// For clients that offer X25519MLKEM768: that group alone, TLS 1.3. `None` when
    /// the fallback already holds nothing else (`pqc`) or the policy forbids it.
    hybrid: Option<Arc<ServerConfig>>,
    /// For everyone else: all the policy allows.
    fallback: Arc<ServerConfig>,
}

impl ServerConfigs {
    /// Builds the configurations with `build`, which makes one from a provider and
    /// the versions it may speak (certificate, client verifier, ALPN and the like are
    /// the caller's).
    pub fn new(
        policy: CompliancePolicy,
        build: impl Fn(
            Arc<CryptoProvider>,
            &'static [&'static SupportedProtocolVersion],
        ) -> Result<ServerConfig, rustls::Error>,
    ) -> Result<Self, rustls::Error> {
        let fallback = Arc::new(build(crate::provider(policy).into(), policy.versions())?);
        let hybrid = match policy {
            CompliancePolicy::Unset | CompliancePolicy::Fips1403 => {
                let base = crate::provider(policy);
                let provider = CryptoProvider {
                    kx_groups: vec![X25519MLKEM768],
                    cipher_suites: base
                        .cipher_suites
                        .iter()
                        .filter(|s| s.version() == &TLS13)
                        .copied()
                        .collect(),
                    ..base
                };
                static ONLY_13: [&SupportedProtocolVersion; 1] = [&TLS13];
                Some(Arc::new(build(Arc::new(provider), &ONLY_13)?))
            }
            CompliancePolicy::Pqc | CompliancePolicy::Fips1402 => None,
        };
        Ok(Self { hybrid, fallback })
    }

    /// The configuration for a client that sent `hello`.
    pub fn for_hello(&self, hello: &ClientHello<'_>) -> Arc<ServerConfig> {
        match &self.hybrid {
            Some(hybrid) if offers_hybrid(hello.named_groups(), hello.cipher_suites()) => {
                hybrid.clone()
            }
            _ => self.fallback.clone(),
        }
    }
}

/// Whether a ClientHello can be served by the hybrid configuration: it lists
/// X25519MLKEM768 and a TLS 1.3 AES-GCM suite (which every policy allowing the
/// hybrid group holds). A client that lists the group but speaks only TLS 1.2 is
/// broken, yet keeps the fallback it had before.
fn offers_hybrid(groups: Option<&[NamedGroup]>, suites: &[CipherSuite]) -> bool {
    groups.is_some_and(|groups| groups.contains(&NamedGroup::X25519MLKEM768))
        && suites.iter().any(|s| {
            matches!(
                s,
                CipherSuite::TLS13_AES_128_GCM_SHA256 | CipherSuite::TLS13_AES_256_GCM_SHA384
            )
        })
}

/// Completes a server handshake on `io`, choosing the configuration by its ClientHello.
pub async fn accept<IO>(configs: &ServerConfigs, io: IO) -> Result<TlsStream<IO>, std::io::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
    let config = configs.for_hello(&start.client_hello());
    start.into_stream(config).await
}

/// What a completed handshake settled on, spelt for metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The key-exchange group, as [`crate::group_name`] spells it.
    pub group: &'static str,
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: &'static str,
}

impl Negotiated {
    /// What `conn`'s handshake settled on.
    pub fn of(conn: &CommonState) -> Self {
        Self {
            group: conn
                .negotiated_key_exchange_group()
                .map_or("none", |g| crate::group_name(g.name())),
            version: match conn.protocol_version() {
                Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
                Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "other",
            },
        }
    }
}

/// Why a server handshake failed, in the few kinds an operator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// No key-exchange group in common: typically a classical client under `pqc`.
    NoSharedGroup,
    /// No cipher suite in common.
    NoSharedCipherSuite,
    /// No TLS version in common (a TLS 1.2 client under `pqc`, say).
    ProtocolVersion,
    /// The client's certificate was refused, or the client refused ours.
    Certificate,
    /// Anything else: not TLS, a reset, a malformed message.
    Other,
}

impl HandshakeFailure {
    /// Classifies the error [`accept`] returned.
    pub fn of(e: &std::io::Error) -> Self {
        use rustls::{Error, PeerIncompatible};
        let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
            return Self::Other;
        };
        match tls {
            Error::PeerIncompatible(PeerIncompatible::NoKxGroupsInCommon) => Self::NoSharedGroup,
            Error::PeerIncompatible(PeerIncompatible::NoCipherSuitesInCommon) => {
                Self::NoSharedCipherSuite
            }
            Error::PeerIncompatible(
                PeerIncompatible::Tls12NotOffered
                | PeerIncompatible::Tls12NotOfferedOrEnabled
                | PeerIncompatible::Tls13RequiredForQuic
                | PeerIncompatible::SupportedVersionsExtensionRequired,
            ) => Self::ProtocolVersion,
            Error::InvalidCertificate(_)
            | Error::NoCertificatesPresented
            | Error::AlertReceived(
                rustls::AlertDescription::BadCertificate
                | rustls::AlertDescription::UnknownCA
                | rustls::AlertDescription::CertificateExpired
                | rustls::AlertDescription::CertificateUnknown,
            ) => Self::Certificate,
            _ => Self::Other,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoSharedGroup => "no_shared_group",
            Self::NoSharedCipherSuite => "no_shared_cipher_suite",
            Self::ProtocolVersion => "protocol_version",
            Self::Certificate => "certificate",
            Self::Other => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use rustls::{
        ClientConfig, RootCertStore,
        crypto::ring::kx_group::{SECP256R1, X25519},
        pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
        version::TLS12,
    };
    use tokio_rustls::TlsConnector;

    use super::*;
    use crate::policy::provider;

    struct Server {
        configs: ServerConfigs,
        roots: RootCertStore,
    }

    fn server(policy: CompliancePolicy) -> Server {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["ca.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let configs = ServerConfigs::new(policy, |provider, versions| {
            ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(versions)?
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.der().clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                )
        })
        .unwrap();
        Server { configs, roots }
    }

    /// A client offering `groups` in that order over `versions`; what the server
    /// settled on, or why it failed.
    async fn handshake(
        server: &Server,
        groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
        versions: &[&'static SupportedProtocolVersion],
    ) -> Result<Negotiated, HandshakeFailure> {
        let provider = CryptoProvider {
            kx_groups: groups,
            ..provider(CompliancePolicy::Unset)
        };
        let client = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(server.roots.clone())
            .with_no_client_auth();
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let connector = TlsConnector::from(Arc::new(client));
        let name = ServerName::try_from("ca.test").unwrap();
        let (client, served) = tokio::join!(
            connector.connect(name, client_io),
            accept(&server.configs, server_io)
        );
        match served {
            Ok(tls) => {
                let client = client.unwrap();
                let negotiated = Negotiated::of(tls.get_ref().1);
                assert_eq!(negotiated, Negotiated::of(client.get_ref().1));
                Ok(negotiated)
            }
            Err(e) => Err(HandshakeFailure::of(&e)),
        }
    }

    const BOTH: &[&SupportedProtocolVersion] = &[&TLS13, &TLS12];

    #[tokio::test]
    async fn the_hybrid_group_wins_whenever_offered() {
        let server = server(CompliancePolicy::Unset);
        // First in the client's list.
        let got = handshake(&server, vec![X25519MLKEM768, X25519], BOTH).await;
        assert_eq!(got.unwrap().group, "X25519MLKEM768");
        // Last in its list, with an X25519 share only: asked for the hybrid share.
        let got = handshake(&server, vec![X25519, SECP256R1, X25519MLKEM768], BOTH).await;
        assert_eq!(got.unwrap().group, "X25519MLKEM768");
        // Classical clients keep working, over TLS 1.2 too.
        let got = handshake(&server, vec![X25519], BOTH).await.unwrap();
        assert_eq!((got.group, got.version), ("X25519", "TLSv1.3"));
        let got = handshake(&server, vec![SECP256R1], &[&TLS12])
            .await
            .unwrap();
        assert_eq!((got.group, got.version), ("P-256", "TLSv1.2"));
    }

    #[tokio::test]
    async fn pqc_serves_the_hybrid_group_and_refuses_the_rest() {
        let server = server(CompliancePolicy::Pqc);
        let got = handshake(&server, vec![X25519MLKEM768], &[&TLS13]).await;
        assert_eq!(got.unwrap().group, "X25519MLKEM768");
        let got = handshake(&server, vec![X25519, SECP256R1], BOTH).await;
        assert_eq!(got, Err(HandshakeFailure::NoSharedGroup));
        let got = handshake(&server, vec![SECP256R1], &[&TLS12]).await;
        assert_eq!(got, Err(HandshakeFailure::ProtocolVersion));
    }

    #[tokio::test]
    async fn fips_140_3_refuses_x25519_alone() {
        let server = server(CompliancePolicy::Fips1403);
        let got = handshake(&server, vec![X25519], BOTH).await;
        assert_eq!(got, Err(HandshakeFailure::NoSharedGroup));
        let got = handshake(&server, vec![X25519, SECP256R1], BOTH).await;
        assert_eq!(got.unwrap().group, "P-256");
        let got = handshake(&server, vec![X25519, X25519MLKEM768], BOTH).await;
        assert_eq!(got.unwrap().group, "X25519MLKEM768");
    }

    #[tokio::test]
    async fn fips_140_2_is_tls12_on_p256() {
        let server = server(CompliancePolicy::Fips1402);
        let got = handshake(&server, vec![X25519MLKEM768, SECP256R1], BOTH).await;
        let got = got.unwrap();
        assert_eq!((got.group, got.version), ("P-256", "TLSv1.2"));
        let got = handshake(&server, vec![X25519MLKEM768], &[&TLS13]).await;
        assert_eq!(got, Err(HandshakeFailure::ProtocolVersion));
    }

    #[test]
    fn the_hybrid_configuration_needs_the_group_and_a_tls13_suite() {
        let hybrid = [NamedGroup::X25519, NamedGroup::X25519MLKEM768];
        let tls13 = [
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            CipherSuite::TLS13_AES_256_GCM_SHA384,
        ];
        let tls12 = [CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256];
        assert!(offers_hybrid(Some(&hybrid), &tls13));
        // The group listed by a client that offers no TLS 1.3 suite: the fallback.
        assert!(!offers_hybrid(Some(&hybrid), &tls12));
        assert!(!offers_hybrid(Some(&[NamedGroup::X25519]), &tls13));
        assert!(!offers_hybrid(None, &tls13));
    }

    #[tokio::test]
    async fn not_tls_is_other() {
        use tokio::io::AsyncWriteExt;
        let server = server(CompliancePolicy::Unset);
        let (mut client, server_io) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let err = accept(&server.configs, server_io).await.unwrap_err();
        assert_eq!(HandshakeFailure::of(&err), HandshakeFailure::Other);
    }
}
