//! Envoy `Secret` messages built from PEM: a certificate with its key, a trust bundle,
//! and Envoy's SPIFFE validator with one bundle per trust domain; and the content
//! digest used as a secret's version.

use envoy_types::pb::envoy::{
    config::core::v3::{DataSource, data_source::Specifier},
    extensions::transport_sockets::tls::v3::{
        CertificateValidationContext, Secret, TlsCertificate, secret,
    },
};
use sha2::{Digest, Sha256};

/// Envoy's SPIFFE certificate validator extension.
const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";
const SPIFFE_VALIDATOR_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";

/// A secret ready to send: its version and the Envoy message.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// Changes whenever the content changes.
    pub version: String,
    /// The `Secret`, named as requested.
    pub secret: Secret,
}

fn inline(bytes: &[u8]) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes.to_vec())),
        ..Default::default()
    })
}

/// `Secret{tls_certificate{certificate_chain, private_key}}`, inline bytes.
pub(crate) fn tls_secret(name: &str, chain: &[u8], key: &[u8]) -> Secret {
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain),
            private_key: inline(key),
            ..Default::default()
        })),
    }
}

/// `Secret{validation_context{trusted_ca}}`, inline bytes.
pub(crate) fn roots_secret(name: &str, roots: &[u8]) -> Secret {
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(roots),
                ..Default::default()
            },
        )),
    }
}

/// `validation_context{custom_validator_config}`: Envoy's SPIFFE validator, one
/// trust bundle per trust domain, so a peer is verified only against its own domain's
/// roots.
pub(crate) fn spiffe_secret(name: &str, bundles: &crate::secrets::federation::Bundles) -> Resolved {
    use envoy_types::pb::{
        envoy::{
            config::core::v3::TypedExtensionConfig,
            extensions::transport_sockets::tls::v3::{
                SpiffeCertValidatorConfig, spiffe_cert_validator_config,
            },
        },
        google::protobuf::Any,
    };
    use prost::Message;
    let config = SpiffeCertValidatorConfig {
        trust_domains: bundles
            .iter()
            .map(|(td, pem)| spiffe_cert_validator_config::TrustDomain {
                name: td.clone(),
                trust_bundle: inline(pem.as_bytes()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let value = config.encode_to_vec();
    Resolved {
        version: digest(&value),
        secret: Secret {
            name: name.to_owned(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    custom_validator_config: Some(TypedExtensionConfig {
                        name: SPIFFE_VALIDATOR.to_owned(),
                        typed_config: Some(Any {
                            type_url: SPIFFE_VALIDATOR_TYPE.to_owned(),
                            value,
                        }),
                    }),
                    ..Default::default()
                },
            )),
        },
    }
}

/// A short content digest, used as a secret's version.
pub(crate) fn digest(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}
