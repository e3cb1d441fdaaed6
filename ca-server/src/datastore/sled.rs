//! The embedded datastore: sled 0.34, with a group-commit `fdatasync`.
//!
//! sled's own `flush` writes its buffers to the data file but does not
//! fsync it (it uses `sync_file_range`), so a power loss could lose writes
//! sled reported flushed. Every mutation here therefore waits for a
//! [`GroupSync`] round: one background thread flushes sled and then calls
//! `fdatasync` on the data file, and every writer whose change happened
//! before the round started is released by it. Concurrent writers share one
//! sync. Multi-record changes (an object, its change-feed record and the
//! revision counter; for an entry also its uniqueness key) go through one
//! sled transaction, so a crash leaves them wholly present or wholly
//! absent. The change feed is the `entry_changes` tree (its name from when
//! it held entry changes only; those old records still decode).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use ::sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use ::sled::{Transactional, Tree};
use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sigil_identity::{AgentId, Bundle, EntryId, RegistrationEntry, TrustDomain};
use tokio::sync::watch;

use super::*;
use crate::audit::chain::{self, AuditRecord, ChainHead};

const REVISION_KEY: &[u8] = b"revision";
/// Meta key of the change floor (see [`Datastore::change_floor`]).
const CHANGE_FLOOR_KEY: &[u8] = b"change_floor";
/// Meta key of the single CA journal versions before replicas wrote; read
/// for any server id until the first keyed journal is put.
const LEGACY_CA_JOURNAL_KEY: &[u8] = b"ca_journal";
/// Meta keys of the audit chain: its head (the last record) and its
/// anchor (the last pruned record), each a [`ChainHead::to_bytes`].
const AUDIT_HEAD_KEY: &[u8] = b"audit_head";
const AUDIT_ANCHOR_KEY: &[u8] = b"audit_anchor";

/// The sled-backed [`Datastore`].
///
/// sled latches the first I/O error of its own writes (a full disk) and
/// refuses every later write of that `Db`. The open database therefore
/// sits behind a swappable handle: once sled reports such an error, the
/// next call reopens it in-process (retried with a back-off while the
/// disk is still full), so writes resume without a restart once space is
/// back. Reopening recovers from what is on disk: every acknowledged write
/// was synced, an unacknowledged one may be lost.
pub struct SledDatastore {
    /// The open database; `None` while it is reopened and after a reopen
    /// failed.
    store: std::sync::RwLock<Option<Arc<Store>>>,
    /// When the next reopen may be tried; held while reopening.
    reopen: Mutex<Backoff>,
    sync_file: Arc<SyncFile>,
    /// The change hint, kept across reopens.
    hint: Arc<watch::Sender<u64>>,
    path: PathBuf,
}

/// One open sled database and its trees.
struct Store {
    /// The configuration the database was opened with: it shares sled's
    /// latched error, which tells when the database must be reopened.
    config: ::sled::Config,
    entries: ::sled::Tree,
    entry_keys: ::sled::Tree,
    changes: ::sled::Tree,
    meta: ::sled::Tree,
    agents: ::sled::Tree,
    tokens: ::sled::Tree,
    bundles: ::sled::Tree,
    /// CA journals by server id.
    ca_journals: ::sled::Tree,
    audit: ::sled::Tree,
    /// Signed audit checkpoints by tree size (big-endian).
    checkpoints: ::sled::Tree,
    /// Issued X509-SVIDs by serial.
    issuances: ::sled::Tree,
    /// `spiffe id \0 serial` of every issuance record (empty values).
    issuances_by_id: ::sled::Tree,
    /// Revoked X509-SVIDs by serial.
    revocations: ::sled::Tree,
    /// Each CA's CRL by issuer.
    crls: ::sled::Tree,
    sync: GroupSync,
    /// Every change up to this revision is on disk; later ones are lost
    /// if sled has to be reopened.
    synced_revision: Arc<AtomicU64>,
}

/// Back-off between reopen attempts, so a still-full disk is not hammered.
#[derive(Default)]
struct Backoff {
    next_try: Option<Instant>,
    delay: Duration,
}

const REOPEN_MIN_DELAY: Duration = Duration::from_millis(100);
const REOPEN_MAX_DELAY: Duration = Duration::from_secs(5);

impl Backoff {
    /// A reopen could not be made: wait longer before the next one.
    fn failed(&mut self) {
        self.delay = (self.delay * 2).clamp(REOPEN_MIN_DELAY, REOPEN_MAX_DELAY);
        self.next_try = Some(Instant::now() + self.delay);
    }
}

impl fmt::Debug for SledDatastore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledDatastore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The hint for an error of sled's own writes.
const RESUME_HINT: &str = "free space, writes resume by themselves";

fn backend(e: ::sled::Error) -> DatastoreError {
    match e {
        ::sled::Error::Io(io) => DatastoreError::Backend(write_failed(&io)),
        other => DatastoreError::Backend(other.to_string()),
    }
}

/// What to tell about a failed I/O of the data files.
fn write_failed(io: &std::io::Error) -> String {
    if io.kind() == std::io::ErrorKind::StorageFull {
        format!("datastore write failed: no space left on device ({io}); {RESUME_HINT}")
    } else {
        format!("datastore I/O failed: {io}; check the data directory's disk")
    }
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| DatastoreError::Corrupt(e.to_string()))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| DatastoreError::Corrupt(e.to_string()))
}

fn read_u64(v: Option<::sled::IVec>) -> u64 {
    v.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// Maps a transaction outcome, keeping our own aborts as they are.
fn tx<T>(r: std::result::Result<T, TransactionError<DatastoreError>>) -> Result<T> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => backend(e),
    })
}

fn abort<T>(
    e: DatastoreError,
) -> std::result::Result<T, ConflictableTransactionError<DatastoreError>> {
    Err(ConflictableTransactionError::Abort(e))
}

fn tx_decode<T: DeserializeOwned>(
    bytes: &[u8],
) -> std::result::Result<T, ConflictableTransactionError<DatastoreError>> {
    decode(bytes).map_err(ConflictableTransactionError::Abort)
}

/// How long [`open_db`] keeps retrying a directory whose lock is held.
/// sled can still hold its lock a moment after the `Db` is dropped (a
/// test that reopened a store at once failed on it under load), so a
/// store reopened in the same process may find its own old lock. A lock
/// held by another process is reported after this wait.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Opens the sled database in `path`, waiting up to [`LOCK_WAIT`] for its
/// directory lock.
fn open_db(path: &Path) -> Result<(::sled::Config, ::sled::Db)> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let config = ::sled::Config::new().path(path);
        match config.open() {
            Ok(db) => return Ok((config, db)),
            // sled reports the directory lock as an I/O error mentioning it.
            Err(::sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                if Instant::now() >= deadline {
                    return Err(DatastoreError::Backend(format!(
                        "data directory {} is locked by another process; is a server already running on it?",
                        path.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(other) => {
                return Err(DatastoreError::Backend(format!(
                    "cannot open sled store at {}: {other}",
                    path.display()
                )));
            }
        }
    }
}

fn tx_encode<T: Serialize>(
    v: &T,
) -> std::result::Result<Vec<u8>, ConflictableTransactionError<DatastoreError>> {
    encode(v).map_err(ConflictableTransactionError::Abort)
}

impl SledDatastore {
    /// Opens (or creates) the store in directory `path`.
    ///
    /// sled locks the directory: a second process opening it fails (after
    /// waiting [`LOCK_WAIT`] for the lock), which is why the CLI always
    /// goes through the server's admin API.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, Arc::new(|f: &File| f.sync_data()))
    }

    /// [`SledDatastore::open`] with the call that makes a file durable
    /// (tests inject failures and observe which files are synced).
    pub(crate) fn open_with(path: impl AsRef<Path>, sync_file: Arc<SyncFile>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        std::fs::create_dir_all(&path).map_err(|e| {
            DatastoreError::Backend(format!(
                "cannot create data directory {}: {e}",
                path.display()
            ))
        })?;
        let (hint, _) = watch::channel(0);
        let hint = Arc::new(hint);
        let store = Store::open(&path, Arc::clone(&sync_file), Arc::clone(&hint))?;
        Ok(Self {
            store: std::sync::RwLock::new(Some(Arc::new(store))),
            reopen: Mutex::default(),
            sync_file,
            hint,
            path,
        })
    }

    /// The open database. If sled latched an I/O error, it is reopened
    /// first (at most once per back-off delay); until that succeeds the
    /// latched database is returned: sled still serves reads from it and
    /// refuses writes with the error.
    fn store(&self) -> Result<Arc<Store>> {
        let current = self
            .store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|s| s.config.global_error().is_ok());
        match current {
            Some(s) => Ok(s),
            // Our handle is dropped first: the old database's directory
            // lock goes with the last one.
            _ => self.reopen(),
        }
    }

    /// Reopens the database after sled latched an error (see [`Self::store`]).
    ///
    /// One call reopens; calls meanwhile do not wait for it (blocking
    /// more runtime threads could hold up calls still using the old
    /// database, whose release the reopen waits for).
    fn reopen(&self) -> Result<Arc<Store>> {
        let current = || self.store.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut backoff = match self.reopen.try_lock() {
            Ok(b) => b,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return current().ok_or_else(|| {
                    DatastoreError::Backend(format!(
                        "datastore is being reopened after a write failure; retry; {RESUME_HINT}"
                    ))
                });
            }
        };
        let latched = match current() {
            // Another caller reopened it meanwhile.
            Some(s) => match s.config.global_error() {
                Ok(()) => return Ok(s),
                Err(e) => Some((s, e)),
            },
            None => None,
        };
        if backoff.next_try.is_some_and(|t| Instant::now() < t) {
            return match latched {
                Some((s, _)) => Ok(s),
                None => Err(DatastoreError::Backend(format!(
                    "datastore is not open after a write failure; {RESUME_HINT}"
                ))),
            };
        }
        if let Some((s, e)) = &latched {
            // sled cannot open on a full disk: keep the latched database,
            // which still serves reads, until there is room again.
            if let Err(probe) = room_to_reopen(&self.path) {
                backoff.failed();
                tracing::debug!(error = %probe, "no room yet to reopen the datastore");
                return Ok(Arc::clone(s));
            }
            tracing::warn!(
                error = %e,
                path = %self.path.display(),
                "sled refused writes after an I/O error; reopening the datastore"
            );
        }
        let unsynced = latched.as_ref().map(|(s, _)| s.unsynced_changes());
        // Dropping every handle of the old database releases its
        // directory lock; `Store::open` waits for calls still using it.
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = None;
        drop(latched);
        match Store::open(
            &self.path,
            Arc::clone(&self.sync_file),
            Arc::clone(&self.hint),
        ) {
            Ok(store) => {
                if let Some((lost, seen)) = unsynced
                    && let Err(e) = store.reconcile(&lost, seen)
                {
                    tracing::error!(
                        error = %e,
                        "changes lost in the reopen could not be corrected; restart the server to rebuild its registry"
                    );
                }
                *backoff = Backoff::default();
                let store = Arc::new(store);
                *self.store.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&store));
                tracing::info!(path = %self.path.display(), "datastore reopened; writes resume");
                Ok(store)
            }
            Err(e) => {
                backoff.failed();
                tracing::error!(
                    error = %e,
                    retry_in_ms = backoff.delay.as_millis() as u64,
                    "datastore reopen failed"
                );
                Err(DatastoreError::Backend(format!(
                    "datastore reopen after a write failure failed: {e}; {RESUME_HINT}"
                )))
            }
        }
    }

    /// Moves `server`'s CA journal to where versions before server ids
    /// kept the only one (tests of the upgrade).
    #[cfg(test)]
    pub(crate) fn make_ca_journal_legacy(&self, server: &ServerId) {
        let s = self.store().unwrap();
        let journal = s.ca_journals.remove(server.as_str()).unwrap().unwrap();
        s.meta.insert(LEGACY_CA_JOURNAL_KEY, journal).unwrap();
    }

    /// How many syncs have been asked for (tests).
    #[cfg(test)]
    pub(crate) fn syncs_requested(&self) -> u64 {
        self.store()
            .map(|s| {
                s.sync
                    .shared
                    .state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .requested
            })
            .unwrap_or(0)
    }
}

/// How much free space [`room_to_reopen`] asks for: sled writes a
/// segment (512 KiB) and its snapshot when it opens.
const REOPEN_ROOM: usize = 1 << 20;

/// Whether the data directory has room for sled to open: writes (and then
/// removes) a file of [`REOPEN_ROOM`] bytes.
fn room_to_reopen(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let probe = dir.join("reopen-probe");
    let written = File::create(&probe).and_then(|mut f| {
        f.write_all(&vec![0; REOPEN_ROOM])?;
        f.sync_data()
    });
    let _ = std::fs::remove_file(&probe);
    written
}

impl Store {
    /// Opens the database in directory `path`, which exists.
    fn open(path: &Path, sync_file: Arc<SyncFile>, hint: Arc<watch::Sender<u64>>) -> Result<Self> {
        let (config, db) = open_db(path)?;
        let tree = |name: &str| db.open_tree(name).map_err(backend);
        let data_file = File::open(path.join("db")).map_err(|e| {
            DatastoreError::Backend(format!("cannot open sled data file for syncing: {e}"))
        })?;
        let meta = tree("meta")?;
        // Everything sled recovered is on disk.
        let revision = read_u64(meta.get(REVISION_KEY).map_err(backend)?);
        let synced_revision = Arc::new(AtomicU64::new(revision));
        hint.send_if_modified(|v| raise(v, revision));
        let store = Self {
            entries: tree("entries")?,
            entry_keys: tree("entry_keys")?,
            changes: tree("entry_changes")?,
            agents: tree("agents")?,
            tokens: tree("join_tokens")?,
            bundles: tree("bundles")?,
            ca_journals: tree("ca_journals")?,
            audit: tree("audit")?,
            checkpoints: tree("audit_checkpoints")?,
            issuances: tree("issuances")?,
            issuances_by_id: tree("issuances_by_id")?,
            revocations: tree("revocations")?,
            crls: tree("crls")?,
            sync: GroupSync::start(
                db.clone(),
                meta.clone(),
                Arc::clone(&synced_revision),
                path,
                data_file,
                sync_file,
                hint,
            ),
            meta,
            synced_revision,
            config,
        };
        store.init_audit_head()?;
        store.init_change_floor()?;
        Ok(store)
    }

    /// Before the floor was kept, entry changes were pruned without it:
    /// the floor is then the revision before the oldest stored change (or
    /// the current revision when none is stored).
    fn init_change_floor(&self) -> Result<()> {
        if self.meta.get(CHANGE_FLOOR_KEY).map_err(backend)?.is_some() {
            return Ok(());
        }
        let floor = match self.changes.first().map_err(backend)? {
            Some((k, _)) => read_u64(Some(k)).saturating_sub(1),
            None => read_u64(self.meta.get(REVISION_KEY).map_err(backend)?),
        };
        self.meta
            .insert(CHANGE_FLOOR_KEY, &floor.to_be_bytes())
            .map_err(backend)?;
        Ok(())
    }

    /// The changes made in memory but not yet synced, and the latest
    /// revision readers may have seen (read from a latched database before
    /// it is dropped: sled still serves reads).
    fn unsynced_changes(&self) -> (Vec<Change>, u64) {
        let synced = self.synced_revision.load(Ordering::SeqCst);
        let seen = read_u64(self.meta.get(REVISION_KEY).ok().flatten());
        let changes = self
            .changes
            .range(synced.saturating_add(1).to_be_bytes()..)
            .values()
            .filter_map(|v| decode_change(&v.ok()?).ok())
            .collect();
        (changes, seen)
    }

    /// After a reopen: readers (the change feed's) may have seen revisions
    /// up to `seen` that were never synced and are now gone. Revisions
    /// must not be handed out twice, and what was seen must be corrected:
    /// each object a lost change touched gets a new change record, after
    /// `seen`, with its state as stored now (removed if it is not stored).
    /// Runs before the reopened store is handed out: nothing else writes.
    fn reconcile(&self, lost: &[Change], seen: u64) -> Result<()> {
        let now = read_u64(self.meta.get(REVISION_KEY).map_err(backend)?);
        if now >= seen {
            return Ok(());
        }
        // One correction per object, by a key naming its kind and id.
        let mut touched: std::collections::BTreeMap<String, &Changed> = Default::default();
        for c in lost.iter().filter(|c| c.revision > now) {
            let key = match &c.changed {
                Changed::Entry { entry, .. } => format!("entry/{}", entry.id),
                Changed::Agent { id, .. } => format!("agent/{id}"),
                Changed::JoinToken { hash, .. } => format!("token/{}", hash.as_str()),
                Changed::Bundle { trust_domain, .. } => format!("bundle/{trust_domain}"),
                Changed::CaJournal { server_id } => format!("ca/{server_id}"),
                Changed::Revocation { serials } => format!("revocation/{}", serials.join(",")),
                Changed::Crl { issuer } => format!("crl/{issuer}"),
            };
            touched.insert(key, &c.changed);
        }
        // The stored state of everything but entries (entries are read and
        // rewritten inside the transaction, their revision changing).
        let mut others = Vec::new();
        for lost in touched.values() {
            let now = match lost {
                Changed::Entry { .. } => continue,
                Changed::Agent { id, .. } => Changed::Agent {
                    id: id.clone(),
                    record: self.get(&self.agents, id.as_str().as_bytes())?,
                },
                Changed::JoinToken { hash, .. } => Changed::JoinToken {
                    hash: hash.clone(),
                    record: self.get(&self.tokens, hash.as_str().as_bytes())?,
                },
                Changed::Bundle { trust_domain, .. } => Changed::Bundle {
                    trust_domain: trust_domain.clone(),
                    bundle: self.get(&self.bundles, trust_domain.as_str().as_bytes())?,
                },
                other @ (Changed::CaJournal { .. }
                | Changed::Revocation { .. }
                | Changed::Crl { .. }) => (*other).clone(),
            };
            others.push(now);
        }
        tx(
            (&self.entries, &self.changes, &self.meta).transaction(|(entries, changes, meta)| {
                meta.insert(REVISION_KEY, &seen.to_be_bytes())?;
                for lost in touched.values() {
                    let Changed::Entry { entry: lost, .. } = lost else {
                        continue;
                    };
                    let id = lost.id.as_str();
                    match entries.get(id)? {
                        Some(v) => {
                            let mut e: RegistrationEntry = tx_decode(&v)?;
                            e.revision = bump_revision(meta)?;
                            entries.insert(id, tx_encode(&e)?)?;
                            record_change(changes, ChangeKind::Updated, &e)?;
                        }
                        None => {
                            let e = RegistrationEntry {
                                revision: bump_revision(meta)?,
                                ..lost.clone()
                            };
                            record_change(changes, ChangeKind::Deleted, &e)?;
                        }
                    }
                }
                for changed in &others {
                    tx_record(changes, meta, changed.clone())?;
                }
                Ok(())
            }),
        )
    }

    /// Waits until every change made before this call is on stable storage.
    async fn durable(&self) -> Result<()> {
        self.sync.wait().await
    }

    /// Writes `events` as one record, keyed by its first sequence number,
    /// chained after the current head (see [`put_audit`]), and returns the
    /// last number (0 for none): a batch of issuance events costs one tree
    /// insert, not one each.
    fn insert_audit(&self, events: &[AuditEvent]) -> Result<u64> {
        if events.is_empty() {
            return Ok(0);
        }
        tx((&self.audit, &self.meta).transaction(|(audit, meta)| put_audit(audit, meta, events)))
    }

    /// Before the first chained write: a store whose audit records were
    /// written before the chain existed gets a head after the last of
    /// them, with the zero hash (they stay unchained).
    fn init_audit_head(&self) -> Result<()> {
        if self.meta.get(AUDIT_HEAD_KEY).map_err(backend)?.is_some() {
            return Ok(());
        }
        let Some(last) = self.audit.last().map_err(backend)? else {
            return Ok(());
        };
        let head = match decode_audit_record(read_u64(Some(last.0)), &last.1)?.pop() {
            Some(r) if r.prev.is_some() => ChainHead {
                seq: r.seq,
                hash: chain::record_hash(&r),
            },
            Some(r) => ChainHead {
                seq: r.seq,
                hash: chain::ZERO,
            },
            None => return Ok(()),
        };
        self.meta
            .insert(AUDIT_HEAD_KEY, &head.to_bytes()[..])
            .map_err(backend)?;
        Ok(())
    }

    fn get<T: DeserializeOwned>(&self, tree: &::sled::Tree, key: &[u8]) -> Result<Option<T>> {
        tree.get(key)
            .map_err(backend)?
            .map(|v| decode(&v))
            .transpose()
    }

    fn all<T: DeserializeOwned>(&self, tree: &::sled::Tree) -> Result<Vec<T>> {
        tree.iter()
            .values()
            .map(|v| decode(&v.map_err(backend)?))
            .collect()
    }

    /// One entry creation as a single transaction (no sync).
    fn insert_entry(
        &self,
        entry: RegistrationEntry,
        audit: &AuditWith,
    ) -> Result<RegistrationEntry> {
        tx(self.entry_trees().transaction(|trees| {
            let entry = tx_create(trees, &entry)?;
            put_audit(&trees.4, &trees.3, audit.as_slice())?;
            Ok(entry)
        }))
    }

    /// The trees an entry mutation writes, in [`EntryTrees`] order.
    fn entry_trees(&self) -> (&Tree, &Tree, &Tree, &Tree, &Tree) {
        (
            &self.entries,
            &self.entry_keys,
            &self.changes,
            &self.meta,
            &self.audit,
        )
    }
}

/// The entry trees inside a transaction: entries, uniqueness keys, change
/// feed, meta (revision counter), audit (for the mutation's own record).
type EntryTrees = (
    TransactionalTree,
    TransactionalTree,
    TransactionalTree,
    TransactionalTree,
    TransactionalTree,
);

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<DatastoreError>>;

fn duplicate(entry: &RegistrationEntry) -> DatastoreError {
    DatastoreError::AlreadyExists(format!(
        "an entry for {} under parent {} with the same selectors",
        entry.spiffe_id, entry.parent_id
    ))
}

/// Stores a new entry with the next revision.
fn tx_create(
    (entries, keys, changes, meta, _): &EntryTrees,
    entry: &RegistrationEntry,
) -> TxResult<RegistrationEntry> {
    let key = entry_key(entry);
    if entries.get(entry.id.as_str())?.is_some() {
        return abort(DatastoreError::AlreadyExists(format!("entry {}", entry.id)));
    }
    if keys.get(&key)?.is_some() {
        return abort(duplicate(entry));
    }
    let entry = RegistrationEntry {
        revision: bump_revision(meta)?,
        ..entry.clone()
    };
    entries.insert(entry.id.as_str(), tx_encode(&entry)?)?;
    keys.insert(key.as_slice(), entry.id.as_str())?;
    record_change(changes, ChangeKind::Created, &entry)?;
    Ok(entry)
}

/// Replaces a stored entry; with `expected`, only if its revision is that.
fn tx_update(
    (entries, keys, changes, meta, _): &EntryTrees,
    entry: &RegistrationEntry,
    expected: Option<u64>,
) -> TxResult<RegistrationEntry> {
    let Some(old) = entries.get(entry.id.as_str())? else {
        return abort(DatastoreError::NotFound(format!("entry {}", entry.id)));
    };
    let old: RegistrationEntry = tx_decode(&old)?;
    if expected.is_some_and(|r| r != old.revision) {
        return abort(DatastoreError::Conflict(format!("entry {}", entry.id)));
    }
    let old_key = entry_key(&old);
    let new_key = entry_key(entry);
    if old_key != new_key {
        if keys.get(&new_key)?.is_some() {
            return abort(duplicate(entry));
        }
        keys.remove(old_key.as_slice())?;
        keys.insert(new_key.as_slice(), entry.id.as_str())?;
    }
    let entry = RegistrationEntry {
        revision: bump_revision(meta)?,
        ..entry.clone()
    };
    entries.insert(entry.id.as_str(), tx_encode(&entry)?)?;
    record_change(changes, ChangeKind::Updated, &entry)?;
    Ok(entry)
}

/// Deletes a stored entry; with `expected`, only if its revision is that.
fn tx_delete(
    (entries, keys, changes, meta, _): &EntryTrees,
    id: &EntryId,
    expected: Option<u64>,
) -> TxResult<RegistrationEntry> {
    let Some(old) = entries.remove(id.as_str())? else {
        return abort(DatastoreError::NotFound(format!("entry {id}")));
    };
    let mut old: RegistrationEntry = tx_decode(&old)?;
    if expected.is_some_and(|r| r != old.revision) {
        return abort(DatastoreError::Conflict(format!("entry {id}")));
    }
    keys.remove(entry_key(&old))?;
    old.revision = bump_revision(meta)?;
    record_change(changes, ChangeKind::Deleted, &old)?;
    Ok(old)
}

/// Adds the mutation's audit events, if any, in the same transaction: one
/// record chained after the head stored in `meta` by [`chain::chain`],
/// keyed by its first sequence number, and the new head. Returns the last
/// sequence number (0 for no events). Concurrent writers conflict on the
/// head, so sled runs one of them again: the chain stays a line.
fn put_audit(
    audit: &TransactionalTree,
    meta: &TransactionalTree,
    events: &[AuditEvent],
) -> TxResult<u64> {
    if events.is_empty() {
        return Ok(0);
    }
    let head = match meta.get(AUDIT_HEAD_KEY)? {
        None => ChainHead::default(),
        Some(b) => match ChainHead::from_bytes(&b) {
            Some(h) => h,
            None => return abort(DatastoreError::Corrupt("the audit chain head".into())),
        },
    };
    let (records, head) = chain::chain(head, events);
    let first = head.seq + 1 - records.len() as u64;
    audit.insert(&first.to_be_bytes(), tx_encode(&records)?)?;
    meta.insert(AUDIT_HEAD_KEY, &head.to_bytes()[..])?;
    Ok(head.seq)
}

fn bump_revision(
    meta: &TransactionalTree,
) -> std::result::Result<u64, ConflictableTransactionError<DatastoreError>> {
    let revision = read_u64(meta.get(REVISION_KEY)?) + 1;
    meta.insert(REVISION_KEY, &revision.to_be_bytes())?;
    Ok(revision)
}

/// Records an entry change at the entry's (already bumped) revision.
fn record_change(
    changes: &TransactionalTree,
    kind: ChangeKind,
    entry: &RegistrationEntry,
) -> TxResult<()> {
    let change = Change::entry(kind, entry.clone());
    changes.insert(&change.revision.to_be_bytes(), tx_encode(&change)?)?;
    Ok(())
}

/// Takes the next revision and records `changed` at it.
fn tx_record(
    changes: &TransactionalTree,
    meta: &TransactionalTree,
    changed: Changed,
) -> TxResult<u64> {
    let revision = bump_revision(meta)?;
    let change = Change { revision, changed };
    changes.insert(&revision.to_be_bytes(), tx_encode(&change)?)?;
    Ok(revision)
}

/// An entry change as versions before the feed carried every kind stored it.
#[derive(serde::Deserialize)]
struct LegacyEntryChange {
    revision: u64,
    kind: ChangeKind,
    entry: RegistrationEntry,
}

/// A stored change: a [`Change`], or an entry change written by an older
/// version.
fn decode_change(bytes: &[u8]) -> Result<Change> {
    match serde_json::from_slice::<Change>(bytes) {
        Ok(c) => Ok(c),
        Err(e) => match serde_json::from_slice::<LegacyEntryChange>(bytes) {
            Ok(old) => Ok(Change {
                revision: old.revision,
                changed: Changed::Entry {
                    kind: old.kind,
                    entry: old.entry,
                },
            }),
            Err(_) => Err(DatastoreError::Corrupt(format!("a change record: {e}"))),
        },
    }
}

/// The key of an issuance record in the by-SPIFFE-ID index.
fn issuance_index_key(id: &SpiffeId, serial: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.as_str().len() + 1 + serial.len());
    key.extend_from_slice(id.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(serial.as_bytes());
    key
}

/// An agent change.
fn agent_changed(id: &AgentId, record: Option<&AgentRecord>) -> Changed {
    Changed::Agent {
        id: id.clone(),
        record: record.cloned(),
    }
}

/// Raises a watched revision to `to`; whether it moved.
fn raise(v: &mut u64, to: u64) -> bool {
    let moved = to > *v;
    if moved {
        *v = to;
    }
    moved
}

#[async_trait]
impl Datastore for SledDatastore {
    async fn create_entries_audited(
        &self,
        entries: Vec<(RegistrationEntry, AuditWith)>,
    ) -> Result<Vec<Result<RegistrationEntry>>> {
        let s = self.store()?;
        let results: Vec<_> = entries
            .into_iter()
            .map(|(e, audit)| s.insert_entry(e, &audit))
            .collect();
        s.durable().await?;
        Ok(results)
    }

    async fn update_entry_audited(
        &self,
        entry: RegistrationEntry,
        audit: AuditWith,
    ) -> Result<RegistrationEntry> {
        let s = self.store()?;
        let updated = tx(s.entry_trees().transaction(|trees| {
            let entry = tx_update(trees, &entry, None)?;
            put_audit(&trees.4, &trees.3, audit.as_slice())?;
            Ok(entry)
        }))?;
        s.durable().await?;
        Ok(updated)
    }

    async fn delete_entry_audited(
        &self,
        id: &EntryId,
        audit: AuditWith,
    ) -> Result<RegistrationEntry> {
        let s = self.store()?;
        let deleted = tx(s.entry_trees().transaction(|trees| {
            let entry = tx_delete(trees, id, None)?;
            put_audit(&trees.4, &trees.3, audit.as_slice())?;
            Ok(entry)
        }))?;
        s.durable().await?;
        Ok(deleted)
    }

    async fn apply_entries(&self, batch: EntryBatch) -> Result<Vec<Change>> {
        let s = self.store()?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let made = tx(s.entry_trees().transaction(|trees| {
            let mut made = Vec::new();
            for (id, rev) in &batch.delete {
                let e = tx_delete(trees, id, Some(*rev))?;
                made.push(Change::entry(ChangeKind::Deleted, e));
            }
            for e in &batch.update {
                let e = tx_update(trees, e, Some(e.revision))?;
                made.push(Change::entry(ChangeKind::Updated, e));
            }
            for e in &batch.create {
                made.push(Change::entry(ChangeKind::Created, tx_create(trees, e)?));
            }
            put_audit(&trees.4, &trees.3, &batch.audit)?;
            Ok(made)
        }))?;
        s.durable().await?;
        Ok(made)
    }

    async fn fetch_entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>> {
        let s = self.store()?;
        s.get(&s.entries, id.as_str().as_bytes())
    }

    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<RegistrationEntry>> {
        let s = self.store()?;
        let mut out = Vec::new();
        for v in s.entries.iter().values() {
            let e: RegistrationEntry = decode(&v.map_err(backend)?)?;
            if filter.matches(&e) {
                out.push(e);
            }
        }
        Ok(out)
    }

    async fn count_entries(&self) -> Result<u64> {
        let s = self.store()?;
        Ok(s.entries.len() as u64)
    }

    async fn changes(&self, after: u64, limit: usize) -> Result<Vec<Change>> {
        let s = self.store()?;
        // Only up to the revision committed now: every change up to it is
        // in the tree before the scan starts, so the scan (which reads
        // nodes lazily) cannot see a later change while missing an earlier.
        let upto = read_u64(s.meta.get(REVISION_KEY).map_err(backend)?);
        if upto <= after {
            return Ok(Vec::new());
        }
        s.changes
            .range(after.saturating_add(1).to_be_bytes()..=upto.to_be_bytes())
            .values()
            .take(limit)
            .map(|v| decode_change(&v.map_err(backend)?))
            .collect()
    }

    async fn current_revision(&self) -> Result<u64> {
        let s = self.store()?;
        Ok(read_u64(s.meta.get(REVISION_KEY).map_err(backend)?))
    }

    async fn change_floor(&self) -> Result<u64> {
        let s = self.store()?;
        Ok(read_u64(s.meta.get(CHANGE_FLOOR_KEY).map_err(backend)?))
    }

    async fn prune_changes(&self, through: u64) -> Result<usize> {
        let s = self.store()?;
        // The floor first: a reader never finds a change missing below a
        // floor that does not say so.
        let floor = tx(s.meta.transaction(|meta| {
            let current = read_u64(meta.get(REVISION_KEY)?);
            let floor = read_u64(meta.get(CHANGE_FLOOR_KEY)?).max(through.min(current));
            meta.insert(CHANGE_FLOOR_KEY, &floor.to_be_bytes())?;
            Ok(floor)
        }))?;
        let mut removed = 0;
        for key in s.changes.range(..=floor.to_be_bytes()).keys() {
            s.changes.remove(key.map_err(backend)?).map_err(backend)?;
            removed += 1;
        }
        s.durable().await?;
        Ok(removed)
    }

    fn change_hint(&self) -> watch::Receiver<u64> {
        self.hint.subscribe()
    }

    async fn create_agent_audited(
        &self,
        agent: AgentRecord,
        audit: AuditWith,
    ) -> Result<AgentRecord> {
        let s = self.store()?;
        let value = encode(&agent)?;
        let key = agent.id.as_str();
        tx((&s.agents, &s.changes, &s.meta, &s.audit).transaction(
            |(t, changes, meta, audit_t)| {
                if t.get(key)?.is_some() {
                    return abort(DatastoreError::AlreadyExists(format!("agent {key}")));
                }
                t.insert(key, value.as_slice())?;
                tx_record(changes, meta, agent_changed(&agent.id, Some(&agent)))?;
                put_audit(audit_t, meta, audit.as_slice())?;
                Ok(())
            },
        ))?;
        s.durable().await?;
        Ok(agent)
    }

    async fn update_agent_audited(
        &self,
        agent: AgentRecord,
        audit: AuditWith,
    ) -> Result<AgentRecord> {
        let s = self.store()?;
        let key = agent.id.as_str();
        let stored = tx((&s.agents, &s.changes, &s.meta, &s.audit).transaction(
            |(t, changes, meta, audit_t)| {
                let Some(old) = t.get(key)? else {
                    return abort(DatastoreError::NotFound(format!("agent {key}")));
                };
                let old: AgentRecord = tx_decode(&old)?;
                // A ban is sticky: only deleting the record (evict) lifts it.
                let stored = AgentRecord {
                    banned: agent.banned || old.banned,
                    ..agent.clone()
                };
                t.insert(key, tx_encode(&stored)?)?;
                tx_record(changes, meta, agent_changed(&stored.id, Some(&stored)))?;
                put_audit(audit_t, meta, audit.as_slice())?;
                Ok(stored)
            },
        ))?;
        s.durable().await?;
        Ok(stored)
    }

    async fn fetch_agent(&self, id: &AgentId) -> Result<Option<AgentRecord>> {
        let s = self.store()?;
        s.get(&s.agents, id.as_str().as_bytes())
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        let s = self.store()?;
        s.all(&s.agents)
    }

    async fn delete_agent_audited(&self, id: &AgentId, audit: AuditWith) -> Result<AgentRecord> {
        let s = self.store()?;
        let old = tx((&s.agents, &s.changes, &s.meta, &s.audit).transaction(
            |(t, changes, meta, audit_t)| {
                let Some(old) = t.remove(id.as_str())? else {
                    return abort(DatastoreError::NotFound(format!("agent {id}")));
                };
                tx_record(changes, meta, agent_changed(id, None))?;
                put_audit(audit_t, meta, audit.as_slice())?;
                Ok(old)
            },
        ))?;
        s.durable().await?;
        decode(&old)
    }

    async fn prune_agents(&self, expired_before: SystemTime) -> Result<Vec<AgentId>> {
        let s = self.store()?;
        let mut removed = Vec::new();
        for item in s.agents.iter() {
            let (k, v) = item.map_err(backend)?;
            let agent: AgentRecord = decode(&v)?;
            if agent.banned || agent.expires_at >= expired_before {
                continue;
            }
            // Only the record read: a renewal since keeps the agent.
            let gone = tx(
                (&s.agents, &s.changes, &s.meta).transaction(|(t, changes, meta)| {
                    if t.get(&k)?.as_ref() != Some(&v) {
                        return Ok(false);
                    }
                    t.remove(k.clone())?;
                    tx_record(changes, meta, agent_changed(&agent.id, None))?;
                    Ok(true)
                }),
            )?;
            if gone {
                removed.push(agent.id);
            }
        }
        if !removed.is_empty() {
            s.durable().await?;
        }
        Ok(removed)
    }

    async fn create_join_token_audited(
        &self,
        token: JoinTokenRecord,
        audit: AuditWith,
    ) -> Result<()> {
        let s = self.store()?;
        let value = encode(&token)?;
        tx((&s.tokens, &s.changes, &s.meta, &s.audit).transaction(
            |(t, changes, meta, audit_t)| {
                if t.get(token.hash.as_str())?.is_some() {
                    return abort(DatastoreError::AlreadyExists("join token".into()));
                }
                t.insert(token.hash.as_str(), value.as_slice())?;
                let changed = Changed::JoinToken {
                    hash: token.hash.clone(),
                    record: Some(token.clone()),
                };
                tx_record(changes, meta, changed)?;
                put_audit(audit_t, meta, audit.as_slice())?;
                Ok(())
            },
        ))?;
        s.durable().await
    }

    async fn consume_join_token(
        &self,
        hash: &TokenHash,
        now: SystemTime,
    ) -> Result<JoinTokenRecord> {
        let s = self.store()?;
        // Serializable transactions: of two concurrent callers exactly one
        // removes the record.
        let old = tx(
            (&s.tokens, &s.changes, &s.meta).transaction(|(t, changes, meta)| {
                let Some(old) = t.remove(hash.as_str())? else {
                    return abort(DatastoreError::NotFound("join token".into()));
                };
                let changed = Changed::JoinToken {
                    hash: hash.clone(),
                    record: None,
                };
                tx_record(changes, meta, changed)?;
                Ok(old)
            }),
        )?;
        s.durable().await?;
        let record: JoinTokenRecord = decode(&old)?;
        if record.expires_at <= now {
            return Err(DatastoreError::TokenExpired);
        }
        Ok(record)
    }

    async fn prune_join_tokens(&self, now: SystemTime) -> Result<usize> {
        let s = self.store()?;
        let mut removed = 0;
        for item in s.tokens.iter() {
            let (k, v) = item.map_err(backend)?;
            let record: JoinTokenRecord = decode(&v)?;
            if record.expires_at > now {
                continue;
            }
            let gone = tx(
                (&s.tokens, &s.changes, &s.meta).transaction(|(t, changes, meta)| {
                    if t.get(&k)?.as_ref() != Some(&v) {
                        return Ok(false);
                    }
                    t.remove(k.clone())?;
                    let changed = Changed::JoinToken {
                        hash: record.hash.clone(),
                        record: None,
                    };
                    tx_record(changes, meta, changed)?;
                    Ok(true)
                }),
            )?;
            removed += usize::from(gone);
        }
        if removed > 0 {
            s.durable().await?;
        }
        Ok(removed)
    }

    async fn put_bundle(&self, bundle: &Bundle) -> Result<()> {
        let s = self.store()?;
        let value = encode(bundle)?;
        let key = bundle.trust_domain.as_str();
        tx(
            (&s.bundles, &s.changes, &s.meta).transaction(|(t, changes, meta)| {
                if let Some(old) = t.get(key)? {
                    let old: Bundle = tx_decode(&old)?;
                    if bundle.sequence <= old.sequence {
                        return abort(DatastoreError::SequenceRegression {
                            trust_domain: bundle.trust_domain.clone(),
                            stored: old.sequence,
                            given: bundle.sequence,
                        });
                    }
                }
                t.insert(key, value.as_slice())?;
                let changed = Changed::Bundle {
                    trust_domain: bundle.trust_domain.clone(),
                    bundle: Some(bundle.clone()),
                };
                tx_record(changes, meta, changed)?;
                Ok(())
            }),
        )?;
        s.durable().await
    }

    async fn update_bundle(&self, td: &TrustDomain, edit: BundleEdit) -> Result<Bundle> {
        let s = self.store()?;
        let key = td.as_str();
        let (bundle, written) = tx((&s.bundles, &s.changes, &s.meta).transaction(
            |(t, changes, meta)| {
                let (mut bundle, stored) = match t.get(key)? {
                    Some(v) => (tx_decode::<Bundle>(&v)?, true),
                    None => (Bundle::new(td.clone()), false),
                };
                if !edit.apply_to(&mut bundle) && stored {
                    return Ok((bundle, false));
                }
                bundle.sequence += 1;
                t.insert(key, tx_encode(&bundle)?)?;
                let changed = Changed::Bundle {
                    trust_domain: td.clone(),
                    bundle: Some(bundle.clone()),
                };
                tx_record(changes, meta, changed)?;
                Ok((bundle, true))
            },
        ))?;
        if written {
            s.durable().await?;
        }
        Ok(bundle)
    }

    async fn fetch_bundle(&self, td: &TrustDomain) -> Result<Option<Bundle>> {
        let s = self.store()?;
        s.get(&s.bundles, td.as_str().as_bytes())
    }

    async fn list_bundles(&self) -> Result<Vec<Bundle>> {
        let s = self.store()?;
        s.all(&s.bundles)
    }

    async fn delete_bundle(&self, td: &TrustDomain) -> Result<()> {
        let s = self.store()?;
        tx(
            (&s.bundles, &s.changes, &s.meta).transaction(|(t, changes, meta)| {
                if t.remove(td.as_str())?.is_none() {
                    return abort(DatastoreError::NotFound(format!("bundle of {td}")));
                }
                let changed = Changed::Bundle {
                    trust_domain: td.clone(),
                    bundle: None,
                };
                tx_record(changes, meta, changed)?;
                Ok(())
            }),
        )?;
        s.durable().await
    }

    async fn record_issuances(&self, records: Vec<IssuanceRecord>) -> Result<()> {
        let s = self.store()?;
        let mut batch = ::sled::Batch::default();
        let mut index = ::sled::Batch::default();
        for r in &records {
            batch.insert(r.serial.as_bytes(), encode(r)?);
            index.insert(issuance_index_key(&r.spiffe_id, &r.serial), &[][..]);
        }
        // Index first: an index key without its record is skipped on read.
        s.issuances_by_id.apply_batch(index).map_err(backend)?;
        s.issuances.apply_batch(batch).map_err(backend)?;
        Ok(())
    }

    async fn fetch_issuance(&self, serial: &str) -> Result<Option<IssuanceRecord>> {
        let s = self.store()?;
        s.get(&s.issuances, serial.as_bytes())
    }

    async fn list_issuances_of(&self, id: &SpiffeId) -> Result<Vec<IssuanceRecord>> {
        let s = self.store()?;
        let mut prefix = id.as_str().as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for key in s.issuances_by_id.scan_prefix(&prefix).keys() {
            let key = key.map_err(backend)?;
            if let Some(r) = s.get::<IssuanceRecord>(&s.issuances, &key[prefix.len()..])? {
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn revoke_x509(&self, records: Vec<RevocationRecord>) -> Result<u64> {
        let s = self.store()?;
        let serials: Vec<String> = records.iter().map(|r| r.serial.clone()).collect();
        let revision = tx((&s.revocations, &s.changes, &s.meta).transaction(
            |(t, changes, meta)| {
                for r in &records {
                    if t.get(r.serial.as_bytes())?.is_none() {
                        t.insert(r.serial.as_bytes(), tx_encode(r)?)?;
                    }
                }
                let changed = Changed::Revocation {
                    serials: serials.clone(),
                };
                tx_record(changes, meta, changed)
            },
        ))?;
        s.durable().await?;
        Ok(revision)
    }

    async fn list_revocations(&self) -> Result<Vec<RevocationRecord>> {
        let s = self.store()?;
        s.all(&s.revocations)
    }

    async fn put_crl(&self, crl: CrlRecord) -> Result<()> {
        let s = self.store()?;
        let written = tx(
            (&s.crls, &s.changes, &s.meta).transaction(|(t, changes, meta)| {
                if let Some(old) = t.get(crl.issuer.as_bytes())? {
                    let old: CrlRecord = tx_decode(&old)?;
                    if old.number > crl.number {
                        return Ok(false);
                    }
                }
                t.insert(crl.issuer.as_bytes(), tx_encode(&crl)?)?;
                let changed = Changed::Crl {
                    issuer: crl.issuer.clone(),
                };
                tx_record(changes, meta, changed)?;
                Ok(true)
            }),
        )?;
        if written {
            s.durable().await?;
        }
        Ok(())
    }

    async fn list_crls(&self) -> Result<Vec<CrlRecord>> {
        let s = self.store()?;
        s.all(&s.crls)
    }

    async fn prune_revocations(&self, now: SystemTime) -> Result<usize> {
        let s = self.store()?;
        let mut removed = 0;
        for item in s.issuances.iter() {
            let (k, v) = item.map_err(backend)?;
            let r: IssuanceRecord = decode(&v)?;
            if r.not_after < now {
                s.issuances.remove(&k).map_err(backend)?;
                s.issuances_by_id
                    .remove(issuance_index_key(&r.spiffe_id, &r.serial))
                    .map_err(backend)?;
                removed += 1;
            }
        }
        for item in s.revocations.iter() {
            let (k, v) = item.map_err(backend)?;
            let r: RevocationRecord = decode(&v)?;
            if r.not_after < now {
                s.revocations.remove(&k).map_err(backend)?;
                removed += 1;
            }
        }
        for item in s.crls.iter() {
            let (k, v) = item.map_err(backend)?;
            let r: CrlRecord = decode(&v)?;
            if r.not_after < now {
                s.crls.remove(&k).map_err(backend)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn fetch_ca_journal(&self, server: &ServerId) -> Result<Option<Vec<u8>>> {
        let s = self.store()?;
        if let Some(v) = s.ca_journals.get(server.as_str()).map_err(backend)? {
            return Ok(Some(v.to_vec()));
        }
        // A journal written before replicas had ids: it is this server's
        // until a keyed journal replaces it.
        if s.ca_journals.is_empty() {
            let legacy = s.meta.get(LEGACY_CA_JOURNAL_KEY).map_err(backend)?;
            return Ok(legacy.map(|v| v.to_vec()));
        }
        Ok(None)
    }

    async fn put_ca_journal(&self, server: &ServerId, journal: Vec<u8>) -> Result<()> {
        let s = self.store()?;
        tx(
            (&s.ca_journals, &s.changes, &s.meta).transaction(|(t, changes, meta)| {
                t.insert(server.as_str(), journal.as_slice())?;
                // Moved: the legacy journal was read as this one's start.
                meta.remove(LEGACY_CA_JOURNAL_KEY)?;
                let changed = Changed::CaJournal {
                    server_id: server.clone(),
                };
                tx_record(changes, meta, changed)?;
                Ok(())
            }),
        )?;
        s.durable().await
    }

    async fn list_ca_journals(&self) -> Result<Vec<(ServerId, Vec<u8>)>> {
        let s = self.store()?;
        s.ca_journals
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(backend)?;
                let id = std::str::from_utf8(&k)
                    .ok()
                    .and_then(|k| k.parse::<ServerId>().ok())
                    .ok_or_else(|| {
                        DatastoreError::Corrupt("a CA journal's server id is not valid".into())
                    })?;
                Ok((id, v.to_vec()))
            })
            .collect()
    }

    async fn append_audit(&self, events: Vec<AuditEvent>) -> Result<u64> {
        let s = self.store()?;
        let last = s.insert_audit(&events)?;
        if last != 0 {
            s.durable().await?;
        }
        Ok(last)
    }

    async fn append_audit_unsynced(&self, events: Vec<AuditEvent>) -> Result<u64> {
        let s = self.store()?;
        s.insert_audit(&events)
    }

    async fn sync(&self) -> Result<()> {
        let s = self.store()?;
        s.durable().await
    }

    async fn prune_audit(&self, before: SystemTime) -> Result<usize> {
        let s = self.store()?;
        let removed = s.prune_audit_records(before)?;
        if removed > 0 {
            s.durable().await?;
        }
        Ok(removed)
    }

    async fn list_audit(&self, after: u64, limit: usize) -> Result<Vec<(u64, AuditEvent)>> {
        Ok(self
            .audit_records(after, limit)
            .await?
            .into_iter()
            .map(|r| (r.seq, r.event))
            .collect())
    }

    async fn audit_records(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>> {
        let s = self.store()?;
        let wanted = after.saturating_add(1);
        // The record holding `wanted` starts at or before it.
        let start = match s.audit.range(..=wanted.to_be_bytes()).next_back() {
            Some(item) => item.map_err(backend)?.0,
            None => ::sled::IVec::from(&wanted.to_be_bytes()),
        };
        let mut out = Vec::new();
        for item in s.audit.range(start..) {
            let (k, v) = item.map_err(backend)?;
            for r in decode_audit_record(read_u64(Some(k)), &v)? {
                // Kept in stored order, even one out of place (a verifier
                // must see it), except before the start.
                if r.seq < wanted && out.is_empty() {
                    continue;
                }
                if out.len() == limit {
                    return Ok(out);
                }
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn audit_chain(&self) -> Result<AuditChainState> {
        let s = self.store()?;
        let read = |key| -> Result<Option<ChainHead>> {
            s.meta
                .get(key)
                .map_err(backend)?
                .map(|b| {
                    ChainHead::from_bytes(&b)
                        .ok_or_else(|| DatastoreError::Corrupt("the audit chain head".into()))
                })
                .transpose()
        };
        Ok(AuditChainState {
            head: read(AUDIT_HEAD_KEY)?.unwrap_or_default(),
            anchor: read(AUDIT_ANCHOR_KEY)?,
        })
    }

    async fn put_audit_checkpoint(&self, size: u64, note: String) -> Result<()> {
        let s = self.store()?;
        s.checkpoints
            .insert(size.to_be_bytes(), note.as_bytes())
            .map_err(backend)?;
        s.durable().await
    }

    async fn audit_checkpoints(&self) -> Result<Vec<(u64, String)>> {
        let s = self.store()?;
        s.checkpoints
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(backend)?;
                Ok((read_u64(Some(k)), checkpoint_note(&v)?))
            })
            .collect()
    }

    async fn latest_audit_checkpoint(&self) -> Result<Option<(u64, String)>> {
        let s = self.store()?;
        s.checkpoints
            .last()
            .map_err(backend)?
            .map(|(k, v)| Ok((read_u64(Some(k)), checkpoint_note(&v)?)))
            .transpose()
    }
}

fn checkpoint_note(v: &[u8]) -> Result<String> {
    String::from_utf8(v.to_vec())
        .map_err(|_| DatastoreError::Corrupt("an audit checkpoint is not text".into()))
}

impl Store {
    /// See [`Datastore::prune_audit`]. The removed records and the new
    /// anchor (the last removed record) are written in one transaction,
    /// so verification can always start from the anchor; checkpoints of
    /// removed records before it go too.
    fn prune_audit_records(&self, before: SystemTime) -> Result<usize> {
        let mut removed = 0;
        let mut keys = Vec::new();
        let mut anchor = None;
        for item in self.audit.iter() {
            let (k, v) = item.map_err(backend)?;
            let records = decode_audit_record(read_u64(Some(k.clone())), &v)?;
            if records.iter().any(|r| r.event.time >= before) {
                break;
            }
            if let Some(last) = records.last() {
                anchor = Some(ChainHead {
                    seq: last.seq,
                    hash: last.prev.map_or(chain::ZERO, |_| chain::record_hash(last)),
                });
            }
            keys.push(k);
            removed += records.len();
        }
        let Some(anchor) = anchor else {
            return Ok(removed);
        };
        tx((&self.audit, &self.meta).transaction(|(audit, meta)| {
            for k in &keys {
                audit.remove(k)?;
            }
            meta.insert(AUDIT_ANCHOR_KEY, &anchor.to_bytes()[..])?;
            Ok(())
        }))?;
        for k in self.checkpoints.range(..anchor.seq.to_be_bytes()).keys() {
            self.checkpoints
                .remove(k.map_err(backend)?)
                .map_err(backend)?;
        }
        Ok(removed)
    }
}

/// A stored audit record, keyed by `first`: chained records, or (written
/// before the chain) a list of events numbered from `first`, or (written
/// before batching) one event.
fn decode_audit_record(first: u64, bytes: &[u8]) -> Result<Vec<AuditRecord>> {
    if let Ok(records) = serde_json::from_slice::<Vec<AuditRecord>>(bytes) {
        return Ok(records);
    }
    let events: Vec<AuditEvent> = if bytes.first() == Some(&b'[') {
        decode(bytes)?
    } else {
        vec![decode(bytes)?]
    };
    Ok(events
        .into_iter()
        .zip(first..)
        .map(|(event, seq)| AuditRecord {
            seq,
            prev: None,
            event,
        })
        .collect())
}

/// Makes one open file's data durable: `File::sync_data`, or a test's
/// stand-in.
pub(crate) type SyncFile = dyn Fn(&File) -> std::io::Result<()> + Send + Sync;

/// Group commit: batches `flush + fdatasync` rounds across writers.
struct GroupSync {
    shared: Arc<SyncShared>,
    done: watch::Receiver<SyncProgress>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Clone, Default)]
struct SyncProgress {
    /// Every ticket up to this one is durable.
    durable: u64,
    /// The latest failed round: tickets up to `.0` that were not durable
    /// by then get its error. A failure is not sticky: the next round
    /// tries again, so writes succeed once the cause (a full disk) is gone.
    failed: Option<(u64, String)>,
}

struct SyncShared {
    state: Mutex<SyncState>,
    wake: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Tickets handed out so far.
    requested: u64,
    stop: bool,
}

/// What a sync round writes out: sled's data file and its blob files.
struct SyncFiles {
    db: ::sled::Db,
    /// Read for the revision each round makes durable.
    meta: ::sled::Tree,
    /// Every change up to this revision is on disk.
    synced_revision: Arc<AtomicU64>,
    /// Told the revision each round made durable.
    hint: Arc<watch::Sender<u64>>,
    data_file: File,
    /// sled writes a record larger than about 128 KiB (a segment, 512 KiB,
    /// over 4, less headers: `Log::reserve` in sled 0.34.7) to its own
    /// file here and never fsyncs it; the data file only points to it.
    /// Whole pages are serialized too, so a leaf of a few large records
    /// can go there as well: bounding record sizes would not avoid it.
    blobs: PathBuf,
    /// Blob files already made durable (sled never rewrites one in place).
    synced_blobs: std::collections::HashSet<std::ffi::OsString>,
    sync_file: Arc<SyncFile>,
}

impl SyncFiles {
    /// One round: sled's buffers to the files, new blob files and their
    /// directory entries to disk, then the data file that points to them.
    fn sync(&mut self) -> std::io::Result<()> {
        // Changes up to this revision were made before the flush below.
        let revision = read_u64(self.meta.get(REVISION_KEY).ok().flatten());
        self.db.flush().map_err(|e| match e {
            ::sled::Error::Io(io) => io,
            other => std::io::Error::other(other),
        })?;
        let mut new = Vec::new();
        match std::fs::read_dir(&self.blobs) {
            Ok(dir) => {
                for item in dir {
                    let name = item?.file_name();
                    if !self.synced_blobs.contains(&name) {
                        new.push(name);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if !new.is_empty() {
            for name in &new {
                match File::open(self.blobs.join(name)) {
                    Ok(f) => (self.sync_file)(&f)?,
                    // sled removed a blob it no longer needs.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            (self.sync_file)(&File::open(&self.blobs)?)?;
        }
        (self.sync_file)(&self.data_file)?;
        self.synced_blobs.extend(new);
        self.synced_revision.fetch_max(revision, Ordering::SeqCst);
        self.hint.send_if_modified(|v| raise(v, revision));
        Ok(())
    }
}

impl GroupSync {
    fn start(
        db: ::sled::Db,
        meta: ::sled::Tree,
        synced_revision: Arc<AtomicU64>,
        dir: &Path,
        data_file: File,
        sync_file: Arc<SyncFile>,
        hint: Arc<watch::Sender<u64>>,
    ) -> Self {
        let shared = Arc::new(SyncShared {
            state: Mutex::new(SyncState::default()),
            wake: Condvar::new(),
        });
        let (tx, done) = watch::channel(SyncProgress::default());
        let worker = Arc::clone(&shared);
        let mut files = SyncFiles {
            db,
            meta,
            synced_revision,
            hint,
            data_file,
            blobs: dir.join("blobs"),
            synced_blobs: Default::default(),
            sync_file,
        };
        let thread = std::thread::Builder::new()
            .name("sigil-sled-sync".into())
            .spawn(move || sync_loop(&worker, &mut files, &tx))
            .ok();
        Self {
            shared,
            done,
            thread,
        }
    }

    async fn wait(&self) -> Result<()> {
        if self.thread.is_none() {
            return Err(DatastoreError::Durability(
                "the sync thread could not be started".into(),
            ));
        }
        let ticket = {
            let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            s.requested += 1;
            s.requested
        };
        self.shared.wake.notify_one();
        let mut rx = self.done.clone();
        let progress = rx
            .wait_for(|p| p.durable >= ticket || p.failed.as_ref().is_some_and(|f| f.0 >= ticket))
            .await
            .map_err(|_| DatastoreError::Durability("the sync thread stopped".into()))?;
        if progress.durable >= ticket {
            return Ok(());
        }
        let error = progress.failed.as_ref().map_or("", |f| f.1.as_str());
        Err(DatastoreError::Durability(error.to_owned()))
    }
}

fn sync_loop(shared: &SyncShared, files: &mut SyncFiles, tx: &watch::Sender<SyncProgress>) {
    let mut handled = 0;
    loop {
        let target = {
            let mut s = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            while s.requested == handled && !s.stop {
                s = shared.wake.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            if s.requested == handled && s.stop {
                return;
            }
            s.requested
        };
        // Every ticket up to `target` was taken after its write finished,
        // so this round covers all of them.
        handled = target;
        match files.sync() {
            Ok(()) => tx.send_modify(|p| p.durable = target),
            // A full disk or quota loses nothing already written: the next
            // round, once there is space, makes those pages durable.
            Err(e) if is_out_of_space(&e) => {
                tracing::error!(
                    error = %e,
                    "datastore sync failed for lack of space; the writes waiting for it are refused, the next write tries again"
                );
                tx.send_modify(|p| p.failed = Some((target, write_failed(&e))));
            }
            // After an I/O error the kernel may have dropped the dirty pages
            // and marked them clean, so a later successful sync would not
            // prove them on disk: refuse every write until a restart.
            Err(e) => {
                tracing::error!(
                    error = %e,
                    "datastore sync failed; every write is refused until the server restarts (check the disk)"
                );
                tx.send_modify(|p| p.failed = Some((u64::MAX, e.to_string())));
                return;
            }
        }
    }
}

/// Whether a sync failed only for lack of space (retried by the next round).
fn is_out_of_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

impl Drop for GroupSync {
    fn drop(&mut self) {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl SledDatastore {
    /// Every stored join token (for `datastore migrate`; the trait has no
    /// listing of tokens).
    pub fn join_tokens(&self) -> Result<Vec<JoinTokenRecord>> {
        let s = self.store()?;
        s.all(&s.tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::datastore::conformance::datastore_conformance!(|dir: &std::path::Path| {
        std::future::ready(SledDatastore::open(dir).unwrap())
    });

    #[tokio::test]
    async fn audit_records_written_one_event_each_are_still_read() {
        // Before batching, each event was its own record (a JSON object).
        let dir = tempfile::tempdir().unwrap();
        let store = SledDatastore::open(dir.path()).unwrap();
        let old = conformance::audit_event(7);
        let s = store.store().unwrap();
        s.audit
            .insert(1u64.to_be_bytes(), encode(&old).unwrap())
            .unwrap();
        s.meta.remove(AUDIT_HEAD_KEY).unwrap();
        drop(s);
        drop(store);
        // Opened by a version with the chain: it starts after the record.
        let store = SledDatastore::open(dir.path()).unwrap();
        let seq = store
            .append_audit(vec![
                conformance::audit_event(8),
                conformance::audit_event(9),
            ])
            .await
            .unwrap();
        let all = store.list_audit(0, 100).await.unwrap();
        let targets: Vec<_> = all.iter().map(|(_, e)| e.target.as_str()).collect();
        assert_eq!(targets, ["entry-7", "entry-8", "entry-9"]);
        assert_eq!(all[0].0, 1);
        assert_eq!(all[2].0, seq);
        let report = crate::audit::review::verify(&store, &Default::default())
            .await
            .unwrap();
        assert_eq!((report.legacy, report.records), (1, 2));
    }

    #[tokio::test]
    async fn a_ca_journal_stored_before_server_ids_is_read_until_one_is_put() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledDatastore::open(dir.path()).unwrap();
        let s = store.store().unwrap();
        s.meta
            .insert(LEGACY_CA_JOURNAL_KEY, &b"old journal"[..])
            .unwrap();
        drop(s);
        let (a, b): (ServerId, ServerId) = ("a".parse().unwrap(), "b".parse().unwrap());
        for id in [&a, &b] {
            assert_eq!(
                store.fetch_ca_journal(id).await.unwrap().as_deref(),
                Some(&b"old journal"[..]),
                "any server id reads it"
            );
        }
        store.put_ca_journal(&a, b"new".to_vec()).await.unwrap();
        assert_eq!(
            store.fetch_ca_journal(&a).await.unwrap().as_deref(),
            Some(&b"new"[..])
        );
        assert_eq!(store.fetch_ca_journal(&b).await.unwrap(), None, "moved");
        drop(store);
        let store = SledDatastore::open(dir.path()).unwrap();
        assert_eq!(
            store.list_ca_journals().await.unwrap(),
            vec![(a, b"new".to_vec())]
        );
    }

    #[tokio::test]
    async fn entry_changes_stored_by_an_older_version_are_read_and_followed() {
        // The feed as versions before every kind was in it: entry changes
        // only, some pruned, no floor.
        let dir = tempfile::tempdir().unwrap();
        let (e3, e4) = (
            conformance::entry("three", 3),
            conformance::entry("four", 4),
        );
        {
            let store = SledDatastore::open(dir.path()).unwrap();
            let s = store.store().unwrap();
            for (rev, e) in [(3u64, &e3), (4, &e4)] {
                let e = RegistrationEntry {
                    revision: rev,
                    ..e.clone()
                };
                let old = serde_json::json!({"revision": rev, "kind": "created", "entry": e});
                s.changes
                    .insert(rev.to_be_bytes(), serde_json::to_vec(&old).unwrap())
                    .unwrap();
                s.entries
                    .insert(e.id.as_str(), encode(&e).unwrap())
                    .unwrap();
            }
            s.meta.insert(REVISION_KEY, &4u64.to_be_bytes()).unwrap();
            s.meta.remove(CHANGE_FLOOR_KEY).unwrap();
        }
        let store = SledDatastore::open(dir.path()).unwrap();
        assert_eq!(
            store.change_floor().await.unwrap(),
            2,
            "revisions 1 and 2 were pruned"
        );
        let feed = store.changes(0, 10).await.unwrap();
        let got: Vec<_> = feed
            .iter()
            .map(|c| {
                let (kind, e) = c.as_entry().unwrap();
                (c.revision, kind, e.id.clone())
            })
            .collect();
        assert_eq!(
            got,
            [
                (3, ChangeKind::Created, e3.id.clone()),
                (4, ChangeKind::Created, e4.id.clone())
            ]
        );
        let next = store.create_agent(conformance::agent("new")).await;
        next.unwrap();
        let feed = store.changes(4, 10).await.unwrap();
        assert_eq!(feed.len(), 1);
        assert_eq!(feed[0].revision, 5);
        // An older store with nothing left in its feed: the floor is the
        // current revision.
        let empty = tempfile::tempdir().unwrap();
        {
            let store = SledDatastore::open(empty.path()).unwrap();
            let s = store.store().unwrap();
            s.meta.insert(REVISION_KEY, &9u64.to_be_bytes()).unwrap();
            s.meta.remove(CHANGE_FLOOR_KEY).unwrap();
        }
        let store = SledDatastore::open(empty.path()).unwrap();
        assert_eq!(store.change_floor().await.unwrap(), 9);
    }

    #[tokio::test]
    async fn agent_records_stored_with_a_plain_spiffe_id_still_load() {
        // As every version before `AgentId` wrote it (and before pinning
        // by hash): the id is the plain SPIFFE ID string.
        let dir = tempfile::tempdir().unwrap();
        let store = SledDatastore::open(dir.path()).unwrap();
        let raw = "spiffe://example.org/sigil/agent/join_token/old";
        let stored = format!(
            r#"{{"id":"{raw}","attestor":"join_token","serial":"01","expires_at":2000000000,"selectors":["k8s:cluster:prod"],"banned":true,"can_reattest":false,"created_at":1}}"#
        );
        let s = store.store().unwrap();
        s.agents.insert(raw, stored.as_bytes()).unwrap();
        drop(s);

        let id = AgentId::try_from(sigil_identity::SpiffeId::parse(raw).unwrap()).unwrap();
        let got = store
            .fetch_agent(&id)
            .await
            .unwrap()
            .expect("the old record");
        assert_eq!(got.id, id);
        assert!(got.banned);
        assert_eq!(got.selectors.len(), 1);
        assert_eq!(
            store.list_agents().await.unwrap(),
            std::slice::from_ref(&got)
        );
        // Written back, the id keeps its stored form.
        let again: serde_json::Value = serde_json::from_slice(&encode(&got).unwrap()).unwrap();
        assert_eq!(again["id"], raw);
    }

    /// A sync stand-in that records the inode of every file it syncs and
    /// fails while `fail` is set.
    fn observed_sync(
        synced: Arc<Mutex<Vec<u64>>>,
        fail: Arc<std::sync::atomic::AtomicBool>,
    ) -> Arc<SyncFile> {
        use std::os::unix::fs::MetadataExt;
        Arc::new(move |f: &File| {
            if fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            synced.lock().unwrap().push(f.metadata()?.ino());
            f.sync_data()
        })
    }

    #[tokio::test]
    async fn large_records_sled_writes_to_blob_files_are_synced_before_the_ack() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let synced = Arc::new(Mutex::new(Vec::new()));
        let sync = observed_sync(synced.clone(), Arc::default());
        let store = SledDatastore::open_with(dir.path(), sync).unwrap();
        // One audit record of ~400 KiB: well over sled's blob threshold.
        let events: Vec<_> = (0..3_000).map(conformance::audit_event).collect();
        store.append_audit(events).await.unwrap();
        let blobs: Vec<u64> = std::fs::read_dir(dir.path().join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().ino())
            .collect();
        assert!(!blobs.is_empty(), "sled wrote no blob file; test is void");
        let synced = synced.lock().unwrap();
        for ino in blobs {
            assert!(synced.contains(&ino), "blob file {ino} not synced");
        }
    }

    #[tokio::test]
    async fn a_failed_sync_refuses_the_writes_waiting_for_it_and_later_writes_succeed() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sync = observed_sync(Arc::default(), fail.clone());
        let store = SledDatastore::open_with(dir.path(), sync).unwrap();
        store
            .append_audit(vec![conformance::audit_event(1)])
            .await
            .unwrap();
        // The disk fills up: the write is not acknowledged.
        fail.store(true, Ordering::SeqCst);
        let err = store
            .append_audit(vec![conformance::audit_event(2)])
            .await
            .unwrap_err();
        assert!(matches!(err, DatastoreError::Durability(_)), "{err}");
        // Space is back: writes are acknowledged again, without a restart.
        fail.store(false, Ordering::SeqCst);
        store
            .append_audit(vec![conformance::audit_event(3)])
            .await
            .unwrap();
        store.sync().await.unwrap();
    }

    #[tokio::test]
    async fn entry_changes_lost_in_a_reopen_are_corrected_after_the_revisions_seen() {
        // Changes readers saw in the latched database's memory and the
        // reopened database lost: revisions must not be handed out again,
        // and each touched entry gets a change to its stored state.
        let dir = tempfile::tempdir().unwrap();
        let store = SledDatastore::open(dir.path()).unwrap();
        let a = conformance::entry("a", 1);
        let b = conformance::entry("b", 2);
        let made = store
            .create_entries_audited(vec![(a.clone(), None), (b.clone(), None)])
            .await
            .unwrap();
        let stored_a = made[0].clone().unwrap();
        let s = store.store().unwrap();
        // Not synced yet: reported as unsynced.
        let c = s.insert_entry(conformance::entry("c", 3), &None).unwrap();
        let (unsynced, seen) = s.unsynced_changes();
        assert_eq!(seen, 3);
        assert_eq!(unsynced.iter().map(|c| c.revision).collect::<Vec<_>>(), [3]);
        // As if revision 3 and two more were lost: a created "c" (gone),
        // an update of "a", a deletion of "b" (both still stored).
        s.entries.remove(c.id.as_str()).unwrap();
        s.entry_keys.clear().unwrap();
        s.changes.remove(3u64.to_be_bytes()).unwrap();
        s.meta.insert(REVISION_KEY, &2u64.to_be_bytes()).unwrap();
        let change = |revision, kind, entry: &RegistrationEntry| Change {
            revision,
            changed: Changed::Entry {
                kind,
                entry: entry.clone(),
            },
        };
        let lost = [
            change(3, ChangeKind::Created, &c),
            change(4, ChangeKind::Updated, &stored_a),
            change(5, ChangeKind::Deleted, &made[1].clone().unwrap()),
        ];
        s.reconcile(&lost, 5).unwrap();
        let fixes = store.changes(5, 100).await.unwrap();
        let got: Vec<_> = fixes
            .iter()
            .map(|f| {
                let (kind, e) = f.as_entry().unwrap();
                (f.revision, kind, e.id.clone())
            })
            .collect();
        let mut ids = [a.id.clone(), b.id.clone(), c.id.clone()];
        ids.sort_by(|x, y| x.as_str().cmp(y.as_str()));
        let kind = |id: &EntryId| {
            if *id == c.id {
                ChangeKind::Deleted
            } else {
                ChangeKind::Updated
            }
        };
        let want: Vec<_> = ids
            .iter()
            .zip(6..)
            .map(|(id, rev)| (rev, kind(id), id.clone()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(store.current_revision().await.unwrap(), 8);
        let a_now = store.fetch_entry(&a.id).await.unwrap().unwrap();
        assert!(a_now.revision > 5, "{}", a_now.revision);
        // Nothing lost: nothing changes.
        s.reconcile(&[], 8).unwrap();
        assert_eq!(store.current_revision().await.unwrap(), 8);
    }

    #[tokio::test]
    async fn audit_pruning_removes_whole_old_records_and_keeps_recent_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledDatastore::open(dir.path()).unwrap();
        let e = conformance::audit_event;
        for batch in [vec![e(0), e(1)], vec![e(2)], vec![e(3), e(4)], vec![e(5)]] {
            store.append_audit(batch).await.unwrap();
        }
        // Cut-off at event 4's time: the record holding 3 and 4 stays whole.
        let removed = store.prune_audit(e(4).time).await.unwrap();
        assert_eq!(removed, 3);
        let left: Vec<_> = store
            .list_audit(0, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, ev)| ev.target)
            .collect();
        assert_eq!(left, ["entry-3", "entry-4", "entry-5"]);
        assert_eq!(store.prune_audit(e(0).time).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn second_open_of_a_locked_directory_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _first = SledDatastore::open(dir.path()).unwrap();
        let err = SledDatastore::open(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("locked by another process"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn concurrent_writers_share_sync_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledDatastore::open(dir.path()).unwrap());
        let mut tasks = Vec::new();
        for i in 0..64 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                store
                    .append_audit(vec![conformance::audit_event(i)])
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(store.list_audit(0, 100).await.unwrap().len(), 64);
    }
}
