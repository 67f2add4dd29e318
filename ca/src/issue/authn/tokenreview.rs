//! Kubernetes TokenReview through the `kube` client, with a short positive cache.

use std::{
    collections::HashMap,
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use ipnet::IpNet;
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
/// Answers kept at most, positive and negative each; beyond this the oldest go.
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
/// During such a pause, one review still goes out this often.
const TRICKLE_EVERY: Duration = Duration::from_millis(250);

/// TokenReview through a Kubernetes API server.
pub struct KubeTokenReviewer {
    client: kube::Client,
    audiences: Vec<String>,
    /// After a 429, no review is sent before this instant (but the trickle);
    /// callers hear UNAVAILABLE.
    paused_until: Mutex<Option<Instant>>,
    /// When the last review of the trickle went out.
    last_trickle: Mutex<Option<Instant>>,
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
        access: &crate::kubernetes::client::ApiAccess,
        audiences: Vec<String>,
    ) -> Result<Self, crate::kubernetes::client::KubeClientError> {
        let client =
            crate::kubernetes::client::client(access, crate::kubernetes::client::Retries::Never)
                .await?;
        Ok(Self {
            client,
            audiences,
            paused_until: Mutex::new(None),
            last_trickle: Mutex::new(None),
        })
    }

    /// While a 429 pause lasts, one review every [`TRICKLE_EVERY`] still goes out,
    /// so callers are not all turned away for the pause and the API server is asked
    /// again whether it has room.
    fn trickle(&self) -> bool {
        let mut last = crate::sync::lock(&self.last_trickle);
        let now = Instant::now();
        if last.is_some_and(|t| now < t + TRICKLE_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }

    fn paused_until(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // A plain value: a panic elsewhere cannot leave it half-written.
        crate::sync::lock(&self.paused_until)
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
            if self.paused_until().is_some_and(|t| Instant::now() < t) && !self.trickle() {
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
                            // The trickle starts a step into the pause.
                            *crate::sync::lock(&self.last_trickle) =
                                Some(Instant::now());
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
/// storm of TokenReviews; remembers refusals for [`NEGATIVE_CACHE_TTL`]; refuses
/// locally what no review could accept ([`Token::precheck`]); and keeps at most a
/// fixed number of reviews in flight, at most a share of them for one peer address,
/// answering the rest at once.
pub struct CachedReviewer {
    inner: Arc<dyn TokenReviewer>,
    cache: Mutex<Cache>,
    in_flight: tokio::sync::Semaphore,
    precheck: Precheck,
    peers: PeerShares,
}

/// What a token must show before it costs a review.
#[derive(Debug, Clone, Default)]
pub struct Precheck {
    /// The audiences reviews ask for; a token naming none of them is refused.
    pub audiences: Vec<String>,
    /// The cluster's issuer, when known (from its JWKS configuration).
    pub issuer: Option<String>,
}

/// Review slots held per peer address.
#[derive(Debug)]
struct PeerShares {
    /// Slots one address may hold.
    share: usize,
    /// Addresses with no share of their own (crowds behind one address, named by
    /// the operator).
    exempt: Vec<IpNet>,
    held: Mutex<HashMap<IpAddr, usize>>,
}

impl PeerShares {
    fn take(&self, peer: Option<IpAddr>) -> Result<PeerSlot<'_>, ()> {
        let Some(ip) = peer.map(|p| p.to_canonical()) else {
            return Ok(PeerSlot(self, None));
        };
        if self.exempt.iter().any(|n| n.contains(&ip)) {
            return Ok(PeerSlot(self, None));
        }
        let mut held = crate::sync::lock(&self.held);
        let n = held.entry(ip).or_default();
        if *n >= self.share {
            return Err(());
        }
        *n += 1;
        Ok(PeerSlot(self, Some(ip)))
    }
}

/// A review slot of one peer, given back when dropped.
struct PeerSlot<'a>(&'a PeerShares, Option<IpAddr>);

impl Drop for PeerSlot<'_> {
    fn drop(&mut self) {
        if let Some(ip) = self.1 {
            let mut held = crate::sync::lock(&self.0.held);
            if let Some(n) = held.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&ip);
                }
            }
        }
    }
}

/// Answers by token hash, positive and negative apart, each with its own budget, so
/// a flood of refused tokens can never push out the answers of real callers. A full
/// budget drops its expired entries, then its oldest.
#[derive(Debug, Default)]
struct Cache {
    positive: Budget<Reviewed>,
    negative: Budget<String>,
}

#[derive(Debug)]
struct Budget<T> {
    max: usize,
    entries: HashMap<[u8; 32], (T, Instant)>,
    /// Keys in insertion order with their deadline; stale pairs are skipped.
    order: std::collections::VecDeque<([u8; 32], Instant)>,
}

impl<T> Default for Budget<T> {
    fn default() -> Self {
        Self::new(CACHE_MAX_ENTRIES)
    }
}

impl<T> Budget<T> {
    fn new(max: usize) -> Self {
        Self {
            max,
            entries: HashMap::new(),
            order: std::collections::VecDeque::new(),
        }
    }
}

impl<T: Clone> Budget<T> {
    fn get(&self, key: &[u8; 32], now: Instant) -> Option<T> {
        self.entries
            .get(key)
            .filter(|(_, until)| *until > now)
            .map(|(v, _)| v.clone())
    }

    fn insert(&mut self, key: [u8; 32], value: T, until: Instant, now: Instant) {
        // From the front: the oldest entries go while the budget is full (every entry
        // lives about as long, so they are also the first to expire), and expired
        // ones go anyway, so the queue stays near the map's size. A pair whose
        // deadline is not its entry's names an entry renewed since: only the pair goes.
        while let Some(&(old, deadline)) = self.order.front() {
            let current = self.entries.get(&old).is_some_and(|(_, u)| *u == deadline);
            let full = self.entries.len() >= self.max.max(1);
            if current && deadline > now && !full {
                break;
            }
            self.order.pop_front();
            if current {
                self.entries.remove(&old);
            }
        }
        self.entries.insert(key, (value, until));
        self.order.push_back((key, until));
    }
}

impl std::fmt::Debug for CachedReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedReviewer").finish_non_exhaustive()
    }
}

impl CachedReviewer {
    /// Wraps a reviewer that may have `max_in_flight` reviews outstanding, all of
    /// them usable by one peer, and no precheck beyond a well-formed JWT.
    pub fn new(inner: Arc<dyn TokenReviewer>, max_in_flight: usize) -> Self {
        Self {
            inner,
            cache: Mutex::new(Cache::default()),
            in_flight: tokio::sync::Semaphore::new(max_in_flight.max(1)),
            precheck: Precheck::default(),
            peers: PeerShares {
                share: max_in_flight.max(1),
                exempt: Vec::new(),
                held: Mutex::new(HashMap::new()),
            },
        }
    }

    /// Checks tokens against `precheck` before they cost a review.
    pub fn with_precheck(mut self, precheck: Precheck) -> Self {
        self.precheck = precheck;
        self
    }

    /// One peer address holds at most `share` review slots, except the addresses in
    /// `exempt`.
    pub fn with_peer_share(mut self, share: usize, exempt: Vec<IpNet>) -> Self {
        self.peers.share = share.max(1);
        self.peers.exempt = exempt;
        self
    }

    /// Reviews through the cache; `peer` is the caller's address.
    pub async fn review(
        &self,
        token: &Token,
        peer: Option<IpAddr>,
    ) -> Result<Reviewed, ReviewError> {
        let key = token.digest();
        let now = Instant::now();
        {
            let cache = self.lock();
            if let Some(hit) = cache.positive.get(&key, now) {
                return Ok(hit);
            }
            if let Some(why) = cache.negative.get(&key, now) {
                return Err(ReviewError::Rejected(why));
            }
        }
        let unix_now = time::OffsetDateTime::now_utc().unix_timestamp();
        token
            .precheck(
                &self.precheck.audiences,
                self.precheck.issuer.as_deref(),
                unix_now,
            )
            .map_err(|e| ReviewError::Rejected(e.to_string()))?;
        let Ok(_peer_slot) = self.peers.take(peer) else {
            return Err(ReviewError::Throttled(
                "this address has its share of token reviews in flight; retry with backoff".into(),
            ));
        };
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Err(ReviewError::Throttled(
                "too many token reviews are in flight; retry with backoff".into(),
            ));
        };
        let answer = self.inner.review(token).await;
        let now = Instant::now();
        match answer {
            Ok(reviewed) => {
                let mut ttl = CACHE_TTL;
                if let Some(exp) = token.unverified_expiry() {
                    let left = exp - time::OffsetDateTime::now_utc().unix_timestamp();
                    ttl = ttl.min(Duration::from_secs(u64::try_from(left).unwrap_or(0)));
                }
                if !ttl.is_zero() {
                    self.lock()
                        .positive
                        .insert(key, reviewed.clone(), now + ttl, now);
                }
                Ok(reviewed)
            }
            Err(ReviewError::Rejected(why)) => {
                self.lock()
                    .negative
                    .insert(key, why.clone(), now + NEGATIVE_CACHE_TTL, now);
                Err(ReviewError::Rejected(why))
            }
            // No answer is no verdict: nothing to remember.
            Err(other) => Err(other),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding this lock cannot leave the maps inconsistent in a
        // way that matters (a stale queue pair is skipped), so a poisoned lock is
        // still usable.
        crate::sync::lock(&self.cache)
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

    /// A JWT-shaped token (no claims to object to) told apart by `name`.
    fn jwt(name: &str) -> Token {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        Token::new(format!(
            "{}.{}.{}",
            b64("{}"),
            b64(&format!(r#"{{"n":"{name}"}}"#)),
            b64("sig")
        ))
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
        let token = jwt("opaque-token");
        cached.review(&token, None).await.unwrap();
        cached.review(&token, None).await.unwrap();
        assert_eq!(inner.0.load(Ordering::SeqCst), 1);
        tokio::time::advance(CACHE_TTL + Duration::from_secs(1)).await;
        cached.review(&token, None).await.unwrap();
        assert_eq!(inner.0.load(Ordering::SeqCst), 2);
        cached.review(&jwt("another"), None).await.unwrap();
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
        let garbage = jwt("garbage");
        for _ in 0..20 {
            assert!(matches!(
                cached.review(&garbage, None).await,
                Err(ReviewError::Rejected(_))
            ));
        }
        assert_eq!(inner.0.load(Ordering::SeqCst), 1);
        tokio::time::advance(NEGATIVE_CACHE_TTL + Duration::from_secs(1)).await;
        let _ = cached.review(&garbage, None).await;
        assert_eq!(inner.0.load(Ordering::SeqCst), 2);

        // 50 distinct tokens at once: two reach the API server, the rest are turned
        // away at once instead of queueing behind them.
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let cached = cached.clone();
                tokio::spawn(async move { cached.review(&jwt(&format!("t{i}")), None).await })
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

    #[tokio::test(start_paused = true)]
    async fn tokens_no_review_could_accept_never_take_a_slot() {
        let inner = Arc::new(Refusing(AtomicUsize::new(0), Duration::from_millis(5)));
        let cached = CachedReviewer::new(inner.clone(), 2).with_precheck(Precheck {
            audiences: vec!["istio-ca".into()],
            issuer: Some("https://kubernetes.default.svc".into()),
        });
        for i in 0..240 {
            let garbage = Token::new(format!("random-{i}"));
            assert!(matches!(
                cached.review(&garbage, None).await,
                Err(ReviewError::Rejected(why)) if why.contains("not a JWT")
            ));
        }
        assert_eq!(
            inner.0.load(Ordering::SeqCst),
            0,
            "garbage reached the API server"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_address_holds_only_its_share_of_the_review_slots() {
        let inner = Arc::new(Refusing(AtomicUsize::new(0), Duration::from_secs(1)));
        let crowd: IpNet = "10.0.0.0/24".parse().unwrap();
        let cached =
            Arc::new(CachedReviewer::new(inner.clone(), 8).with_peer_share(2, vec![crowd]));
        let attacker: IpAddr = "192.0.2.66".parse().unwrap();
        let spawn = |name: String, peer: IpAddr| {
            let cached = cached.clone();
            tokio::spawn(async move { cached.review(&jwt(&name), Some(peer)).await })
        };
        let flood: Vec<_> = (0..20).map(|i| spawn(format!("a{i}"), attacker)).collect();
        tokio::task::yield_now().await;
        // A real caller from another address still reaches the API server, and so
        // do more than two callers behind a named crowd.
        let real = spawn("pod".into(), "192.0.2.7".parse().unwrap());
        let crowd: Vec<_> = (0..4)
            .map(|i| spawn(format!("c{i}"), "10.0.0.9".parse().unwrap()))
            .collect();
        let mut throttled = 0;
        for t in flood {
            if matches!(t.await.unwrap(), Err(ReviewError::Throttled(_))) {
                throttled += 1;
            }
        }
        assert_eq!(throttled, 18, "the attacker got more than its two slots");
        assert!(matches!(real.await.unwrap(), Err(ReviewError::Rejected(_))));
        for t in crowd {
            assert!(matches!(t.await.unwrap(), Err(ReviewError::Rejected(_))));
        }
        assert_eq!(inner.0.load(Ordering::SeqCst), 2 + 1 + 4);
    }

    #[test]
    fn a_full_cache_drops_its_oldest_answers_not_all_of_them() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let mut budget: Budget<u8> = Budget::new(3);
        for k in 0..5u8 {
            budget.insert([k; 32], k, later, now);
        }
        assert_eq!(budget.entries.len(), 3);
        assert_eq!(budget.get(&[0; 32], now), None);
        assert_eq!(budget.get(&[1; 32], now), None);
        for k in 2..5u8 {
            assert_eq!(budget.get(&[k; 32], now), Some(k));
        }
        // Refusals have their own budget: a flood of them leaves the answers of real
        // callers alone.
        let mut cache = Cache::default();
        let reviewed = Reviewed {
            account: ServiceAccount::new("shop", "web").unwrap(),
            pod: None,
        };
        cache.positive.insert([1; 32], reviewed.clone(), later, now);
        for i in 0..(CACHE_MAX_ENTRIES as u32 + 10) {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            key[31] = 0xff;
            cache.negative.insert(key, "bad".into(), later, now);
        }
        assert_eq!(cache.positive.get(&[1; 32], now), Some(reviewed));
        assert_eq!(cache.negative.entries.len(), CACHE_MAX_ENTRIES);
    }
}
