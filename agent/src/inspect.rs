//! `signet-agent inspect`: asks an SDS socket for secrets the way Envoy does and
//! describes what came back. Works against any SDS server (it uses StreamSecrets,
//! which pilot-agent and SPIRE implement too).

use std::{path::PathBuf, time::Duration as StdDuration};

use envoy_types::pb::envoy::{
    config::core::v3::data_source::Specifier,
    extensions::transport_sockets::tls::v3::{Secret, secret},
    service::{
        discovery::v3::DiscoveryRequest,
        secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient,
    },
};
use prost::Message;
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tonic::transport::{Endpoint, Uri};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use crate::sds::SECRET_TYPE;

/// What went wrong inspecting.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("cannot connect to {path}: {problem}")]
    Connect { path: String, problem: String },
    #[error("the SDS server refused: {0}")]
    Refused(String),
    #[error("no answer for {missing:?} within {timeout:?}")]
    Timeout {
        missing: Vec<String>,
        timeout: StdDuration,
    },
}

/// One certificate as the operator sees it.
#[derive(Debug, Serialize)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    pub spiffe_id: Option<String>,
    pub serial: String,
    /// Subject key identifier (`AB:CD:...`, as openssl prints it).
    pub key_id: Option<String>,
    /// Authority key identifier: which CA key signed it. Two intermediates of the
    /// same name (a rotation) differ here.
    pub issuer_key_id: Option<String>,
    pub not_before: String,
    pub not_after: String,
    pub seconds_left: i64,
    pub sha256_fingerprint: String,
}

/// One secret.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SecretInfo {
    TlsCertificate {
        name: String,
        chain_length: usize,
        leaf: Option<Box<CertInfo>>,
        /// Seconds until the agent rotates it, at the given grace ratio.
        seconds_to_rotation: Option<i64>,
        has_private_key: bool,
    },
    ValidationContext {
        name: String,
        roots: Vec<CertInfo>,
        /// What the CA said of its trust change with this bundle, when the agent
        /// serving it says (signet-agent's `/trust`).
        #[serde(skip_serializing_if = "Option::is_none")]
        ca_trust_change: Option<TrustChange>,
    },
    Other {
        name: String,
    },
}

/// Which stage of the CA's trust change a bundle belongs to, as the agent says.
#[derive(Debug, Serialize)]
pub struct TrustChange {
    /// The stage (`idle`, `distribute`, `switch`, `retire`, `done`, `aborting`);
    /// `None` when the CA did not say (it is not signet-ca).
    pub stage: Option<String>,
    /// Whether the CA has been told this bundle is served.
    pub reported: bool,
}

/// What the agent at `addr` says at `/trust`, or why it could not be asked.
async fn agent_trust(addr: std::net::SocketAddr) -> Result<crate::server::TrustView, String> {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("http://{addr}/trust");
    let answer = reqwest::Client::builder()
        .timeout(StdDuration::from_secs(2))
        .build()
        .map_err(|e| e.to_string())?
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !answer.status().is_success() {
        return Err(format!("{url} answered {}", answer.status()));
    }
    let body = answer.bytes().await.map_err(|e| format!("{url}: {e}"))?;
    serde_json::from_slice(&body).map_err(|e| format!("{url}: not signet-agent's answer ({e})"))
}

/// A gRPC channel over the Unix socket at `socket`.
pub async fn connect(socket: &std::path::Path) -> Result<tonic::transport::Channel, InspectError> {
    let path = socket.to_owned();
    let connect_err = |problem: String| InspectError::Connect {
        path: socket.display().to_string(),
        problem,
    };
    Endpoint::try_from("http://sds.invalid")
        .map_err(|e| connect_err(e.to_string()))?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| {
            connect_err(format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            ))
        })
}

/// Connects to `socket`, subscribes to `names`, and waits for one answer per name;
/// asks the agent's HTTP listener at `agent` which stage of the CA's trust change
/// the bundle it serves belongs to (shown with the bundle whose roots are those).
pub async fn inspect(
    socket: PathBuf,
    names: Vec<String>,
    timeout: StdDuration,
    grace_ratio: f64,
    agent: std::net::SocketAddr,
) -> Result<Vec<SecretInfo>, InspectError> {
    let channel = connect(&socket).await?;
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let request = DiscoveryRequest {
        resource_names: names.clone(),
        type_url: SECRET_TYPE.to_owned(),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let _ = tx.send(request).await;
    let collect = async {
        let mut stream = client
            .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| InspectError::Refused(format!("{:?}: {}", s.code(), s.message())))?
            .into_inner();
        let mut found: Vec<Secret> = Vec::new();
        while found.len() < names.len() {
            match stream.message().await {
                Ok(Some(response)) => {
                    for any in response.resources {
                        if let Ok(secret) = Secret::decode(any.value.as_slice())
                            && !found.iter().any(|s| s.name == secret.name)
                        {
                            found.push(secret);
                        }
                    }
                }
                Ok(None) => break,
                Err(s) => {
                    return Err(InspectError::Refused(format!(
                        "{:?}: {}",
                        s.code(),
                        s.message()
                    )));
                }
            }
        }
        Ok(found)
    };
    let found = match tokio::time::timeout(timeout, collect).await {
        Ok(found) => found?,
        Err(_) => {
            return Err(InspectError::Timeout {
                missing: names,
                timeout,
            });
        }
    };
    drop(tx);
    let trust = agent_trust(agent).await;
    if let Err(e) = &trust {
        tracing::debug!(error = %e, "the agent does not say which stage of a trust change it holds");
    }
    let now = OffsetDateTime::now_utc();
    let mut infos: Vec<SecretInfo> = found
        .iter()
        .map(|s| describe(s, now, grace_ratio))
        .collect();
    if let Ok(view) = trust {
        for info in &mut infos {
            if let SecretInfo::ValidationContext {
                roots,
                ca_trust_change,
                ..
            } = info
            {
                let mut digests: Vec<&str> = roots
                    .iter()
                    .map(|r| r.sha256_fingerprint.as_str())
                    .collect();
                digests.sort_unstable();
                digests.dedup();
                if digests == view.roots.iter().map(String::as_str).collect::<Vec<_>>() {
                    *ca_trust_change = Some(TrustChange {
                        stage: view.stage.clone(),
                        reported: view.reported,
                    });
                }
            }
        }
    }
    Ok(infos)
}

fn inline(source: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> Vec<u8> {
    match source.as_ref().and_then(|s| s.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => b.clone(),
        Some(Specifier::InlineString(s)) => s.clone().into_bytes(),
        _ => Vec::new(),
    }
}

fn certs(pem: &[u8], now: OffsetDateTime) -> Vec<CertInfo> {
    ::pem::parse_many(pem)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .filter_map(|p| {
            let der = p.into_contents();
            let (_, c) = X509Certificate::from_der(&der).ok()?;
            let spiffe_id = c.subject_alternative_name().ok().flatten().and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    GeneralName::URI(u) if u.starts_with("spiffe://") => Some((*u).to_owned()),
                    _ => None,
                })
            });
            let not_after = c.validity().not_after.to_datetime();
            let (key_id, issuer_key_id) = signet_spiffe::key_ids(&der);
            Some(CertInfo {
                subject: c.subject().to_string(),
                issuer: c.issuer().to_string(),
                spiffe_id,
                serial: hex::encode(c.raw_serial()),
                key_id,
                issuer_key_id,
                not_before: signet_telemetry::rfc3339(c.validity().not_before.to_datetime()),
                not_after: signet_telemetry::rfc3339(not_after),
                seconds_left: (not_after - now).whole_seconds(),
                sha256_fingerprint: hex::encode(Sha256::digest(&der)),
            })
        })
        .collect()
}

fn describe(secret: &Secret, now: OffsetDateTime, grace_ratio: f64) -> SecretInfo {
    match &secret.r#type {
        Some(secret::Type::TlsCertificate(tls)) => {
            let chain = inline(&tls.certificate_chain);
            let mut infos = certs(&chain, now);
            let chain_length = infos.len();
            let leaf = if infos.is_empty() {
                None
            } else {
                Some(Box::new(infos.remove(0)))
            };
            let seconds_to_rotation = ::pem::parse_many(&chain)
                .ok()
                .and_then(|p| p.into_iter().next())
                .and_then(|p| {
                    let der = p.into_contents();
                    let (_, c) = X509Certificate::from_der(&der).ok()?;
                    let (nb, na) = (
                        c.validity().not_before.to_datetime(),
                        c.validity().not_after.to_datetime(),
                    );
                    Some(
                        (crate::identity::schedule::refresh_at(nb, na, grace_ratio, 0.0) - now)
                            .whole_seconds(),
                    )
                });
            SecretInfo::TlsCertificate {
                name: secret.name.clone(),
                chain_length,
                leaf,
                seconds_to_rotation,
                has_private_key: !inline(&tls.private_key).is_empty(),
            }
        }
        Some(secret::Type::ValidationContext(vc)) => SecretInfo::ValidationContext {
            name: secret.name.clone(),
            roots: certs(&inline(&vc.trusted_ca), now),
            ca_trust_change: None,
        },
        _ => SecretInfo::Other {
            name: secret.name.clone(),
        },
    }
}

fn human(secs: i64) -> String {
    let sign = if secs < 0 { "-" } else { "" };
    let s = secs.unsigned_abs();
    format!("{sign}{}h{:02}m{:02}s", s / 3600, (s / 60) % 60, s % 60)
}

/// Text for a terminal.
pub fn render_text(secrets: &[SecretInfo]) -> String {
    let mut out = String::new();
    for s in secrets {
        match s {
            SecretInfo::TlsCertificate {
                name,
                chain_length,
                leaf,
                seconds_to_rotation,
                has_private_key,
            } => {
                out.push_str(&format!(
                    "{name}: TLS certificate (chain of {chain_length}, private key {})\n",
                    if *has_private_key {
                        "present"
                    } else {
                        "MISSING"
                    }
                ));
                if let Some(c) = leaf {
                    out.push_str(&format!(
                        "  SPIFFE ID   {}\n",
                        c.spiffe_id.as_deref().unwrap_or("(none)")
                    ));
                    out.push_str(&format!(
                        "  serial      {}\n  issuer      {}\n  issuer key  {}\n",
                        c.serial,
                        c.issuer,
                        c.issuer_key_id.as_deref().unwrap_or("(none)")
                    ));
                    out.push_str(&format!(
                        "  not before  {}\n  not after   {}\n",
                        c.not_before, c.not_after
                    ));
                    out.push_str(&format!("  time left   {}\n", human(c.seconds_left)));
                }
                if let Some(r) = seconds_to_rotation {
                    out.push_str(&format!("  rotation in {}\n", human(*r)));
                }
            }
            SecretInfo::ValidationContext {
                name,
                roots,
                ca_trust_change,
            } => {
                out.push_str(&format!(
                    "{name}: trust bundle of {} root(s)\n",
                    roots.len()
                ));
                if let Some(change) = ca_trust_change {
                    let rotating = matches!(
                        change.stage.as_deref(),
                        Some("distribute" | "switch" | "retire")
                    );
                    let told = match (change.reported, rotating) {
                        (true, _) => "the CA knows it is served",
                        (false, true) => "the CA is told within seconds that it is served",
                        (false, false) => "the CA learns it is served at the next renewal",
                    };
                    match &change.stage {
                        Some(stage) => {
                            out.push_str(&format!("  CA trust change: {stage} ({told})\n"))
                        }
                        None => {
                            out.push_str("  CA trust change: not said (the CA is not signet-ca)\n")
                        }
                    }
                }
                for r in roots {
                    out.push_str(&format!(
                        "  {}\n    sha256 {}\n    key id {}\n    expires {} ({} left)\n",
                        r.subject,
                        r.sha256_fingerprint,
                        r.key_id.as_deref().unwrap_or("(none)"),
                        r.not_after,
                        human(r.seconds_left)
                    ));
                }
            }
            SecretInfo::Other { name } => {
                out.push_str(&format!("{name}: a secret of another kind\n"))
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(change: Option<TrustChange>) -> String {
        render_text(&[SecretInfo::ValidationContext {
            name: "ROOTCA".into(),
            roots: Vec::new(),
            ca_trust_change: change,
        }])
    }

    #[test]
    fn the_text_says_which_stage_of_the_cas_trust_change_the_bundle_belongs_to() {
        let text = bundle(Some(TrustChange {
            stage: Some("distribute".into()),
            reported: false,
        }));
        assert!(
            text.contains(
                "CA trust change: distribute (the CA is told within seconds that it is served)"
            ),
            "{text}"
        );
        let text = bundle(Some(TrustChange {
            stage: None,
            reported: true,
        }));
        assert!(
            text.contains("not said (the CA is not signet-ca)"),
            "{text}"
        );
        assert!(!bundle(None).contains("trust change"));
    }
}
