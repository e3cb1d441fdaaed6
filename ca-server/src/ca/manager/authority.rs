//! Operator control of this replica's CA authorities: `prepare`,
//! `activate`, `taint` and `revoke`, next to the automatic rotation.
//!
//! An authority is an X.509 CA key (named by its certificate's
//! SubjectKeyIdentifier, hex) or a JWT key (named by its `kid`). Its life:
//!
//! ```text
//! prepare ─▶ prepared ─activate─▶ active ─(next activation)─▶ old ─taint─▶ tainted ─revoke─▶ revoked
//! ```
//!
//! - only a prepared authority can be activated (its previous active one
//!   becomes old);
//! - only an old authority can be tainted: the active one signs, so a new
//!   one is prepared and activated first;
//! - only a tainted authority can be revoked;
//! - `prepare` is refused while another authority is prepared (activate it
//!   first) or while a tainted one is not yet revoked, so no incident is
//!   left half-handled. The journal keeps every authority until it expires:
//!   preparing never discards one.
//!
//! Every step is written to the journal before it is published, and every
//! publication re-applies the journal's taint markers and revocations, so a
//! restart at any point ends in the state the journal holds. The automatic
//! rotation only prepares when nothing is prepared and activates only a
//! prepared key, so it never undoes a manual step: a manually activated key
//! is simply the active key whose half-life the next rotation waits for.

use std::sync::Arc;
use std::time::SystemTime;

use sigil_identity::x509 as svid;
use tracing::info;

use super::{BACKDATE, CaManager, Gone, activate, jwt_signer};
use crate::ca::CaError;
use crate::ca::journal::{CaJournal, JwtSlot, Slot, SlotState, X509Slot};
use crate::ca::keys::KeyId;
use crate::ca::x509::X509Authority;
use crate::datastore::{BundleEdit, ServerId};

/// Which kind of authority a command is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthorityKind {
    /// X.509 CA keys (ids: SubjectKeyIdentifier, hex).
    X509,
    /// JWT signing keys (ids: `kid`).
    Jwt,
}

impl std::fmt::Display for AuthorityKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthorityKind::X509 => "x509",
            AuthorityKind::Jwt => "jwt",
        })
    }
}

/// One authority as the commands show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityView {
    pub kind: AuthorityKind,
    /// SubjectKeyIdentifier (hex) or `kid`.
    pub id: String,
    pub state: SlotState,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The replica whose journal holds it.
    pub server_id: ServerId,
}

/// Why an authority command was refused: each variant names the rule.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    #[error(
        "no {kind} authority {id} on replica {server_id}; `sigil-server authority {kind} show` lists them"
    )]
    Unknown {
        kind: AuthorityKind,
        id: String,
        server_id: ServerId,
    },
    #[error("only a prepared authority can be activated; {kind} authority {id} is {state}")]
    NotPrepared {
        kind: AuthorityKind,
        id: String,
        state: SlotState,
    },
    #[error(
        "{kind} authority {id} is prepared but not yet in the published bundle; try again in a moment"
    )]
    NotPublished { kind: AuthorityKind, id: String },
    #[error(
        "{kind} authority {id} is the active authority and cannot be tainted; prepare and activate a new one first"
    )]
    TaintActive { kind: AuthorityKind, id: String },
    #[error(
        "only an old (no longer active) authority can be tainted; {kind} authority {id} is {state}"
    )]
    NotOld {
        kind: AuthorityKind,
        id: String,
        state: SlotState,
    },
    #[error(
        "only a tainted authority can be revoked; {kind} authority {id} is {state} (taint it first: `sigil-server authority {kind} taint --id {id}`)"
    )]
    NotTainted {
        kind: AuthorityKind,
        id: String,
        state: SlotState,
    },
    #[error(
        "{kind} authority {id} is already prepared; activate it (`sigil-server authority {kind} activate --id {id}`) before preparing another"
    )]
    AlreadyPrepared { kind: AuthorityKind, id: String },
    #[error(
        "{kind} authority {id} is tainted but not revoked; revoke it (`sigil-server authority {kind} revoke --id {id}`) before preparing another"
    )]
    UnrevokedTaint { kind: AuthorityKind, id: String },
    #[error(
        "X.509 authorities signed by an upstream CA cannot be tainted here: the bundle holds the upstream roots, so rotate the upstream CA instead"
    )]
    Upstream,
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// The id of an X.509 authority: its SubjectKeyIdentifier in lowercase
/// hex (its serial if it has none, which Sigil's CA certificates never lack).
pub fn x509_id(cert_der: &[u8]) -> String {
    match svid::parse(cert_der) {
        Ok(cert) => svid::subject_key_id(&cert)
            .map(|ski| sigil_identity::random::hex(&ski))
            .unwrap_or_else(|| svid::serial_hex(&cert)),
        Err(_) => String::new(),
    }
}

/// An id as typed: hex may come in any case and with colons.
fn normalise(kind: AuthorityKind, id: &str) -> String {
    match kind {
        AuthorityKind::X509 => id.trim().replace(':', "").to_ascii_lowercase(),
        AuthorityKind::Jwt => id.trim().to_owned(),
    }
}

/// A slot and its authority id.
trait Authority: Slot {
    fn id(&self) -> String;
}

impl Authority for X509Slot {
    fn id(&self) -> String {
        x509_id(&self.cert_der)
    }
}

impl Authority for JwtSlot {
    fn id(&self) -> String {
        self.kid.clone()
    }
}

fn views<S: Authority>(
    kind: AuthorityKind,
    slots: &[S],
    server_id: &ServerId,
) -> Vec<AuthorityView> {
    slots
        .iter()
        .map(|s| {
            let (not_before, not_after) = s.validity();
            AuthorityView {
                kind,
                id: s.id(),
                state: s.state(),
                not_before,
                not_after,
                server_id: server_id.clone(),
            }
        })
        .collect()
}

/// Every authority of `kind` in `journal`.
pub(crate) fn journal_views(
    kind: AuthorityKind,
    journal: &CaJournal,
    server_id: &ServerId,
) -> Vec<AuthorityView> {
    match kind {
        AuthorityKind::X509 => views(kind, &journal.x509, server_id),
        AuthorityKind::Jwt => views(kind, &journal.jwt, server_id),
    }
}

/// `prepare` is refused while a key is prepared or a tainted one is not
/// revoked.
fn check_prepare<S: Authority>(kind: AuthorityKind, slots: &[S]) -> Result<(), AuthorityError> {
    if let Some(s) = slots.iter().find(|s| s.state() == SlotState::Tainted) {
        return Err(AuthorityError::UnrevokedTaint { kind, id: s.id() });
    }
    if let Some(s) = slots.iter().find(|s| s.state() == SlotState::Prepared) {
        return Err(AuthorityError::AlreadyPrepared { kind, id: s.id() });
    }
    Ok(())
}

/// The operator steps that take an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Activate,
    Taint,
    Revoke,
}

/// The index of authority `id` in `slots` if `step` may be applied to it.
fn check_step<S: Authority>(
    kind: AuthorityKind,
    slots: &[S],
    id: &str,
    step: Step,
    server_id: &ServerId,
) -> Result<usize, AuthorityError> {
    let index = slots
        .iter()
        .position(|s| s.id() == id)
        .ok_or_else(|| AuthorityError::Unknown {
            kind,
            id: id.to_owned(),
            server_id: server_id.clone(),
        })?;
    let state = slots[index].state();
    let id = id.to_owned();
    match (step, state) {
        (Step::Activate, SlotState::Prepared)
        | (Step::Taint, SlotState::Retired)
        | (Step::Revoke, SlotState::Tainted) => Ok(index),
        (Step::Activate, state) => Err(AuthorityError::NotPrepared { kind, id, state }),
        (Step::Taint, SlotState::Active) => Err(AuthorityError::TaintActive { kind, id }),
        (Step::Taint, state) => Err(AuthorityError::NotOld { kind, id, state }),
        (Step::Revoke, state) => Err(AuthorityError::NotTainted { kind, id, state }),
    }
}

/// Adds the journal's operator steps to a bundle edit: taint markers for
/// tainted authorities, removal of revoked ones. Every publication carries
/// them, so a bundle write lost to a crash is made good by the next one.
pub(super) fn mark_taint(journal: &CaJournal, edit: &mut BundleEdit) {
    for s in &journal.x509 {
        match s.state {
            SlotState::Tainted => edit.taint_x509.push(s.cert_der.clone()),
            SlotState::Revoked => edit.remove_x509.push(s.cert_der.clone()),
            _ => {}
        }
    }
    for s in &journal.jwt {
        match s.state {
            SlotState::Tainted => edit.taint_jwt.push(s.kid.clone()),
            SlotState::Revoked => edit.remove_jwt.push(s.kid.clone()),
            _ => {}
        }
    }
}

impl CaManager {
    /// A new prepared X.509 CA key and certificate, valid from `now`.
    pub(super) fn new_x509_slot(&self, now: SystemTime) -> Result<X509Slot, CaError> {
        let (not_before, not_after) = self.new_validity(now)?;
        let alg = self.config.key_algorithm;
        let key_id = KeyId::generate("x509");
        let key = self.keys.generate(&key_id, alg)?;
        let authority = X509Authority::create(
            &self.config.trust_domain,
            &key,
            not_before,
            not_after,
            self.upstream.as_ref(),
        );
        let authority = match authority {
            Ok(a) => a,
            Err(e) => {
                let _ = self.keys.delete(&key_id);
                return Err(e);
            }
        };
        info!(key_id = %key_id, kind = "x509", "CA key prepared");
        Ok(X509Slot {
            key_id,
            algorithm: alg,
            state: SlotState::Prepared,
            cert_der: authority.cert_der().to_vec(),
            not_before,
            not_after: authority.not_after(),
        })
    }

    /// A new prepared JWT key, valid from `now`.
    pub(super) fn new_jwt_slot(&self, now: SystemTime) -> Result<JwtSlot, CaError> {
        let (not_before, not_after) = self.new_validity(now)?;
        let alg = self.config.key_algorithm;
        let key_id = KeyId::generate("jwt");
        let key = self.keys.generate(&key_id, alg)?;
        let kid = sigil_identity::random::hex_id();
        let signer = match jwt_signer(&kid, &key, not_after) {
            Ok(s) => s,
            Err(e) => {
                let _ = self.keys.delete(&key_id);
                return Err(e.into());
            }
        };
        info!(key_id = %key_id, kind = "jwt", "JWT key prepared");
        Ok(JwtSlot {
            key_id,
            algorithm: alg,
            state: SlotState::Prepared,
            kid,
            public_key: signer.public_key().jwk_members(),
            not_before,
            not_after,
        })
    }

    fn new_validity(&self, now: SystemTime) -> Result<(SystemTime, SystemTime), CaError> {
        let not_before = now.checked_sub(BACKDATE).unwrap_or(now);
        let not_after = now
            .checked_add(self.config.ca_ttl)
            .ok_or(CaError::Build("ca ttl overflows the clock".into()))?;
        Ok((not_before, not_after))
    }

    /// This replica's authorities of `kind`, oldest first.
    pub async fn authorities(&self, kind: AuthorityKind) -> Vec<AuthorityView> {
        journal_views(kind, &*self.journal.lock().await, &self.config.server_id)
    }

    /// Every replica's authorities of `kind` (read from the journals in
    /// the shared datastore; this replica's as held), by replica.
    pub async fn all_authorities(
        &self,
        kind: AuthorityKind,
    ) -> Result<Vec<AuthorityView>, CaError> {
        let mut out = Vec::new();
        for (server_id, bytes) in self.store.list_ca_journals().await? {
            if server_id == self.config.server_id {
                continue;
            }
            let journal = CaJournal::from_bytes(&bytes)?;
            out.extend(journal_views(kind, &journal, &server_id));
        }
        out.extend(self.authorities(kind).await);
        out.sort_by(|a, b| a.server_id.as_str().cmp(b.server_id.as_str()));
        Ok(out)
    }

    /// Prepares a new authority of `kind` now and publishes it in the
    /// bundle; it signs only once activated.
    pub async fn prepare_authority(
        &self,
        kind: AuthorityKind,
    ) -> Result<AuthorityView, AuthorityError> {
        let mut journal = self.journal.lock().await;
        let now = self.clock.now();
        let mut next = journal.clone();
        let key_id = match kind {
            AuthorityKind::X509 => {
                check_prepare(kind, &next.x509)?;
                let slot = self.new_x509_slot(now)?;
                let key_id = slot.key_id.clone();
                next.x509.push(slot);
                key_id
            }
            AuthorityKind::Jwt => {
                check_prepare(kind, &next.jwt)?;
                let slot = self.new_jwt_slot(now)?;
                let key_id = slot.key_id.clone();
                next.jwt.push(slot);
                key_id
            }
        };
        let persisted = async {
            self.save(&next).await?;
            self.publish(&next, &Gone::default()).await
        }
        .await;
        if let Err(e) = persisted {
            let _ = self.keys.delete(&key_id);
            return Err(e.into());
        }
        *journal = next;
        let view = journal_views(kind, &journal, &self.config.server_id)
            .pop()
            .ok_or(CaError::NotReady)?;
        info!(kind = %kind, authority_id = %view.id, "authority prepared by an operator");
        Ok(view)
    }

    /// Makes the prepared authority `id` the active one; the one active
    /// until now becomes old.
    pub async fn activate_authority(
        &self,
        kind: AuthorityKind,
        id: &str,
    ) -> Result<AuthorityView, AuthorityError> {
        let id = normalise(kind, id);
        let server_id = &self.config.server_id;
        let mut journal = self.journal.lock().await;
        let mut next = journal.clone();
        let bundle = self.bundle();
        match kind {
            AuthorityKind::X509 => {
                let i = check_step(kind, &next.x509, &id, Step::Activate, server_id)?;
                let slot = &next.x509[i];
                if self.upstream.is_none() && !bundle.x509_authorities.contains(&slot.cert_der) {
                    return Err(AuthorityError::NotPublished { kind, id });
                }
                let signer = Arc::new(self.load_x509(slot)?);
                activate(&mut next.x509);
                self.save(&next).await?;
                *self.x509.write().unwrap_or_else(|p| p.into_inner()) = Some(signer);
            }
            AuthorityKind::Jwt => {
                let i = check_step(kind, &next.jwt, &id, Step::Activate, server_id)?;
                let slot = &next.jwt[i];
                if bundle.jwt_authority(&slot.kid).is_none() {
                    return Err(AuthorityError::NotPublished { kind, id });
                }
                let signer = Arc::new(self.load_jwt(slot)?);
                activate(&mut next.jwt);
                self.save(&next).await?;
                *self.jwt.write().unwrap_or_else(|p| p.into_inner()) = Some(signer);
            }
        }
        *journal = next;
        info!(kind = %kind, authority_id = %id, "authority activated by an operator");
        self.view(kind, &journal, &id)
    }

    /// Marks the old authority `id` tainted: it stays in the bundle with a
    /// taint marker, and agents replace what it signed.
    pub async fn taint_authority(
        &self,
        kind: AuthorityKind,
        id: &str,
    ) -> Result<AuthorityView, AuthorityError> {
        self.operator_step(kind, id, Step::Taint, SlotState::Tainted)
            .await
    }

    /// Removes the tainted authority `id` from the bundle for good.
    pub async fn revoke_authority(
        &self,
        kind: AuthorityKind,
        id: &str,
    ) -> Result<AuthorityView, AuthorityError> {
        self.operator_step(kind, id, Step::Revoke, SlotState::Revoked)
            .await
    }

    /// Taint or revoke: a state change in the journal, then a publication
    /// (which applies the journal's markers and removals).
    async fn operator_step(
        &self,
        kind: AuthorityKind,
        id: &str,
        step: Step,
        to: SlotState,
    ) -> Result<AuthorityView, AuthorityError> {
        let id = normalise(kind, id);
        let server_id = &self.config.server_id;
        let mut journal = self.journal.lock().await;
        let mut next = journal.clone();
        match kind {
            AuthorityKind::X509 => {
                let i = check_step(kind, &next.x509, &id, step, server_id)?;
                if self.upstream.is_some() {
                    return Err(AuthorityError::Upstream);
                }
                next.x509[i].state = to;
            }
            AuthorityKind::Jwt => {
                let i = check_step(kind, &next.jwt, &id, step, server_id)?;
                next.jwt[i].state = to;
            }
        }
        // Journal first: a crash before the bundle is written is made good
        // by the publication at start, which applies the journal's steps.
        self.save(&next).await?;
        *journal = next;
        self.publish(&journal, &Gone::default()).await?;
        info!(kind = %kind, authority_id = %id, state = %to, "authority changed by an operator");
        self.view(kind, &journal, &id)
    }

    fn view(
        &self,
        kind: AuthorityKind,
        journal: &CaJournal,
        id: &str,
    ) -> Result<AuthorityView, AuthorityError> {
        journal_views(kind, journal, &self.config.server_id)
            .into_iter()
            .find(|v| v.id == id)
            .ok_or_else(|| AuthorityError::Unknown {
                kind,
                id: id.to_owned(),
                server_id: self.config.server_id.clone(),
            })
    }
}

#[cfg(test)]
mod tests;
