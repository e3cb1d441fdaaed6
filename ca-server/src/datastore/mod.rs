//! Persistent state behind one trait.
//!
//! The [`Datastore`] trait deals in domain types and is grouped by entity:
//! registration entries (with a change feed keyed by revision), attested
//! agents, join tokens (stored only as hashes), trust bundles, the CA
//! journal, and audit events. Every mutation returns only after it is
//! durable. [`sled`] is the embedded implementation, [`postgres`] the one
//! shared by server replicas; [`conformance`] is the suite every
//! implementation must pass.

#[cfg(test)]
pub(crate) mod conformance;
pub mod postgres;
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
use crate::ca::journal::CaJournal;

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
    /// progress, pool timeout): nothing was changed.
    #[error("datastore unavailable ({0}): the change was not made; retry when the database is back")]
    Unavailable(String),
}

/// Opens the datastore `[datastore]` names: sled under
/// `<data_dir>/datastore`, or the PostgreSQL database (migrated to this
/// binary's schema).
pub async fn open(
    section: &crate::config::DatastoreSection,
    data_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn Datastore>> {
    use crate::config::DatastoreKind;
    match (section.kind, &section.connection) {
        (DatastoreKind::Postgres, Some(connection)) => {
            let settings = postgres::PgSettings::parse(
                connection.expose(),
                section.password_file.as_deref(),
            )
            .map_err(|e| DatastoreError::Backend(e.to_string()))?;
            let options = postgres::PgOptions {
                pool_size: section.pool_size,
                poll_interval: section.poll_interval,
            };
            Ok(std::sync::Arc::new(
                postgres::PostgresDatastore::open(settings, options).await?,
            ))
        }
        (DatastoreKind::Postgres, None) => Err(DatastoreError::Backend(
            "datastore.type = \"postgres\" needs datastore.connection".into(),
        )),
        (DatastoreKind::Sled, _) => Ok(std::sync::Arc::new(SledDatastore::open(
            data_dir.join("datastore"),
        )?)),
    }
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

/// One entry in the change feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryChange {
    /// The revision this change produced.
    pub revision: u64,
    /// What happened.
    pub kind: ChangeKind,
    /// The entry after the change (before it, for a deletion).
    pub entry: RegistrationEntry,
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
    async fn apply_entries(&self, batch: EntryBatch) -> Result<Vec<EntryChange>>;
    /// One entry by id.
    async fn fetch_entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>>;
    /// Entries passing `filter`, ordered by id.
    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<RegistrationEntry>>;
    /// How many entries exist.
    async fn count_entries(&self) -> Result<u64>;
    /// Changes with revision greater than `after`, oldest first, at most `limit`.
    async fn entry_changes(&self, after: u64, limit: usize) -> Result<Vec<EntryChange>>;
    /// The revision of the latest entry change (0 when none).
    async fn current_revision(&self) -> Result<u64>;
    /// Removes the changes with revision up to `through`, returning how
    /// many went.
    async fn prune_entry_changes(&self, through: u64) -> Result<usize>;

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
    /// is kept.
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
    /// Removes expired tokens, returning how many.
    async fn prune_join_tokens(&self, now: SystemTime) -> Result<usize>;

    /// Stores a bundle; its sequence must be greater than the stored one.
    async fn put_bundle(&self, bundle: &Bundle) -> Result<()>;
    /// The bundle of `td`.
    async fn fetch_bundle(&self, td: &TrustDomain) -> Result<Option<Bundle>>;
    /// All bundles, ordered by trust domain.
    async fn list_bundles(&self) -> Result<Vec<Bundle>>;
    /// Removes the bundle of `td`.
    async fn delete_bundle(&self, td: &TrustDomain) -> Result<()>;

    /// The CA journal, if one was written.
    async fn fetch_ca_journal(&self) -> Result<Option<CaJournal>>;
    /// Replaces the CA journal.
    async fn put_ca_journal(&self, journal: &CaJournal) -> Result<()>;

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
    /// and hash as the chain's anchor, in the same transaction.
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
}
