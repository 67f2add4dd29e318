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
    cache: Mutex<HashMap<Vec<String>, Cached>>,
    bundle: watch::Sender<Bundle>,
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
    /// Tokens from `ca`.
    pub fn new(ca: Arc<dyn CaClient>) -> Arc<Self> {
        Arc::new(Self {
            ca,
            cache: Mutex::new(HashMap::new()),
            bundle: watch::Sender::new(Bundle::Unknown),
        })
    }

    /// The bundle, watched.
    pub fn bundle(&self) -> watch::Receiver<Bundle> {
        self.bundle.subscribe()
    }

    /// A token for `audiences` (the pod's SPIFFE ID, token): cached while more than
    /// half its life is left, else minted.
    pub async fn fetch(&self, audiences: &[String]) -> Result<(String, String), Status> {
        if audiences.is_empty() || audiences.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let mut key = audiences.to_vec();
        key.sort();
        key.dedup();
        let now = unix_now();
        if let Some(hit) = crate::sync::lock(&self.cache).get(&key)
            && now < hit.refresh_at
        {
            return Ok((hit.spiffe_id.clone(), hit.token.clone()));
        }
        let minted = self.ca.mint_jwt(&key).await.map_err(|e| status_of(&e))?;
        let cached = Cached {
            refresh_at: now + (minted.expires_at - now) / 2,
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
                Ok(MAX_REFRESH)
            }
            Err(e) => Err(e),
        }
    }

    /// Keeps the bundle current until `stop`: fetched now, again at the CA's hint,
    /// sooner after a failure.
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
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(wait) => {}
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
            .ok_or_else(|| invalid("no sub claim".into()))?
            .to_owned();
        let trust_domain = id
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.split('/').next())
            .filter(|td| !td.is_empty())
            .ok_or_else(|| invalid(format!("sub {id:?} is not a SPIFFE ID")))?;
        let keys = match &*self.bundle.borrow() {
            Bundle::Keys(keys) if keys.trust_domain == trust_domain => keys.clone(),
            _ => {
                return Err(invalid(format!(
                    "no JWT bundle for trust domain {trust_domain:?}"
                )));
            }
        };
        let claims = unverified
            .verify(&keys.set, audience, unix_now())
            .map_err(|e| invalid(format!("{e} (trust domain {trust_domain:?})")))?;
        Ok((id, claims))
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
