//! JWT-SVIDs for the Workload API: tokens minted by signet-ca for the pod's identity,
//! cached per audience set and minted again once half their life is gone (a caller
//! never gets one close to expiry), the CA's JWT bundle kept current, and
//! ValidateJWTSVID's check of a token against that bundle.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use tonic::{Code, Status};

use crate::{
    identity::caclient::{CaClient, CaError},
    jose::{Jwks, Unverified},
};

/// Audience sets cached at once; past this the entries nearest renewal go first.
const MAX_CACHED: usize = 64;
/// Bundle refresh when the CA gives no hint.
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Bundle refresh bounds, whatever the CA says.
const MIN_REFRESH: Duration = Duration::from_secs(5);
const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// Retry after a failed bundle fetch, doubling to the refresh interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Mints asked of the CA at once; more callers wait (and then mostly find the token
/// one of them got in the cache), so one local process cannot turn the agent into a
/// stream of CA requests.
const MINTS_IN_FLIGHT: usize = 4;

/// The CA's JWT bundle as held.
#[derive(Debug, Clone)]
pub enum Bundle {
    /// Not fetched yet.
    Unknown,
    /// The CA does not mint JWT-SVIDs (`UNIMPLEMENTED`).
    NotServed,
    /// The trust domain's key set.
    Keys(Arc<KeySet>),
}

/// One trust domain's JWKS, as bytes (for the Workload API) and parsed.
#[derive(Debug)]
pub struct KeySet {
    pub trust_domain: String,
    pub jwks: Vec<u8>,
    set: Jwks,
}

#[derive(Clone)]
struct Cached {
    token: String,
    spiffe_id: String,
    refresh_at: i64,
}

/// Tokens per audience set, and the bundle.
pub struct JwtSvids {
    ca: Arc<dyn CaClient>,
    /// The pod's SPIFFE ID, the only one a token can name.
    id: String,
    cache: Mutex<HashMap<Vec<String>, Cached>>,
    mints: tokio::sync::Semaphore,
    bundle: watch::Sender<Bundle>,
    /// Asks [`JwtSvids::keep_bundle`] to fetch the bundle before its next turn.
    refresh_now: tokio::sync::Notify,
}

impl std::fmt::Debug for JwtSvids {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSvids").finish_non_exhaustive()
    }
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A CA failure as the Workload API's caller sees it: the CA's own refusal passed
/// through (a bad audience is INVALID_ARGUMENT either way), the rest UNAVAILABLE.
fn status_of(e: &CaError) -> Status {
    match e {
        CaError::Refused {
            code: Code::Unimplemented,
            ..
        } => {
            Status::unimplemented("signet-ca does not mint JWT-SVIDs (it runs without --jwt-svids)")
        }
        CaError::Refused { code, message } => Status::new(*code, format!("signet-ca: {message}")),
        CaError::Overloaded { .. } | CaError::Connect { .. } => {
            Status::unavailable(format!("cannot get a JWT-SVID now: {e}"))
        }
        CaError::Token { .. } | CaError::Trust(_) => Status::internal(e.to_string()),
    }
}

impl JwtSvids {
    /// Tokens for `id` from `ca`.
    pub fn new(ca: Arc<dyn CaClient>, id: String) -> Arc<Self> {
        Arc::new(Self {
            ca,
            id,
            cache: Mutex::new(HashMap::new()),
            mints: tokio::sync::Semaphore::new(MINTS_IN_FLIGHT),
            bundle: watch::Sender::new(Bundle::Unknown),
            refresh_now: tokio::sync::Notify::new(),
        })
    }

    fn cached(&self, key: &[String], now: i64) -> Option<(String, String)> {
        crate::sync::lock(&self.cache)
            .get(key)
            .filter(|hit| now < hit.refresh_at)
            .map(|hit| (hit.spiffe_id.clone(), hit.token.clone()))
    }

    /// The bundle, watched.
    pub fn bundle(&self) -> watch::Receiver<Bundle> {
        self.bundle.subscribe()
    }

    /// A token for `audiences` naming `spiffe_id` (empty: the pod's), as (SPIFFE ID,
    /// token): cached while more than half its life is left, else minted.
    pub async fn fetch(
        &self,
        audiences: &[String],
        spiffe_id: &str,
    ) -> Result<(String, String), Status> {
        if audiences.is_empty() || audiences.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if !spiffe_id.is_empty() && spiffe_id != self.id {
            return Err(Status::permission_denied(format!(
                "this agent holds only {}, not {spiffe_id:?}",
                self.id
            )));
        }
        let mut key = audiences.to_vec();
        key.sort();
        key.dedup();
        if let Some(hit) = self.cached(&key, unix_now()) {
            return Ok(hit);
        }
        let _permit = self
            .mints
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the agent is stopping"))?;
        // Another caller may have minted it while this one waited.
        let now = unix_now();
        if let Some(hit) = self.cached(&key, now) {
            return Ok(hit);
        }
        let minted = self.ca.mint_jwt(&key).await.map_err(|e| status_of(&e))?;
        if !matches!(*self.bundle.borrow(), Bundle::Keys(_)) {
            // The CA mints, so it has keys to publish: fetch them now.
            self.refresh_now.notify_one();
        }
        let cached = Cached {
            refresh_at: now.saturating_add(minted.expires_at.saturating_sub(now) / 2),
            token: minted.token,
            spiffe_id: minted.spiffe_id,
        };
        let mut cache = crate::sync::lock(&self.cache);
        if cache.len() >= MAX_CACHED && !cache.contains_key(&key) {
            cache.retain(|_, c| c.refresh_at > now);
            if cache.len() >= MAX_CACHED
                && let Some(first) = cache
                    .iter()
                    .min_by_key(|(_, c)| c.refresh_at)
                    .map(|(k, _)| k.clone())
            {
                cache.remove(&first);
            }
        }
        cache.insert(key, cached.clone());
        Ok((cached.spiffe_id, cached.token))
    }

    /// Fetches the bundle now and publishes it if it changed; the refresh interval
    /// the CA asks for.
    async fn refresh(&self) -> Result<Duration, CaError> {
        match self.ca.jwt_bundle().await {
            Ok(answer) => {
                let set = Jwks::parse(&answer.jwks).map_err(|e| CaError::Refused {
                    code: Code::Internal,
                    message: format!("the CA's JWT bundle is not a JWKS: {e}"),
                })?;
                self.bundle.send_if_modified(|held| {
                    let same = matches!(held, Bundle::Keys(k) if k.jwks == answer.jwks && k.trust_domain == answer.trust_domain);
                    if !same {
                        *held = Bundle::Keys(Arc::new(KeySet {
                            trust_domain: answer.trust_domain.clone(),
                            jwks: answer.jwks.clone(),
                            set,
                        }));
                    }
                    !same
                });
                let hint = u64::try_from(answer.refresh_hint_seconds).unwrap_or(0);
                Ok(if hint == 0 {
                    DEFAULT_REFRESH
                } else {
                    Duration::from_secs(hint).clamp(MIN_REFRESH, MAX_REFRESH)
                })
            }
            Err(CaError::Refused {
                code: Code::Unimplemented,
                ..
            }) => {
                self.bundle.send_if_modified(|held| {
                    let was = matches!(held, Bundle::NotServed);
                    *held = Bundle::NotServed;
                    !was
                });
                // Asked again now and then: the CA may be restarted with JWT-SVIDs.
                Ok(DEFAULT_REFRESH)
            }
            Err(e) => Err(e),
        }
    }

    /// Keeps the bundle current until `stop`: fetched now, again at the CA's hint,
    /// sooner after a failure, and when asked (a first token minted, a token naming
    /// a key not in the bundle), at most every [`MIN_REFRESH`].
    pub async fn keep_bundle(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut retry = FIRST_RETRY;
        loop {
            let wait = match self.refresh().await {
                Ok(every) => {
                    retry = FIRST_RETRY;
                    every
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?retry, "cannot fetch the JWT bundle");
                    let wait = retry;
                    retry = (retry * 2).min(DEFAULT_REFRESH);
                    wait
                }
            };
            let fetched = tokio::time::Instant::now();
            let early = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(wait) => false,
                () = self.refresh_now.notified() => true,
            };
            if early {
                // Asked early: not sooner than the floor after the last fetch.
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep_until(fetched + MIN_REFRESH.min(wait)) => {}
                }
            }
        }
    }

    /// ValidateJWTSVID: `token`'s signature by a key of its trust domain's bundle,
    /// `audience` among its `aud`, not expired; its SPIFFE ID and claims.
    pub fn validate(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<(String, serde_json::Map<String, serde_json::Value>), Status> {
        if audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if token.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        if matches!(*self.bundle.borrow(), Bundle::NotServed) {
            return Err(Status::unimplemented(
                "signet-ca does not mint JWT-SVIDs (it runs without --jwt-svids): there are no JWT keys to validate with",
            ));
        }
        let invalid = |why: String| Status::invalid_argument(format!("invalid JWT-SVID: {why}"));
        let unverified = Unverified::parse(token).map_err(invalid)?;
        let id = unverified
            .claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| invalid("no sub claim".into()))?;
        let id = spiffe::SpiffeId::new(id)
            .map_err(|e| invalid(format!("sub {id:?} is not a SPIFFE ID: {e}")))?;
        let trust_domain = id.trust_domain_name();
        let keys = match &*self.bundle.borrow() {
            Bundle::Keys(keys) if keys.trust_domain == trust_domain => keys.clone(),
            Bundle::Unknown => {
                return Err(Status::unavailable(
                    "the agent has not fetched the JWT bundle from signet-ca yet",
                ));
            }
            _ => {
                return Err(invalid(format!(
                    "no JWT bundle for trust domain {trust_domain:?}"
                )));
            }
        };
        if unverified
            .kid
            .as_deref()
            .is_some_and(|kid| !keys.set.contains(kid))
        {
            // Perhaps a key the agent has not seen yet; the caller may retry.
            self.refresh_now.notify_one();
        }
        let claims = unverified
            .verify(&keys.set, audience, unix_now())
            .map_err(|e| invalid(format!("{e} (trust domain {trust_domain:?})")))?;
        Ok((id.to_string(), claims))
    }
}

/// JSON claims as a protobuf Struct (ValidateJWTSVID's `claims`).
pub fn claims_struct(claims: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: claims
            .into_iter()
            .map(|(k, v)| (k, value(v)))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(claims_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}
