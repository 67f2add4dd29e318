//! istiod's serving certificate as a `kubernetes.io/tls` Secret (`tls.crt` leaf and
//! chain, `tls.key`, `ca.crt` the trust bundle), for an istiod run with
//! `ENABLE_CA_SERVER=false` and `--tlsCertFile/--tlsKeyFile/--caCertFile` from it.
//! Issued here, renewed at half its life, re-issued when the key material or the
//! names change, and restored when the Secret is deleted or edited.

use std::{collections::BTreeMap, sync::Arc, time::Duration as StdDuration};

use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, ResourceExt, runtime::controller::Action};
use rcgen::PublicKeyData;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::{
    Failures, IstiodSecret, MANAGED_BY, Tally,
    apply::{WriteError, ensure},
    drain, key_changes, requeue, retry_after, singleton,
};
use crate::keys::signer::Signer;

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
    let mut crt = issued.leaf;
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

/// What reconciling the Secret reads.
struct Context {
    api: Api<Secret>,
    config: IstiodSecret,
    signer: watch::Receiver<Arc<Signer>>,
    tally: Tally,
    failures: Failures,
}

/// Makes the Secret hold a certificate for the names under the current key
/// material, renewed at half its life. `current` is the Secret as the API server has
/// it, or a skeleton without a `resourceVersion` while it has none. Requeued for the
/// renewal point of what is there now.
async fn reconcile(current: Arc<Secret>, ctx: Arc<Context>) -> Result<Action, WriteError> {
    let (config, tally) = (&ctx.config, &ctx.tally);
    let known = current.resource_version().map(|_| (*current).clone());
    let signer = ctx.signer.borrow().clone();
    let now = OffsetDateTime::now_utc();
    let bundle = signer.roots_pem();
    // Judged on each attempt, so after a conflict with a fresher Secret (another
    // replica renewed it a moment ago) nothing is issued twice.
    let mut fresh: Option<(String, String)> = None;
    let mut failure: Option<WriteError> = None;
    let mut next = None;
    let written = ensure(&ctx.api, &config.name, Some(known), tally, |s| {
        let want = match judge(s, &signer, &config.dns_names, now) {
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
                    match issue(&signer, config, now) {
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
            .map(|w| judge(Some(w), &signer, &config.dns_names, now))
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
    ctx.failures.succeeded(&config.name);
    tally.synced();
    // Woken at the renewal point of what is there now.
    Ok(requeue(next.map(|at| {
        StdDuration::try_from(at - now).unwrap_or(StdDuration::from_secs(1))
    })))
}

fn error_policy(_: Arc<Secret>, error: &WriteError, ctx: Arc<Context>) -> Action {
    retry_after(&ctx.tally, &ctx.failures, &ctx.config.name, error)
}

/// Runs the writer until aborted.
pub(super) async fn run(
    client: kube::Client,
    config: IstiodSecret,
    signer: watch::Receiver<Arc<Signer>>,
    tally: Tally,
) {
    let api: Api<Secret> = Api::namespaced(client, &config.namespace);
    let skeleton = Secret {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(config.namespace.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    tracing::info!(secret = %format!("{}/{}", config.namespace, config.name), names = ?config.dns_names, "keeping istiod's serving certificate");
    let controller =
        singleton(api.clone(), skeleton, ()).reconcile_all_on(key_changes(signer.clone()));
    let writer = tally.name();
    let ctx = Arc::new(Context {
        api,
        config,
        signer,
        tally,
        failures: Failures::default(),
    });
    drain(writer, controller.run(reconcile, error_policy, ctx)).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn signer(now: OffsetDateTime) -> (tempfile::TempDir, Signer) {
        let dir = tempfile::tempdir().unwrap();
        let material = crate::keys::cacerts::load_or_create_self_signed(
            &dir.path().join("state"),
            "cluster.local",
            now,
        )
        .unwrap();
        let signer = Signer::new(material, now).unwrap();
        (dir, signer)
    }

    fn config() -> IstiodSecret {
        IstiodSecret {
            namespace: "istio-system".into(),
            name: "istiod-tls".into(),
            dns_names: vec!["istiod.istio-system.svc".into()],
            ttl: time::Duration::hours(24),
        }
    }

    /// Reconciling the Secret, from plain values: what is there decides whether a
    /// certificate is issued, kept until its renewal point, or left for a human.
    #[test]
    fn the_secret_is_issued_kept_until_half_life_and_reissued_when_it_must_be() {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let (_dir, signer) = signer(now);
        let config = config();
        let names = &config.dns_names;
        assert!(
            matches!(judge(None, &signer, names, now), State::Reissue(why) if why == "missing")
        );
        let fresh = issue(&signer, &config, now).unwrap();
        let secret = desired(None, &config, signer.roots_pem(), Some(&fresh)).unwrap();
        assert_eq!(secret.type_.as_deref(), Some(TLS_TYPE));
        let State::Good { renew_at } = judge(Some(&secret), &signer, names, now) else {
            panic!("a fresh certificate must be good");
        };
        let half = renew_at - now;
        assert!(
            (half - time::Duration::hours(12)).abs() < time::Duration::minutes(3),
            "{half}"
        );
        // As it should be: nothing to write.
        assert!(desired(Some(&secret), &config, signer.roots_pem(), None).is_none());
        // Half its life over: issued again.
        let later = now + time::Duration::hours(13);
        assert!(matches!(
            judge(Some(&secret), &signer, names, later),
            State::Reissue(_)
        ));
        // Other names, or another CA's key material: issued again.
        let other_names = vec!["istiod.other.svc".to_owned()];
        assert!(matches!(
            judge(Some(&secret), &signer, &other_names, now),
            State::Reissue(_)
        ));
        let (_other_dir, other) = self::signer(now);
        assert!(matches!(
            judge(Some(&secret), &other, names, now),
            State::Reissue(_)
        ));
        // A Secret of another type under the name cannot be fixed by a write.
        let mut opaque = secret.clone();
        opaque.type_ = Some("Opaque".into());
        assert!(matches!(
            judge(Some(&opaque), &signer, names, now),
            State::Stuck(_)
        ));
    }
}
