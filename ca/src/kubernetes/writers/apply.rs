//! Writing one object so it is as desired: create it when missing, replace it with
//! its `resourceVersion` as precondition when it differs, and on 409 Conflict read it
//! again and retry. Two writers that disagree therefore cannot overwrite each
//! other's changes blindly: the loser rereads and decides again.

use std::fmt::Debug;

use kube::{Api, Resource, ResourceExt, api::PostParams};
use serde::{Serialize, de::DeserializeOwned};

use super::Tally;

/// Attempts per object before a run of conflicts counts as a failed sync.
const MAX_ATTEMPTS: usize = 5;

/// Why a sync did not complete.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}: still conflicting after {MAX_ATTEMPTS} attempts")]
    Conflicts(String),
    #[error("{0}")]
    Other(String),
}

impl WriteError {
    pub(crate) fn api(what: impl Into<String>, source: kube::Error) -> Self {
        Self::Api {
            what: what.into(),
            source,
        }
    }
}

/// The HTTP status of an API error, if it is one.
pub(crate) fn status(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Makes object `name` of `api` what `desire` says it should be, given what it is
/// (`None`: absent). `desire` returns `None` when the object is already right.
/// `known` is the object as last seen by a watch (`Some(None)`: known absent); it
/// saves a read, and after a conflict the object is read afresh. Returns whether
/// anything was written.
pub(crate) async fn ensure<K>(
    api: &Api<K>,
    name: &str,
    known: Option<Option<K>>,
    tally: &Tally,
    mut desire: impl FnMut(Option<&K>) -> Option<K>,
) -> Result<bool, WriteError>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let what = || format!("{} {name}", api.resource_url());
    let mut known = known;
    for _ in 0..MAX_ATTEMPTS {
        let current = match known.take() {
            Some(k) => k,
            None => api
                .get_opt(name)
                .await
                .map_err(|e| WriteError::api(what(), e))?,
        };
        let Some(mut want) = desire(current.as_ref()) else {
            return Ok(false);
        };
        let result = match &current {
            None => api.create(&PostParams::default(), &want).await,
            Some(current) => {
                want.meta_mut().resource_version = current.resource_version();
                api.replace(name, &PostParams::default(), &want).await
            }
        };
        match result {
            Ok(_) => {
                tally.wrote();
                return Ok(true);
            }
            // 409: AlreadyExists on create, Conflict on a stale resourceVersion.
            Err(e) if status(&e) == Some(409) => {
                tally.conflict();
                tracing::debug!(object = %what(), "conflict; reading it again");
            }
            Err(e) => return Err(WriteError::api(what(), e)),
        }
    }
    Err(WriteError::Conflicts(what()))
}
