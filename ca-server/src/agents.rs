//! The agent lifecycle in one service: admitting an attested agent,
//! authenticating it by its pinned SVID, renewing, banning and evicting.
//!
//! The node API (attest, authenticate, renew) and the admin API (ban,
//! evict) call [`AgentService`]; it writes agent records to the datastore,
//! each with its audit event in the same write. Those writes reach the
//! registry (this replica's and every other's) only from the datastore's
//! change feed: after a write the service catches the registry up, so its
//! reply reflects its own change. Errors are [`AgentError`]s; the one
//! mapping to gRPC statuses is [`crate::status::agent_status`].

use std::sync::Arc;
use std::time::SystemTime;

use sigil_identity::clock::Clock;
use sigil_identity::{AgentId, SpiffeId};
use tracing::warn;

use crate::audit::Audit;
use crate::datastore::{AgentRecord, AuditEvent, Datastore, DatastoreError};
use crate::registry::Registry;

/// Why an agent operation was refused or failed. The message is what the
/// caller is told (see [`crate::status::agent_status`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// An operator named an agent that does not exist.
    #[error("agent {0} not found")]
    NotFound(AgentId),
    /// The caller's certificate is not an agent SVID.
    #[error("the client certificate is not an agent SVID")]
    NotAgentSvid,
    /// The presented agent SVID has expired.
    #[error("agent SVID has expired; the agent must attest again")]
    SvidExpired,
    /// The presented SVID is neither the pin nor the renewal in flight.
    #[error("agent SVID was superseded by a renewal")]
    Superseded,
    /// The agent record is gone (evicted): the agent is revoked.
    #[error("unknown agent; it may have been evicted")]
    Evicted,
    /// The agent's record vanished between authentication and renewal.
    #[error("unknown agent")]
    Unknown,
    /// The agent is banned: it is revoked.
    #[error("agent is banned")]
    Banned,
    /// A banned agent tried to attest.
    #[error("agent is banned; an operator must evict it before it can attest again")]
    BannedFromAttesting,
    /// The agent exists and its attestor does not allow attesting again.
    #[error("agent already attested and its attestor does not allow re-attestation")]
    NoReattestation,
    /// Another attestation of the same agent won the race.
    #[error("agent already attested")]
    AlreadyAttested,
    /// The agent was evicted while its attestation was being recorded.
    #[error("agent was evicted during attestation; attest again")]
    EvictedWhileAttesting,
    /// The datastore failed.
    #[error("{0}")]
    Store(#[from] DatastoreError),
}

/// The agent SVID a caller presented in its TLS handshake.
#[derive(Debug, Clone, Copy)]
pub struct Presented<'a> {
    pub id: &'a SpiffeId,
    pub serial: &'a str,
    pub cert_sha256: &'a str,
    pub not_after: SystemTime,
}

/// The agent lifecycle (see the module documentation).
pub struct AgentService {
    store: Arc<dyn Datastore>,
    registry: Arc<Registry>,
    audit: Audit,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for AgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentService").finish_non_exhaustive()
    }
}

impl AgentService {
    pub fn new(
        store: Arc<dyn Datastore>,
        registry: Arc<Registry>,
        audit: Audit,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            store,
            registry,
            audit,
            clock,
        }
    }

    /// Agent writes reach the registry only from the change feed: catches
    /// the registry up (so this service's own write is applied, and any
    /// later one, such as an eviction that won a race) and returns agent
    /// `id` as the registry now holds it.
    async fn follow(&self, id: &AgentId) -> Result<Option<AgentRecord>, AgentError> {
        Ok(self.registry.caught_up_agent(id).await?)
    }

    // ---- authentication ------------------------------------------------

    /// Checks a presented SVID against the agent's pin, from the registry
    /// only (no datastore read): the agent exists, is not banned, and the
    /// SVID is unexpired and is the pinned certificate or the renewal in
    /// flight. Returns the agent id, and the agent's record when the SVID
    /// is the renewal (its first use must make it the pin: [`Self::pin`]).
    pub fn check_presented(
        &self,
        svid: Presented<'_>,
    ) -> Result<(AgentId, Option<AgentRecord>), AgentError> {
        let refuse = |e: AgentError| {
            warn!(agent_id = %svid.id, serial = %svid.serial, reason = %e, "node API call refused");
            e
        };
        // The TLS verifier admits only agent IDs; this is the typed check.
        let Ok(id) = AgentId::try_from(svid.id.clone()) else {
            return Err(refuse(AgentError::NotAgentSvid));
        };
        if self.clock.now() > svid.not_after {
            return Err(refuse(AgentError::SvidExpired));
        }
        let Some(record) = self.registry.agent(&id) else {
            return Err(refuse(AgentError::Evicted));
        };
        if record.banned {
            return Err(refuse(AgentError::Banned));
        }
        // Records from before pinning by hash have none: their serial
        // stands in until the next renewal writes one.
        let current = if record.cert_sha256.is_empty() {
            record.serial == svid.serial
        } else {
            record.cert_sha256 == svid.cert_sha256
        };
        let pending = record.pending_cert_sha256.as_deref() == Some(svid.cert_sha256);
        if !current && !pending {
            return Err(refuse(AgentError::Superseded));
        }
        Ok((id, pending.then_some(record)))
    }

    /// First use of a renewed SVID: from now on only it is accepted, and
    /// streams opened with the old one end.
    pub async fn pin(
        &self,
        mut record: AgentRecord,
        svid: Presented<'_>,
    ) -> Result<(), AgentError> {
        let id = record.id.clone();
        let refuse = |e: AgentError| {
            warn!(agent_id = %id, reason = %e, "node API call refused");
            e
        };
        record.serial = svid.serial.to_owned();
        record.cert_sha256 = svid.cert_sha256.to_owned();
        record.pending_cert_sha256 = None;
        record.expires_at = svid.not_after;
        match self.store.update_agent(record).await {
            Ok(_) => {}
            Err(DatastoreError::NotFound(_)) => return Err(refuse(AgentError::Evicted)),
            // The database is down: the renewed SVID is already accepted as
            // the pending pin, so the agent is served from the registry; the
            // pin moves on a call once the database is back.
            Err(DatastoreError::Unavailable(e)) => {
                warn!(agent_id = %id, error = %e, "renewed agent SVID used while the datastore is unavailable; its pin is recorded later");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let stored = self.follow(&id).await?;
        // Streams opened with the old SVID end; the old one is dead.
        self.registry.supersede(&id);
        match stored {
            None => Err(refuse(AgentError::Evicted)),
            Some(r) if r.banned => Err(refuse(AgentError::Banned)),
            Some(_) => Ok(()),
        }
    }

    // ---- attestation ---------------------------------------------------

    /// Whether agent `id`, just attested, may be admitted; returns its
    /// current record when it is known (a re-attestation).
    pub fn admissible(&self, id: &AgentId) -> Result<Option<AgentRecord>, AgentError> {
        let existing = self.registry.agent(id);
        if let Some(existing) = &existing {
            if existing.banned {
                warn!(agent_id = %id, "banned agent tried to attest");
                return Err(AgentError::BannedFromAttesting);
            }
            if !existing.can_reattest {
                return Err(AgentError::NoReattestation);
            }
        }
        Ok(existing)
    }

    /// Records an attestation: the agent's record (created, or replacing
    /// `existing`) written with its audit event `issued` in one write.
    /// Refusals are audited too.
    pub async fn admit(
        &self,
        record: AgentRecord,
        existing: Option<&AgentRecord>,
        issued: AuditEvent,
    ) -> Result<AgentRecord, AgentError> {
        let id = record.id.clone();
        let written = match existing {
            Some(_) => {
                self.store
                    .update_agent_audited(record, Some(issued.clone()))
                    .await
            }
            None => {
                self.store
                    .create_agent_audited(record, Some(issued.clone()))
                    .await
            }
        };
        let stored = match written {
            Ok(stored) => stored,
            Err(e) => {
                let e = match e {
                    DatastoreError::AlreadyExists(_) => AgentError::AlreadyAttested,
                    e => AgentError::Store(e),
                };
                self.audit
                    .record(id.as_str(), "agent.attest", id.as_str(), &e.to_string())
                    .await;
                return Err(e);
            }
        };
        self.audit.log_written(&[issued]);
        if stored.banned {
            // Banned while attesting: the record was updated (and audited),
            // the agent is still refused.
            self.audit
                .record(id.as_str(), "agent.attest", id.as_str(), "agent is banned")
                .await;
            return Err(AgentError::BannedFromAttesting);
        }
        let record = match self.follow(&id).await? {
            None => return Err(AgentError::EvictedWhileAttesting),
            Some(r) if r.banned => return Err(AgentError::BannedFromAttesting),
            Some(r) => r,
        };
        if existing.is_some() {
            // The old SVID's streams end; the new one replaces it.
            self.registry.supersede(&id);
        }
        Ok(record)
    }

    // ---- renewal -------------------------------------------------------

    /// Records a renewal: the SVID with pin `cert_sha256` is accepted next
    /// to the current one until its first use. Written with the audit
    /// event `issued`.
    pub async fn renew(
        &self,
        id: &AgentId,
        cert_sha256: String,
        issued: AuditEvent,
    ) -> Result<(), AgentError> {
        let mut record = self.registry.agent(id).ok_or(AgentError::Unknown)?;
        record.pending_cert_sha256 = Some(cert_sha256);
        match self
            .store
            .update_agent_audited(record, Some(issued.clone()))
            .await
        {
            Ok(_) => {}
            Err(DatastoreError::NotFound(_)) => return Err(AgentError::Evicted),
            Err(e) => return Err(e.into()),
        }
        self.audit.log_written(&[issued]);
        if self.follow(id).await?.is_none() {
            return Err(AgentError::Evicted);
        }
        Ok(())
    }

    // ---- operators -----------------------------------------------------

    /// Bans agent `id` for `caller` (audited either way): it is refused
    /// everywhere until evicted.
    pub async fn ban(&self, caller: &str, id: &AgentId) -> Result<AgentRecord, AgentError> {
        let ok = self.audit.event(caller, "agent.ban", id.as_str(), "ok");
        let result = async {
            let mut a = self
                .store
                .fetch_agent(id)
                .await?
                .ok_or_else(|| AgentError::NotFound(id.clone()))?;
            a.banned = true;
            let a = self.store.update_agent_audited(a, Some(ok.clone())).await?;
            // What the store holds now (an eviction may have won).
            self.follow(id).await?;
            Ok(a)
        }
        .await;
        self.operator_outcome(caller, "agent.ban", id, ok, result)
            .await
    }

    /// Evicts agent `id` for `caller` (audited either way): its record is
    /// deleted, which also lifts a ban; it must attest again.
    pub async fn evict(&self, caller: &str, id: &AgentId) -> Result<AgentRecord, AgentError> {
        let ok = self.audit.event(caller, "agent.evict", id.as_str(), "ok");
        let result = async {
            let a = self
                .store
                .delete_agent_audited(id, Some(ok.clone()))
                .await
                .map_err(|e| match e {
                    DatastoreError::NotFound(_) => AgentError::NotFound(id.clone()),
                    e => AgentError::Store(e),
                })?;
            self.follow(id).await?;
            Ok(a)
        }
        .await;
        self.operator_outcome(caller, "agent.evict", id, ok, result)
            .await
    }

    /// Audits an operator's ban or eviction and, when it failed, makes the
    /// registry follow the store all the same: a write whose sync failed is
    /// applied (the next sync round makes it durable), or an evicted agent
    /// could keep working.
    async fn operator_outcome(
        &self,
        caller: &str,
        action: &str,
        id: &AgentId,
        ok: AuditEvent,
        result: Result<AgentRecord, AgentError>,
    ) -> Result<AgentRecord, AgentError> {
        match &result {
            Ok(_) => self.audit.log_written(&[ok]),
            Err(e) => {
                if let Err(e) = self.follow(id).await {
                    warn!(agent_id = %id, error = %e, "registry could not catch up with the datastore");
                }
                self.audit
                    .record(caller, action, id.as_str(), &e.to_string())
                    .await;
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sigil_identity::TrustDomain;
    use sigil_identity::clock::SystemClock;

    use super::*;
    use crate::datastore::SledDatastore;

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Arc<dyn Datastore>,
        agents: AgentService,
        audit: Audit,
        id: AgentId,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Datastore> =
            Arc::new(SledDatastore::open(dir.path().join("data")).unwrap());
        let td = TrustDomain::new("example.org").unwrap();
        let registry = Registry::load(store.clone(), &td).await.unwrap();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let audit = Audit::new(store.clone(), clock.clone());
        let agents = AgentService::new(store.clone(), registry, audit.clone(), clock);
        let id = AgentId::from_segments(&td, &["x509pop", "node-1"]).unwrap();
        Fixture {
            _dir: dir,
            store,
            agents,
            audit,
            id,
        }
    }

    fn record(id: &AgentId, pin: &str) -> AgentRecord {
        AgentRecord {
            id: id.clone(),
            attestor: "x509pop".into(),
            serial: "01".into(),
            cert_sha256: pin.into(),
            pending_cert_sha256: None,
            expires_at: SystemTime::now() + Duration::from_secs(3600),
            selectors: Default::default(),
            banned: false,
            can_reattest: true,
            created_at: SystemTime::now(),
        }
    }

    fn presented<'a>(id: &'a SpiffeId, pin: &'a str) -> Presented<'a> {
        Presented {
            id,
            serial: "01",
            cert_sha256: pin,
            not_after: SystemTime::now() + Duration::from_secs(3600),
        }
    }

    fn event(f: &Fixture, action: &str) -> AuditEvent {
        f.audit.issued(
            f.id.as_str(),
            action,
            f.id.as_str(),
            SystemTime::now() + Duration::from_secs(3600),
        )
    }

    async fn actions(store: &Arc<dyn Datastore>) -> Vec<(String, String)> {
        store
            .audit_records(0, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.event.action, r.event.outcome))
            .collect()
    }

    #[tokio::test]
    async fn an_agent_goes_through_attest_renew_ban_and_evict() {
        let f = fixture().await;
        let spiffe: SpiffeId = f.id.clone().into();
        let (old, new) = ("aa".repeat(32), "bb".repeat(32));

        // Attested: its SVID is the pin.
        assert!(f.agents.admissible(&f.id).unwrap().is_none());
        let ev = event(&f, "agent.attest");
        f.agents.admit(record(&f.id, &old), None, ev).await.unwrap();
        let (id, pending) = f.agents.check_presented(presented(&spiffe, &old)).unwrap();
        assert_eq!((id, pending), (f.id.clone(), None));

        // Renewed: the new SVID is accepted next to the old one; its first
        // use makes it the pin and the old one is refused.
        let ev = event(&f, "agent.renew");
        f.agents.renew(&f.id, new.clone(), ev).await.unwrap();
        let (_, pending) = f.agents.check_presented(presented(&spiffe, &new)).unwrap();
        let pending = pending.expect("the renewal in flight carries the record");
        f.agents.check_presented(presented(&spiffe, &old)).unwrap();
        f.agents
            .pin(pending, presented(&spiffe, &new))
            .await
            .unwrap();
        assert!(matches!(
            f.agents.check_presented(presented(&spiffe, &old)),
            Err(AgentError::Superseded)
        ));

        // Banned: refused everywhere, attesting included.
        f.agents.ban("uid:0", &f.id).await.unwrap();
        assert!(matches!(
            f.agents.check_presented(presented(&spiffe, &new)),
            Err(AgentError::Banned)
        ));
        assert!(matches!(
            f.agents.admissible(&f.id),
            Err(AgentError::BannedFromAttesting)
        ));
        assert!(f.store.fetch_agent(&f.id).await.unwrap().unwrap().banned);

        // Evicted: gone, the ban lifted, free to attest again.
        f.agents.evict("uid:0", &f.id).await.unwrap();
        assert!(matches!(
            f.agents.check_presented(presented(&spiffe, &new)),
            Err(AgentError::Evicted)
        ));
        assert!(f.agents.admissible(&f.id).unwrap().is_none());
        assert!(f.store.fetch_agent(&f.id).await.unwrap().is_none());
        assert!(matches!(
            f.agents.evict("uid:0", &f.id).await,
            Err(AgentError::NotFound(_))
        ));

        f.audit.flush().await;
        let want = [
            ("agent.attest", "ok"),
            ("agent.renew", "ok"),
            ("agent.ban", "ok"),
            ("agent.evict", "ok"),
        ];
        let got = actions(&f.store).await;
        for (action, outcome) in want {
            assert!(
                got.iter().any(|(a, o)| a == action && o == outcome),
                "{action} {outcome} missing from {got:?}"
            );
        }
        let refused = format!("agent {} not found", f.id);
        assert!(
            got.iter().any(|(a, o)| a == "agent.evict" && *o == refused),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn a_renewal_of_an_unknown_agent_is_refused_and_writes_nothing() {
        let f = fixture().await;
        let ev = event(&f, "agent.renew");
        let err = f.agents.renew(&f.id, "cc".repeat(32), ev).await;
        assert!(matches!(err, Err(AgentError::Unknown)), "{err:?}");
        assert!(f.store.fetch_agent(&f.id).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_agent_whose_attestor_forbids_it_cannot_attest_twice() {
        let f = fixture().await;
        let mut once = record(&f.id, &"aa".repeat(32));
        once.can_reattest = false;
        let ev = event(&f, "agent.attest");
        f.agents.admit(once, None, ev).await.unwrap();
        assert!(matches!(
            f.agents.admissible(&f.id),
            Err(AgentError::NoReattestation)
        ));
        // A second create of the same agent (two attestations racing) loses.
        let ev = event(&f, "agent.attest");
        let err = f
            .agents
            .admit(record(&f.id, &"bb".repeat(32)), None, ev)
            .await;
        assert!(matches!(err, Err(AgentError::AlreadyAttested)), "{err:?}");
    }
}
