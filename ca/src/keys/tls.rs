//! The CA's TLS side: a serving certificate it issues to itself (swapped on renewal
//! and on key-material reload) and optional client certificates verified against the
//! current trust bundle.

use std::sync::{Arc, RwLock};

use rustls::{
    DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime},
    server::{
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use time::{Duration, OffsetDateTime};

use crate::keys::signer::{SignError, Signer};

/// Flags of the CA's own serving certificate (part of `signet-ca serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// DNS names in the CA's serving certificate (comma separated): the names
    /// clients dial and verify.
    #[arg(
        long,
        env = "SERVING_DNS_NAMES",
        value_delimiter = ',',
        default_value = "istiod.istio-system.svc,istiod.istio-system.svc.cluster.local,istiod.istio-system,istiod"
    )]
    pub serving_dns_names: Vec<String>,

    #[command(flatten)]
    pub compliance: signet_tls::ComplianceArgs,
}

impl TlsArgs {
    /// The names, blank entries dropped (a trailing comma in the variable); at least
    /// one, each a DNS name.
    pub fn names(&self) -> Result<Vec<String>, crate::flags::ConfigError> {
        let flag = "--serving-dns-names";
        let names: Vec<String> = self
            .serving_dns_names
            .iter()
            .map(|n| n.trim())
            .filter(|n| !n.is_empty())
            .map(|n| {
                crate::flags::dns_name(n)
                    .map_err(|e| crate::flags::ConfigError::new(flag, e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        if names.is_empty() {
            return Err(crate::flags::ConfigError::new(
                flag,
                "at least one name is needed",
            ));
        }
        Ok(names)
    }
}

/// Lifetime of the CA's own serving certificate; renewed at half of it.
pub(crate) const SERVING_CERT_LIFETIME: Duration = Duration::hours(24);

/// What went wrong setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot issue the serving certificate: {0}")]
    Issue(#[from] SignError),
    #[error("TLS setup: {0}")]
    Rustls(String),
}

/// The ring provider: Signet's only crypto stack.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Serving certificate and client trust, both swappable while the server runs.
#[derive(Debug)]
pub(crate) struct TlsState {
    cert: RwLock<Arc<CertifiedKey>>,
    not_after: RwLock<OffsetDateTime>,
    clients: RwLock<Arc<dyn ClientCertVerifier>>,
    dns_names: Vec<String>,
}

impl TlsState {
    /// Issues a first serving certificate from `signer`.
    pub(crate) fn new(
        signer: &Signer,
        dns_names: Vec<String>,
        now: OffsetDateTime,
    ) -> Result<Arc<Self>, TlsError> {
        let (cert, not_after) = issue_serving(signer, &dns_names, now)?;
        Ok(Arc::new(Self {
            cert: RwLock::new(Arc::new(cert)),
            not_after: RwLock::new(not_after),
            clients: RwLock::new(client_verifier(signer)?),
            dns_names,
        }))
    }

    /// Re-issues the serving certificate and trusts `signer`'s roots from now on.
    pub(crate) fn refresh(&self, signer: &Signer, now: OffsetDateTime) -> Result<(), TlsError> {
        let verifier = client_verifier(signer)?;
        let (cert, not_after) = issue_serving(signer, &self.dns_names, now)?;
        *crate::sync::write(&self.cert) = Arc::new(cert);
        *crate::sync::write(&self.not_after) = not_after;
        *crate::sync::write(&self.clients) = verifier;
        Ok(())
    }

    /// When the serving certificate should be renewed: half-way through its life.
    pub(crate) fn renew_at(&self) -> OffsetDateTime {
        let not_after = *crate::sync::read(&self.not_after);
        not_after - SERVING_CERT_LIFETIME / 2
    }

    /// The current serving certificate, for another listener (OIDC discovery).
    pub(crate) fn cert_resolver(self: &Arc<Self>) -> Arc<dyn ResolvesServerCert> {
        Arc::new(DynamicCert(self.clone()))
    }

    /// The rustls server configurations under `policy` (see
    /// [`signet_tls::ServerConfigs`]), each reading the current certificate and trust.
    ///
    /// Session resumption is off: a resumed session restores the peer's certificates
    /// from the ticket without running the verifier, which would let a client
    /// certificate authenticate after it expired. gRPC clients keep one connection
    /// open, so a full handshake per connection costs nothing that matters.
    pub(crate) fn server_configs(
        self: &Arc<Self>,
        policy: signet_tls::CompliancePolicy,
    ) -> Result<signet_tls::ServerConfigs, TlsError> {
        signet_tls::ServerConfigs::new(policy, |provider, versions| {
            let mut config = ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(versions)?
                .with_client_cert_verifier(Arc::new(DynamicClientVerifier(self.clone())))
                .with_cert_resolver(Arc::new(DynamicCert(self.clone())));
            config.alpn_protocols = vec![b"h2".to_vec()];
            // No session cache and no TLS 1.3 tickets; the builder's ticketer already
            // never produces TLS 1.2 tickets.
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
            Ok(config)
        })
        .map_err(|e| TlsError::Rustls(e.to_string()))
    }

    /// Checks a client certificate chain again, at `now`, against the trust bundle
    /// and revocation lists loaded now. The handshake checked it once, but a
    /// connection outlives both the certificate and a key-material reload, so a
    /// request that authenticates by certificate is judged by this, not by the
    /// handshake.
    pub(crate) fn reverify_client(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        self.verifier()
            .verify_client_cert(leaf, intermediates, now)
            .map(|_| ())
    }

    fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        crate::sync::read(&self.clients).clone()
    }
}

fn issue_serving(
    signer: &Signer,
    dns_names: &[String],
    now: OffsetDateTime,
) -> Result<(CertifiedKey, OffsetDateTime), TlsError> {
    use rcgen::PublicKeyData;
    let key = crate::keys::generate_p256().map_err(|e| TlsError::Rustls(e.to_string()))?;
    let issued = signer.sign_server(
        &key.pair.subject_public_key_info(),
        dns_names,
        SERVING_CERT_LIFETIME,
        now,
    )?;
    let leaf = pem::parse(&issued.leaf).map_err(|e| TlsError::Rustls(e.to_string()))?;
    let mut chain = vec![CertificateDer::from(leaf.into_contents())];
    chain.extend(signer.chain_certs());
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pair.serialize_der()));
    let signing_key = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    Ok((CertifiedKey::new(chain, signing_key), issued.not_after))
}

fn client_verifier(signer: &Signer) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for root in signer.roots() {
        roots
            .add(root.clone())
            .map_err(|e| TlsError::Rustls(format!("trust bundle: {e}")))?;
    }
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated();
    if !signer.crls().is_empty() {
        // Istio's ca-crl.pem comes from the signing CA: it speaks for the leaves it
        // issued, and there is no list for the CAs above it.
        builder = builder
            .with_crls(signer.crls().iter().cloned())
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    builder
        .build()
        .map_err(|e| TlsError::Rustls(format!("client verifier (ca-crl.pem?): {e}")))
}

#[derive(Debug)]
struct DynamicCert(Arc<TlsState>);

impl ResolvesServerCert for DynamicCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(crate::sync::read(&self.0.cert).clone())
    }
}

/// Client certificates are optional; when sent, they must chain to the current bundle.
#[derive(Debug)]
struct DynamicClientVerifier(Arc<TlsState>);

impl ClientCertVerifier for DynamicClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would pin the borrow to one verifier generation; none are needed.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .verifier()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.verifier().supported_verify_schemes()
    }
}
