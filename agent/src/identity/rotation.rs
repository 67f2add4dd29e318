//! Keeping the certificate fresh: a short loop that fetches, publishes and sleeps
//! until the time [`Schedule`] says. The loop reads the time through [`Clock`] so
//! tests can run it on paused time.

use std::{sync::Arc, time::Duration as StdDuration};

use rand::Rng;
use time::{Duration, OffsetDateTime};
use tokio::sync::watch;

use crate::{
    identity::caclient::{CaClient, CaError},
    identity::catrust::CaTrust,
    identity::keys::{KeyError, KeyType, WorkloadKey},
    identity::schedule::{Next, Schedule, TrustSyncEnd, Why},
    identity::svid::{self, AnswerError, Svid, TrustNote},
    metrics::Metrics,
};
use signet_flags::{ConfigError, DAY, between, lifetime_between};

/// Why one attempt to get a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The key or the CSR could not be made.
    #[error("cannot make the key or CSR: {0}")]
    Key(#[from] KeyError),
    /// The key generation task died.
    #[error("the key generation task failed: {0}")]
    Task(String),
    /// No answer from the CA, or a refusal.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The CA's answer failed a check.
    #[error("refusing the CA's answer: {0}")]
    Answer(#[from] AnswerError),
}

impl FetchError {
    /// How long the CA asked to wait before the next attempt, if it did.
    pub fn retry_in(&self) -> Option<StdDuration> {
        match self {
            Self::Ca(e) => e.retry_in(),
            _ => None,
        }
    }
}

/// Longest single sleep: the wall clock is re-read at least this often, so a
/// suspended machine or a clock jump cannot leave an expired certificate in place.
pub const MAX_SLEEP: StdDuration = StdDuration::from_secs(5);

/// Wall-clock time.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> OffsetDateTime;
}

/// The system clock.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// Sleeps until `deadline` on the wall clock, re-reading it every [`MAX_SLEEP`] at
/// most. Returns early (false) when `stop` turns true.
pub async fn sleep_until(
    clock: &dyn Clock,
    deadline: OffsetDateTime,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    sleep_until_or(clock, deadline, stop, &mut || false).await
}

/// [`sleep_until`], also ending (true) as soon as `wake` says so; `wake` is asked
/// after every nap.
pub async fn sleep_until_or(
    clock: &dyn Clock,
    deadline: OffsetDateTime,
    stop: &mut watch::Receiver<bool>,
    wake: &mut (dyn FnMut() -> bool + Send),
) -> bool {
    loop {
        let left = deadline - clock.now();
        if left <= Duration::ZERO || wake() {
            return true;
        }
        let nap = StdDuration::try_from(left)
            .unwrap_or(MAX_SLEEP)
            .min(MAX_SLEEP);
        tokio::select! {
            _ = tokio::time::sleep(nap) => {}
            _ = stop.wait_for(|s| *s) => return false,
        }
    }
}

/// Flags of the identity asked for and its renewal (part of `signet-agent run`).
#[derive(Debug, Clone, clap::Args)]
pub struct IdentityArgs {
    /// The pod's namespace.
    #[arg(long, env = "POD_NAMESPACE", value_parser = non_empty)]
    pub namespace: String,

    /// The pod's service account.
    #[arg(long, env = "SERVICE_ACCOUNT", value_parser = non_empty)]
    pub service_account: String,

    /// Trust domain of the SPIFFE ID.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local", value_parser = signet_spiffe::trust_domain)]
    pub trust_domain: spiffe::TrustDomain,

    /// Certificate lifetime to ask for (1s to 365 days).
    #[arg(long, env = "SECRET_TTL", default_value = "24h", value_parser = lifetime_between(StdDuration::from_secs(1), 365 * DAY), value_name = "DURATION")]
    pub secret_ttl: Duration,

    /// Rotate when this fraction of the lifetime is left (0 < r < 1).
    #[arg(long, env = "SECRET_GRACE_PERIOD_RATIO", default_value_t = 0.5, value_parser = ratio)]
    pub grace_ratio: f64,

    /// Moves each refresh point by a random part of the lifetime of up to this much
    /// either way (0 to 0.1), as pilot-agent does: agents started together then do
    /// not all renew at the same moment.
    #[arg(long, env = "SECRET_GRACE_PERIOD_RATIO_JITTER", default_value_t = 0.01, value_parser = jitter)]
    pub grace_ratio_jitter: f64,

    /// After the CA trust file changes (a root rotation), keep asking the CA (with
    /// backoff from 1 s to 30 s) until its bundle reflects the change, for at most
    /// this long (1s to 1 day); then warn, count it, and return to the normal
    /// schedule.
    #[arg(long, env = "TRUST_SYNC_TIMEOUT", default_value = "10m", value_parser = between(StdDuration::from_secs(1), DAY), value_name = "DURATION")]
    pub trust_sync_timeout: StdDuration,

    /// Type of the private key generated for each certificate [default: ec-p256].
    /// Without it, pilot-agent's variables are read: ECC_SIGNATURE_ALGORITHM=ECDSA
    /// (with ECC_CURVE P256 or P384), else WORKLOAD_RSA_KEY_SIZE.
    #[arg(long, env = "SIGNET_KEY_TYPE", value_enum)]
    pub key_type: Option<KeyTypeArg>,
}

/// Key types on the command line (`rsa-2048` is the same as `rsa2048`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyTypeArg {
    /// ECDSA P-256.
    #[value(alias = "ec-p-256", alias = "p256")]
    EcP256,
    /// ECDSA P-384.
    #[value(alias = "ec-p-384", alias = "p384")]
    EcP384,
    /// RSA 2048 bits.
    #[value(alias = "rsa-2048")]
    Rsa2048,
    /// RSA 3072 bits.
    #[value(alias = "rsa-3072")]
    Rsa3072,
    /// RSA 4096 bits.
    #[value(alias = "rsa-4096")]
    Rsa4096,
}

impl From<KeyTypeArg> for KeyType {
    fn from(k: KeyTypeArg) -> Self {
        match k {
            KeyTypeArg::EcP256 => Self::EcP256,
            KeyTypeArg::EcP384 => Self::EcP384,
            KeyTypeArg::Rsa2048 => Self::Rsa(2048),
            KeyTypeArg::Rsa3072 => Self::Rsa(3072),
            KeyTypeArg::Rsa4096 => Self::Rsa(4096),
        }
    }
}

/// A flag value that is not what it takes.
#[derive(Debug, thiserror::Error)]
pub enum IdentityFlagError {
    #[error("must not be empty")]
    Empty,
    #[error("{0:?} is not between 0 and 1")]
    Ratio(String),
    #[error("{0:?} is not between 0 and 0.1")]
    Jitter(String),
}

fn non_empty(s: &str) -> Result<String, IdentityFlagError> {
    (!s.is_empty())
        .then(|| s.to_owned())
        .ok_or(IdentityFlagError::Empty)
}

fn jitter(s: &str) -> Result<f64, IdentityFlagError> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|j| (0.0..=crate::identity::schedule::MAX_JITTER).contains(j))
        .ok_or_else(|| IdentityFlagError::Jitter(s.to_owned()))
}

/// The value of the variable `name` in `env`, trimmed; `None` when unset or empty.
fn env_var<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// The key type from pilot-agent's variables in `env`, when they name one:
/// `ECC_SIGNATURE_ALGORITHM=ECDSA` (curve `ECC_CURVE`, P256 by default), else
/// `WORKLOAD_RSA_KEY_SIZE`.
fn pilot_agent_key_type(env: &[(String, String)]) -> Result<Option<KeyType>, ConfigError> {
    let var = |name| env_var(env, name);
    if let Some(algorithm) = var("ECC_SIGNATURE_ALGORITHM") {
        if !algorithm.eq_ignore_ascii_case("ECDSA") {
            return Err(ConfigError::new(
                "ECC_SIGNATURE_ALGORITHM",
                format!("{algorithm:?} is not ECDSA (the one value pilot-agent knows)"),
            ));
        }
        return match var("ECC_CURVE").map(str::to_ascii_uppercase).as_deref() {
            None | Some("P256") => Ok(Some(KeyType::EcP256)),
            Some("P384") => Ok(Some(KeyType::EcP384)),
            Some(other) => Err(ConfigError::new(
                "ECC_CURVE",
                format!("{other:?} is not P256 or P384"),
            )),
        };
    }
    match var("WORKLOAD_RSA_KEY_SIZE") {
        None => Ok(None),
        Some("2048") => Ok(Some(KeyType::Rsa(2048))),
        Some("3072") => Ok(Some(KeyType::Rsa(3072))),
        Some("4096") => Ok(Some(KeyType::Rsa(4096))),
        Some(other) => Err(ConfigError::new(
            "WORKLOAD_RSA_KEY_SIZE",
            format!("{other:?} is not 2048, 3072 or 4096"),
        )),
    }
}

fn ratio(s: &str) -> Result<f64, IdentityFlagError> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|r| *r > 0.0 && *r < 1.0)
        .ok_or_else(|| IdentityFlagError::Ratio(s.to_owned()))
}

/// The identity asked for and its renewal, checked.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub spiffe_id: spiffe::SpiffeId,
    /// Its trust domain.
    pub trust_domain: spiffe::TrustDomain,
    /// Lifetime asked for.
    pub ttl: Duration,
    /// Renew when this fraction of the lifetime is left.
    pub grace_ratio: f64,
    /// ... moved by up to this fraction of the lifetime either way.
    pub grace_jitter: f64,
    /// How long to keep asking for a bundle that reflects a trust-file change.
    pub trust_sync_timeout: StdDuration,
    /// Key type generated.
    pub key_type: KeyType,
}

impl IdentityArgs {
    /// The SPIFFE ID these flags name, and the rest as given.
    pub fn validate(self, env: &[(String, String)]) -> Result<IdentityConfig, ConfigError> {
        if env_var(env, "FILE_MOUNTED_CERTS").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Err(ConfigError::new(
                "FILE_MOUNTED_CERTS",
                "certificates mounted at /etc/certs are pilot-agent's mode; signet-agent gets them from the CA. Leave such pods to pilot-agent, or serve the files with --file-secret-dir (Istio's file-cert: names)",
            ));
        }
        let key_type = match self.key_type {
            Some(k) => k.into(),
            None => pilot_agent_key_type(env)?.unwrap_or(KeyType::EcP256),
        };

        let spiffe_id = spiffe::SpiffeId::from_segments(
            self.trust_domain.clone(),
            &["ns", &self.namespace, "sa", &self.service_account],
        )
        .map_err(|e| {
            ConfigError::new(
                "--namespace/--service-account",
                format!("not usable in a SPIFFE ID: {e}"),
            )
        })?;
        Ok(IdentityConfig {
            spiffe_id,
            trust_domain: self.trust_domain,
            ttl: self.secret_ttl,
            grace_ratio: self.grace_ratio,
            grace_jitter: self.grace_ratio_jitter,
            trust_sync_timeout: self.trust_sync_timeout,
            key_type,
        })
    }
}

/// Where certificates are published: the secret store, which serves them (the
/// rotation never sees who reads them).
pub trait Publish: Send + Sync {
    /// Publishes a certificate that passed every check.
    fn publish(&self, svid: Arc<Svid>);
    /// The certificate published last, if any.
    fn current(&self) -> Option<Arc<Svid>>;
}

/// What the rotation loop needs.
pub struct Rotation {
    /// The CA.
    pub ca: Arc<dyn CaClient>,
    /// Where certificates are published.
    pub store: Arc<dyn Publish>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Identity to ask for.
    pub id: spiffe::SpiffeId,
    /// Key type to generate.
    pub key_type: KeyType,
    /// Lifetime to ask for.
    pub ttl: Duration,
    /// Renew when this fraction of the lifetime is left.
    pub grace_ratio: f64,
    /// ... moved by up to this fraction of the lifetime either way.
    pub grace_jitter: f64,
    /// Counters.
    pub metrics: Metrics,
    /// What the CA is trusted with (`--ca-root-cert`): when that file changes, the
    /// CA's trust has changed (a root rotation), so a new certificate and bundle are
    /// fetched at once instead of at the next refresh.
    pub ca_trust: CaTrust,
    /// How long to keep asking for a bundle that reflects a trust-file change.
    pub trust_sync_timeout: StdDuration,
}

impl Rotation {
    /// Fetches a certificate now, then renews it for ever: at the refresh point after
    /// a success, with backoff after a failure, sooner while the CA's bundle must come
    /// to reflect a change of the trust file. The certificate being served is only
    /// replaced by one that passed every check.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut schedule = Schedule::new(
            self.grace_ratio,
            self.grace_jitter,
            self.trust_sync_timeout,
            self.ca_trust.read().ok().flatten(),
            Box::new(|| rand::rng().random::<f64>()),
        );
        loop {
            let next = match self.fetch().await {
                Ok(svid) => {
                    let svid = Arc::new(svid);
                    self.store.publish(svid.clone());
                    let trust = self.ca_trust.read().ok().flatten();
                    let next = schedule.after_success(&svid, trust, self.clock.now());
                    tracing::info!(
                        id = %svid.id, serial = %svid.serial, not_after = %signet_telemetry::rfc3339(svid.not_after),
                        refresh_at = %next.refresh.map(signet_telemetry::rfc3339).unwrap_or_default(),
                        "certificate obtained"
                    );
                    next
                }
                Err(e) => {
                    let next = schedule.after_failure(e.retry_in(), self.clock.now());
                    self.failed(&e, &next);
                    next
                }
            };
            self.report(&next);
            let woke = if next.why == Why::Refresh {
                let trusted = schedule.trusted();
                let mut trust_changed = || self.ca_trust.digest() != trusted;
                let woke =
                    sleep_until_or(self.clock.as_ref(), next.at, &mut stop, &mut trust_changed)
                        .await;
                if woke && self.ca_trust.digest() != trusted {
                    tracing::info!(
                        "the CA trust file changed; fetching a new certificate and bundle now"
                    );
                }
                woke
            } else {
                sleep_until(self.clock.as_ref(), next.at, &mut stop).await
            };
            if !woke {
                return;
            }
        }
    }

    /// Says how a wait for the CA's bundle goes.
    fn report(&self, next: &Next) {
        match &next.ended {
            Some(TrustSyncEnd::Reflected) => {
                tracing::info!("the CA's bundle now reflects the trust file");
            }
            Some(TrustSyncEnd::TimedOut(waited)) => {
                tracing::warn!(
                    waited = %waited,
                    "the CA's bundle still does not reflect the change of the CA trust file; back to the normal schedule (is the CA's cacerts updated?)"
                );
                self.metrics.trust_sync_timeouts.inc();
            }
            None => {}
        }
        if let Why::Report { delay } = next.why {
            tracing::info!(
                after = ?delay,
                "the CA is changing its trust: telling it the roots now served with the next request"
            );
        }
        if let Why::TrustSync { delay } = next.why {
            tracing::info!(
                retry_in = ?delay,
                "the CA's bundle does not reflect the changed CA trust file yet; asking again"
            );
        }
    }

    /// Says and counts a failed attempt.
    fn failed(&self, error: &FetchError, next: &Next) {
        let Why::Retry { delay, attempt } = next.why else {
            return;
        };
        self.metrics.failed_requests.inc();
        self.metrics.retries.inc();
        let held = self
            .store
            .current()
            .map(|s| signet_telemetry::rfc3339(s.not_after));
        tracing::warn!(
            error = %error, retry_in = ?delay, attempt,
            serving_until = held.as_deref().unwrap_or("nothing held yet"),
            "cannot renew the certificate; the one held keeps being served"
        );
    }

    /// One attempt: a fresh key, a CSR, the CA's answer, its checks.
    pub async fn fetch(&self) -> Result<Svid, FetchError> {
        let key_type = self.key_type;
        // RSA generation takes long enough to keep it off the reactor.
        let key = tokio::task::spawn_blocking(move || WorkloadKey::generate(key_type))
            .await
            .map_err(|e| FetchError::Task(e.to_string()))??;
        let csr = key.csr(&self.id)?;
        // The roots served now: signet-ca counts a holder as serving a trust
        // change's next roots only once it says so.
        let served = self
            .store
            .current()
            .map(|s| s.root_digests.clone())
            .unwrap_or_default();
        let started = std::time::Instant::now();
        self.metrics.outgoing_requests.inc();
        let answer = self.ca.sign_telling(&csr, self.ttl, &served).await;
        self.metrics.observe_csr(started.elapsed());
        let answer = answer?;
        let mut svid = svid::check_answer(
            &answer.chain,
            &self.id,
            &key.spki(),
            key.pkcs8_pem(),
            self.clock.now(),
        )?;
        svid.trust = TrustNote {
            stage: answer.trust_stage,
            reported: svid.root_digests == served,
        };
        Ok(svid)
    }
}

impl std::fmt::Debug for Rotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotation")
            .field("id", &self.id.to_string())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + secs).unwrap()
    }

    /// Wall time that follows tokio's (pausable) clock.
    struct TokioClock {
        base: OffsetDateTime,
        start: tokio::time::Instant,
        jump: std::sync::Mutex<Duration>,
    }
    impl Clock for TokioClock {
        fn now(&self) -> OffsetDateTime {
            self.base
                + Duration::try_from(self.start.elapsed()).unwrap()
                + *self.jump.lock().unwrap()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sleeps_follow_the_wall_clock_not_the_timer() {
        let clock = Arc::new(TokioClock {
            base: t(0),
            start: tokio::time::Instant::now(),
            jump: Default::default(),
        });
        let (_stop_tx, mut stop) = watch::channel(false);
        let c = clock.clone();
        let sleeper =
            tokio::spawn(async move { sleep_until(c.as_ref(), t(3600), &mut stop).await });
        tokio::time::advance(StdDuration::from_secs(60)).await;
        assert!(!sleeper.is_finished());
        // The machine was suspended for two hours: the wall clock jumps past the
        // deadline and the sleeper wakes within one MAX_SLEEP, not in an hour.
        *clock.jump.lock().unwrap() = Duration::hours(2);
        tokio::time::advance(MAX_SLEEP + StdDuration::from_millis(1)).await;
        assert!(sleeper.await.unwrap());
    }
}
