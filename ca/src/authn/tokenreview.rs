//! Kubernetes TokenReview through the `kube` client, with a short positive cache.

use std::{
    collections::HashMap,
    future::Future,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, api::PostParams};
use tokio::time::Instant;

use super::{PodRef, Token};
use signet_spiffe::ServiceAccount;

/// The longest a positive TokenReview answer is reused.
pub(crate) const CACHE_TTL: Duration = Duration::from_secs(60);
/// How long a refused token is refused again without asking the API server, so
/// anonymous callers replaying garbage cannot turn into API-server traffic.
pub(crate) const NEGATIVE_CACHE_TTL: Duration = Duration::from_secs(10);
/// Entries kept at most; beyond this, expired ones are dropped, then the cache is reset.
const CACHE_MAX_ENTRIES: usize = 50_000;
const SA_GROUP: &str = "system:serviceaccounts";
const POD_NAME_KEY: &str = "authentication.kubernetes.io/pod-name";
/// The extra key the API server puts the bound pod's UID under.
const POD_UID_KEY: &str = "authentication.kubernetes.io/pod-uid";

/// A token that passed review.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reviewed {
    /// Its service account.
    pub account: ServiceAccount,
    /// The pod it was bound to, when the token says.
    pub pod: Option<PodRef>,
}

/// A failed review.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReviewError {
    /// The token is not acceptable.
    #[error("{0}")]
    Rejected(String),
    /// No answer could be had (API server down, JWKS unreachable).
    #[error("{0}")]
    Unavailable(String),
    /// Too many reviews are in flight already; the caller should retry later.
    #[error("{0}")]
    Throttled(String),
}

/// A boxed review future, so reviewers can sit behind `dyn`.
pub type ReviewFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Reviewed, ReviewError>> + Send + 'a>>;

/// Something that can review a service account token (the API server, or a fake).
pub trait TokenReviewer: Send + Sync {
    /// Reviews one token.
    fn review<'a>(&'a self, token: &'a Token) -> ReviewFuture<'a>;
}

/// How long no TokenReview is sent after the API server answered one with 429 Too
/// Many Requests (API Priority and Fairness asks for a second).
const THROTTLED_PAUSE: Duration = Duration::from_secs(1);

/// TokenReview through a Kubernetes API server.
pub struct KubeTokenReviewer {
    client: kube::Client,
    audiences: Vec<String>,
    /// After a 429, no review is sent before this instant; callers hear UNAVAILABLE.
    paused_until: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for KubeTokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTokenReviewer")
            .field("audiences", &self.audiences)
            .finish_non_exhaustive()
    }
}

impl KubeTokenReviewer {
    /// A client from a kubeconfig file, or the in-cluster configuration when `None`.
    pub async fn connect(
        kubeconfig: Option<&Path>,
        audiences: Vec<String>,
    ) -> Result<Self, crate::kubeapi::KubeClientError> {
        let client = crate::kubeapi::client(kubeconfig, crate::kubeapi::Retries::Never).await?;
        Ok(Self {
            client,
            audiences,
            paused_until: Mutex::new(None),
        })
    }

    fn paused_until(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // A plain value: a panic elsewhere cannot leave it half-written.
        self.paused_until.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl TokenReviewer for KubeTokenReviewer {
    fn review<'a>(&'a self, token: &'a Token) -> ReviewFuture<'a> {
        Box::pin(async move {
            let unavailable = || {
                ReviewError::Unavailable(
                    "the Kubernetes API server could not review the token; retry later".into(),
                )
            };
            if self.paused_until().is_some_and(|t| Instant::now() < t) {
                // Not asked at all: a limit of ours, counted and logged as one.
                return Err(ReviewError::Throttled(
                    "the Kubernetes API server is rate-limiting token reviews; retry with backoff"
                        .into(),
                ));
            }
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: token.secret().to_owned(),
                    audiences: Some(self.audiences.clone()),
                },
                ..Default::default()
            };
            let api: Api<TokenReview> = Api::all(self.client.clone());
            // kube's errors describe the HTTP exchange, never the request body, so the
            // token cannot leak through them. Their text is the operator's business:
            // it goes to the log, and the caller hears only that no answer came.
            let answer = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| {
                    match e {
                        kube::Error::Api(status) if status.code == 429 => {
                            // Said once per pause, not once per refused caller.
                            let mut paused = self.paused_until();
                            if paused.is_none_or(|t| Instant::now() >= t) {
                                tracing::warn!(
                                    pause_ms = THROTTLED_PAUSE.as_millis() as u64,
                                    "the API server is rate-limiting TokenReviews (429); pausing them"
                                );
                            }
                            *paused = Some(Instant::now() + THROTTLED_PAUSE);
                        }
                        kube::Error::Api(status) => tracing::warn!(
                            code = status.code,
                            reason = %status.reason,
                            message = %status.message,
                            "the API server refused a TokenReview"
                        ),
                        other => {
                            tracing::warn!(error = %other, "cannot reach the API server for a TokenReview")
                        }
                    }
                    unavailable()
                })?;
            interpret(answer.status, &self.audiences)
        })
    }
}

/// Reads a TokenReview status the way Istio does (contract §2).
pub(crate) fn interpret(
    status: Option<TokenReviewStatus>,
    audiences: &[String],
) -> Result<Reviewed, ReviewError> {
    let reject = |why: String| Err(ReviewError::Rejected(why));
    let Some(status) = status else {
        return reject("the TokenReview came back without a status".into());
    };
    if status.authenticated != Some(true) {
        // The API server's own words stay in the log.
        tracing::debug!(
            error = status.error.as_deref().unwrap_or(""),
            "TokenReview: token not authenticated"
        );
        return reject("the Kubernetes API server did not authenticate the token".into());
    }
    // A review that asked for audiences is answered with the ones the token carries
    // among them; an answer that names none of them did not check the audience.
    let got = status.audiences.unwrap_or_default();
    if !audiences.is_empty() && !got.iter().any(|a| audiences.contains(a)) {
        return reject(format!(
            "the TokenReview answer confirms none of the audiences {audiences:?}"
        ));
    }
    let Some(user) = status.user else {
        return reject("the TokenReview names no user".into());
    };
    let username = user.username.unwrap_or_default();
    if !user
        .groups
        .unwrap_or_default()
        .iter()
        .any(|g| g == SA_GROUP)
    {
        return reject(format!("{username:?} is not in group {SA_GROUP}"));
    }
    let account = ServiceAccount::from_username(&username)
        .map_err(|e| ReviewError::Rejected(e.to_string()))?;
    let mut extra = user.extra.unwrap_or_default();
    let mut first = |key: &str| extra.remove(key).and_then(|v| v.into_iter().next());
    let pod = first(POD_NAME_KEY).map(|name| PodRef {
        name,
        uid: first(POD_UID_KEY),
    });
    Ok(Reviewed { account, pod })
}

/// Remembers positive answers by token hash until the token expires or for
/// [`CACHE_TTL`], whichever comes first, so a restart storm of pods does not become a
/// storm of TokenReviews; remembers refusals for [`NEGATIVE_CACHE_TTL`]; and keeps
/// at most a fixed number of reviews in flight, answering the rest at once.
pub struct CachedReviewer {
    inner: Arc<dyn TokenReviewer>,
    cache: Mutex<Cache>,
    in_flight: tokio::sync::Semaphore,
}

type Cache = HashMap<[u8; 32], (Result<Reviewed, String>, Instant)>;

impl std::fmt::Debug for CachedReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedReviewer").finish_non_exhaustive()
    }
}

impl CachedReviewer {
    /// Wraps a reviewer that may have `max_in_flight` reviews outstanding.
    pub fn new(inner: Arc<dyn TokenReviewer>, max_in_flight: usize) -> Self {
        Self {
            inner,
            cache: Mutex::new(HashMap::new()),
            in_flight: tokio::sync::Semaphore::new(max_in_flight.max(1)),
        }
    }

    /// Reviews through the cache.
    pub async fn review(&self, token: &Token) -> Result<Reviewed, ReviewError> {
        let key = token.digest();
        let now = Instant::now();
        if let Some((hit, until)) = self.lock().get(&key)
            && *until > now
        {
            return hit.clone().map_err(ReviewError::Rejected);
        }
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Err(ReviewError::Throttled(
                "too many token reviews are in flight; retry with backoff".into(),
            ));
        };
        let (entry, ttl) = match self.inner.review(token).await {
            Ok(reviewed) => {
                let mut ttl = CACHE_TTL;
                if let Some(exp) = token.unverified_expiry() {
                    let left = exp - time::OffsetDateTime::now_utc().unix_timestamp();
                    ttl = ttl.min(Duration::from_secs(u64::try_from(left).unwrap_or(0)));
                }
                (Ok(reviewed), ttl)
            }
            Err(ReviewError::Rejected(why)) => (Err(why), NEGATIVE_CACHE_TTL),
            // No answer is no verdict: nothing to remember.
            Err(other) => return Err(other),
        };
        if !ttl.is_zero() {
            let now = Instant::now();
            let mut cache = self.lock();
            if cache.len() >= CACHE_MAX_ENTRIES {
                cache.retain(|_, (_, until)| *until > now);
                if cache.len() >= CACHE_MAX_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(key, (entry.clone(), now + ttl));
        }
        entry.map_err(ReviewError::Rejected)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding this lock cannot leave the map inconsistent (every
        // update is a single insert or retain), so a poisoned lock is still usable.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn status(user: &str, groups: &[&str]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec!["istio-ca".into()]),
            user: Some(UserInfo {
                username: Some(user.into()),
                groups: Some(groups.iter().map(|g| g.to_string()).collect()),
                extra: Some(
                    [
                        (POD_NAME_KEY.to_string(), vec!["pod-1".to_string()]),
                        (POD_UID_KEY.to_string(), vec!["uid-1".to_string()]),
                    ]
                    .into_iter()
                    .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn accepts_only_authenticated_service_accounts() {
        let aud = vec!["istio-ca".to_string()];
        let ok = interpret(
            Some(status("system:serviceaccount:ns1:sa1", &[SA_GROUP])),
            &aud,
        )
        .unwrap();
        assert_eq!(ok.account, ServiceAccount::new("ns1", "sa1").unwrap());
        assert_eq!(
            ok.pod,
            Some(PodRef {
                name: "pod-1".into(),
                uid: Some("uid-1".into())
            })
        );
        assert!(interpret(Some(status("system:serviceaccount:ns1:sa1", &["x"])), &aud).is_err());
        assert!(interpret(Some(status("alice", &[SA_GROUP])), &aud).is_err());
        assert!(interpret(Some(status("system:serviceaccount::sa", &[SA_GROUP])), &aud).is_err());
        let mut denied = status("system:serviceaccount:ns1:sa1", &[SA_GROUP]);
        denied.authenticated = Some(false);
        denied.error = Some("token expired".into());
        let err = interpret(Some(denied), &aud).unwrap_err().to_string();
        assert!(err.contains("did not authenticate"), "{err}");
        assert!(interpret(None, &aud).is_err());
        let other_aud = vec!["other".to_string()];
        assert!(
            interpret(
                Some(status("system:serviceaccount:a:b", &[SA_GROUP])),
                &other_aud
            )
            .is_err()
        );
        // The API server's error text is not passed on to the caller.
        assert!(!err.contains("token expired"), "{err}");
    }

    #[test]
    fn an_answer_that_confirms_no_audience_is_refused() {
        // Authenticated, but `status.audiences` empty or absent: the API server did
        // not say the token is meant for us.
        let aud = vec!["istio-ca".to_string()];
        for audiences in [Some(vec![]), None] {
            let mut s = status("system:serviceaccount:ns1:sa1", &[SA_GROUP]);
            s.audiences = audiences.clone();
            let err = interpret(Some(s), &aud).unwrap_err().to_string();
            assert!(err.contains("audiences"), "{audiences:?}: {err}");
        }
    }

    struct Counting(AtomicUsize);
    impl TokenReviewer for Counting {
        fn review<'a>(&'a self, _: &'a Token) -> ReviewFuture<'a> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {
                Ok(Reviewed {
                    account: ServiceAccount::new("a", "b").unwrap(),
                    pod: None,
                })
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn caches_positive_answers_for_a_minute() {
        let inner = Arc::new(Counting(AtomicUsize::new(0)));
        let cached = CachedReviewer::new(inner.clone(), 4);
        let token = Token::new("opaque-token");
        cached.review(&token).await.unwrap();
        cached.review(&token).await.unwrap();
        assert_eq!(inner.0.load(Ordering::SeqCst), 1);
        tokio::time::advance(CACHE_TTL + Duration::from_secs(1)).await;
        cached.review(&token).await.unwrap();
        assert_eq!(inner.0.load(Ordering::SeqCst), 2);
        cached.review(&Token::new("another")).await.unwrap();
        assert_eq!(inner.0.load(Ordering::SeqCst), 3);
    }

    /// Refuses every token after `delay`, counting reviews.
    struct Refusing(AtomicUsize, Duration);
    impl TokenReviewer for Refusing {
        fn review<'a>(&'a self, _: &'a Token) -> ReviewFuture<'a> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let delay = self.1;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Err(ReviewError::Rejected("bad token".into()))
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_remembered_briefly_and_reviews_in_flight_are_bounded() {
        let inner = Arc::new(Refusing(AtomicUsize::new(0), Duration::from_millis(5)));
        let cached = Arc::new(CachedReviewer::new(inner.clone(), 2));
        // The same garbage token, replayed: one review, then the remembered refusal.
        let garbage = Token::new("garbage");
        for _ in 0..20 {
            assert!(matches!(
                cached.review(&garbage).await,
                Err(ReviewError::Rejected(_))
            ));
        }
        assert_eq!(inner.0.load(Ordering::SeqCst), 1);
        tokio::time::advance(NEGATIVE_CACHE_TTL + Duration::from_secs(1)).await;
        let _ = cached.review(&garbage).await;
        assert_eq!(inner.0.load(Ordering::SeqCst), 2);

        // 50 distinct tokens at once: two reach the API server, the rest are turned
        // away at once instead of queueing behind them.
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let cached = cached.clone();
                tokio::spawn(async move { cached.review(&Token::new(format!("t{i}"))).await })
            })
            .collect();
        let mut throttled = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), Err(ReviewError::Throttled(_))) {
                throttled += 1;
            }
        }
        assert_eq!(throttled, 48);
        assert_eq!(inner.0.load(Ordering::SeqCst), 4);
    }
}
