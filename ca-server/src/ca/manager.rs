//! `CaManager`: CA key rotation driven by the journal, bundle publication,
//! and signing with the active keys.
//!
//! Rotation follows [`sigil_identity::rotation`]: at ½ of the active key's
//! life the next key is made, written to the journal and published in the
//! bundle; at ⅚ it becomes active; a retired key stays in the bundle until
//! it expires. Every step is persisted before the next one, and on start
//! the bundle is rebuilt from the journal and published before any key is
//! used, so no key ever signs before its certificate is in the published
//! bundle.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use sigil_identity::clock::Clock;
use sigil_identity::jwt::{JwtSigner, JwtSvid};
use sigil_identity::rotation::{CaAction, ca_action};
use sigil_identity::{Bundle, DnsName, JwtAuthority, SpiffeId};
use tokio::sync::{Mutex, watch};
use tracing::{info, warn};

use super::csr::public_key_from_csr;
use super::journal::{CaJournal, JwtSlot, Slot, SlotState, X509Slot};
use super::keys::{KeyId, KeyManager};
use super::signing::jwt_signer;
use super::x509::{BACKDATE, IssuedSvid, UpstreamCa, X509Authority};
use super::{CaConfig, CaError};
use crate::datastore::{BundleEdit, Change, Changed, Datastore, IssuanceRecord};
use crate::registry::ChangeListener;

/// The CA as the rest of the server uses it.
pub struct CaManager {
    config: CaConfig,
    store: Arc<dyn Datastore>,
    keys: Arc<dyn KeyManager>,
    clock: Arc<dyn Clock>,
    upstream: Option<UpstreamCa>,
    /// Serialises rotation steps; holds the journal as last persisted.
    journal: Mutex<CaJournal>,
    x509: RwLock<Option<Arc<X509Authority>>>,
    jwt: RwLock<Option<Arc<JwtSigner>>>,
    bundle: watch::Sender<Arc<Bundle>>,
    /// Records of X509-SVIDs issued and not yet stored (see
    /// [`CaManager::take_issued`]).
    issued: std::sync::Mutex<Vec<IssuanceRecord>>,
    /// Woken when `issued` gets a record.
    issued_wake: tokio::sync::Notify,
}

impl std::fmt::Debug for CaManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaManager")
            .field("trust_domain", &self.config.trust_domain)
            .finish_non_exhaustive()
    }
}

/// What one rotation pass changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RotationReport {
    pub prepared: usize,
    pub activated: usize,
    pub pruned: usize,
}

impl RotationReport {
    fn any(&self) -> bool {
        self.prepared + self.activated + self.pruned > 0
    }
}

/// The plan for one slot list at `now`.
fn plan<S: Slot>(slots: &[S], now: SystemTime) -> CaAction {
    let prepared = slots.iter().any(|s| s.state() == SlotState::Prepared);
    match slots.iter().find(|s| s.state() == SlotState::Active) {
        Some(active) => {
            let (nb, na) = active.validity();
            if now >= na {
                // Asleep past the active key's expiry: move on at once.
                if prepared {
                    CaAction::Activate
                } else {
                    CaAction::Prepare
                }
            } else {
                ca_action(now, nb, na, prepared)
            }
        }
        None if prepared => CaAction::Activate,
        None => CaAction::Prepare,
    }
}

/// Loads every live slot's key with `load`, installing the active one in
/// `active`; a slot whose key cannot be loaded is retired. Returns whether
/// any slot changed.
fn load_slots<S: Slot, T>(
    slots: &mut [S],
    load: impl Fn(&S) -> Result<T, CaError>,
    active: &RwLock<Option<Arc<T>>>,
    kind: &str,
) -> bool {
    let mut changed = false;
    for slot in slots.iter_mut().filter(|s| s.state().is_live()) {
        match load(slot) {
            Ok(signer) if slot.state() == SlotState::Active => {
                *active.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(signer));
            }
            Ok(_) => {}
            Err(e) => {
                warn!(key_id = %slot.key_id(), state = ?slot.state(), kind, error = %e, "CA key unusable; retiring it");
                slot.set_state(SlotState::Retired);
                changed = true;
            }
        }
    }
    changed
}

/// Marks the prepared slot active and the active one retired.
fn activate<S: Slot>(slots: &mut [S]) {
    for s in slots.iter_mut() {
        match s.state() {
            SlotState::Active => s.set_state(SlotState::Retired),
            SlotState::Prepared => s.set_state(SlotState::Active),
            SlotState::Retired | SlotState::Tainted | SlotState::Revoked => {}
        }
    }
}

/// What a publication removes from the bundle: this replica's expired
/// authorities.
#[derive(Debug, Default)]
struct Gone {
    /// CA certificates, DER.
    x509: Vec<Vec<u8>>,
    /// JWT key ids.
    jwt: Vec<String>,
}

/// Whether `s` no longer signs and has expired at `now`: retired, tainted
/// and revoked slots leave the journal (and the bundle) then.
fn is_expired_old<S: Slot>(s: &S, now: SystemTime) -> bool {
    !s.state().is_live() && s.validity().1 <= now
}

/// The old slots that have expired at `now` (what [`prune`] removes).
fn expired_slots<S: Slot>(slots: &[S], now: SystemTime) -> impl Iterator<Item = &S> {
    slots.iter().filter(move |s| is_expired_old(*s, now))
}

/// Removes retired slots that have expired, returning their key ids.
fn prune<S: Slot>(slots: &mut Vec<S>, now: SystemTime) -> Vec<KeyId> {
    let mut gone = Vec::new();
    slots.retain(|s| {
        let expired = is_expired_old(s, now);
        if expired {
            gone.push(s.key_id().clone());
        }
        !expired
    });
    gone
}

impl CaManager {
    /// Loads the journal, publishes the bundle it implies, loads the active
    /// keys, and performs any rotation that is due (creating the first keys
    /// on a fresh store).
    pub async fn start(
        config: CaConfig,
        store: Arc<dyn Datastore>,
        keys: Arc<dyn KeyManager>,
        clock: Arc<dyn Clock>,
        upstream: Option<UpstreamCa>,
    ) -> Result<Arc<Self>, CaError> {
        let stored = store.fetch_ca_journal(&config.server_id).await?;
        // A journal an older version kept without a server id is read for
        // any id: saved under ours at once, it is no other replica's.
        let adopt = stored.is_some()
            && !store
                .list_ca_journals()
                .await?
                .iter()
                .any(|(id, _)| *id == config.server_id);
        let journal = match stored {
            Some(bytes) => CaJournal::from_bytes(&bytes)?,
            None => CaJournal::default(),
        };
        let initial = store
            .fetch_bundle(&config.trust_domain)
            .await?
            .unwrap_or_else(|| Bundle::new(config.trust_domain.clone()));
        let (bundle, _) = watch::channel(Arc::new(initial));
        let ca = Arc::new(Self {
            config,
            store,
            keys,
            clock,
            upstream,
            journal: Mutex::new(journal),
            x509: RwLock::new(None),
            jwt: RwLock::new(None),
            bundle,
            issued: std::sync::Mutex::new(Vec::new()),
            issued_wake: tokio::sync::Notify::new(),
        });
        {
            let mut journal = ca.journal.lock().await;
            if adopt {
                ca.save(&journal).await?;
                info!(server_id = %ca.config.server_id, "CA journal of the previous version taken over");
            }
            // Publish first: whatever the journal holds is in the bundle
            // before any of it signs.
            ca.publish(&journal, &Gone::default()).await?;
            ca.load_active(&mut journal).await?;
        }
        ca.rotate().await?;
        Ok(ca)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &sigil_identity::TrustDomain {
        &self.config.trust_domain
    }

    /// The configuration.
    pub fn config(&self) -> &CaConfig {
        &self.config
    }

    /// The current bundle of our own trust domain.
    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle.borrow().clone()
    }

    /// A receiver that sees every new bundle.
    pub fn subscribe_bundle(&self) -> watch::Receiver<Arc<Bundle>> {
        self.bundle.subscribe()
    }

    /// A copy of the journal as last persisted.
    pub async fn journal(&self) -> CaJournal {
        self.journal.lock().await.clone()
    }

    /// Persists `journal` as this replica's.
    async fn save(&self, journal: &CaJournal) -> Result<(), CaError> {
        let bytes = journal.to_bytes()?;
        self.store
            .put_ca_journal(&self.config.server_id, bytes)
            .await?;
        Ok(())
    }

    /// Loads the signers of the active slots and checks the prepared ones;
    /// a slot whose key is gone (a memory key manager after restart, a
    /// deleted file) is retired so a new key takes over. Its certificate
    /// stays in the bundle until it expires.
    async fn load_active(&self, journal: &mut CaJournal) -> Result<(), CaError> {
        let x509 = load_slots(&mut journal.x509, |s| self.load_x509(s), &self.x509, "x509");
        let jwt = load_slots(&mut journal.jwt, |s| self.load_jwt(s), &self.jwt, "jwt");
        if x509 || jwt {
            self.save(journal).await?;
        }
        Ok(())
    }

    fn load_x509(&self, slot: &X509Slot) -> Result<X509Authority, CaError> {
        let key = self
            .keys
            .load(&slot.key_id, slot.algorithm)?
            .ok_or_else(|| {
                CaError::Key(super::keys::KeyManagerError::Invalid(format!(
                    "{} is missing",
                    slot.key_id
                )))
            })?;
        X509Authority::load(&slot.cert_der, &key, self.upstream.as_ref())
    }

    fn load_jwt(&self, slot: &JwtSlot) -> Result<JwtSigner, CaError> {
        let key = self
            .keys
            .load(&slot.key_id, slot.algorithm)?
            .ok_or_else(|| {
                CaError::Key(super::keys::KeyManagerError::Invalid(format!(
                    "{} is missing",
                    slot.key_id
                )))
            })?;
        Ok(
            jwt_signer(&slot.kid, &key, slot.not_after)?
                .with_issuer(self.config.jwt_issuer.clone()),
        )
    }

    /// Publishes this replica's authorities: every X.509 and JWT key of
    /// the journal not yet expired is added to the shared bundle, those in
    /// `gone` removed, in one durable read-modify-write (other replicas'
    /// authorities stay). Nothing is written when the bundle already holds
    /// them all.
    async fn publish(&self, journal: &CaJournal, gone: &Gone) -> Result<(), CaError> {
        let now = self.clock.now();
        // Revoked authorities never go back in; tainted ones carry a marker.
        let live_x509 = journal
            .x509
            .iter()
            .filter(|s| s.not_after > now && s.state.is_published());
        let live_jwt = journal
            .jwt
            .iter()
            .filter(|s| s.not_after > now && s.state.is_published());
        let mut edit = BundleEdit {
            add_jwt: live_jwt
                .filter_map(|s| {
                    s.key().map(|public_key| JwtAuthority {
                        kid: s.kid.clone(),
                        public_key,
                    })
                })
                .collect(),
            remove_x509: gone.x509.clone(),
            remove_jwt: gone.jwt.clone(),
            refresh_hint: self.config.refresh_hint,
            ..BundleEdit::default()
        };
        authority::mark_taint(journal, &mut edit);
        match &self.upstream {
            // The upstream roots are the X.509 authorities; the journal's
            // certificates are intermediates that agents get in chains.
            Some(u) => edit.add_x509 = u.roots(),
            None => edit.add_x509 = live_x509.map(|s| s.cert_der.clone()).collect(),
        }
        let mut local = (*self.bundle()).clone();
        if !edit.apply_to(&mut local) {
            return Ok(());
        }
        let td = &self.config.trust_domain;
        let stored = self.store.update_bundle(td, edit).await?;
        info!(
            trust_domain = %stored.trust_domain,
            server_id = %self.config.server_id,
            sequence = stored.sequence,
            x509_authorities = stored.x509_authorities.len(),
            jwt_authorities = stored.jwt_authorities.len(),
            "bundle published"
        );
        self.follow_bundle(stored);
        Ok(())
    }

    /// Takes `bundle` (our trust domain's, as stored) as the current one
    /// unless a newer one is already held: bundle sequences only grow, so
    /// publications and the change feed may arrive in any order.
    fn follow_bundle(&self, bundle: Bundle) {
        self.bundle.send_if_modified(|current| {
            let newer = bundle.sequence > current.sequence;
            if newer {
                *current = Arc::new(bundle);
            }
            newer
        });
    }

    /// Runs every rotation step due at the clock's `now`.
    pub async fn rotate(&self) -> Result<RotationReport, CaError> {
        let mut journal = self.journal.lock().await;
        let mut report = RotationReport::default();
        // Each pass takes at most one step per key kind; a server that slept
        // through several phases catches up in a few passes.
        for _ in 0..4 {
            let now = self.clock.now();
            let step = self.step(&mut journal, now).await?;
            report.prepared += step.prepared;
            report.activated += step.activated;
            report.pruned += step.pruned;
            if !step.any() {
                break;
            }
        }
        Ok(report)
    }

    /// One rotation step at `now`: prepare (and publish) successors that
    /// are due, then activate those that are due, then drop expired keys.
    /// Each change is made on a copy of the journal and adopted only once
    /// it is persisted, so a failed write leaves nothing half-done.
    async fn step(
        &self,
        journal: &mut CaJournal,
        now: SystemTime,
    ) -> Result<RotationReport, CaError> {
        let mut report = RotationReport::default();
        let mut next = journal.clone();
        let mut new_keys = Vec::new();
        if plan(&next.x509, now) == CaAction::Prepare {
            let slot = self.new_x509_slot(now)?;
            new_keys.push(slot.key_id.clone());
            next.x509.push(slot);
            report.prepared += 1;
        }
        if plan(&next.jwt, now) == CaAction::Prepare {
            let slot = self.new_jwt_slot(now)?;
            new_keys.push(slot.key_id.clone());
            next.jwt.push(slot);
            report.prepared += 1;
        }
        if report.prepared > 0 {
            // Journal first, then the bundle: a crash in between is healed by
            // `start`, which publishes what the journal holds. Keys prepared
            // here activate in a later step, after this bundle is durable.
            let persisted = async {
                self.save(&next).await?;
                self.publish(&next, &Gone::default()).await
            }
            .await;
            if let Err(e) = persisted {
                for key_id in &new_keys {
                    let _ = self.keys.delete(key_id);
                }
                return Err(e);
            }
            *journal = next;
            return Ok(report);
        }

        // Activation: only a slot whose certificate (or kid) is already in
        // the published bundle may start signing.
        let bundle = self.bundle();
        let x509_ready = |s: &X509Slot| match &self.upstream {
            Some(_) => true,
            None => bundle.x509_authorities.contains(&s.cert_der),
        };
        let x509_next = match plan(&next.x509, now) {
            CaAction::Activate => next
                .x509
                .iter()
                .find(|s| s.state == SlotState::Prepared && x509_ready(s))
                .map(|s| self.load_x509(s)),
            _ => None,
        };
        let jwt_next = match plan(&next.jwt, now) {
            CaAction::Activate => next
                .jwt
                .iter()
                .find(|s| s.state == SlotState::Prepared && bundle.jwt_authority(&s.kid).is_some())
                .map(|s| self.load_jwt(s)),
            _ => None,
        };
        let x509_next = x509_next.transpose()?.map(Arc::new);
        let jwt_next = jwt_next.transpose()?.map(Arc::new);
        if x509_next.is_some() {
            activate(&mut next.x509);
        }
        if jwt_next.is_some() {
            activate(&mut next.jwt);
        }
        if x509_next.is_some() || jwt_next.is_some() {
            self.save(&next).await?;
            *journal = next.clone();
            if let Some(a) = x509_next {
                *self.x509.write().unwrap_or_else(|p| p.into_inner()) = Some(a);
                info!(kind = "x509", "CA key activated");
                report.activated += 1;
            }
            if let Some(signer) = jwt_next {
                *self.jwt.write().unwrap_or_else(|p| p.into_inner()) = Some(signer);
                info!(kind = "jwt", "JWT key activated");
                report.activated += 1;
            }
        } else if matches!(plan(&next.x509, now), CaAction::Activate)
            || matches!(plan(&next.jwt, now), CaAction::Activate)
        {
            // Due but not yet published (a failed publish earlier): publish now,
            // activate in the next step.
            self.publish(&next, &Gone::default()).await?;
        }

        let expired = Gone {
            x509: expired_slots(&next.x509, now)
                .map(|s| s.cert_der.clone())
                .collect(),
            jwt: expired_slots(&next.jwt, now)
                .map(|s| s.kid.clone())
                .collect(),
        };
        let mut gone = prune(&mut next.x509, now);
        gone.extend(prune(&mut next.jwt, now));
        if !gone.is_empty() {
            // Out of the bundle first: a crash before the journal is saved
            // leaves expired slots that the next pass prunes again (never
            // an authority nobody will remove).
            self.publish(&next, &expired).await?;
            self.save(&next).await?;
            *journal = next.clone();
            for key_id in &gone {
                if let Err(e) = self.keys.delete(key_id) {
                    warn!(key_id = %key_id, error = %e, "could not delete expired CA key");
                }
            }
            info!(
                count = gone.len(),
                "expired CA keys removed from the bundle"
            );
            report.pruned += gone.len();
        }
        Ok(report)
    }

    /// Runs rotation on a timer until `shutdown` resolves.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let period =
            (self.config.ca_ttl / 120).clamp(Duration::from_secs(1), Duration::from_secs(30));
        tokio::pin!(shutdown);
        loop {
            let jitter = 1.0 + 0.1 * sigil_identity::random::jitter_unit();
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(period.mul_f64(jitter)) => {}
            }
            if let Err(e) = self.rotate().await {
                warn!(error = %e, "CA rotation step failed; will retry");
            }
        }
    }

    fn active_x509(&self) -> Result<Arc<X509Authority>, CaError> {
        self.x509
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(CaError::NotReady)
    }

    fn active_jwt(&self) -> Result<Arc<JwtSigner>, CaError> {
        self.jwt
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(CaError::NotReady)
    }

    fn check_member(&self, id: &SpiffeId) -> Result<(), CaError> {
        if id.is_member_of(&self.config.trust_domain) {
            Ok(())
        } else {
            Err(CaError::ForeignId(
                id.to_string(),
                self.config.trust_domain.clone(),
            ))
        }
    }

    /// Issues an X509-SVID for `spiffe_id` from a CSR, taking only the
    /// CSR's public key. `ttl` defaults to the configured SVID TTL.
    pub fn issue_x509_svid(
        &self,
        spiffe_id: &SpiffeId,
        dns_names: &[DnsName],
        ttl: Option<Duration>,
        csr_der: &[u8],
    ) -> Result<IssuedSvid, CaError> {
        self.check_member(spiffe_id)?;
        let key = public_key_from_csr(csr_der)?;
        let ttl = ttl.unwrap_or(self.config.x509_svid_ttl);
        let issued =
            self.active_x509()?
                .issue(spiffe_id, dns_names, ttl, &key, self.clock.now())?;
        self.issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(IssuanceRecord {
                serial: issued.serial.clone(),
                spiffe_id: spiffe_id.clone(),
                issuer: issued.issuer.clone(),
                not_after: issued.expires_at,
            });
        self.issued_wake.notify_one();
        Ok(issued)
    }

    /// Takes the records of X509-SVIDs issued since the last call, for the
    /// datastore (`crate::revocation` writes them in batches).
    pub fn take_issued(&self) -> Vec<IssuanceRecord> {
        std::mem::take(&mut *self.issued.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Returns once an X509-SVID was issued after the last
    /// [`CaManager::take_issued`] (at once if one is waiting).
    pub async fn issued_waiting(&self) {
        self.issued_wake.notified().await;
    }

    /// Every X.509 CA of this replica that has not expired at the clock's
    /// now, with its key and NotAfter: the CAs that sign CRLs. A CA whose
    /// key cannot be loaded is skipped (and logged).
    pub async fn crl_signers(&self) -> Vec<(Vec<u8>, super::keys::CaKey, SystemTime)> {
        let journal = self.journal.lock().await.clone();
        let now = self.clock.now();
        let mut out = Vec::new();
        for slot in journal.x509.iter().filter(|s| s.not_after > now) {
            match self.keys.load(&slot.key_id, slot.algorithm) {
                Ok(Some(key)) => out.push((slot.cert_der.clone(), key, slot.not_after)),
                Ok(None) => {
                    warn!(key_id = %slot.key_id, "CA key is missing; its CRL cannot be signed");
                }
                Err(e) => {
                    warn!(key_id = %slot.key_id, error = %e, "CA key could not be loaded; its CRL cannot be signed");
                }
            }
        }
        out
    }

    /// The clock the CA runs on.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Mints a JWT-SVID; `ttl` defaults to the configured JWT TTL.
    pub fn mint_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Option<Duration>,
    ) -> Result<JwtSvid, CaError> {
        self.check_member(spiffe_id)?;
        let ttl = ttl.unwrap_or(self.config.jwt_svid_ttl);
        let now = self.clock.now();
        let svid = self.active_jwt()?.mint(spiffe_id, audience, ttl, now)?;
        // SPEC: every minted credential passes Sigil's own validator before
        // it leaves the CA (this catches, e.g., a token too long to validate).
        let expected: Vec<&str> = audience.iter().map(String::as_str).collect();
        sigil_identity::jwt::validate(&svid.token, &expected, &*self.bundle(), now)
            .map_err(CaError::JwtSelfCheck)?;
        Ok(svid)
    }
}

/// The CA follows its trust domain's bundle from the change feed: another
/// replica's publication reaches this one's bundle watch (and so its agents).
#[async_trait::async_trait]
impl ChangeListener for CaManager {
    async fn changed(&self, change: &Change) {
        if let Changed::Bundle {
            trust_domain,
            bundle: Some(bundle),
        } = &change.changed
            && *trust_domain == self.config.trust_domain
        {
            self.follow_bundle(bundle.clone());
        }
    }

    async fn reload(&self) {
        match self.store.fetch_bundle(&self.config.trust_domain).await {
            Ok(Some(bundle)) => self.follow_bundle(bundle),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "could not re-read the bundle; the next change brings it"),
        }
    }
}

mod authority;
pub use authority::{AuthorityError, AuthorityKind, AuthorityView};

#[cfg(test)]
mod tests;
