//! istiod's serving certificate as a `kubernetes.io/tls` Secret (`tls.crt` leaf and
//! chain, `tls.key`, `ca.crt` the trust bundle), for an istiod run with
//! `ENABLE_CA_SERVER=false` and `--tlsCertFile/--tlsKeyFile/--caCertFile` from it.
//! Issued here, renewed at half its life, re-issued when the key material or the
//! names change, and restored when the Secret is deleted or edited.

use std::{collections::BTreeMap, sync::Arc, time::Duration as StdDuration};

use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api,
    runtime::{reflector, watcher},
};
use rcgen::PublicKeyData;
use time::OffsetDateTime;
use tokio::{
    sync::{Notify, watch},
    task::JoinSet,
};

use super::{
    Driver, IstiodSecret, MANAGED_BY,
    apply::{WriteError, ensure},
    watch_into,
};
use crate::signer::Signer;

const TLS_TYPE: &str = "kubernetes.io/tls";

/// What the Secret holds now, as far as renewal cares.
#[derive(Debug, PartialEq)]
enum State {
    /// Good until `renew_at`; `ca.crt` may still need updating.
    Good { renew_at: OffsetDateTime },
    /// Must be issued anew, for this reason.
    Reissue(String),
    /// Cannot be fixed by an update (a Secret's type is immutable).
    Stuck(String),
}

/// Judges the Secret's certificate against the signer, names and time.
fn judge(secret: Option<&Secret>, signer: &Signer, names: &[String], now: OffsetDateTime) -> State {
    let Some(secret) = secret else {
        return State::Reissue("missing".into());
    };
    if secret.type_.as_deref() != Some(TLS_TYPE) {
        return State::Stuck(format!(
            "it exists with type {:?}, which cannot be changed; delete it and Signet creates a {TLS_TYPE} Secret",
            secret.type_.as_deref().unwrap_or("Opaque")
        ));
    }
    let data = secret.data.as_ref();
    let get = |k: &str| data.and_then(|d| d.get(k)).map(|b| b.0.as_slice());
    let Some(key_spki) = get("tls.key")
        .and_then(|k| std::str::from_utf8(k).ok())
        .and_then(|k| rcgen::KeyPair::from_pem(k).ok())
        .map(|k| k.subject_public_key_info())
    else {
        return State::Reissue("tls.key is missing or not a usable private key".into());
    };
    let Some(crt) = get("tls.crt") else {
        return State::Reissue("tls.crt is missing".into());
    };
    let certs: Vec<Vec<u8>> = match pem::parse_many(crt) {
        Ok(blocks) => blocks
            .into_iter()
            .filter(|b| b.tag() == "CERTIFICATE")
            .map(pem::Pem::into_contents)
            .collect(),
        Err(_) => return State::Reissue("tls.crt is not PEM".into()),
    };
    let Some((leaf, chain)) = certs.split_first() else {
        return State::Reissue("tls.crt holds no certificate".into());
    };
    let chain_now: Vec<Vec<u8>> = signer.chain_certs().iter().map(|c| c.to_vec()).collect();
    if chain != chain_now.as_slice() {
        return State::Reissue("issued under other key material".into());
    }
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return State::Reissue("tls.crt is not a certificate".into());
    };
    if cert.public_key().raw != key_spki.as_slice() {
        return State::Reissue("tls.key is not the key of tls.crt".into());
    }
    let signed_by_us = chain_now
        .first()
        .and_then(|issuer| x509_parser::parse_x509_certificate(issuer).ok())
        .is_some_and(|(_, issuer)| cert.verify_signature(Some(issuer.public_key())).is_ok());
    if !signed_by_us {
        return State::Reissue("tls.crt is not signed by the signing certificate".into());
    }
    let (_, mut dns) = signet_spiffe::san_names(&cert);
    dns.sort();
    let mut want = names.to_vec();
    want.sort();
    if dns != want {
        return State::Reissue("DNS names changed".into());
    }
    let not_before = cert.validity().not_before.to_datetime();
    let not_after = cert.validity().not_after.to_datetime();
    let renew_at = not_before + (not_after - not_before) / 2;
    if now >= renew_at {
        // Near the end of the signing certificate's life a new leaf cannot outlive
        // this one: keep it and look again later instead of reissuing in a loop.
        if not_after + time::Duration::minutes(1) >= signer.leaf_not_after_limit() {
            return State::Good {
                renew_at: now + time::Duration::minutes(5),
            };
        }
        return State::Reissue("half of its life is over".into());
    }
    State::Good { renew_at }
}

/// A new key and certificate: (tls.crt, tls.key).
fn issue(
    signer: &Signer,
    config: &IstiodSecret,
    now: OffsetDateTime,
) -> Result<(String, String), WriteError> {
    let key = crate::keys::generate_p256().map_err(|e| WriteError::Other(e.to_string()))?;
    let issued = signer
        .sign_server(
            &key.pair.subject_public_key_info(),
            &config.dns_names,
            config.ttl,
            now,
        )
        .map_err(|e| WriteError::Other(format!("cannot issue istiod's certificate: {e}")))?;
    let mut crt = issued
        .cert_chain
        .first()
        .cloned()
        .ok_or_else(|| WriteError::Other("the signer returned no certificate".into()))?;
    for cert in signer.chain_certs() {
        if !crt.ends_with('\n') {
            crt.push('\n');
        }
        crt.push_str(&signet_spiffe::pem_cert(&cert));
    }
    Ok((crt, key.pair.serialize_pem()))
}

/// The Secret as it should be, from `current` and the state judged of it.
fn desired(
    current: Option<&Secret>,
    config: &IstiodSecret,
    bundle: &str,
    fresh: Option<&(String, String)>,
) -> Option<Secret> {
    let mut secret = current.cloned().unwrap_or_else(|| Secret {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(config.namespace.clone()),
            ..Default::default()
        },
        type_: Some(TLS_TYPE.into()),
        ..Default::default()
    });
    let mut changed = current.is_none();
    let labels = secret.metadata.labels.get_or_insert_with(BTreeMap::new);
    if labels.get(MANAGED_BY.0).map(String::as_str) != Some(MANAGED_BY.1) {
        labels.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
        changed = true;
    }
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    let mut set = |k: &str, v: &str| {
        if data.get(k).map(|b| b.0.as_slice()) != Some(v.as_bytes()) {
            data.insert(k.into(), ByteString(v.as_bytes().to_vec()));
            changed = true;
        }
    };
    if let Some((crt, key)) = fresh {
        set("tls.crt", crt);
        set("tls.key", key);
    }
    set("ca.crt", bundle);
    secret.string_data = None;
    changed.then_some(secret)
}

/// Runs the writer until aborted.
pub(super) async fn run(
    client: kube::Client,
    config: IstiodSecret,
    signer: watch::Receiver<Arc<Signer>>,
    sync: Driver,
) {
    let api: Api<Secret> = Api::namespaced(client, &config.namespace);
    let changed = Arc::new(Notify::new());
    let (store, writer) = reflector::store::<Secret>();
    let mut watches = JoinSet::new();
    watches.spawn(watch_into(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={}", config.name)),
        writer,
        changed.clone(),
        "istiod secret",
    ));
    if store.wait_until_ready().await.is_err() {
        return;
    }
    tracing::info!(secret = %format!("{}/{}", config.namespace, config.name), names = ?config.dns_names, "keeping istiod's serving certificate");
    let (api, config, sync_ref) = (&api, &config, &sync);
    sync.drive(changed, signer, |current| {
        let known = store
            .get(&reflector::ObjectRef::new(&config.name).within(&config.namespace))
            .map(|s| (*s).clone());
        async move {
            let now = OffsetDateTime::now_utc();
            let bundle = current.roots_pem();
            // Judged on each attempt, so after a conflict with a fresher Secret
            // (another replica renewed it a moment ago) nothing is issued twice.
            let mut fresh: Option<(String, String)> = None;
            let mut failure: Option<WriteError> = None;
            let mut next = None;
            let written = ensure(api, &config.name, Some(known), sync_ref, |s| {
                let want = match judge(s, &current, &config.dns_names, now) {
                    State::Good { renew_at } => {
                        next = Some(renew_at);
                        return desired(s, config, bundle, None);
                    }
                    State::Stuck(why) => {
                        failure = Some(WriteError::Other(format!(
                            "Secret {}/{}: {why}",
                            config.namespace, config.name
                        )));
                        return None;
                    }
                    State::Reissue(why) => {
                        if fresh.is_none() {
                            match issue(&current, config, now) {
                                Ok(f) => fresh = Some(f),
                                Err(e) => {
                                    failure = Some(e);
                                    return None;
                                }
                            }
                            tracing::info!(reason = %why, "issuing istiod's certificate");
                        }
                        desired(s, config, bundle, fresh.as_ref())
                    }
                };
                if let Some(State::Good { renew_at }) = want
                    .as_ref()
                    .map(|w| judge(Some(w), &current, &config.dns_names, now))
                {
                    next = Some(renew_at);
                }
                want
            })
            .await?;
            if let Some(e) = failure {
                return Err(e);
            }
            if written {
                tracing::info!(secret = %config.name, "istiod's Secret written");
            }
            // Wake at the renewal point of what is there now.
            Ok(next.map(|at| StdDuration::try_from(at - now).unwrap_or(StdDuration::from_secs(1))))
        }
    })
    .await;
}
