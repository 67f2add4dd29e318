//! The task that owns the CA's key material while it serves: it reads the cacerts
//! set (reloading it when idle, as before) and the declared next set, advances the
//! trust change when the evidence is in, persists the stage before acting on it,
//! and publishes the signer each stage calls for: the set that signs, with the
//! bundle of the stage.
//!
//! The stage lives in `<state-dir>/rotation.json`; a restart reads it and goes on
//! from there (the sets on disk must still be the ones it names). In cluster mode
//! the record every replica follows is the shared one (`signet-ca-rotation`), and
//! only the replica holding the writers' Lease declares, advances and writes it;
//! the others sign as it says and report their counts.

use std::sync::Arc;

use signet_fs::watch::{Poll, Reported};
use signet_spiffe::TrustDomains;
use time::{Duration, OffsetDateTime};
use tokio::sync::watch;

use super::{
    Rotation, chain_id,
    flags::RotationArgs,
    ledger::{Ledger, LedgerError, Pending, Serving},
    next, rfc3339,
    sets::{
        compose, in_place, key, load, next_dir, promote_self_signed, read_record, root_digests,
        settled, short, write_record,
    },
    shared::{self, Report, Shared},
    stage::{self, Declared, Evidence, Record, Stage},
    status::Status,
};
use crate::{
    keys::{
        cacerts::{CaCertsError, Source},
        reload::{self, KeyArgs, ReloadError},
        signer::{SignError, Signer},
        tls::TlsState,
    },
    metrics::Metrics,
};

/// The stage record in the state directory.
pub const RECORD_FILE: &str = "rotation.json";
/// Written by `signet-ca rotation abort`; removed when the driver has read it.
pub const ABORT_FILE: &str = "rotation-abort";
/// Where `signet-ca rotation start --self-signed` puts the next self-signed root.
pub const SELF_SIGNED_NEXT: &str = "next";

/// Why the CA cannot start with its key material and stage record.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Reload(#[from] ReloadError),
    #[error(transparent)]
    CaCerts(#[from] CaCertsError),
    #[error(transparent)]
    Signer(#[from] SignError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("{path}: {problem}")]
    Record { path: String, problem: String },
}

/// What the driver is told at start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The key material flags.
    pub keys: KeyArgs,
    /// The rotation flags.
    pub rotation: RotationArgs,
    /// Our trust domain and aliases (a next set may not name another).
    pub trust_domains: TrustDomains,
    /// `--default-ttl`: a next set must sign one of these at the rotation's end,
    /// and on a first start one may have been issued just before.
    pub default_ttl: Duration,
    /// Why driven rotation is off in this configuration (then a next set is
    /// reported, never declared).
    pub unavailable: Option<&'static str>,
    /// The shortest window a rotation may use (`--rotation-window` is raised to it):
    /// two hours with pod certificates, which last one at least.
    pub min_window: Duration,
    /// In cluster mode: the record every replica follows, the reports, the
    /// consumers read back.
    pub shared: Option<Arc<dyn Shared>>,
    /// In cluster mode: whether this replica holds the writers' Lease (only the
    /// elected replica declares, advances and writes the record).
    pub leading: Option<watch::Receiver<bool>>,
    /// The other clusters on the shared root, whose stages gate the switch and the
    /// retire.
    pub peers: Option<Arc<dyn shared::Peers>>,
}

/// The driver's state between ticks.
#[derive(Debug)]
pub struct Driver {
    settings: Settings,
    rotation: Arc<Rotation>,
    record: Record,
    /// The cacerts set alone (the "from" set).
    base: Arc<Signer>,
    /// The declared next set alone, from the declaration until the rotation is over.
    next: Option<Arc<Signer>>,
    published: Arc<Signer>,
    /// What the published signer was composed from: (stage, base digest, next digest).
    composed: (Stage, [u8; 32], Option<[u8; 32]>),
    converged: bool,
    lagging: Vec<String>,
    problem: Option<String>,
    reported: Reported,
    last_report: Option<Report>,
    pending: Pending,
    peer_notes: Vec<String>,
    ticks: u64,
    /// When the writers' objects were last read back (Unix seconds), and for which
    /// bundle: read again after 5 s while some lag, 30 s once none does, and at once
    /// for another bundle.
    readback: (i64, String),
    /// Why the state directory cannot keep the record or the issuance marks: the CA
    /// serves, and declares no trust change, until it restarts with one that can.
    unkept: Option<String>,
}

impl Driver {
    /// Reads the stage record (the shared one in cluster mode, when the API server
    /// answers; else the state directory's), the sets it names and the issuance
    /// marks; the signer to start with is [`Self::published`].
    pub async fn start(settings: Settings, now: OffsetDateTime) -> Result<Self, DriverError> {
        let state_dir = settings.keys.state_dir.clone();
        let mut saved = read_record(&state_dir)?;
        let mut own_marks = None;
        if let Some(shared) = &settings.shared {
            match shared.read().await {
                Ok(state) => {
                    own_marks = state.reports.get(shared.replica()).map(|r| r.marks);
                    if state.record.is_some() {
                        saved = state.record;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the shared rotation record at start; starting from the state directory's")
                }
            }
        }
        if saved.as_ref().is_some_and(|r| r.stage == Stage::Done) {
            // A self-signed renewal moves the new root in place at the end; finish a
            // move a crash interrupted before the root is read.
            promote_self_signed(&state_dir).map_err(|e| DriverError::Record {
                path: state_dir.join(SELF_SIGNED_NEXT).display().to_string(),
                problem: format!("cannot move the renewed self-signed root in place: {e}"),
            })?;
        }
        let base = Arc::new(reload::initial(
            &settings.keys,
            settings.trust_domains.primary().as_str(),
            now,
        )?);
        let (record, next) = resolve(saved, &settings, &base, now)?;
        // A state directory that cannot keep the marks or the record does not stop
        // the CA: it serves, and refuses to declare a trust change, saying why.
        // (Marks that are there but cannot be read or are not marks stop it: taking
        // them as none could end a stage early.)
        let mut unkept = None;
        let ledger = match Ledger::open(Some(&state_dir), settings.default_ttl, now) {
            Ok(ledger) => ledger,
            Err(e) if e.unwritable => {
                unkept = Some(e.to_string());
                Ledger::unkept(settings.default_ttl, now)
            }
            Err(e) => return Err(e.into()),
        };
        // In cluster mode, what this replica said it had issued counts as well: its
        // state directory may be new (an emptyDir lost with the pod).
        if let Some(marks) = &own_marks {
            ledger.absorb(marks);
        }
        let rotation = Arc::new(Rotation::new(ledger));
        let published = compose(record.stage, &base, next.as_ref(), now)?;
        let composed = key(record.stage, &base, next.as_ref());
        if let Err(e) = write_record(&state_dir, &record) {
            unkept.get_or_insert(e.to_string());
        }
        if let Some(why) = &unkept {
            tracing::error!(
                problem = %why,
                "the state directory cannot keep the rotation record and issuance marks; serving, but no trust change is declared until the CA restarts with a writable --state-dir"
            );
        }
        let mut driver = Self {
            settings,
            rotation,
            record,
            base,
            next,
            published,
            composed,
            converged: false,
            lagging: Vec::new(),
            problem: None,
            reported: Reported::default(),
            last_report: None,
            peer_notes: Vec::new(),
            ticks: 0,
            readback: (0, String::new()),
            pending: Pending::default(),
            unkept,
        };
        driver.converged = driver.write_root_file();
        // The request path's stage, cap and next roots; from now on set as the record
        // changes (`commit`, `follow`).
        let r = &driver.record;
        driver
            .rotation
            .set_stage(r.stage, r.window(), &r.next_roots);
        driver.show(now);
        Ok(driver)
    }

    /// The signer to serve with now.
    pub fn published(&self) -> Arc<Signer> {
        self.published.clone()
    }

    /// What the request path shares.
    pub fn rotation(&self) -> Arc<Rotation> {
        self.rotation.clone()
    }

    /// Ticks every `--reload-interval` until `stop`.
    pub(crate) async fn run(
        mut self,
        signer_tx: watch::Sender<Arc<Signer>>,
        tls: Arc<TlsState>,
        metrics: Metrics,
        stop: watch::Receiver<bool>,
    ) {
        let mut poll = Poll::new(self.settings.keys.reload_interval, Some(stop));
        self.metrics(&metrics, OffsetDateTime::now_utc());
        while poll.tick().await {
            self.tick(&signer_tx, &tls, &metrics).await;
        }
    }

    fn leading(&self) -> bool {
        self.settings.leading.as_ref().is_none_or(|l| *l.borrow())
    }

    async fn tick(
        &mut self,
        signer_tx: &watch::Sender<Arc<Signer>>,
        tls: &TlsState,
        metrics: &Metrics,
    ) {
        let now = OffsetDateTime::now_utc();
        self.ticks = self.ticks.wrapping_add(1);
        // An idle follower looks at the shared record every fifth look: it only
        // needs to see a declaration, and every replica polling every look adds up.
        if self.settings.shared.is_some()
            && !self.leading()
            && self.record.stage == Stage::Idle
            && !self.ticks.is_multiple_of(5)
        {
            self.reload_base(metrics, now).await;
            self.publish(signer_tx, tls, metrics, now);
            self.show(now);
            return;
        }
        let shared_state = match &self.settings.shared {
            None => None,
            Some(shared) => match shared.read().await {
                Ok(state) => Some(state),
                Err(e) => {
                    // Nothing moves without the shared record; signing goes on as it
                    // is, and an idle CA still takes a changed cacerts set.
                    self.wait(format!("the shared rotation record: {e}"));
                    if self.record.stage == Stage::Idle {
                        self.reload_base(metrics, now).await;
                        self.publish(signer_tx, tls, metrics, now);
                    }
                    self.show(now);
                    return;
                }
            },
        };
        // A replica that cannot sign as the shared record says must not act on it
        // either: not even when it holds the Lease.
        let in_sync = match shared_state.as_ref().and_then(|s| s.record.clone()) {
            Some(record) => self.follow(record, now),
            None => true,
        };
        let leading = self.leading() && in_sync;
        if let Some(shared) = &self.settings.shared
            && self.abort_file_present()
        {
            // `signet-ca rotation abort` run in any replica's pod: the elected one acts.
            if let Err(e) = shared.request_abort().await {
                tracing::error!(error = %e, "cannot pass the abort request on to the shared record");
            }
        }
        if leading && let (Some(state), Some(shared)) = (&shared_state, &self.settings.shared) {
            let gone: Vec<String> = shared::gone(&state.reports, now)
                .into_iter()
                .filter(|r| r != shared.replica())
                .collect();
            if !gone.is_empty()
                && let Err(e) = shared.forget(gone).await
            {
                tracing::warn!(error = %e, "cannot remove the reports of replicas long gone");
            }
        }
        if leading {
            let abort = match &shared_state {
                Some(state) => state.abort,
                None => self.abort_file_present(),
            };
            if abort {
                self.abort(now).await;
            }
        }
        match self.record.stage {
            Stage::Idle => {
                self.reload_base(metrics, now).await;
                if leading {
                    let others = shared_state
                        .as_ref()
                        .map(|s| shared::renew_by(&s.reports))
                        .unwrap_or_default();
                    self.declare_if_asked(metrics, others, now).await;
                }
            }
            Stage::Done if leading => self.adopt_if_promoted(now).await,
            Stage::Done => {}
            _ => self.check_sets_unchanged(metrics),
        }
        self.publish(signer_tx, tls, metrics, now);
        self.pending = self.own_pending(now);
        if leading {
            self.gather(now).await;
            let mut pending = self.pending.clone();
            if let Some(state) = &shared_state {
                pending = shared::combine(
                    pending,
                    self.settings
                        .shared
                        .as_ref()
                        .map(|s| s.replica())
                        .unwrap_or(""),
                    &state.reports,
                    &self.record,
                    now,
                );
            }
            self.pending = pending;
            let (peers_distributed, peers_switched) = self.peers().await;
            // Evidence counts only for the signer this stage calls for, published.
            let published = key(self.record.stage, &self.base, self.next.as_ref()) == self.composed;
            let evidence = Evidence {
                pending: self.pending.count,
                late: self.pending.late,
                complete: self.pending.complete,
                consumers_converged: self.converged && published,
                peers_distributed,
                peers_switched,
                replicas_follow: self.pending.behind.is_empty() && published,
            };
            // What the other clusters read of this one: its bundle, and whether its
            // own evidence for the stage is in.
            let mut told = self.record.clone();
            told.roots = root_digests(&self.published);
            told.ready = stage::ready(&self.record, &evidence, now);
            if told != self.record {
                self.commit(told, false).await;
            }
            if let Some(to) = stage::advance(&self.record, &evidence, now) {
                self.enter(to, false, now).await;
                self.publish(signer_tx, tls, metrics, now);
                self.gather(now).await;
            }
        }
        self.report(now).await;
        self.show(now);
        self.metrics(metrics, now);
    }

    /// What the other clusters on the shared root allow: (distributed, switched);
    /// their notes go to the status. Without other clusters, both.
    async fn peers(&mut self) -> (bool, bool) {
        self.peer_notes.clear();
        let Some(peers) = &self.settings.peers else {
            return (true, true);
        };
        if !matches!(self.record.stage, Stage::Distribute | Stage::Switch) {
            return (true, true);
        }
        let read = match peers.read().await {
            Ok(read) => read,
            Err(e) => {
                self.peer_notes = vec![format!("the other clusters: {e}")];
                return (false, false);
            }
        };
        let (d, w, notes) = shared::peers_allow(&self.record, &read);
        self.peer_notes = notes;
        (d, w)
    }

    /// Takes the record the elected replica wrote (a follower signs as it says; a
    /// new leader goes on from it), once the sets it names are in place here.
    fn follow(&mut self, record: Record, now: OffsetDateTime) -> bool {
        if record == self.record {
            return true;
        }
        let base_digest = hex::encode(self.base.digest());
        if record.stage == Stage::Idle || record.stage == Stage::Done && record.to == base_digest {
            if record.from != base_digest {
                match in_place(&self.settings, &self.base) {
                    Ok(Some(m)) if hex::encode(m.digest) == record.from => {
                        match Signer::new(m, now) {
                            Ok(s) => self.base = Arc::new(s),
                            Err(e) => {
                                return self
                                    .wait_false(format!("the set in place cannot sign: {e}"));
                            }
                        }
                    }
                    _ => {
                        return self.wait_false(format!(
                            "the shared record signs with the set {}, which is not in place here yet",
                            short(&record.from)
                        ));
                    }
                }
            }
            self.next = None;
        } else {
            if record.from != base_digest {
                return self.wait_false(format!(
                    "the shared record rotates from the set {}, but this replica's cacerts holds {}",
                    short(&record.from),
                    short(&base_digest)
                ));
            }
            if self.next.as_ref().map(|n| hex::encode(n.digest())) != Some(record.to.clone()) {
                let Some(dir) = next_dir(&self.settings, &self.base) else {
                    return self.wait_false("the shared record rotates to a next set, but no --next-cacerts-dir is configured here".into());
                };
                match load(&dir, &self.base) {
                    Ok(Some(m)) if hex::encode(m.digest) == record.to => {
                        match Signer::new(m, now) {
                            Ok(s) => self.next = Some(Arc::new(s)),
                            Err(e) => return self.wait_false(format!("next set: {e}")),
                        }
                    }
                    _ => {
                        return self.wait_false(format!(
                            "the shared record rotates to the set {}, which {} does not hold here yet",
                            short(&record.to),
                            dir.display()
                        ));
                    }
                }
            }
        }
        if self.record.stage != record.stage {
            tracing::info!(stage = %record.stage, previous = %self.record.stage, "trust change: stage entered (following the shared record)");
        }
        self.rotation
            .set_stage(record.stage, record.window(), &record.next_roots);
        self.record = record;
        self.problem = None;
        if let Err(e) = write_record(&self.settings.keys.state_dir, &self.record) {
            tracing::warn!(error = %e, "cannot keep a copy of the rotation record in the state directory");
        }
        true
    }

    fn wait_false(&mut self, problem: String) -> bool {
        self.wait(problem);
        false
    }

    fn wait(&mut self, problem: String) {
        if self.reported.is_new(&problem) {
            tracing::warn!(problem, "not following the shared rotation record yet");
        }
        self.problem = Some(problem);
    }

    /// The idle CA's reload of its cacerts set (the behaviour without a rotation).
    async fn reload_base(&mut self, metrics: &Metrics, now: OffsetDateTime) {
        match reload::changed(
            &self.settings.keys.cacerts_dir,
            &self.base,
            self.settings.keys.allow_root_change,
            now,
        )
        .await
        {
            Ok(None) => {}
            Ok(Some(new)) => {
                // The elected replica takes the new set only once the record names
                // it (the others follow the record).
                let mut record = self.record.clone();
                record.from = hex::encode(new.digest());
                if self.leading() && !self.commit(record, false).await {
                    return;
                }
                self.base = Arc::new(new);
                metrics
                    .cacerts_reloads
                    .with_label_values(&["success"])
                    .inc();
                self.reported.clear();
            }
            Err(e) => {
                metrics
                    .cacerts_reloads
                    .with_label_values(&["failure"])
                    .inc();
                if self.reported.is_new(&e) {
                    tracing::error!(error = %e, "refusing new CA key material; the previous set keeps serving");
                }
            }
        }
    }

    /// Declares the next set when one that differs from the set in use (and from
    /// one just aborted) is in place, whole and valid; refuses it otherwise.
    /// `others_renew_by`: the latest renewal point the other replicas reported.
    async fn declare_if_asked(
        &mut self,
        metrics: &Metrics,
        others_renew_by: i64,
        now: OffsetDateTime,
    ) {
        let Some(dir) = next_dir(&self.settings, &self.base) else {
            return;
        };
        let material = match settled(&dir, &self.base).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                // An emptied next set may be declared again later, even one aborted.
                if (!dir.exists() || load(&dir, &self.base).ok().flatten().is_none())
                    && self.record.declined.is_some()
                {
                    let mut record = self.record.clone();
                    record.declined = None;
                    self.commit(record, false).await;
                    self.problem = None;
                }
                return;
            }
            Err(e) => return self.refuse(&e.to_string(), metrics),
        };
        let digest = hex::encode(material.digest);
        if material.digest == self.base.digest() || self.record.declined.as_ref() == Some(&digest) {
            return;
        }
        if let Some(why) = self.settings.unavailable {
            return self.refuse(
                &format!("{}: a next set is in place, but {why}", dir.display()),
                metrics,
            );
        }
        if let Some(why) = &self.unkept {
            let problem = format!(
                "{}: a next set is in place, but the state directory cannot keep the rotation record and issuance marks ({why}); restart the CA with a writable --state-dir",
                dir.display()
            );
            return self.refuse(&problem, metrics);
        }
        let next = match Signer::new(material, now) {
            Ok(s) => s,
            Err(e) => return self.refuse(&format!("next set: {e}"), metrics),
        };
        let window = Duration::try_from(self.settings.rotation.rotation_window)
            .unwrap_or(Duration::HOUR)
            .max(self.settings.min_window);
        let others = OffsetDateTime::from_unix_timestamp(others_renew_by).unwrap_or(now);
        let first_stage_end = self.rotation.ledger().renew_by(now).max(others);
        let must_last_until = first_stage_end.max(now) + window * 2 + self.settings.default_ttl;
        if let Err(e) = next::check(
            &self.base,
            &next,
            &self.settings.trust_domains,
            must_last_until,
        ) {
            return self.refuse(&format!("next set: {e}"), metrics);
        }
        let (adds_roots, drops_roots) = next::bundle_change(&self.base, &next);
        let declared = self.record.declare(
            Declared {
                to: digest,
                window,
                first_stage_end,
                adds_roots,
                drops_roots,
                next_roots: root_digests(&next),
                slack: Duration::try_from(self.settings.keys.reload_interval * 2)
                    .unwrap_or(Duration::ZERO)
                    + Duration::seconds(5),
            },
            now,
        );
        self.next = Some(Arc::new(next));
        if !self.commit(declared, false).await {
            self.next = None;
            return;
        }
        tracing::info!(
            next = %dir.display(),
            adds_roots,
            drops_roots,
            first_stage_end = %rfc3339(first_stage_end.max(now)),
            window_seconds = window.whole_seconds(),
            "trust change declared: distributing the next roots; lifetimes are capped at the window from now on"
        );
        self.event(Stage::Distribute).await;
        self.problem = None;
        self.reported.clear();
    }

    fn refuse(&mut self, problem: &str, metrics: &Metrics) {
        if self.reported.is_new(&problem) {
            metrics.rotation_refusals.inc();
            tracing::error!(problem, "refusing the next CA set; nothing is distributed");
        }
        self.problem = Some(problem.to_owned());
    }

    /// In `done`: once the cacerts set is the next one (the operator moved it
    /// there; a self-signed root is moved here), that set alone is the CA's again.
    async fn adopt_if_promoted(&mut self, now: OffsetDateTime) {
        let Some(next) = self.next.clone() else {
            return;
        };
        if matches!(self.base.source(), Source::SelfSigned(_))
            && let Err(e) = promote_self_signed(&self.settings.keys.state_dir)
        {
            self.problem = Some(format!(
                "cannot move the renewed self-signed root in place: {e}"
            ));
            return;
        }
        if let Ok(Some(m)) = in_place(&self.settings, &self.base)
            && m.digest == next.digest()
        {
            // The signer of the set in place: the same key material, read from
            // where it now lives, so later reloads compare against it.
            let base = Signer::new(m, now).map(Arc::new).unwrap_or(next);
            if self
                .commit(Record::idle(hex::encode(base.digest()), now), false)
                .await
            {
                tracing::info!(source = %base.source(), "trust change complete: the next set is now the CA's key material");
                self.base = base;
                self.next = None;
                self.problem = None;
                self.event(Stage::Idle).await;
            }
        }
    }

    /// During a rotation the sets on disk must stay as declared: changes are
    /// reported (once) and not followed.
    fn check_sets_unchanged(&mut self, metrics: &Metrics) {
        let base_now = in_place(&self.settings, &self.base);
        let next_now = next_dir(&self.settings, &self.base).map(|d| (load(&d, &self.base), d));
        let base_changed = matches!(&base_now, Ok(Some(m)) if m.digest != self.base.digest());
        let next_changed = match (&next_now, &self.next) {
            (Some((Ok(Some(m)), _)), Some(n)) => m.digest != n.digest(),
            _ => false,
        };
        if base_changed || next_changed {
            let which = if base_changed {
                self.settings.keys.cacerts_dir.display().to_string()
            } else {
                next_now
                    .map(|(_, d)| d.display().to_string())
                    .unwrap_or_default()
            };
            self.refuse(
                &format!(
                    "{which} changed while a rotation is in stage {}; the change is not followed (the rotation goes on with the sets it declared; abort it first to change them)",
                    self.record.stage
                ),
                metrics,
            );
        } else if self
            .problem
            .as_deref()
            .is_some_and(|p| p.contains("changed while a rotation is in stage"))
        {
            // Only its own report goes (an abort refusal stays shown).
            self.problem = None;
            self.reported.clear();
        }
    }

    fn abort_file_present(&self) -> bool {
        let path = self.settings.keys.state_dir.join(ABORT_FILE);
        if !path.exists() {
            return false;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot remove the abort request; it is not acted on");
                false
            }
        }
    }

    async fn abort(&mut self, now: OffsetDateTime) {
        let blocked = match &self.settings.peers {
            Some(peers) => match peers.read().await {
                Ok(read) => shared::abort_blocked(&self.record, &read),
                Err(e) => Some(format!("the other clusters cannot be read ({e})")),
            },
            None => None,
        };
        let verdict = match blocked {
            Some(why) => Err(why),
            None => stage::abort(self.record.stage).map_err(str::to_owned),
        };
        match verdict {
            Ok(to) => {
                tracing::warn!(stage = %self.record.stage, "trust change aborted by the operator: returning to the old chain");
                self.enter(to, true, now).await;
            }
            Err(why) => {
                tracing::warn!(stage = %self.record.stage, why = %why, "abort refused");
                self.problem = Some(format!("abort refused: {why}"));
                // The request is answered: cleared from the shared record too.
                if self.settings.shared.is_some() {
                    let record = self.record.clone();
                    self.commit(record, true).await;
                }
            }
        }
    }

    /// Moves the record to `stage` (back to idle when a rotation ends aborted).
    async fn enter(&mut self, stage: Stage, aborted: bool, now: OffsetDateTime) {
        let previous = self.record.clone();
        let record = if stage == Stage::Idle {
            let mut idle = Record::idle(previous.from.clone(), now);
            idle.declined = Some(previous.to.clone());
            idle
        } else {
            previous.enter(stage, now)
        };
        if self.commit(record, aborted).await {
            tracing::info!(stage = %stage, previous = %previous.stage, "trust change: stage entered");
            if stage == Stage::Idle {
                self.next = None;
            }
            self.event(stage).await;
        }
    }

    /// Writes `record` where it lives (the state directory; in cluster mode the
    /// shared record first) and only then takes it: nothing moves on without the
    /// record written, so a restart or a new leader never goes back to a stage
    /// whose bundle was already withdrawn.
    async fn commit(&mut self, record: Record, aborted: bool) -> bool {
        if let Some(shared) = &self.settings.shared
            && let Err(e) = shared.write(&record, aborted).await
        {
            tracing::error!(error = %e, stage = %self.record.stage, "cannot write the shared rotation record; staying in the stage");
            return false;
        }
        if let Err(e) = write_record(&self.settings.keys.state_dir, &record) {
            if self.settings.shared.is_none() {
                tracing::error!(error = %e, stage = %self.record.stage, "cannot save the rotation record; staying in the stage");
                return false;
            }
            tracing::warn!(error = %e, "cannot keep a copy of the rotation record in the state directory");
        }
        self.rotation
            .set_stage(record.stage, record.window(), &record.next_roots);
        self.record = record;
        true
    }

    async fn event(&self, stage: Stage) {
        let Some(shared) = &self.settings.shared else {
            return;
        };
        let note = match stage {
            Stage::Distribute => format!(
                "next CA set {} declared: every bundle now holds the old and new roots",
                short(&self.record.to)
            ),
            Stage::Switch => "every consumer holds both roots: the new chain signs".into(),
            Stage::Retire => "no certificate of the old chain can be in use: the old roots leave the bundles".into(),
            Stage::Done => "the bundles hold the new roots alone; make the next set the cacerts Secret, then remove the next one".into(),
            Stage::Aborting => "aborted: the old chain signs again; the new roots stay until no certificate of the new chain can be in use".into(),
            Stage::Idle => format!("the set {} alone signs and is the bundle", short(&self.record.from)),
        };
        if let Err(e) = shared.event(stage, note).await {
            tracing::warn!(error = %e, "cannot record the stage change as an Event");
        }
    }

    /// Publishes the signer of the stage when what it is composed from changed.
    fn publish(
        &mut self,
        signer_tx: &watch::Sender<Arc<Signer>>,
        tls: &TlsState,
        metrics: &Metrics,
        now: OffsetDateTime,
    ) {
        let wanted = key(self.record.stage, &self.base, self.next.as_ref());
        if wanted == self.composed {
            return;
        }
        let signer = match compose(self.record.stage, &self.base, self.next.as_ref(), now) {
            Ok(s) => s,
            Err(e) => {
                if self.reported.is_new(&e) {
                    tracing::error!(error = %e, stage = %self.record.stage, "cannot compose the signer of this stage; retrying");
                }
                return;
            }
        };
        if let Err(e) = tls.refresh(&signer, now) {
            if self.reported.is_new(&e) {
                tracing::error!(error = %e, "cannot issue the serving certificate of this stage; retrying");
            }
            return;
        }
        tracing::info!(
            source = %signer.source(),
            key = %signer.key_kind(),
            roots = signer.roots().len(),
            stage = %self.record.stage,
            signing_cert_expires = %rfc3339(signer.signing_not_after()),
            "new CA key material loaded; it signs every request from now on"
        );
        metrics.set_expiries(signer.root_not_after(), signer.signing_not_after());
        self.published = signer.clone();
        self.composed = wanted;
        signer_tx.send_replace(signer);
    }

    /// Whether every consumer holds the published bundle: the trust file written
    /// (and read back), and in cluster mode the writers' objects read back.
    async fn gather(&mut self, now: OffsetDateTime) {
        let file = self.write_root_file();
        let bundle = self.published.roots_pem().to_owned();
        let t = now.unix_timestamp();
        if let Some(shared) = &self.settings.shared
            && matches!(self.record.stage, Stage::Distribute | Stage::Retire)
            && (self.readback.1 != bundle
                || t - self.readback.0 >= if self.lagging.is_empty() { 30 } else { 5 })
        {
            // Listing every root ConfigMap is not free: while some lag, every 5 s;
            // once all hold the bundle, every 30 s to see it stays so.
            self.lagging = match shared.lagging(&bundle).await {
                Ok(lagging) => lagging,
                Err(e) => vec![format!("(cannot read back: {e})")],
            };
            self.readback = (t, bundle);
        } else if self.settings.shared.is_none()
            || !matches!(self.record.stage, Stage::Distribute | Stage::Retire)
        {
            self.lagging.clear();
        }
        self.converged = file && self.lagging.is_empty();
    }

    /// Keeps `--root-cert-file` holding the published bundle; whether it reads back so.
    fn write_root_file(&mut self) -> bool {
        let Some(path) = &self.settings.rotation.root_cert_file else {
            return true;
        };
        let want = self.published.roots_pem().as_bytes();
        if std::fs::read(path).is_ok_and(|have| have == want) {
            return true;
        }
        if let Err(e) = signet_fs::write_atomic(path, want, 0o644)
            && self.reported.is_new(&e)
        {
            tracing::error!(path = %path.display(), error = %e, "cannot write the trust bundle file");
        }
        std::fs::read(path).is_ok_and(|have| have == want)
    }

    fn own_pending(&self, now: OffsetDateTime) -> Pending {
        let new = self.next.as_deref().map(chain_id).unwrap_or_default();
        self.rotation
            .ledger()
            .pending(&self.record, chain_id(&self.base), new, now)
    }

    /// In cluster mode, this replica's marks and count, written when they change
    /// (and during a rotation every 10 s, so the elected replica can tell it is
    /// alive).
    async fn report(&mut self, now: OffsetDateTime) {
        let Some(shared) = self.settings.shared.clone() else {
            return;
        };
        let mut own = self.own_pending(now);
        if self.record.stage == Stage::Idle {
            own.serving = Serving::default();
        }
        let report = Report {
            marks: self.rotation.ledger().marks(),
            stage: self.record.stage,
            since: self.record.since,
            pending: own.count,
            late: own.late,
            serving: own.serving,
            complete: own.complete,
            sample: own.sample,
            at: now.unix_timestamp(),
        };
        // Idle, a report matters only for its marks (read at a declaration): written
        // when it changes. During a rotation its age says the replica is alive.
        let idle = matches!(self.record.stage, Stage::Idle | Stage::Done);
        let same = self.last_report.as_ref().is_some_and(|last| {
            Report {
                at: report.at,
                ..last.clone()
            } == report
                && (idle || report.at - last.at < 10)
        });
        if same {
            return;
        }
        match shared.report(shared.replica(), &report).await {
            Ok(()) => self.last_report = Some(report),
            Err(e) => {
                if self.reported.is_new(&e) {
                    tracing::warn!(error = %e, "cannot write this replica's rotation report");
                }
            }
        }
    }

    fn show(&self, now: OffsetDateTime) {
        let r = &self.record;
        let pending = self.pending.clone();
        let active = !matches!(r.stage, Stage::Idle | Stage::Done);
        let waiting_for = match r.stage {
            Stage::Idle => match &self.settings.unavailable {
                Some(why) => format!("nothing: no rotation under way ({why})"),
                None => "nothing: no rotation under way (put the next set in --next-cacerts-dir to declare one)".into(),
            },
            Stage::Distribute if r.adds_roots => format!(
                "consumers to hold the old and new roots, and every holder of a certificate to have the new roots: renewed since the declaration with them (signet-agents: and said they serve them), or due to renew ({} pending)",
                pending.count
            ),
            Stage::Distribute => "consumers to hold the bundle (the next set adds no root)".into(),
            Stage::Switch if r.drops_roots => format!(
                "no certificate of the old chain to be in use ({} pending)",
                pending.count
            ),
            Stage::Switch => "nothing (the next set drops no root)".into(),
            Stage::Retire => "consumers to hold the new roots alone".into(),
            Stage::Done => {
                "the operator to make the next set the CA's key material (cacerts), then to remove the next set"
                    .into()
            }
            Stage::Aborting => format!(
                "no certificate of the new chain to be in use ({} pending)",
                pending.count
            ),
        };
        let at = |s: i64| rfc3339(OffsetDateTime::from_unix_timestamp(s).unwrap_or(now));
        self.rotation.show(Status {
            stage: r.stage,
            since: at(r.since),
            seconds_in_stage: now.unix_timestamp() - r.since,
            declared_at: (r.stage != Stage::Idle).then(|| at(r.declared_at)),
            from: r.from.clone(),
            to: (r.stage != Stage::Idle).then(|| r.to.clone()),
            signing: format!(
                "{} (valid until {})",
                next::signing_cert_file(self.published.source()).display(),
                rfc3339(self.published.signing_not_after())
            ),
            roots: self.published.roots().len(),
            window_seconds: r.window_secs,
            waiting_for,
            pending: if active { pending.count } else { 0 },
            complete: pending.complete,
            late: if active { pending.late } else { 0 },
            pending_sample: if active { pending.sample } else { Vec::new() },
            consumers_converged: self.converged,
            lagging: self
                .lagging
                .iter()
                .chain(&self.peer_notes)
                .take(10)
                .cloned()
                .collect(),
            role: self.settings.shared.as_ref().map(|s| {
                let role = if self.leading() {
                    "elected"
                } else {
                    "following"
                };
                format!("{role} ({}, {})", s.replica(), s.place())
            }),
            expected_end: r.latest_end().map(rfc3339),
            problem: self.problem.clone().or_else(|| {
                self.unkept.as_ref().map(|why| {
                    format!("the state directory cannot keep the rotation record and issuance marks ({why}); no trust change is declared until the CA restarts with a writable --state-dir")
                })
            }),
            history: r.history.iter().map(|c| (c.stage, at(c.at))).collect(),
            serving: if r.stage == Stage::Idle {
                Serving::default()
            } else {
                pending.serving
            },
        });
    }

    fn metrics(&self, metrics: &Metrics, now: OffsetDateTime) {
        for s in Stage::ALL {
            metrics
                .rotation_stage
                .with_label_values(&[s.name()])
                .set(i64::from(s == self.record.stage));
        }
        metrics
            .rotation_stage_seconds
            .set((now.unix_timestamp() - self.record.since) as f64);
        let status = self.rotation.status();
        metrics.rotation_pending.set(status.pending as i64);
        metrics.rotation_converged.set(i64::from(self.converged));
    }
}

/// What else an operator can do when the sets on disk are not the record's.
fn way_out(stage: Stage) -> &'static str {
    match stage {
        Stage::Retire | Stage::Done => {
            "the bundles already hold the new roots alone, so do not leave the driven rotation now (the old set would sign again, untrusted): put the next set in the cacerts directory too, and the CA is idle on it"
        }
        _ => {
            "or remove this file (and, in a cluster, the ConfigMap signet-ca-rotation) to leave the driven rotation and follow the manual steps of docs/root-rotation.md"
        }
    }
}

/// The record to start from and the next set it names, checked against the sets on
/// disk: `saved` (none: idle on `base`).
fn resolve(
    saved: Option<Record>,
    settings: &Settings,
    base: &Arc<Signer>,
    now: OffsetDateTime,
) -> Result<(Record, Option<Arc<Signer>>), DriverError> {
    let base_digest = hex::encode(base.digest());
    let record_path = settings
        .keys
        .state_dir
        .join(RECORD_FILE)
        .display()
        .to_string();
    let disagree = |problem: String| DriverError::Record {
        path: record_path.clone(),
        problem,
    };
    let r = match saved {
        None => return Ok((Record::idle(base_digest, now), None)),
        Some(r) if r.stage == Stage::Idle => {
            return Ok((
                Record {
                    from: base_digest,
                    ..r
                },
                None,
            ));
        }
        Some(r) if r.stage == Stage::Done && r.to == base_digest => {
            return Ok((Record::idle(base_digest, now), None));
        }
        Some(r) => r,
    };
    if r.from != base_digest {
        return Err(disagree(format!(
            "the rotation is in stage {} from the set {}, but the CA key material now is {}; put back the set it started from; {}",
            r.stage,
            short(&r.from),
            short(&base_digest),
            way_out(r.stage)
        )));
    }
    let dir = next_dir(settings, base).ok_or_else(|| {
        disagree(format!(
            "the rotation is in stage {} but no next set is configured (--next-cacerts-dir)",
            r.stage
        ))
    })?;
    let material = load(&dir, base)?.ok_or_else(|| {
        disagree(format!(
            "the rotation is in stage {} to the set {}, but {} holds no key material; put it back; {}",
            r.stage,
            short(&r.to),
            dir.display(),
            way_out(r.stage)
        ))
    })?;
    if hex::encode(material.digest) != r.to {
        return Err(disagree(format!(
            "the rotation is in stage {} to the set {}, but {} now holds {}; put back the set it declared; {}",
            r.stage,
            short(&r.to),
            dir.display(),
            short(&hex::encode(material.digest)),
            way_out(r.stage)
        )));
    }
    let next = Arc::new(Signer::new(material, now)?);
    Ok((r, Some(next)))
}
