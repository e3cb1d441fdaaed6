//! Persistent state behind one trait.
//!
//! The [`Datastore`] trait deals in domain types and is grouped by entity:
//! registration entries, attested agents, join tokens (stored only as
//! hashes), trust bundles, the CA journal of each server replica (opaque
//! bytes), and audit events. Every mutation returns only after it is
//! durable.
//!
//! # The change feed
//! Every mutation of entries, agents, join tokens, bundles and CA journals
//! takes the next revision (gap-free: revision order is commit order) and
//! records a [`Change`] carrying the object whole in the same atomic write.
//! A replica follows [`Datastore::changes`] from the revision it has
//! applied; [`Datastore::change_hint`] only wakes it up. A reader whose
//! position fell below [`Datastore::change_floor`] (pruned) reloads fully.
//!
//! [`sled`] is the embedded implementation, [`postgres`] the one shared
//! by server replicas; [`conformance`] is the suite every implementation
//! must pass.

#[cfg(test)]
pub(crate) mod conformance;
pub mod postgres;
pub mod revocations;
pub mod sled;

use std::fmt;
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sigil_identity::clock::serde_unix_seconds;
use sigil_identity::{
    AgentId, Bundle, EntryId, RegistrationEntry, SelectorSet, SpiffeId, TrustDomain,
};

pub use crate::audit::chain::AuditEvent;
use crate::audit::chain::{AuditRecord, ChainHead};
/// A stable identifier of one server replica; the datastore uses it as an
/// opaque key.
pub use crate::server_id::ServerId;
pub use sigil_identity::JwtAuthority;

pub use self::revocations::{CrlRecord, IssuanceRecord, RevocationReason, RevocationRecord};
pub use self::sled::SledDatastore;

/// What went wrong in the datastore.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DatastoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("join token has expired")]
    TokenExpired,
    #[error("bundle sequence for {trust_domain} would go back from {stored} to {given}")]
    SequenceRegression {
        trust_domain: TrustDomain,
        stored: u64,
        given: u64,
    },
    #[error("{0} changed while the change was being made; run it again")]
    Conflict(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("storage backend failed: {0}")]
    Backend(String),
    /// The write was made (readers see it) but could not be synced to disk,
    /// so it may not survive a crash: its outcome is unknown to the caller.
    #[error(
        "write applied but not confirmed on disk ({0}): it may be lost in a crash; the data directory's disk may be full or failing"
    )]
    Durability(String),
    /// The database cannot be reached (connection refused, failover in
    /// progress, pool timeout): nothing was done.
    #[error(
        "datastore unavailable ({0}): the request was not carried out (no change was made) and may be retried"
    )]
    Unavailable(String),
}

/// Result alias for datastore calls.
pub type Result<T, E = DatastoreError> = std::result::Result<T, E>;

/// How an entry changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Created,
    Updated,
    Deleted,
}

/// What one revision changed. Objects are carried whole (after the change;
/// for a deletion the entry as it was), so a replica applies a change
/// without reading anything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Changed {
    /// An entry; its `revision` is this change's.
    Entry {
        kind: ChangeKind,
        entry: RegistrationEntry,
    },
    /// `record: None` = removed (evicted or pruned). Attest, renew, first
    /// use, ban: `Some`.
    Agent {
        id: AgentId,
        record: Option<AgentRecord>,
    },
    /// `record: None` = consumed or pruned.
    JoinToken {
        hash: TokenHash,
        record: Option<JoinTokenRecord>,
    },
    /// `bundle: None` = deleted.
    Bundle {
        trust_domain: TrustDomain,
        bundle: Option<Bundle>,
    },
    /// The CA journal of replica `server_id` was replaced (read it with
    /// [`Datastore::fetch_ca_journal`]).
    CaJournal { server_id: ServerId },
    /// X509-SVIDs were revoked (read them with
    /// [`Datastore::list_revocations`]).
    Revocation { serials: Vec<String> },
    /// The CRL of CA `issuer` (SubjectKeyIdentifier, hex) was replaced
    /// (read it with [`Datastore::list_crls`]).
    Crl { issuer: String },
}

/// One record of the change feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The revision this change produced.
    pub revision: u64,
    /// What it changed.
    pub changed: Changed,
}

impl Change {
    /// An entry change (the entry's revision is the change's).
    pub fn entry(kind: ChangeKind, entry: RegistrationEntry) -> Self {
        Self {
            revision: entry.revision,
            changed: Changed::Entry { kind, entry },
        }
    }

    /// The entry change this is, if it is one.
    pub fn as_entry(&self) -> Option<(ChangeKind, &RegistrationEntry)> {
        match &self.changed {
            Changed::Entry { kind, entry } => Some((*kind, entry)),
            _ => None,
        }
    }
}

/// A read-modify-write of one trust domain's bundle
/// ([`Datastore::update_bundle`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleEdit {
    /// CA certificates (DER) added if absent.
    pub add_x509: Vec<Vec<u8>>,
    /// CA certificates (DER) removed if present.
    pub remove_x509: Vec<Vec<u8>>,
    /// JWT authorities added, replacing one with the same kid.
    pub add_jwt: Vec<JwtAuthority>,
    /// JWT authorities removed, by kid.
    pub remove_jwt: Vec<String>,
    /// Set as the bundle's refresh hint when `Some`.
    pub refresh_hint: Option<std::time::Duration>,
    /// CA certificates (DER) marked tainted, if in the bundle.
    pub taint_x509: Vec<Vec<u8>>,
    /// JWT authorities marked tainted by kid, if in the bundle.
    pub taint_jwt: Vec<String>,
}

impl BundleEdit {
    /// Applies the edit to `bundle` (removals first, so an authority both
    /// removed and added stays); returns whether anything changed. The
    /// sequence is left alone.
    pub fn apply_to(&self, bundle: &mut Bundle) -> bool {
        let before = bundle.clone();
        bundle
            .x509_authorities
            .retain(|c| !self.remove_x509.contains(c));
        bundle
            .jwt_authorities
            .retain(|a| !self.remove_jwt.contains(&a.kid));
        for c in &self.add_x509 {
            if !bundle.x509_authorities.contains(c) {
                bundle.x509_authorities.push(c.clone());
            }
        }
        for a in &self.add_jwt {
            match bundle.jwt_authorities.iter_mut().find(|b| b.kid == a.kid) {
                Some(b) => *b = a.clone(),
                None => bundle.jwt_authorities.push(a.clone()),
            }
        }
        if self.refresh_hint.is_some() {
            bundle.refresh_hint = self.refresh_hint;
        }
        // Taint markers: added for authorities present, and removed with
        // their authority.
        let mut x509 = std::mem::take(&mut bundle.tainted_x509_authorities);
        x509.extend(self.taint_x509.iter().cloned());
        let mut jwt = std::mem::take(&mut bundle.tainted_jwt_kids);
        jwt.extend(self.taint_jwt.iter().cloned());
        bundle.set_taint(x509, jwt);
        *bundle != before
    }
}

/// Which entries `list_entries` returns; every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryFilter {
    /// Exactly this SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
    /// Exactly this parent.
    pub parent_id: Option<SpiffeId>,
    /// Entries holding all of these selectors.
    pub selectors: Option<SelectorSet>,
    /// Entries of this registration-file owner.
    pub owner: Option<String>,
}

impl EntryFilter {
    /// Whether `e` passes the filter.
    pub fn matches(&self, e: &RegistrationEntry) -> bool {
        self.spiffe_id.as_ref().is_none_or(|id| *id == e.spiffe_id)
            && self.parent_id.as_ref().is_none_or(|id| *id == e.parent_id)
            && self
                .selectors
                .as_ref()
                .is_none_or(|s| s.is_subset(&e.selectors))
            && self.owner.as_ref().is_none_or(|o| *o == e.owner)
    }
}

/// Entry changes made together by [`Datastore::apply_entries`]: all of them
/// or none. Updates and deletions name the revision they were planned
/// against; if the stored entry has moved on since, nothing is changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryBatch {
    /// New entries (ids must be free).
    pub create: Vec<RegistrationEntry>,
    /// Replacements; each `revision` is the stored revision expected.
    pub update: Vec<RegistrationEntry>,
    /// Deletions: id and the stored revision expected.
    pub delete: Vec<(EntryId, u64)>,
    /// The audit events of these changes, written in the same step.
    pub audit: Vec<AuditEvent>,
}

impl EntryBatch {
    /// Whether the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.delete.is_empty()
    }
}

/// The identity of what makes two entries "the same registration": one
/// SPIFFE ID, under one parent, for one selector set.
pub fn entry_key(e: &RegistrationEntry) -> Vec<u8> {
    let mut k = Vec::new();
    k.extend_from_slice(e.spiffe_id.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(e.parent_id.as_str().as_bytes());
    for s in &e.selectors {
        k.push(0);
        k.extend_from_slice(s.to_string().as_bytes());
    }
    k
}

/// An attested agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The agent's SPIFFE ID (stored as the plain ID string).
    pub id: AgentId,
    /// Which node attestor admitted it.
    pub attestor: String,
    /// Serial (hex) of the agent's current SVID (shown to operators).
    pub serial: String,
    /// SHA-256 (hex) of the DER of the agent SVID it must present: the
    /// pin. A serial alone is not enough: with an upstream CA, a sibling CA
    /// can mint a certificate with the same serial. Empty only in records
    /// written before pinning by hash; those match by serial until the
    /// next renewal or attestation writes a hash.
    #[serde(default)]
    pub cert_sha256: String,
    /// SHA-256 of the SVID issued during a renewal, also accepted; its
    /// first use makes it the pin.
    #[serde(default)]
    pub pending_cert_sha256: Option<String>,
    /// Expiry of the current agent SVID.
    #[serde(with = "serde_unix_seconds")]
    pub expires_at: SystemTime,
    /// Node selectors from attestation.
    pub selectors: SelectorSet,
    /// Banned agents are refused everywhere until evicted.
    pub banned: bool,
    /// Whether the attestor allows the node to attest again.
    pub can_reattest: bool,
    /// When it first attested.
    #[serde(with = "serde_unix_seconds")]
    pub created_at: SystemTime,
}

/// SHA-256 (hex) of a certificate's DER: how agents are pinned.
pub fn cert_sha256(der: &[u8]) -> String {
    sigil_identity::random::hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// SHA-256 of a join token, hex. The token itself is never stored.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TokenHash(String);

impl TokenHash {
    /// Hashes a token.
    pub fn of(token: &str) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        Self(sigil_identity::random::hex(d.as_ref()))
    }

    /// The hash, hex.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A prefix is enough to tell hashes apart in logs.
        write!(f, "TokenHash({}…)", &self.0[..self.0.len().min(8)])
    }
}

/// A join token as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// Hash of the token.
    pub hash: TokenHash,
    /// After this the token is refused.
    #[serde(with = "serde_unix_seconds")]
    pub expires_at: SystemTime,
    /// Optional node alias ID to attach to the agent.
    pub alias: Option<SpiffeId>,
}

/// Where the audit chain stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuditChainState {
    /// The last record written (sequence 0 before the first).
    pub head: ChainHead,
    /// The last record removed by retention, where verification starts.
    pub anchor: Option<ChainHead>,
}

/// The audit event of a mutation, written in the same atomic write as the
/// mutation and only if it is made: a crash never leaves one without the
/// other. `None` for mutations that are not audited.
pub type AuditWith = Option<AuditEvent>;

/// The storage interface of the server.
///
/// Every mutation of entries, agents, join tokens, bundles and CA journals
/// takes the next revision and records its [`Change`] in the same atomic
/// write (a mutation of N objects: N consecutive revisions). Audit appends
/// take no revision.
#[async_trait]
pub trait Datastore: Send + Sync + fmt::Debug {
    /// Stores a new entry, assigning its revision. Fails with
    /// `AlreadyExists` if the id, or the same (SPIFFE ID, parent,
    /// selectors), is taken.
    async fn create_entry(&self, entry: RegistrationEntry) -> Result<RegistrationEntry> {
        self.create_entries_audited(vec![(entry, None)])
            .await?
            .pop()
            .unwrap_or_else(|| Err(DatastoreError::Backend("no result for the entry".into())))
    }
    /// Creates several entries with one durable sync; one result per item.
    async fn create_entries(
        &self,
        entries: Vec<RegistrationEntry>,
    ) -> Result<Vec<Result<RegistrationEntry>>> {
        self.create_entries_audited(entries.into_iter().map(|e| (e, None)).collect())
            .await
    }
    /// [`Datastore::create_entries`], each entry with its audit event.
    async fn create_entries_audited(
        &self,
        entries: Vec<(RegistrationEntry, AuditWith)>,
    ) -> Result<Vec<Result<RegistrationEntry>>>;
    /// Replaces an existing entry (same id), assigning a new revision.
    async fn update_entry(&self, entry: RegistrationEntry) -> Result<RegistrationEntry> {
        self.update_entry_audited(entry, None).await
    }
    /// [`Datastore::update_entry`] with its audit event.
    async fn update_entry_audited(
        &self,
        entry: RegistrationEntry,
        audit: AuditWith,
    ) -> Result<RegistrationEntry>;
    /// Deletes an entry and returns it.
    async fn delete_entry(&self, id: &EntryId) -> Result<RegistrationEntry> {
        self.delete_entry_audited(id, None).await
    }
    /// [`Datastore::delete_entry`] with its audit event.
    async fn delete_entry_audited(
        &self,
        id: &EntryId,
        audit: AuditWith,
    ) -> Result<RegistrationEntry>;
    /// Makes every change of `batch` (deletions first, then updates, then
    /// creations), each with its own revision and change-feed record, in
    /// one atomic, durable step; on any error nothing is changed. Returns
    /// the changes in the order made.
    async fn apply_entries(&self, batch: EntryBatch) -> Result<Vec<Change>>;
    /// One entry by id.
    async fn fetch_entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>>;
    /// Entries passing `filter`, ordered by id.
    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<RegistrationEntry>>;
    /// How many entries exist.
    async fn count_entries(&self) -> Result<u64>;

    /// Changes with revision greater than `after`, oldest first, at most
    /// `limit`: every kind of object, in commit order, without gaps above
    /// [`Datastore::change_floor`].
    async fn changes(&self, after: u64, limit: usize) -> Result<Vec<Change>>;
    /// The revision of the latest change (0 when none).
    async fn current_revision(&self) -> Result<u64>;
    /// Every change with a revision above this is still stored (0 until
    /// something is pruned). A reader whose position is below it missed
    /// changes and must reload fully.
    async fn change_floor(&self) -> Result<u64>;
    /// Removes the changes with revision up to `through` (at most the
    /// current revision), raising the floor to it (never lowering it);
    /// returns how many went. Runs on one replica at a time: another
    /// replica pruning at the same moment makes this return 0.
    async fn prune_changes(&self, through: u64) -> Result<usize>;
    /// A wake-up for change readers: its value is some revision known to
    /// be committed (durable), bumped after writes. Readers never take
    /// content from it: they call [`Datastore::changes`].
    fn change_hint(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Stores a newly attested agent; `AlreadyExists` if present.
    async fn create_agent(&self, agent: AgentRecord) -> Result<AgentRecord> {
        self.create_agent_audited(agent, None).await
    }
    /// [`Datastore::create_agent`] with its audit event.
    async fn create_agent_audited(
        &self,
        agent: AgentRecord,
        audit: AuditWith,
    ) -> Result<AgentRecord>;
    /// Replaces an agent record; `NotFound` if absent. A ban is sticky: an
    /// update never clears `banned` (only `delete_agent` does), so a ban
    /// racing with a renewal cannot be lost. Returns the stored record.
    async fn update_agent(&self, agent: AgentRecord) -> Result<AgentRecord> {
        self.update_agent_audited(agent, None).await
    }
    /// [`Datastore::update_agent`] with its audit event.
    async fn update_agent_audited(
        &self,
        agent: AgentRecord,
        audit: AuditWith,
    ) -> Result<AgentRecord>;
    /// One agent.
    async fn fetch_agent(&self, id: &AgentId) -> Result<Option<AgentRecord>>;
    /// All agents, ordered by id.
    async fn list_agents(&self) -> Result<Vec<AgentRecord>>;
    /// Removes an agent (evict) and returns it.
    async fn delete_agent(&self, id: &AgentId) -> Result<AgentRecord> {
        self.delete_agent_audited(id, None).await
    }
    /// [`Datastore::delete_agent`] with its audit event.
    async fn delete_agent_audited(&self, id: &AgentId, audit: AuditWith) -> Result<AgentRecord>;
    /// Removes agents that are not banned and whose SVID expired before
    /// `expired_before`, returning their ids. An agent renewed meanwhile
    /// is kept. Runs on one replica at a time (see
    /// [`Datastore::prune_changes`]).
    async fn prune_agents(&self, expired_before: SystemTime) -> Result<Vec<AgentId>>;

    /// Stores a join token hash.
    async fn create_join_token(&self, token: JoinTokenRecord) -> Result<()> {
        self.create_join_token_audited(token, None).await
    }
    /// [`Datastore::create_join_token`] with its audit event.
    async fn create_join_token_audited(
        &self,
        token: JoinTokenRecord,
        audit: AuditWith,
    ) -> Result<()>;
    /// Atomically takes a token: exactly one caller ever gets it. An
    /// expired token is removed and refused with `TokenExpired`.
    async fn consume_join_token(
        &self,
        hash: &TokenHash,
        now: SystemTime,
    ) -> Result<JoinTokenRecord>;
    /// Removes expired tokens, returning how many. Runs on one replica at
    /// a time.
    async fn prune_join_tokens(&self, now: SystemTime) -> Result<usize>;

    /// Stores a bundle whole (a foreign trust domain's); its sequence must
    /// be greater than the stored one.
    async fn put_bundle(&self, bundle: &Bundle) -> Result<()>;
    /// Edits the bundle of `td` in one read-modify-write transaction (a
    /// missing bundle starts empty): the sequence becomes the stored one +
    /// 1 (1 when new). Returns the stored result; an edit that changes an
    /// existing bundle in nothing writes nothing (no new revision).
    async fn update_bundle(&self, td: &TrustDomain, edit: BundleEdit) -> Result<Bundle>;
    /// The bundle of `td`.
    async fn fetch_bundle(&self, td: &TrustDomain) -> Result<Option<Bundle>>;
    /// All bundles, ordered by trust domain.
    async fn list_bundles(&self) -> Result<Vec<Bundle>>;
    /// Removes the bundle of `td`.
    async fn delete_bundle(&self, td: &TrustDomain) -> Result<()>;

    /// The CA journal of replica `server`, as stored by
    /// [`Datastore::put_ca_journal`].
    async fn fetch_ca_journal(&self, server: &ServerId) -> Result<Option<Vec<u8>>>;
    /// Replaces the CA journal of replica `server` (one revision).
    async fn put_ca_journal(&self, server: &ServerId, journal: Vec<u8>) -> Result<()>;
    /// Every replica's CA journal, by server id.
    async fn list_ca_journals(&self) -> Result<Vec<(ServerId, Vec<u8>)>>;

    /// Appends audit events in order with one durable sync, returning the
    /// sequence number of the last one (0 if `events` is empty). Like every
    /// audit write, chains them with [`crate::audit::chain::chain`] after
    /// the head read in the same transaction, and stores the new head.
    async fn append_audit(&self, events: Vec<AuditEvent>) -> Result<u64>;
    /// Like [`Datastore::append_audit`], without waiting until the events
    /// are durable: [`Datastore::sync`], or any later durable write, makes
    /// them so.
    async fn append_audit_unsynced(&self, events: Vec<AuditEvent>) -> Result<u64>;
    /// Returns once every write made so far is durable.
    async fn sync(&self) -> Result<()>;
    /// Audit events with sequence greater than `after`, oldest first.
    async fn list_audit(&self, after: u64, limit: usize) -> Result<Vec<(u64, AuditEvent)>>;
    /// Removes the oldest audit events, stopping at the first record (a
    /// written batch) holding an event at or after `before`; returns how
    /// many events went. Keeps the last removed record's sequence number
    /// and hash as the chain's anchor, in the same transaction. Runs on one
    /// replica at a time.
    async fn prune_audit(&self, before: SystemTime) -> Result<usize>;
    /// Stored audit records with sequence greater than `after`, in stored
    /// order (tampering may have put them out of sequence), at most `limit`.
    async fn audit_records(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>>;
    /// The chain's head and anchor.
    async fn audit_chain(&self) -> Result<AuditChainState>;
    /// Stores a signed checkpoint (a note) of the first `size` records.
    async fn put_audit_checkpoint(&self, size: u64, note: String) -> Result<()>;
    /// Every stored checkpoint, by size.
    async fn audit_checkpoints(&self) -> Result<Vec<(u64, String)>>;
    /// The checkpoint of the largest size.
    async fn latest_audit_checkpoint(&self) -> Result<Option<(u64, String)>>;

    /// Stores records of issued X509-SVIDs (no revision: they are not in
    /// the change feed). A serial already recorded is replaced.
    async fn record_issuances(&self, records: Vec<IssuanceRecord>) -> Result<()>;
    /// The issuance record of `serial` (lowercase hex), if kept.
    async fn fetch_issuance(&self, serial: &str) -> Result<Option<IssuanceRecord>>;
    /// Every kept issuance record naming `id`, by serial.
    async fn list_issuances_of(&self, id: &SpiffeId) -> Result<Vec<IssuanceRecord>>;
    /// Revokes certificates (one revision, a [`Changed::Revocation`]); a
    /// serial already revoked keeps its first record. Returns the revision.
    async fn revoke_x509(&self, records: Vec<RevocationRecord>) -> Result<u64>;
    /// Every kept revocation, by serial.
    async fn list_revocations(&self) -> Result<Vec<RevocationRecord>>;
    /// Replaces the CRL of `crl.issuer` (one revision, a [`Changed::Crl`])
    /// unless the stored one has a higher number.
    async fn put_crl(&self, crl: CrlRecord) -> Result<()>;
    /// Every kept CRL, by issuer.
    async fn list_crls(&self) -> Result<Vec<CrlRecord>>;
    /// Removes issuance and revocation records whose certificate expired
    /// before `now`, and CRLs whose CA did; returns how many went. Not in
    /// the change feed: an expired serial is refused by its NotAfter.
    async fn prune_revocations(&self, now: SystemTime) -> Result<usize>;
}
