//! The task that owns the CA's key material while it serves: it reads the cacerts
//! set (reloading it when idle, as before) and the declared next set, advances the
//! trust change when the evidence is in, persists the stage before acting on it,
//! and publishes the signer each stage calls for: the set that signs, with the
//! bundle of the stage.
//!
//! The stage lives in `<state-dir>/rotation.json`; a restart reads it and goes on
//! from there (the sets on disk must still be the ones it names).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use signet_fs::watch::{Poll, Reported};
use signet_spiffe::TrustDomains;
use time::{Duration, OffsetDateTime};
use tokio::sync::watch;

use super::{
    Rotation, chain_id,
    flags::RotationArgs,
    ledger::{Ledger, LedgerError},
    next, rfc3339,
    stage::{self, Declared, Evidence, Record, Stage},
    status::Status,
};
use crate::{
    keys::{
        cacerts::{self, CaCertsError, KeyMaterial, Source},
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
    problem: Option<String>,
    reported: Reported,
}

impl Driver {
    /// Reads the stage record, the sets it names and the issuance marks; the
    /// signer to start with is [`Self::published`].
    pub fn start(settings: Settings, now: OffsetDateTime) -> Result<Self, DriverError> {
        let state_dir = settings.keys.state_dir.clone();
        let saved = read_record(&state_dir)?;
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
        let base_digest = hex::encode(base.digest());
        let record_path = state_dir.join(RECORD_FILE).display().to_string();
        let disagree = |problem: String| DriverError::Record {
            path: record_path.clone(),
            problem,
        };
        let mut next = None;
        let record = match saved {
            None => Record::idle(base_digest, now),
            Some(r) if r.stage == Stage::Idle => Record {
                from: base_digest,
                ..r
            },
            Some(r) if r.stage == Stage::Done && r.to == base_digest => {
                Record::idle(base_digest, now)
            }
            Some(r) => {
                if r.from != base_digest {
                    return Err(disagree(format!(
                        "the rotation is in stage {} from the set {}, but the CA key material now is {}; put back the set it started from, or remove this file to leave the driven rotation (then follow the manual steps of docs/root-rotation.md)",
                        r.stage,
                        short(&r.from),
                        short(&base_digest)
                    )));
                }
                let dir = next_dir(&settings, &base).ok_or_else(|| {
                    disagree(format!(
                        "the rotation is in stage {} but no next set is configured (--next-cacerts-dir)",
                        r.stage
                    ))
                })?;
                let material = load(&dir, &base)?.ok_or_else(|| {
                    disagree(format!(
                        "the rotation is in stage {} to the set {}, but {} holds no key material; put it back, or remove this file to leave the driven rotation",
                        r.stage,
                        short(&r.to),
                        dir.display()
                    ))
                })?;
                if hex::encode(material.digest) != r.to {
                    return Err(disagree(format!(
                        "the rotation is in stage {} to the set {}, but {} now holds {}; put back the set it declared, or remove this file to leave the driven rotation",
                        r.stage,
                        short(&r.to),
                        dir.display(),
                        short(&hex::encode(material.digest))
                    )));
                }
                next = Some(Arc::new(Signer::new(material, now)?));
                r
            }
        };
        let ledger = Ledger::open(Some(&state_dir), settings.default_ttl, now)?;
        let rotation = Arc::new(Rotation::new(ledger));
        let published = compose(record.stage, &base, next.as_ref(), now)?;
        let composed = key(record.stage, &base, next.as_ref());
        let mut driver = Self {
            settings,
            rotation,
            record,
            base,
            next,
            published,
            composed,
            converged: false,
            problem: None,
            reported: Reported::default(),
        };
        driver.save()?;
        driver.write_root_file();
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

    async fn tick(
        &mut self,
        signer_tx: &watch::Sender<Arc<Signer>>,
        tls: &TlsState,
        metrics: &Metrics,
    ) {
        let now = OffsetDateTime::now_utc();
        self.abort_if_asked(now);
        match self.record.stage {
            Stage::Idle => {
                self.reload_base(metrics, now).await;
                self.declare_if_asked(metrics, now).await;
            }
            Stage::Done => self.adopt_if_promoted(now),
            _ => self.check_sets_unchanged(metrics),
        }
        self.publish(signer_tx, tls, metrics, now);
        self.converged = self.write_root_file();
        let before = self.record.stage;
        if let Some(to) = stage::advance(&self.record, &self.evidence(now), now) {
            self.enter(to, now);
            self.publish(signer_tx, tls, metrics, now);
            self.converged = self.write_root_file();
        }
        if self.record.stage != before {
            tracing::info!(stage = %self.record.stage, previous = %before, "trust change: stage entered");
        }
        self.show(now);
        self.metrics(metrics, now);
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
                self.base = Arc::new(new);
                self.record.from = hex::encode(self.base.digest());
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
    async fn declare_if_asked(&mut self, metrics: &Metrics, now: OffsetDateTime) {
        let Some(dir) = next_dir(&self.settings, &self.base) else {
            return;
        };
        let material = match settled(&dir, &self.base).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                // An emptied next set may be declared again later, even one aborted.
                if !dir.exists() || load(&dir, &self.base).ok().flatten().is_none() {
                    self.record.declined = None;
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
        let next = match Signer::new(material, now) {
            Ok(s) => s,
            Err(e) => return self.refuse(&format!("next set: {e}"), metrics),
        };
        let window =
            Duration::try_from(self.settings.rotation.rotation_window).unwrap_or(Duration::HOUR);
        let first_stage_end = self.rotation.ledger().renew_by(now);
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
            },
            now,
        );
        tracing::info!(
            next = %next.source(),
            adds_roots,
            drops_roots,
            first_stage_end = %rfc3339(first_stage_end.max(now)),
            window = %humantime::format_duration(self.settings.rotation.rotation_window),
            "trust change declared: distributing the next roots; lifetimes are capped at the window from now on"
        );
        self.problem = None;
        self.reported.clear();
        self.next = Some(Arc::new(next));
        self.record = declared;
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
    fn adopt_if_promoted(&mut self, now: OffsetDateTime) {
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
        let in_place = match self.base.source() {
            Source::SelfSigned(dir) => cacerts::load_self_signed(dir),
            _ => cacerts::load_dir(&self.settings.keys.cacerts_dir),
        };
        if let Ok(Some(m)) = in_place
            && m.digest == next.digest()
        {
            tracing::info!(source = %next.source(), "trust change complete: the next set is now the CA's key material");
            // The signer of the set in place: the same key material, read from
            // where it now lives, so later reloads compare against it.
            match Signer::new(m, now) {
                Ok(s) => self.base = Arc::new(s),
                Err(_) => self.base = next,
            }
            self.next = None;
            self.record = Record::idle(hex::encode(self.base.digest()), now);
            self.problem = None;
        }
    }

    /// During a rotation the sets on disk must stay as declared: changes are
    /// reported (once) and not followed.
    fn check_sets_unchanged(&mut self, metrics: &Metrics) {
        let base_now = match self.base.source() {
            Source::SelfSigned(dir) => cacerts::load_self_signed(dir),
            _ => cacerts::load_dir(&self.settings.keys.cacerts_dir),
        };
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
        } else if self.problem.is_some() {
            self.problem = None;
            self.reported.clear();
        }
    }

    fn abort_if_asked(&mut self, now: OffsetDateTime) {
        let path = self.settings.keys.state_dir.join(ABORT_FILE);
        if !path.exists() {
            return;
        }
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::error!(path = %path.display(), error = %e, "cannot remove the abort request; it is not acted on");
            return;
        }
        match stage::abort(self.record.stage) {
            Ok(to) => {
                tracing::warn!(stage = %self.record.stage, "trust change aborted by the operator: returning to the old chain");
                self.enter(to, now);
            }
            Err(why) => {
                tracing::warn!(stage = %self.record.stage, why, "abort refused");
                self.problem = Some(format!("abort refused: {why}"));
            }
        }
    }

    /// Moves the record to `stage` (back to idle when a rotation ends aborted).
    fn enter(&mut self, stage: Stage, now: OffsetDateTime) {
        let previous = self.record.clone();
        self.record = if stage == Stage::Idle {
            let mut idle = Record::idle(previous.from.clone(), now);
            idle.declined = Some(previous.to.clone());
            idle
        } else {
            previous.enter(stage, now)
        };
        match self.save() {
            Ok(()) if stage == Stage::Idle => self.next = None,
            Ok(()) => {}
            Err(e) => {
                // Nothing moves on without the record on disk: a restart must not
                // go back to a stage whose bundle was already withdrawn.
                tracing::error!(error = %e, stage = %previous.stage, "cannot save the rotation stage; staying in it");
                self.record = previous;
            }
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
        if self.save().is_err() {
            return;
        }
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

    fn evidence(&self, now: OffsetDateTime) -> Evidence {
        let pending = self.pending(now);
        Evidence {
            pending: pending.count,
            complete: pending.complete,
            consumers_converged: self.converged,
            peers_distributed: true,
        }
    }

    fn pending(&self, now: OffsetDateTime) -> super::ledger::Pending {
        let new = self.next.as_deref().map(chain_id).unwrap_or_default();
        self.rotation
            .ledger()
            .pending(&self.record, chain_id(&self.base), new, now)
    }

    fn save(&self) -> Result<(), DriverError> {
        let path = self.settings.keys.state_dir.join(RECORD_FILE);
        if read_record(&self.settings.keys.state_dir)
            .ok()
            .flatten()
            .as_ref()
            == Some(&self.record)
        {
            return Ok(());
        }
        let err = |problem: String| DriverError::Record {
            path: path.display().to_string(),
            problem,
        };
        let json = serde_json::to_vec_pretty(&self.record).map_err(|e| err(e.to_string()))?;
        std::fs::create_dir_all(&self.settings.keys.state_dir).map_err(|e| err(e.to_string()))?;
        signet_fs::write_atomic(&path, &json, 0o600).map_err(|e| err(e.to_string()))
    }

    fn show(&self, now: OffsetDateTime) {
        let r = &self.record;
        let pending = self.pending(now);
        let active = !matches!(r.stage, Stage::Idle | Stage::Done);
        let waiting_for = match r.stage {
            Stage::Idle => match &self.settings.unavailable {
                Some(why) => format!("nothing: no rotation under way ({why})"),
                None => "nothing: no rotation under way (put the next set in --next-cacerts-dir to declare one)".into(),
            },
            Stage::Distribute if r.adds_roots => format!(
                "consumers to hold the old and new roots, and every holder of a certificate issued before the declaration to renew ({} pending)",
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
        self.rotation.show(
            r.stage,
            r.window(),
            Status {
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
                pending_sample: if active { pending.sample } else { Vec::new() },
                consumers_converged: self.converged,
                expected_end: r.latest_end().map(rfc3339),
                problem: self.problem.clone(),
                history: r.history.iter().map(|c| (c.stage, at(c.at))).collect(),
            },
        );
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

/// What the published signer is made of.
fn key(
    stage: Stage,
    base: &Signer,
    next: Option<&Arc<Signer>>,
) -> (Stage, [u8; 32], Option<[u8; 32]>) {
    (stage, base.digest(), next.map(|n| n.digest()))
}

/// The signer of `stage`: the set that signs, with the union bundle while both
/// roots are distributed.
fn compose(
    stage: Stage,
    base: &Arc<Signer>,
    next: Option<&Arc<Signer>>,
    now: OffsetDateTime,
) -> Result<Arc<Signer>, DriverError> {
    let Some(next) = next else {
        return Ok(base.clone());
    };
    let (signs, other) = if stage.signs_with_next() {
        (next, base)
    } else {
        (base, next)
    };
    if !stage.bundles_both() {
        return Ok(signs.clone());
    }
    let mut material = reread(signs)?;
    material.add_roots(other.roots());
    Ok(Arc::new(Signer::new(material, now)?))
}

/// The key material of `signer`, read again from where it came from (and checked to
/// be the same).
fn reread(signer: &Signer) -> Result<KeyMaterial, DriverError> {
    let material = match signer.source() {
        Source::SelfSigned(dir) => cacerts::load_self_signed(dir)?,
        Source::Istio(dir) | Source::CertManager(dir) => cacerts::load_dir(dir)?,
    };
    let path = next::signing_cert_file(signer.source())
        .display()
        .to_string();
    match material {
        Some(m) if m.digest == signer.digest() => Ok(m),
        _ => Err(DriverError::Record {
            path,
            problem: "changed or vanished while the signer of the next stage was being made; the sets must stay as declared during a rotation".into(),
        }),
    }
}

/// Where the next set is looked for: `--next-cacerts-dir`, or for a self-signed
/// CA, `<state-dir>/next`.
fn next_dir(settings: &Settings, base: &Signer) -> Option<PathBuf> {
    match (&settings.rotation.next_cacerts_dir, base.source()) {
        (Some(dir), _) => Some(dir.clone()),
        (None, Source::SelfSigned(dir)) => Some(dir.join(SELF_SIGNED_NEXT)),
        (None, _) => None,
    }
}

/// The set in `dir`: the cacerts layouts, or a self-signed root for a self-signed
/// CA's `<state-dir>/next`.
fn load(dir: &Path, base: &Signer) -> Result<Option<KeyMaterial>, CaCertsError> {
    match base.source() {
        Source::SelfSigned(state) if dir == state.join(SELF_SIGNED_NEXT) => {
            cacerts::load_self_signed(dir)
        }
        _ => cacerts::load_dir(dir),
    }
}

/// The set in `dir` when two reads a moment apart agree (Kubernetes swaps a Secret
/// mount atomically, but reading four files is not).
async fn settled(dir: &Path, base: &Signer) -> Result<Option<KeyMaterial>, CaCertsError> {
    let Some(first) = load(dir, base)? else {
        return Ok(None);
    };
    if first.digest == base.digest() {
        return Ok(Some(first));
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    Ok(load(dir, base)?.filter(|second| second.digest == first.digest))
}

fn read_record(state_dir: &Path) -> Result<Option<Record>, DriverError> {
    let path = state_dir.join(RECORD_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| DriverError::Record {
                path: path.display().to_string(),
                problem: format!("not a rotation record Signet wrote: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DriverError::Record {
            path: path.display().to_string(),
            problem: e.to_string(),
        }),
    }
}

/// Moves a renewed self-signed root from `<state-dir>/next` in place: key first, so
/// that a crash in between leaves the certificate to move on the next start.
fn promote_self_signed(state_dir: &Path) -> std::io::Result<()> {
    let next = state_dir.join(SELF_SIGNED_NEXT);
    for name in [cacerts::SELF_SIGNED_KEY, cacerts::SELF_SIGNED_CERT] {
        let from = next.join(name);
        if from.exists() {
            std::fs::rename(&from, state_dir.join(name))?;
        }
    }
    if next.exists() {
        let _ = std::fs::remove_dir(&next);
    }
    Ok(())
}

fn short(digest: &str) -> String {
    digest.chars().take(16).collect()
}

/// Writes the abort request a serving CA picks up (`signet-ca rotation abort`).
pub fn request_abort(state_dir: &Path) -> std::io::Result<PathBuf> {
    let path = state_dir.join(ABORT_FILE);
    if !state_dir.join(RECORD_FILE).exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "{} does not exist: is {} the state directory of a CA that rotates?",
                state_dir.join(RECORD_FILE).display(),
                state_dir.display()
            ),
        ));
    }
    signet_fs::write_atomic(&path, b"abort\n", 0o600)?;
    Ok(path)
}

/// Makes a new self-signed root in `<state-dir>/next` (`signet-ca rotation start
/// --self-signed`); the serving CA declares it on its next look.
pub fn start_self_signed(
    state_dir: &Path,
    trust_domain: &str,
    now: OffsetDateTime,
) -> Result<PathBuf, CaCertsError> {
    if cacerts::load_self_signed(state_dir)?.is_none() {
        return Err(CaCertsError::Invalid {
            path: state_dir.join(cacerts::SELF_SIGNED_CERT),
            problem: "there is no self-signed root here to renew (is this the CA's --state-dir?)"
                .into(),
        });
    }
    let dir = state_dir.join(SELF_SIGNED_NEXT);
    if cacerts::load_self_signed(&dir)?.is_some() {
        return Err(CaCertsError::Invalid {
            path: dir,
            problem: "a next root is already there; remove it first to make another".into(),
        });
    }
    cacerts::create_self_signed_in(&dir, trust_domain, now)?;
    Ok(dir)
}
