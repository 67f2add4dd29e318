//! Trust changes the CA drives: the operator declares the next key material once
//! (`--next-cacerts-dir`, or a renewed self-signed root in `<state-dir>/next`), and
//! the CA takes every consumer through [`stage`]s (distribute, switch, retire),
//! each gated by evidence: its own issuance record ([`ledger`]) and consumers read
//! back. The next set is checked before anything is distributed ([`next`]); the
//! task that reads the sets, advances and publishes the signer is the [`driver`];
//! what it shows is [`status`].
//!
//! The request path asks this module two things: the cap on lifetimes while a
//! rotation is under way ([`Rotation::cap`]), and to note every leaf it issued
//! ([`Rotation::note`]).

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
use ledger::Ledger;
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

    /// Notes a leaf issued to `holder`: an identity and the pod (or node) its
    /// credential is bound to; `None` when it names neither.
    pub fn note(&self, holder: Option<&str>, signer: &Signer, issued: &Issued) {
        if let Err(e) = self.ledger.record(
            holder,
            chain_id(signer),
            OffsetDateTime::now_utc(),
            issued.not_after,
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

    /// Takes the stage's cap at once (before the signer of the stage is published),
    /// the status following at the end of the driver's look.
    fn set_stage(&self, stage: Stage, window: Duration) {
        let mut view = self.view();
        view.stage = stage;
        view.window = window;
    }

    fn show(&self, stage: Stage, window: Duration, status: Status) {
        *self.view() = View {
            stage,
            window,
            status: Arc::new(status),
        };
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
    fn jitter_keeps_lifetimes_between_half_and_a_whole_window() {
        let w = Duration::minutes(60);
        assert_eq!(jittered(w, 0.5), Duration::minutes(30));
        assert_eq!(jittered(w, 1.0), w);
        assert_eq!(jittered(Duration::ZERO, 0.5), Duration::seconds(1));
    }
}
