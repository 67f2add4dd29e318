//! Identities shared by Signet's CA and agent: Kubernetes service accounts, their
//! SPIFFE IDs (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`), trust domains, and the PEM
//! form certificates travel in, and fresh keys ([`generate_key`]). Neither program
//! depends on the other; both depend on this.
#![forbid(unsafe_code)]

use std::fmt;

mod keygen;
pub use keygen::{KeyGenError, KeyType, generate_key};

use spiffe::{SpiffeId, TrustDomain};

/// Why a name could not become an identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The trust domain is not a valid SPIFFE trust domain name.
    #[error("invalid trust domain {name:?}: {source}")]
    TrustDomain {
        name: String,
        #[source]
        source: spiffe::SpiffeIdError,
    },
    /// A namespace or service account name that cannot appear in a SPIFFE ID.
    #[error("invalid service account {namespace:?}/{name:?}: {source}")]
    ServiceAccount {
        namespace: String,
        name: String,
        #[source]
        source: spiffe::SpiffeIdError,
    },
    /// A trust domain written as something else: a URI, a path, upper case.
    #[error("invalid trust domain {name:?}: {reason}")]
    TrustDomainName { name: String, reason: &'static str },
    /// A Kubernetes username that is not `system:serviceaccount:<ns>:<sa>`.
    #[error(
        "{0:?} is not a service account username (want system:serviceaccount:<namespace>:<name>)"
    )]
    NotServiceAccount(String),
}

/// A Kubernetes service account: the subject every Signet certificate is issued to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceAccount {
    namespace: String,
    name: String,
}

impl ServiceAccount {
    /// Validates both parts: non-empty, and usable as SPIFFE path segments.
    pub fn new(namespace: &str, name: &str) -> Result<Self, IdentityError> {
        let td =
            TrustDomain::new("check.invalid").map_err(|source| IdentityError::TrustDomain {
                name: "check.invalid".into(),
                source,
            })?;
        SpiffeId::from_segments(td, &["ns", namespace, "sa", name]).map_err(|source| {
            IdentityError::ServiceAccount {
                namespace: namespace.into(),
                name: name.into(),
                source,
            }
        })?;
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Parses a Kubernetes username of the form `system:serviceaccount:<ns>:<sa>`.
    pub fn from_username(username: &str) -> Result<Self, IdentityError> {
        let not_sa = || IdentityError::NotServiceAccount(username.to_owned());
        let rest = username
            .strip_prefix("system:serviceaccount:")
            .ok_or_else(not_sa)?;
        let (namespace, name) = rest.split_once(':').ok_or_else(not_sa)?;
        if namespace.is_empty() || name.is_empty() || name.contains(':') {
            return Err(not_sa());
        }
        Self::new(namespace, name)
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service account name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `spiffe://<td>/ns/<ns>/sa/<sa>`; fails only when the whole ID is too long.
    pub fn spiffe_id(&self, trust_domain: &TrustDomain) -> Result<SpiffeId, IdentityError> {
        SpiffeId::from_segments(
            trust_domain.clone(),
            &["ns", &self.namespace, "sa", &self.name],
        )
        .map_err(|source| IdentityError::ServiceAccount {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        })
    }

    /// Reads `ns` and `sa` back out of an Istio-shaped SPIFFE ID.
    pub fn from_spiffe_id(id: &SpiffeId) -> Option<Self> {
        let mut parts = id.path().strip_prefix('/')?.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Self::new(ns, sa).ok(),
            _ => None,
        }
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Our trust domain and the aliases accepted for it (in CSR SANs and client
/// certificates); a caller's own certificate names the primary one (a node agent's
/// impersonated identity is issued as asked, alias included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustDomains {
    primary: TrustDomain,
    aliases: Vec<TrustDomain>,
}

impl TrustDomains {
    /// `primary` and its `aliases`.
    pub fn new(primary: TrustDomain, aliases: Vec<TrustDomain>) -> Self {
        Self { primary, aliases }
    }

    /// The trust domain certificates are issued in.
    pub fn primary(&self) -> &TrustDomain {
        &self.primary
    }

    /// Whether `name` is ours or an alias.
    pub fn contains(&self, name: &str) -> bool {
        self.iter().any(|td| td.as_str() == name)
    }

    /// The primary, then the aliases.
    pub fn iter(&self) -> impl Iterator<Item = &TrustDomain> {
        std::iter::once(&self.primary).chain(&self.aliases)
    }
}

/// Parses and validates a trust domain name such as `cluster.local`.
pub fn trust_domain(name: &str) -> Result<TrustDomain, IdentityError> {
    let reason = if name.is_empty() {
        Some("it is empty; Istio's default is cluster.local")
    } else if name.contains("://") {
        Some("give the bare name, without a scheme: cluster.local, not spiffe://cluster.local")
    } else if name.contains('/') {
        Some("a trust domain has no path ('/'): cluster.local, not cluster.local/ns/default")
    } else if name.contains(':') {
        Some("a trust domain has no port or ':'")
    } else if name.chars().any(|c| c.is_ascii_uppercase()) {
        Some("SPIFFE trust domains are lower case (cluster.local, not Cluster.Local)")
    } else {
        None
    };
    if let Some(reason) = reason {
        return Err(IdentityError::TrustDomainName {
            name: name.into(),
            reason,
        });
    }
    TrustDomain::new(name).map_err(|source| IdentityError::TrustDomain {
        name: name.into(),
        source,
    })
}

/// PEM of one certificate, LF line endings (what Istio's answers and Envoy's secrets
/// carry).
pub fn pem_cert(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// The URI and DNS names in a certificate's subject alternative names, in order; both
/// empty when it has none (or an extension that does not parse).
pub fn san_names(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> (Vec<String>, Vec<String>) {
    use x509_parser::extensions::GeneralName;
    let (mut uris, mut dns) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    (uris, dns)
}

/// The key identifiers of a DER certificate, written as `openssl x509 -text` writes
/// them (`AB:CD:...`): its own (subject key identifier) and its issuer's (authority
/// key identifier). Operators compare them to tell two CAs of the same name apart.
pub fn key_ids(der: &[u8]) -> (Option<String>, Option<String>) {
    use x509_parser::{extensions::ParsedExtension, prelude::FromDer};
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(der) else {
        return (None, None);
    };
    let (mut own, mut issuer) = (None, None);
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(ski) => own = Some(colon_hex(ski.0)),
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                issuer = aki.key_identifier.as_ref().map(|k| colon_hex(k.0));
            }
            _ => {}
        }
    }
    (own, issuer)
}

fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn username_parsing() {
        let sa = ServiceAccount::from_username("system:serviceaccount:default:bookinfo").unwrap();
        assert_eq!(sa.namespace(), "default");
        assert_eq!(sa.name(), "bookinfo");
        for bad in [
            "system:serviceaccount::sa",
            "system:serviceaccount:ns:",
            "system:serviceaccount:ns",
            "system:node:foo",
            "alice",
            "system:serviceaccount:ns:sa:extra",
            "system:serviceaccount:n/s:sa",
        ] {
            assert!(ServiceAccount::from_username(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spiffe_round_trip() {
        let td = trust_domain("cluster.local").unwrap();
        let sa = ServiceAccount::new("foo", "bar").unwrap();
        let id = sa.spiffe_id(&td).unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/foo/sa/bar");
        assert_eq!(ServiceAccount::from_spiffe_id(&id), Some(sa));
        let other = SpiffeId::new("spiffe://cluster.local/ns/foo/sa/bar/x").unwrap();
        assert_eq!(ServiceAccount::from_spiffe_id(&other), None);
    }

    #[test]
    fn bad_trust_domains() {
        for (bad, says) in [
            ("", "empty"),
            ("spiffe://cluster.local", "without a scheme"),
            ("cluster.local/ns/x", "no path"),
            ("cluster.local:443", "no port"),
            ("Cluster.Local", "lower case"),
            ("a b", "invalid trust domain \"a b\""),
        ] {
            let e = trust_domain(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn key_ids_tell_two_cas_of_the_same_name_apart() {
        let ca = |key: &rcgen::KeyPair| {
            let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "Intermediate CA");
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let cert = p.self_signed(key).unwrap();
            (p, cert)
        };
        let (k1, k2) = (
            rcgen::KeyPair::generate().unwrap(),
            rcgen::KeyPair::generate().unwrap(),
        );
        let ((p1, c1), (_, c2)) = (ca(&k1), ca(&k2));
        let (id1, _) = key_ids(c1.der());
        let (id2, _) = key_ids(c2.der());
        assert!(id1.is_some() && id1 != id2, "{id1:?} {id2:?}");
        assert_eq!(id1.as_deref().unwrap().len(), 20 * 3 - 1, "AB:CD:... form");
        let mut leaf = rcgen::CertificateParams::new(vec!["w.example".into()]).unwrap();
        leaf.use_authority_key_identifier_extension = true;
        let issuer = rcgen::Issuer::from_params(&p1, &k1);
        let leaf = leaf
            .signed_by(&rcgen::KeyPair::generate().unwrap(), &issuer)
            .unwrap();
        assert_eq!(key_ids(leaf.der()).1, id1);
        assert_eq!(key_ids(b"garbage"), (None, None));
    }
}
