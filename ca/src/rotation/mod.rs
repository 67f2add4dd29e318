//! Trust changes the CA drives: the operator declares the next key material once
//! (`--next-cacerts-dir`, or a renewed self-signed root in `<state-dir>/next`), and
//! the CA takes every consumer through [`stage`]s (distribute, switch, retire),
//! each gated by evidence: its own issuance record ([`ledger`]) and consumers read
//! back. The next set is checked before anything is distributed ([`next`]); the
//! task that reads the sets, advances and publishes the signer is the [`driver`];
//! what it shows is [`status`].
//!
//! The request path asks this module three things: the cap on lifetimes while a
//! rotation is under way ([`Rotation::cap`]), to note every leaf it issued with
//! what its holder said it serves ([`Rotation::note`]), and the stage to tell
//! signet-agents ([`Rotation::stage`]).

pub mod driver;
pub mod flags;
pub mod ledger;
pub mod next;
pub mod sets;
pub mod shared;
pub mod stage;
pub mod status;

use std::sync::{Arc, Mutex};

use rand::Rng;
use time::{Duration, OffsetDateTime};

use crate::{
    keys::signer::{Issued, Signer},
    sync::lock,
};
use ledger::{Ledger, Seen, Serves};
use stage::Stage;
use status::Status;

/// What the request path shares with the driver.
#[derive(Debug)]
pub struct Rotation {
    ledger: Ledger,
    view: Mutex<View>,
}

#[derive(Debug, Clone)]
struct View {
    stage: Stage,
    window: Duration,
    /// The roots of the declared next set (SHA-256 of each, sorted); empty when
    /// idle.
    next: Arc<[[u8; 32]]>,
    status: Arc<Status>,
}

impl Rotation {
    /// Idle, noting leaves in `ledger`.
    pub fn new(ledger: Ledger) -> Self {
        Self {
            ledger,
            view: Mutex::new(View {
                stage: Stage::Idle,
                window: Duration::ZERO,
                next: Arc::new([]),
                status: Arc::new(Status::default()),
            }),
        }
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        lock(&self.view)
    }

    /// The longest lifetime to issue now: `None` outside a rotation; during one, the
    /// rotation window shortened by a random part of up to half, so that the renewals
    /// it causes spread over a quarter window instead of arriving together.
    pub fn cap(&self) -> Option<Duration> {
        let view = self.view();
        view.stage
            .caps_lifetimes()
            .then(|| jittered(view.window, rand::rng().random_range(0.5..=1.0)))
    }

    /// The stage the request path is in (what signet-agents are told).
    pub fn stage(&self) -> Stage {
        self.view().stage
    }

    /// Notes a leaf issued to `holder` (an identity and the pod or node its
    /// credential is bound to; `None` when it names neither) by `signer`, whose
    /// caller said it serves the roots `served` (SHA-256 of each, sorted; `None`:
    /// it did not say).
    pub fn note(
        &self,
        holder: Option<&str>,
        signer: &Signer,
        issued: &Issued,
        served: Option<&[[u8; 32]]>,
    ) {
        let (stage, next) = {
            let view = self.view();
            (view.stage, view.next.clone())
        };
        let seen = seen(stage, &next, signer.root_digests(), served);
        if let Err(e) = self.ledger.record(
            holder,
            chain_id(signer),
            OffsetDateTime::now_utc(),
            issued.not_after,
            seen,
        ) {
            tracing::error!(error = %e, "cannot write the issuance marks; a restart during a root rotation would underestimate how long leaves issued now stay in use");
        }
    }

    /// What `rotation status` shows.
    pub fn status(&self) -> Arc<Status> {
        self.view().status.clone()
    }

    /// The issuance record.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Takes the stage's cap and next roots at once (before the signer of the stage
    /// is published), the status following at the end of the driver's look.
    fn set_stage(&self, stage: Stage, window: Duration, next: &[String]) {
        let next: Arc<[[u8; 32]]> = if stage == Stage::Idle {
            Arc::new([])
        } else {
            let mut all: Vec<[u8; 32]> = next
                .iter()
                .filter_map(|h| {
                    let mut d = [0; 32];
                    hex::decode_to_slice(h, &mut d).ok().map(|()| d)
                })
                .collect();
            all.sort_unstable();
            all.into()
        };
        let mut view = self.view();
        view.stage = stage;
        view.window = window;
        view.next = next;
    }

    fn show(&self, status: Status) {
        self.view().status = Arc::new(status);
    }
}

/// What a leaf tells about the trust change in `stage`: whether the bundle `given`
/// (the signer's roots) holds every root of `next`, and what the holder said it
/// serves. Idle, no bundle holds the next roots of a declaration this replica has
/// not taken yet, and done, none is taken as holding them (a new declaration may be
/// under way); in a change whose next roots are not known, nothing is judged.
fn seen(stage: Stage, next: &[[u8; 32]], given: &[[u8; 32]], served: Option<&[[u8; 32]]>) -> Seen {
    if stage == Stage::Idle {
        return Seen {
            given_next: Some(false),
            serves: Serves::Unknown,
        };
    }
    if next.is_empty() {
        return Seen::default();
    }
    let holds = |set: &[[u8; 32]]| next.iter().all(|d| set.binary_search(d).is_ok());
    Seen {
        given_next: Some(stage != Stage::Done && holds(given)),
        serves: match served {
            None => Serves::Unknown,
            Some(s) if !holds(s) => Serves::Lacking,
            Some(s) if s.len() > next.len() => Serves::Both,
            Some(_) => Serves::NextAlone,
        },
    }
}

/// `window` scaled by `factor` (0.5 to 1), whole seconds, at least one second.
fn jittered(window: Duration, factor: f64) -> Duration {
    Duration::seconds(((window.as_seconds_f64() * factor) as i64).max(1))
}

/// The chain a signer signs with, as the ledger keeps it.
pub fn chain_id(signer: &Signer) -> u64 {
    let d = signer.digest();
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// `now` as the status shows it.
fn rfc3339(t: OffsetDateTime) -> String {
    signet_telemetry::rfc3339(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaf_tells_whether_its_bundle_and_its_holder_hold_the_next_roots() {
        let (old, new) = ([1; 32], [2; 32]);
        let d = Stage::Distribute;
        // Idle: whatever it was given, not the next roots (a declaration not taken).
        assert_eq!(
            seen(Stage::Idle, &[], &[old], Some(&[old])).given_next,
            Some(false)
        );
        // Done: what it serves is told, but nothing counts as given (the next
        // declaration's roots are not known here yet).
        let done = seen(Stage::Done, &[new], &[new], Some(&[new]));
        assert_eq!(
            (done.given_next, done.serves),
            (Some(false), Serves::NextAlone)
        );
        // Next roots unknown: nothing judged.
        assert_eq!(seen(d, &[], &[old], Some(&[old])), Seen::default());
        let s = seen(d, &[new], &[old, new], Some(&[old]));
        assert_eq!(s.given_next, Some(true));
        assert_eq!(s.serves, Serves::Lacking);
        assert_eq!(
            seen(d, &[new], &[old, new], Some(&[old, new])).serves,
            Serves::Both
        );
        assert_eq!(
            seen(d, &[new], &[new], Some(&[new])).serves,
            Serves::NextAlone
        );
        assert_eq!(seen(d, &[new], &[old], None).serves, Serves::Unknown);
        assert_eq!(seen(d, &[new], &[old], None).given_next, Some(false));
    }

    #[test]
    fn jitter_keeps_lifetimes_between_half_and_a_whole_window() {
        let w = Duration::minutes(60);
        assert_eq!(jittered(w, 0.5), Duration::minutes(30));
        assert_eq!(jittered(w, 1.0), w);
        assert_eq!(jittered(Duration::ZERO, 0.5), Duration::seconds(1));
    }
}
