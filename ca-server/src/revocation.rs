//! Per-SVID revocation: the operator's `x509 revoke` (by serial or by
//! entry), the revocation of a banned agent's SVID, writing issuance
//! records, and keeping every CA's CRL signed and current.
//!
//! - Issuance records (serial, SPIFFE ID, issuing CA, NotAfter) are taken
//!   from the CA after each issuance and written in batches, so `x509
//!   revoke --entry` finds every unexpired SVID of the entry's SPIFFE ID.
//! - A revocation is one datastore write ([`Changed::Revocation`]); every
//!   replica, following the feed, re-signs the CRLs of its own CAs with
//!   CRL number = the datastore revision (it only grows) and stores them
//!   ([`Changed::Crl`]); every replica keeps the set of all current CRLs of
//!   the trust domain in a watch that Sync streams push to agents.
//! - CRLs are re-signed every [`CrlPolicy::refresh`] and valid for
//!   [`CrlPolicy::validity`] (nextUpdate), and a serial leaves its CA's CRL
//!   after its NotAfter (see [`crate::ca::crl`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_identity::SpiffeId;
use tokio::sync::{Mutex, watch};
use tracing::{info, warn};

use crate::audit::Audit;
use crate::ca::CaManager;
use crate::ca::crl::sign_crl;
use crate::datastore::{
    Change, Changed, CrlRecord, Datastore, DatastoreError, RevocationReason, RevocationRecord,
};
use crate::registry::ChangeListener;

/// How often CRLs are re-signed and how long each is valid.
#[derive(Debug, Clone, Copy)]
pub struct CrlPolicy {
    /// Re-sign interval (also when nothing changed, to move nextUpdate).
    pub refresh: Duration,
    /// nextUpdate − thisUpdate.
    pub validity: Duration,
}

impl Default for CrlPolicy {
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(600),
            validity: Duration::from_secs(3600),
        }
    }
}

/// Why a revocation was refused.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error(
        "no X509-SVID with serial {0} is known: it was not issued by this trust domain, or it has expired (an expired SVID needs no revocation). Serials are hexadecimal, as `openssl x509 -serial` prints them"
    )]
    UnknownSerial(String),
    #[error("{0}")]
    BadSerial(String),
    #[error("revocation could not be stored: {0}")]
    Store(#[from] DatastoreError),
}

/// The CRLs of the trust domain, DER, one per CA, as agents get them.
pub type CrlSet = Arc<Vec<Vec<u8>>>;

/// Normalises an operator's serial: hex digits, optionally with colons
/// (as `openssl x509 -serial` or `-text` print them) or a `0x` prefix,
/// any case; leading zero bytes dropped, as Sigil stores serials.
pub fn normalize_serial(input: &str) -> Result<String, RevokeError> {
    let s = input.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .or_else(|| s.strip_prefix("serial="))
        .unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) || hex.len() > 64 {
        return Err(RevokeError::BadSerial(format!(
            "serial {input:?} is not hexadecimal (expected e.g. 5f3a…, as `openssl x509 -noout -serial` prints it)"
        )));
    }
    let hex = hex.to_ascii_lowercase();
    let trimmed = hex.trim_start_matches('0');
    Ok(if trimmed.is_empty() {
        "0".into()
    } else if trimmed.len() % 2 == 1 {
        format!("0{trimmed}")
    } else {
        trimmed.to_owned()
    })
}

/// Revocation and CRLs for one server replica.
pub struct Revocations {
    store: Arc<dyn Datastore>,
    ca: Arc<CaManager>,
    audit: Audit,
    policy: CrlPolicy,
    /// Serialises signing, so CRL numbers of one CA never repeat.
    signing: Mutex<()>,
    crls: watch::Sender<CrlSet>,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations").finish_non_exhaustive()
    }
}

impl Revocations {
    /// Loads the stored CRLs and signs this replica's.
    pub async fn start(
        store: Arc<dyn Datastore>,
        ca: Arc<CaManager>,
        audit: Audit,
        policy: CrlPolicy,
    ) -> Arc<Self> {
        let (crls, _) = watch::channel(CrlSet::default());
        let this = Arc::new(Self {
            store,
            ca,
            audit,
            policy,
            signing: Mutex::new(()),
            crls,
        });
        this.sign_and_publish().await;
        this
    }

    /// The current CRLs (one per live CA of the trust domain).
    pub fn crls(&self) -> CrlSet {
        self.crls.borrow().clone()
    }

    /// A receiver that sees every new CRL set.
    pub fn subscribe(&self) -> watch::Receiver<CrlSet> {
        self.crls.subscribe()
    }

    /// Writes the issuance records the CA holds.
    pub async fn flush_issued(&self) {
        let records = self.ca.take_issued();
        if records.is_empty() {
            return;
        }
        let n = records.len();
        if let Err(e) = self.store.record_issuances(records).await {
            warn!(error = %e, records = n, "could not store issuance records; `x509 revoke --entry` will not find these SVIDs (revoke them by serial)");
        }
    }

    /// Revokes the X509-SVID with `serial` for `caller`.
    pub async fn revoke_serial(
        &self,
        caller: &str,
        serial: &str,
        reason: RevocationReason,
    ) -> Result<Vec<RevocationRecord>, RevokeError> {
        let serial = normalize_serial(serial)?;
        self.flush_issued().await;
        let now = self.ca.clock().now();
        let record = self
            .store
            .fetch_issuance(&serial)
            .await?
            .filter(|r| r.not_after >= now)
            .ok_or_else(|| RevokeError::UnknownSerial(serial.clone()));
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                self.audit
                    .record(caller, "svid.x509.revoke", &serial, "unknown serial")
                    .await;
                return Err(e);
            }
        };
        self.revoke(caller, vec![record.revoke(now, reason)]).await
    }

    /// Revokes every unexpired X509-SVID issued for `id` (the SPIFFE ID of
    /// an entry, or of an agent) for `caller`. None is not an error.
    pub async fn revoke_spiffe_id(
        &self,
        caller: &str,
        id: &SpiffeId,
        reason: RevocationReason,
    ) -> Result<Vec<RevocationRecord>, RevokeError> {
        self.flush_issued().await;
        let now = self.ca.clock().now();
        let records: Vec<_> = self
            .store
            .list_issuances_of(id)
            .await?
            .into_iter()
            .filter(|r| r.not_after >= now)
            .map(|r| r.revoke(now, reason))
            .collect();
        if records.is_empty() {
            self.audit
                .record(
                    caller,
                    "svid.x509.revoke",
                    id.as_str(),
                    "no unexpired SVIDs",
                )
                .await;
            return Ok(records);
        }
        self.revoke(caller, records).await
    }

    async fn revoke(
        &self,
        caller: &str,
        records: Vec<RevocationRecord>,
    ) -> Result<Vec<RevocationRecord>, RevokeError> {
        let outcome = self.store.revoke_x509(records.clone()).await;
        let events = records
            .iter()
            .map(|r| {
                let outcome = match &outcome {
                    Ok(_) => format!("ok reason={}", r.reason.name()),
                    Err(e) => format!("failed: {e}"),
                };
                self.audit.event(
                    caller,
                    "svid.x509.revoke",
                    &format!("{} serial={}", r.spiffe_id, r.serial),
                    &outcome,
                )
            })
            .collect();
        self.audit.record_all(events).await;
        let revision = outcome?;
        for r in &records {
            info!(serial = %r.serial, spiffe_id = %r.spiffe_id, issuer = %r.issuer, reason = r.reason.name(), revision, "X509-SVID revoked");
        }
        // At once, not when the feed comes round: the CLI returns with the
        // CRL already signed by this replica.
        self.sign_and_publish().await;
        Ok(records)
    }

    /// Signs the CRL of each of this replica's live CAs, stores them, and
    /// publishes the trust domain's CRL set. Failures are logged: the
    /// previous CRLs stay until their nextUpdate.
    pub async fn sign_and_publish(&self) {
        if let Err(e) = self.sign().await {
            warn!(error = %e, "could not sign CRLs; the previous ones stay in use");
        }
        self.reload_crls().await;
    }

    async fn sign(&self) -> Result<(), DatastoreError> {
        let _one = self.signing.lock().await;
        let revoked = self.store.list_revocations().await?;
        let signers = self.ca.crl_signers().await;
        for (cert, key, not_after) in signers {
            let now = self.ca.clock().now();
            // The revision only grows, and each stored CRL takes one.
            let number = self.store.current_revision().await?;
            match sign_crl(&cert, &key, &revoked, number, now, self.policy.validity) {
                Ok(crl) => {
                    self.store
                        .put_crl(CrlRecord {
                            issuer: crl.issuer.clone(),
                            number,
                            not_after,
                            der: crl.der,
                        })
                        .await?;
                    info!(issuer = %crl.issuer, number, revoked = crl.listed, "CRL signed");
                }
                Err(e) => warn!(error = %e, "CRL not signed"),
            }
        }
        Ok(())
    }

    /// Re-reads every stored CRL and publishes those of live CAs.
    pub async fn reload_crls(&self) {
        let now = self.ca.clock().now();
        match self.store.list_crls().await {
            Ok(all) => {
                let live: Vec<Vec<u8>> = all
                    .into_iter()
                    .filter(|c| c.not_after > now)
                    .map(|c| c.der)
                    .collect();
                self.crls.send_if_modified(|current| {
                    let changed = **current != live;
                    if changed {
                        *current = Arc::new(live);
                    }
                    changed
                });
            }
            Err(e) => warn!(error = %e, "could not read the CRLs; the next change brings them"),
        }
    }

    /// Until `stop`: writes issuance records as they come, re-signs the
    /// CRLs every [`CrlPolicy::refresh`], and prunes expired records.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.policy.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    self.flush_issued().await;
                    return;
                }
                () = self.ca.issued_waiting() => {
                    // Gather what comes within a moment into one write.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    self.flush_issued().await;
                }
                _ = tick.tick() => {
                    self.prune(self.ca.clock().now()).await;
                    self.sign_and_publish().await;
                }
            }
        }
    }

    async fn prune(&self, now: SystemTime) {
        match self.store.prune_revocations(now).await {
            Ok(n) if n > 0 => info!(
                pruned = n,
                "expired issuance, revocation and CRL records removed"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "pruning revocation records failed"),
        }
    }
}

/// Another replica's revocation makes this one re-sign its own CAs'
/// CRLs; any stored CRL or new CA is picked up.
#[async_trait::async_trait]
impl ChangeListener for Revocations {
    async fn changed(&self, change: &Change) {
        match &change.changed {
            Changed::Revocation { .. } | Changed::CaJournal { .. } => {
                self.sign_and_publish().await;
            }
            Changed::Crl { .. } => self.reload_crls().await,
            _ => {}
        }
    }

    async fn reload(&self) {
        self.sign_and_publish().await;
    }
}

/// A banned agent's SVIDs are revoked (every unexpired one of its SPIFFE
/// ID). A failure is logged and audited; the ban itself stands.
pub async fn revoke_banned_agent(
    revocations: &Revocations,
    caller: &str,
    agent: &crate::datastore::AgentRecord,
) {
    let id: &SpiffeId = &agent.id;
    match revocations
        .revoke_spiffe_id(caller, id, RevocationReason::KeyCompromise)
        .await
    {
        Ok(revoked) => {
            info!(agent_id = %agent.id, revoked = revoked.len(), "banned agent's SVIDs revoked")
        }
        Err(e) => {
            warn!(agent_id = %agent.id, error = %e, "banned agent's SVIDs could not be revoked; revoke them with `x509 revoke --serial`")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_normalised_as_stored() {
        assert_eq!(normalize_serial("0A:1B").unwrap(), "0a1b");
        assert_eq!(normalize_serial("00a1b").unwrap(), "0a1b");
        assert_eq!(normalize_serial("0x7F").unwrap(), "7f");
        assert_eq!(normalize_serial("serial=7F").unwrap(), "7f");
        assert!(matches!(
            normalize_serial("xyz"),
            Err(RevokeError::BadSerial(_))
        ));
        assert!(matches!(
            normalize_serial(""),
            Err(RevokeError::BadSerial(_))
        ));
    }
}
