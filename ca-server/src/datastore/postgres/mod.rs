//! The PostgreSQL datastore, shared by every server replica.
//!
//! Every mutation runs in one READ COMMITTED transaction that first locks
//! the single `sigil_revision` row, so mutations are serialized, revisions
//! are handed out in commit order with no gaps (a rolled-back transaction
//! gives its numbers back), and the change-feed record, the mutation and
//! its audit event commit together. The transaction then NOTIFYs
//! `sigil_changes` with the new revision and commits before the call
//! returns: an acknowledged write is committed with the database's own
//! durability settings. Audit appends lock only the audit chain row.
//! Pruning that must run once across replicas takes a transaction-scoped
//! advisory lock and does nothing when another replica holds it.
//!
//! A database that cannot be reached (refused, closed, timed out, a
//! standby after a failover) is reported as [`DatastoreError::Unavailable`]
//! at once; the pool reconnects by itself.
//!
//! # Layout
//! - [`settings`]: the connection string, password file and TLS mode.
//! - [`tls`]: rustls verifiers for `sslmode`.
//! - [`schema`]: embedded, numbered migrations under an advisory lock.
//! - [`listen`]: the LISTEN connection that wakes change-feed readers.
//! - [`import`]: copying a sled store in (`datastore migrate`).

pub mod import;
pub mod listen;
pub mod schema;
pub mod settings;
pub mod tls;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde::de::DeserializeOwned;
use sigil_identity::{AgentId, Bundle, EntryId, RegistrationEntry, TrustDomain};
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::{IsolationLevel, Row};
use tracing::{info, warn};

pub use self::settings::{PgSettings, SettingsError, TlsMode};
use super::*;
use crate::audit::chain::{self, AuditRecord, ChainHead};

/// The NOTIFY channel of the change feed.
pub const CHANNEL: &str = "sigil_changes";

/// Advisory lock keys ("SIGIL" and a number): schema migrations (session
/// lock), and the jobs that run on one replica at a time (transaction
/// locks).
pub const LOCK_MIGRATE: i64 = 0x5349_4749_4c00_0001;
const LOCK_PRUNE_CHANGES: i64 = 0x5349_4749_4c00_0002;
const LOCK_PRUNE_TOKENS: i64 = 0x5349_4749_4c00_0003;
const LOCK_PRUNE_AGENTS: i64 = 0x5349_4749_4c00_0004;
const LOCK_PRUNE_AUDIT: i64 = 0x5349_4749_4c00_0005;

/// How long a call waits for a pooled connection, or for a new one.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);

/// Tunables of [`PostgresDatastore::open`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Connections in the pool (besides the LISTEN connection).
    pub pool_size: usize,
    /// How often the LISTEN connection checks the database (and wakes
    /// readers if a notification was missed).
    pub poll_interval: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            poll_interval: Duration::from_secs(5),
        }
    }
}

/// The PostgreSQL-backed [`Datastore`].
pub struct PostgresDatastore {
    pool: Pool,
    hint: watch::Sender<u64>,
    listener: tokio::task::JoinHandle<()>,
    /// The settings as shown in logs (no password).
    shown: String,
}

impl fmt::Debug for PostgresDatastore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresDatastore")
            .field("database", &self.shown)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresDatastore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// An error's message with its causes, for logs and errors. tokio-postgres
/// never puts the password in one.
pub fn redact(e: &tokio_postgres::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Maps a database error: unreachable → `Unavailable`, a conflict between
/// transactions → `Conflict`, the rest → `Backend`.
pub fn db(e: tokio_postgres::Error) -> DatastoreError {
    let message = redact(&e);
    let Some(code) = e.code() else {
        // No server error: I/O, a closed connection, a timeout, TLS;
        // or a value this code failed to convert.
        let ours = ["error serializing", "error deserializing", "invalid column"]
            .iter()
            .any(|p| message.starts_with(p));
        return if ours {
            DatastoreError::Backend(message)
        } else {
            unavailable(message)
        };
    };
    let class = &code.code()[..2];
    if class == "08"
        || class == "57"
        || *code == SqlState::TOO_MANY_CONNECTIONS
        || *code == SqlState::READ_ONLY_SQL_TRANSACTION
    {
        unavailable(message)
    } else if *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
    {
        DatastoreError::Conflict(format!("a concurrent transaction ({message})"))
    } else {
        DatastoreError::Backend(format!("PostgreSQL: {message}"))
    }
}

/// Maps the error of a `COMMIT`. An answer from the server means the
/// transaction was not committed ([`db`]); a connection lost while
/// committing leaves the outcome unknown, which `Unavailable` ("no change
/// was made") would misstate.
fn commit_error(e: tokio_postgres::Error) -> DatastoreError {
    if e.code().is_some() {
        return db(e);
    }
    DatastoreError::Backend(format!(
        "the connection to PostgreSQL was lost while committing ({}): the change may or may not have been made; check before retrying",
        redact(&e)
    ))
}

fn unavailable(message: String) -> DatastoreError {
    DatastoreError::Unavailable(message)
}

fn pool_error(e: deadpool_postgres::PoolError) -> DatastoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db(e),
        other => unavailable(format!("no database connection: {other}")),
    }
}

fn int(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| DatastoreError::Backend(format!("{v} is out of range")))
}

fn uint(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Unix seconds, rounded up: stored whole seconds `s` satisfy `s < t`
/// exactly when `s < ceil(t)`.
fn secs_ceil(t: SystemTime) -> Result<i64> {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    int(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

/// Unix seconds, rounded down: `s <= t` exactly when `s <= floor(t)`.
fn secs_floor(t: SystemTime) -> Result<i64> {
    int(sigil_identity::clock::unix_seconds(t))
}

fn json<T: DeserializeOwned>(row: &Row, idx: usize) -> Result<T> {
    let v: serde_json::Value = row.try_get(idx).map_err(db)?;
    serde_json::from_value(v).map_err(|e| DatastoreError::Corrupt(e.to_string()))
}

fn hash(bytes: &[u8]) -> Result<chain::Hash> {
    bytes
        .try_into()
        .map_err(|_| DatastoreError::Corrupt("an audit chain hash is not 32 bytes".into()))
}

type Conn = deadpool_postgres::Object;
type Tx<'a> = deadpool_postgres::Transaction<'a>;

impl PostgresDatastore {
    /// Connects, applies the schema migrations (refusing a database newer
    /// than this binary), and starts the LISTEN connection. Must be called
    /// inside the Tokio runtime.
    pub async fn open(settings: PgSettings, options: PgOptions) -> Result<Self> {
        let shown = settings.to_string();
        let mut config = settings.config.clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(POOL_TIMEOUT);
        }
        let connector =
            tls::connector(&settings).map_err(|e| DatastoreError::Backend(e.to_string()))?;
        if tls::is_unverified(&settings) && settings.tls != TlsMode::Disable {
            warn!(
                database = %shown,
                "the database server's certificate is not verified (sslmode prefer/require without sslrootcert); use sslmode=verify-full with sslrootcert"
            );
        }
        {
            let (mut client, connection) =
                config
                    .connect(connector.clone())
                    .await
                    .map_err(|e| match db(e) {
                        DatastoreError::Unavailable(m) => {
                            unavailable(format!("cannot connect to PostgreSQL ({shown}): {m}"))
                        }
                        other => other,
                    })?;
            let driver = tokio::spawn(connection);
            let version = schema::migrate(&mut client).await?;
            drop(client);
            let _ = driver.await;
            info!(database = %shown, schema_version = version, "PostgreSQL datastore open");
        }
        let manager = Manager::from_config(
            config.clone(),
            connector.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|e| DatastoreError::Backend(format!("connection pool: {e}")))?;
        let (hint, _) = watch::channel(0);
        let store = Self {
            pool,
            listener: tokio::spawn(listen::run(
                config,
                connector,
                hint.clone(),
                options.poll_interval,
            )),
            hint,
            shown,
        };
        listen::bump(&store.hint, store.current_revision().await?);
        Ok(store)
    }

    async fn conn(&self) -> Result<Conn> {
        self.pool.get().await.map_err(pool_error)
    }

    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let conn = self.conn().await?;
        let statement = conn.prepare_cached(sql).await.map_err(db)?;
        conn.query(&statement, params).await.map_err(db)
    }

    async fn query_opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        let conn = self.conn().await?;
        let statement = conn.prepare_cached(sql).await.map_err(db)?;
        conn.query_opt(&statement, params).await.map_err(db)
    }

    /// Runs `f` as one mutation (see the module documentation) and returns
    /// its result once committed.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        F: for<'a, 'b> FnOnce(&'a mut Writer<'b>) -> BoxFuture<'a, Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let mut conn = self.conn().await?;
        let tx = conn
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
            .await
            .map_err(db)?;
        let row = one(
            &tx,
            "SELECT rev FROM sigil_revision WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await?;
        let start: i64 = row.get(0);
        let mut w = Writer {
            tx,
            start,
            rev: start,
        };
        let out = f(&mut w).await?;
        let Writer { tx, start, rev } = w;
        if rev > start {
            exec(
                &tx,
                "UPDATE sigil_revision SET rev = $1 WHERE id = 1",
                &[&rev],
            )
            .await?;
            exec(
                &tx,
                "SELECT pg_notify($1, $2)",
                &[&CHANNEL, &rev.to_string()],
            )
            .await?;
        }
        tx.commit().await.map_err(commit_error)?;
        if rev > start {
            listen::bump(&self.hint, uint(rev));
        }
        Ok(out)
    }

    /// Runs `f` in one transaction under the advisory lock `key`, or
    /// returns `None` when another replica holds it.
    async fn singleton<T, F>(&self, key: i64, f: F) -> Result<Option<T>>
    where
        F: for<'a, 'b> FnOnce(&'a mut Writer<'b>) -> BoxFuture<'a, Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        self.write(move |w| {
            Box::pin(async move {
                let row = one(&w.tx, "SELECT pg_try_advisory_xact_lock($1)", &[&key]).await?;
                if !row.get::<_, bool>(0) {
                    return Ok(None);
                }
                f(w).await.map(Some)
            })
        })
        .await
    }
}

/// Runs a statement in `tx`, prepared once per connection (the pool's
/// statement cache): one round trip instead of two.
async fn exec(tx: &Tx<'_>, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
    let statement = tx.prepare_cached(sql).await.map_err(db)?;
    tx.execute(&statement, params).await.map_err(db)
}

/// [`exec`] for the rows of a query.
async fn rows(tx: &Tx<'_>, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
    let statement = tx.prepare_cached(sql).await.map_err(db)?;
    tx.query(&statement, params).await.map_err(db)
}

/// [`exec`] for a query of at most one row.
async fn opt(tx: &Tx<'_>, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
    let statement = tx.prepare_cached(sql).await.map_err(db)?;
    tx.query_opt(&statement, params).await.map_err(db)
}

/// [`exec`] for a query of exactly one row.
async fn one(tx: &Tx<'_>, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
    let statement = tx.prepare_cached(sql).await.map_err(db)?;
    tx.query_one(&statement, params).await.map_err(db)
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// One mutation's transaction, holding the revision row.
struct Writer<'a> {
    tx: Tx<'a>,
    start: i64,
    /// The last revision handed out in this transaction.
    rev: i64,
}

impl Writer<'_> {
    /// The next revision.
    fn next(&mut self) -> u64 {
        self.rev += 1;
        uint(self.rev)
    }

    /// Records `change` (its revision handed out by [`Writer::next`]).
    async fn record(&self, change: &Change) -> Result<()> {
        exec(
            &self.tx,
            "INSERT INTO sigil_changes (rev, change) VALUES ($1, $2)",
            &[&int(change.revision)?, &Json(change)],
        )
        .await?;
        Ok(())
    }

    /// Takes the next revision for `changed` and records it.
    async fn change(&mut self, changed: Changed) -> Result<u64> {
        let revision = self.next();
        self.record(&Change { revision, changed }).await?;
        Ok(revision)
    }

    async fn exists(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<bool> {
        Ok(opt(&self.tx, sql, params).await?.is_some())
    }

    /// Appends audit events after the chain head, locked in this
    /// transaction; returns the last sequence number (0 for none).
    async fn audit(&self, events: &[AuditEvent]) -> Result<u64> {
        put_audit(&self.tx, events).await
    }

    async fn create_entry(&mut self, entry: &RegistrationEntry) -> Result<RegistrationEntry> {
        let key = entry_key(entry);
        if self
            .exists(
                "SELECT 1 FROM sigil_entries WHERE id = $1",
                &[&entry.id.as_str()],
            )
            .await?
        {
            return Err(DatastoreError::AlreadyExists(format!("entry {}", entry.id)));
        }
        if self
            .exists("SELECT 1 FROM sigil_entries WHERE entry_key = $1", &[&key])
            .await?
        {
            return Err(duplicate(entry));
        }
        let entry = RegistrationEntry {
            revision: self.next(),
            ..entry.clone()
        };
        exec(
            &self.tx,
            "INSERT INTO sigil_entries (id, entry_key, spiffe_id, parent_id, owner, revision, body)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &entry.id.as_str(),
                &key,
                &entry.spiffe_id.as_str(),
                &entry.parent_id.as_str(),
                &entry.owner,
                &int(entry.revision)?,
                &Json(&entry),
            ],
        )
        .await?;
        self.entry_change(ChangeKind::Created, &entry).await?;
        Ok(entry)
    }

    async fn update_entry(
        &mut self,
        entry: &RegistrationEntry,
        expected: Option<u64>,
    ) -> Result<RegistrationEntry> {
        let Some(row) = opt(
            &self.tx,
            "SELECT body FROM sigil_entries WHERE id = $1 FOR UPDATE",
            &[&entry.id.as_str()],
        )
        .await?
        else {
            return Err(DatastoreError::NotFound(format!("entry {}", entry.id)));
        };
        let old: RegistrationEntry = json(&row, 0)?;
        if expected.is_some_and(|r| r != old.revision) {
            return Err(DatastoreError::Conflict(format!("entry {}", entry.id)));
        }
        let key = entry_key(entry);
        if key != entry_key(&old)
            && self
                .exists("SELECT 1 FROM sigil_entries WHERE entry_key = $1", &[&key])
                .await?
        {
            return Err(duplicate(entry));
        }
        let entry = RegistrationEntry {
            revision: self.next(),
            ..entry.clone()
        };
        exec(&self.tx, "UPDATE sigil_entries SET entry_key = $2, spiffe_id = $3, parent_id = $4, owner = $5, revision = $6, body = $7
                 WHERE id = $1",
                &[
                    &entry.id.as_str(),
                    &key,
                    &entry.spiffe_id.as_str(),
                    &entry.parent_id.as_str(),
                    &entry.owner,
                    &int(entry.revision)?,
                    &Json(&entry),
                ]).await?;
        self.entry_change(ChangeKind::Updated, &entry).await?;
        Ok(entry)
    }

    async fn delete_entry(
        &mut self,
        id: &EntryId,
        expected: Option<u64>,
    ) -> Result<RegistrationEntry> {
        let Some(row) = opt(
            &self.tx,
            "SELECT body FROM sigil_entries WHERE id = $1 FOR UPDATE",
            &[&id.as_str()],
        )
        .await?
        else {
            return Err(DatastoreError::NotFound(format!("entry {id}")));
        };
        let mut old: RegistrationEntry = json(&row, 0)?;
        if expected.is_some_and(|r| r != old.revision) {
            return Err(DatastoreError::Conflict(format!("entry {id}")));
        }
        exec(
            &self.tx,
            "DELETE FROM sigil_entries WHERE id = $1",
            &[&id.as_str()],
        )
        .await?;
        old.revision = self.next();
        self.entry_change(ChangeKind::Deleted, &old).await?;
        Ok(old)
    }

    async fn entry_change(&self, kind: ChangeKind, entry: &RegistrationEntry) -> Result<()> {
        self.record(&Change::entry(kind, entry.clone())).await
    }
}

fn duplicate(entry: &RegistrationEntry) -> DatastoreError {
    DatastoreError::AlreadyExists(format!(
        "an entry for {} under parent {} with the same selectors",
        entry.spiffe_id, entry.parent_id
    ))
}

/// See [`Writer::audit`]; also used by audit-only appends.
async fn put_audit(tx: &Tx<'_>, events: &[AuditEvent]) -> Result<u64> {
    if events.is_empty() {
        return Ok(0);
    }
    let row = one(
        tx,
        "SELECT head_seq, head_hash FROM sigil_audit_chain WHERE id = 1 FOR UPDATE",
        &[],
    )
    .await?;
    let head = ChainHead {
        seq: uint(row.get(0)),
        hash: hash(row.get(1))?,
    };
    let (records, head) = chain::chain(head, events);
    let first = head.seq + 1 - records.len() as u64;
    let max_time = events
        .iter()
        .map(|e| sigil_identity::clock::unix_seconds(e.time))
        .max()
        .unwrap_or(0);
    exec(
        tx,
        "INSERT INTO sigil_audit (first_seq, max_time, records) VALUES ($1, $2, $3)",
        &[&int(first)?, &int(max_time)?, &Json(&records)],
    )
    .await?;
    exec(
        tx,
        "UPDATE sigil_audit_chain SET head_seq = $1, head_hash = $2 WHERE id = 1",
        &[&int(head.seq)?, &&head.hash[..]],
    )
    .await?;
    Ok(head.seq)
}

#[async_trait]
impl Datastore for PostgresDatastore {
    async fn create_entries_audited(
        &self,
        entries: Vec<(RegistrationEntry, AuditWith)>,
    ) -> Result<Vec<Result<RegistrationEntry>>> {
        self.write(move |w| {
            Box::pin(async move {
                let mut out = Vec::with_capacity(entries.len());
                for (entry, audit) in &entries {
                    let made = w.create_entry(entry).await;
                    if made.is_ok() {
                        w.audit(audit.as_slice()).await?;
                    }
                    match made {
                        // Refusals are per item; anything else fails all.
                        Ok(e) => out.push(Ok(e)),
                        Err(e @ DatastoreError::AlreadyExists(_)) => out.push(Err(e)),
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            })
        })
        .await
    }

    async fn update_entry_audited(
        &self,
        entry: RegistrationEntry,
        audit: AuditWith,
    ) -> Result<RegistrationEntry> {
        self.write(move |w| {
            Box::pin(async move {
                let e = w.update_entry(&entry, None).await?;
                w.audit(audit.as_slice()).await?;
                Ok(e)
            })
        })
        .await
    }

    async fn delete_entry_audited(
        &self,
        id: &EntryId,
        audit: AuditWith,
    ) -> Result<RegistrationEntry> {
        let id = id.clone();
        self.write(move |w| {
            Box::pin(async move {
                let e = w.delete_entry(&id, None).await?;
                w.audit(audit.as_slice()).await?;
                Ok(e)
            })
        })
        .await
    }

    async fn apply_entries(&self, batch: EntryBatch) -> Result<Vec<Change>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.write(move |w| {
            Box::pin(async move {
                let mut made = Vec::new();
                let mut push =
                    |kind, entry: RegistrationEntry| made.push(Change::entry(kind, entry));
                for (id, rev) in &batch.delete {
                    push(ChangeKind::Deleted, w.delete_entry(id, Some(*rev)).await?);
                }
                for e in &batch.update {
                    push(
                        ChangeKind::Updated,
                        w.update_entry(e, Some(e.revision)).await?,
                    );
                }
                for e in &batch.create {
                    push(ChangeKind::Created, w.create_entry(e).await?);
                }
                w.audit(&batch.audit).await?;
                Ok(made)
            })
        })
        .await
    }

    async fn fetch_entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>> {
        self.query_opt(
            "SELECT body FROM sigil_entries WHERE id = $1",
            &[&id.as_str()],
        )
        .await?
        .map(|r| json(&r, 0))
        .transpose()
    }

    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<RegistrationEntry>> {
        let spiffe_id = filter.spiffe_id.as_ref().map(|s| s.as_str());
        let parent_id = filter.parent_id.as_ref().map(|s| s.as_str());
        let rows = self
            .query(
                "SELECT body FROM sigil_entries
                 WHERE ($1::text IS NULL OR spiffe_id = $1)
                   AND ($2::text IS NULL OR parent_id = $2)
                   AND ($3::text IS NULL OR owner = $3)
                 ORDER BY id",
                &[&spiffe_id, &parent_id, &filter.owner],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let e: RegistrationEntry = json(row, 0)?;
            if filter.matches(&e) {
                out.push(e);
            }
        }
        Ok(out)
    }

    async fn count_entries(&self) -> Result<u64> {
        let rows = self
            .query("SELECT count(*) FROM sigil_entries", &[])
            .await?;
        Ok(rows.first().map_or(0, |r| uint(r.get(0))))
    }

    async fn changes(&self, after: u64, limit: usize) -> Result<Vec<Change>> {
        let rows = self
            .query(
                "SELECT change FROM sigil_changes WHERE rev > $1 ORDER BY rev LIMIT $2",
                &[&int(after)?, &int(limit as u64)?],
            )
            .await?;
        rows.iter().map(|r| json(r, 0)).collect()
    }

    async fn current_revision(&self) -> Result<u64> {
        let rows = self
            .query("SELECT rev FROM sigil_revision WHERE id = 1", &[])
            .await?;
        Ok(rows.first().map_or(0, |r| uint(r.get(0))))
    }

    async fn change_floor(&self) -> Result<u64> {
        let rows = self
            .query("SELECT floor FROM sigil_revision WHERE id = 1", &[])
            .await?;
        Ok(rows.first().map_or(0, |r| uint(r.get(0))))
    }

    fn change_hint(&self) -> watch::Receiver<u64> {
        self.hint.subscribe()
    }

    async fn prune_changes(&self, through: u64) -> Result<usize> {
        let through = int(through)?;
        let removed = self
            .singleton(LOCK_PRUNE_CHANGES, move |w| {
                Box::pin(async move {
                    // Never past the current revision (held by this
                    // transaction), never lowered.
                    let floor = w.rev.min(through);
                    let floor: i64 = one(&w.tx, "UPDATE sigil_revision SET floor = greatest(floor, $1) WHERE id = 1 RETURNING floor",
                            &[&floor]).await?
                        .get(0);
                    let n = exec(&w.tx, "DELETE FROM sigil_changes WHERE rev <= $1", &[&floor]).await?;
                    Ok(n as usize)
                })
            })
            .await?;
        Ok(removed.unwrap_or(0))
    }

    async fn create_agent_audited(
        &self,
        agent: AgentRecord,
        audit: AuditWith,
    ) -> Result<AgentRecord> {
        self.write(move |w| {
            Box::pin(async move {
                let n = exec(&w.tx, "INSERT INTO sigil_agents (id, banned, expires_at, body) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (id) DO NOTHING",
                        &[
                            &agent.id.as_str(),
                            &agent.banned,
                            &secs_floor(agent.expires_at)?,
                            &Json(&agent),
                        ]).await?;
                if n == 0 {
                    return Err(DatastoreError::AlreadyExists(format!("agent {}", agent.id)));
                }
                w.change(Changed::Agent {
                    id: agent.id.clone(),
                    record: Some(agent.clone()),
                })
                .await?;
                w.audit(audit.as_slice()).await?;
                Ok(agent)
            })
        })
        .await
    }

    async fn update_agent_audited(
        &self,
        agent: AgentRecord,
        audit: AuditWith,
    ) -> Result<AgentRecord> {
        self.write(move |w| {
            Box::pin(async move {
                let Some(row) = opt(
                    &w.tx,
                    "SELECT banned FROM sigil_agents WHERE id = $1 FOR UPDATE",
                    &[&agent.id.as_str()],
                )
                .await?
                else {
                    return Err(DatastoreError::NotFound(format!("agent {}", agent.id)));
                };
                // A ban is sticky: only deleting the record (evict) lifts it.
                let stored = AgentRecord {
                    banned: agent.banned || row.get::<_, bool>(0),
                    ..agent
                };
                exec(
                    &w.tx,
                    "UPDATE sigil_agents SET banned = $2, expires_at = $3, body = $4 WHERE id = $1",
                    &[
                        &stored.id.as_str(),
                        &stored.banned,
                        &secs_floor(stored.expires_at)?,
                        &Json(&stored),
                    ],
                )
                .await?;
                w.change(Changed::Agent {
                    id: stored.id.clone(),
                    record: Some(stored.clone()),
                })
                .await?;
                w.audit(audit.as_slice()).await?;
                Ok(stored)
            })
        })
        .await
    }

    async fn fetch_agent(&self, id: &AgentId) -> Result<Option<AgentRecord>> {
        self.query_opt(
            "SELECT body FROM sigil_agents WHERE id = $1",
            &[&id.as_str()],
        )
        .await?
        .map(|r| json(&r, 0))
        .transpose()
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        let rows = self
            .query("SELECT body FROM sigil_agents ORDER BY id", &[])
            .await?;
        rows.iter().map(|r| json(r, 0)).collect()
    }

    async fn delete_agent_audited(&self, id: &AgentId, audit: AuditWith) -> Result<AgentRecord> {
        let id = id.clone();
        self.write(move |w| {
            Box::pin(async move {
                let Some(row) = opt(
                    &w.tx,
                    "DELETE FROM sigil_agents WHERE id = $1 RETURNING body",
                    &[&id.as_str()],
                )
                .await?
                else {
                    return Err(DatastoreError::NotFound(format!("agent {id}")));
                };
                w.change(Changed::Agent {
                    id: id.clone(),
                    record: None,
                })
                .await?;
                w.audit(audit.as_slice()).await?;
                json(&row, 0)
            })
        })
        .await
    }

    async fn prune_agents(&self, expired_before: SystemTime) -> Result<Vec<AgentId>> {
        let before = secs_ceil(expired_before)?;
        let removed = self
            .singleton(LOCK_PRUNE_AGENTS, move |w| {
                Box::pin(async move {
                    // Row locks: a renewal committed meanwhile is seen
                    // (READ COMMITTED re-checks the condition) and kept.
                    let rows = rows(&w.tx, "DELETE FROM sigil_agents WHERE NOT banned AND expires_at < $1 RETURNING body",
                            &[&before]).await?;
                    let mut ids = Vec::with_capacity(rows.len());
                    for row in &rows {
                        let agent: AgentRecord = json(row, 0)?;
                        ids.push(agent.id);
                    }
                    ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
                    for id in &ids {
                        w.change(Changed::Agent {
                            id: id.clone(),
                            record: None,
                        })
                        .await?;
                    }
                    Ok(ids)
                })
            })
            .await?;
        Ok(removed.unwrap_or_default())
    }

    async fn create_join_token_audited(
        &self,
        token: JoinTokenRecord,
        audit: AuditWith,
    ) -> Result<()> {
        self.write(move |w| {
            Box::pin(async move {
                let n = exec(
                    &w.tx,
                    "INSERT INTO sigil_join_tokens (hash, expires_at, body) VALUES ($1, $2, $3)
                         ON CONFLICT (hash) DO NOTHING",
                    &[
                        &token.hash.as_str(),
                        &secs_floor(token.expires_at)?,
                        &Json(&token),
                    ],
                )
                .await?;
                if n == 0 {
                    return Err(DatastoreError::AlreadyExists("join token".into()));
                }
                w.change(Changed::JoinToken {
                    hash: token.hash.clone(),
                    record: Some(token.clone()),
                })
                .await?;
                w.audit(audit.as_slice()).await?;
                Ok(())
            })
        })
        .await
    }

    async fn consume_join_token(
        &self,
        hash: &TokenHash,
        now: SystemTime,
    ) -> Result<JoinTokenRecord> {
        let hash = hash.clone();
        // Removed whether or not it has expired: exactly one caller sees it.
        let record: JoinTokenRecord = self
            .write(move |w| {
                Box::pin(async move {
                    let Some(row) = opt(
                        &w.tx,
                        "DELETE FROM sigil_join_tokens WHERE hash = $1 RETURNING body",
                        &[&hash.as_str()],
                    )
                    .await?
                    else {
                        return Err(DatastoreError::NotFound("join token".into()));
                    };
                    w.change(Changed::JoinToken {
                        hash: hash.clone(),
                        record: None,
                    })
                    .await?;
                    json(&row, 0)
                })
            })
            .await?;
        if record.expires_at <= now {
            return Err(DatastoreError::TokenExpired);
        }
        Ok(record)
    }

    async fn prune_join_tokens(&self, now: SystemTime) -> Result<usize> {
        let now = secs_floor(now)?;
        let removed = self
            .singleton(LOCK_PRUNE_TOKENS, move |w| {
                Box::pin(async move {
                    let rows = rows(
                        &w.tx,
                        "DELETE FROM sigil_join_tokens WHERE expires_at <= $1 RETURNING body",
                        &[&now],
                    )
                    .await?;
                    let mut tokens: Vec<JoinTokenRecord> =
                        rows.iter().map(|r| json(r, 0)).collect::<Result<_>>()?;
                    tokens.sort_by(|a, b| a.hash.cmp(&b.hash));
                    for t in &tokens {
                        w.change(Changed::JoinToken {
                            hash: t.hash.clone(),
                            record: None,
                        })
                        .await?;
                    }
                    Ok(tokens.len())
                })
            })
            .await?;
        Ok(removed.unwrap_or(0))
    }

    async fn put_bundle(&self, bundle: &Bundle) -> Result<()> {
        let bundle = bundle.clone();
        self.write(move |w| {
            Box::pin(async move {
                let td = bundle.trust_domain.as_str();
                if let Some(row) = opt(&w.tx, "SELECT sequence FROM sigil_bundles WHERE trust_domain = $1 FOR UPDATE",
                        &[&td]).await?
                {
                    let stored = uint(row.get(0));
                    if bundle.sequence <= stored {
                        return Err(DatastoreError::SequenceRegression {
                            trust_domain: bundle.trust_domain.clone(),
                            stored,
                            given: bundle.sequence,
                        });
                    }
                }
                exec(&w.tx, "INSERT INTO sigil_bundles (trust_domain, sequence, body) VALUES ($1, $2, $3)
                     ON CONFLICT (trust_domain) DO UPDATE SET sequence = EXCLUDED.sequence, body = EXCLUDED.body",
                    &[&td, &int(bundle.sequence)?, &Json(&bundle)]).await?;
                w.change(Changed::Bundle {
                    trust_domain: bundle.trust_domain.clone(),
                    bundle: Some(bundle.clone()),
                })
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn fetch_bundle(&self, td: &TrustDomain) -> Result<Option<Bundle>> {
        self.query_opt(
            "SELECT body FROM sigil_bundles WHERE trust_domain = $1",
            &[&td.as_str()],
        )
        .await?
        .map(|r| json(&r, 0))
        .transpose()
    }

    async fn list_bundles(&self) -> Result<Vec<Bundle>> {
        let rows = self
            .query("SELECT body FROM sigil_bundles ORDER BY trust_domain", &[])
            .await?;
        rows.iter().map(|r| json(r, 0)).collect()
    }

    async fn delete_bundle(&self, td: &TrustDomain) -> Result<()> {
        let td = td.clone();
        self.write(move |w| {
            Box::pin(async move {
                let n = exec(
                    &w.tx,
                    "DELETE FROM sigil_bundles WHERE trust_domain = $1",
                    &[&td.as_str()],
                )
                .await?;
                if n == 0 {
                    return Err(DatastoreError::NotFound(format!("bundle of {td}")));
                }
                w.change(Changed::Bundle {
                    trust_domain: td.clone(),
                    bundle: None,
                })
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn update_bundle(&self, td: &TrustDomain, edit: BundleEdit) -> Result<Bundle> {
        let td = td.clone();
        self.write(move |w| {
            Box::pin(async move {
                let stored = opt(&w.tx, "SELECT body FROM sigil_bundles WHERE trust_domain = $1 FOR UPDATE",
                        &[&td.as_str()]).await?;
                let (mut bundle, exists) = match &stored {
                    Some(row) => (json::<Bundle>(row, 0)?, true),
                    None => (Bundle::new(td.clone()), false),
                };
                if !edit.apply_to(&mut bundle) && exists {
                    return Ok(bundle);
                }
                bundle.sequence += 1;
                exec(&w.tx, "INSERT INTO sigil_bundles (trust_domain, sequence, body) VALUES ($1, $2, $3)
                     ON CONFLICT (trust_domain) DO UPDATE SET sequence = EXCLUDED.sequence, body = EXCLUDED.body",
                    &[&td.as_str(), &int(bundle.sequence)?, &Json(&bundle)]).await?;
                w.change(Changed::Bundle {
                    trust_domain: td.clone(),
                    bundle: Some(bundle.clone()),
                })
                .await?;
                Ok(bundle)
            })
        })
        .await
    }

    async fn record_issuances(&self, records: Vec<IssuanceRecord>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        // No revision: issuance records are not in the change feed, so the
        // write does not queue behind the revision row.
        let serials: Vec<&str> = records.iter().map(|r| r.serial.as_str()).collect();
        let ids: Vec<&str> = records.iter().map(|r| r.spiffe_id.as_str()).collect();
        let not_after = records
            .iter()
            .map(|r| secs_ceil(r.not_after))
            .collect::<Result<Vec<i64>>>()?;
        let bodies: Vec<Json<&IssuanceRecord>> = records.iter().map(Json).collect();
        let conn = self.conn().await?;
        let statement = conn
            .prepare_cached(
                "INSERT INTO sigil_issuances (serial, spiffe_id, not_after, record)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::jsonb[])
                 ON CONFLICT (serial) DO UPDATE SET spiffe_id = EXCLUDED.spiffe_id,
                     not_after = EXCLUDED.not_after, record = EXCLUDED.record",
            )
            .await
            .map_err(db)?;
        conn.execute(&statement, &[&serials, &ids, &not_after, &bodies])
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn fetch_issuance(&self, serial: &str) -> Result<Option<IssuanceRecord>> {
        self.query_opt(
            "SELECT record FROM sigil_issuances WHERE serial = $1",
            &[&serial],
        )
        .await?
        .map(|r| json(&r, 0))
        .transpose()
    }

    async fn list_issuances_of(&self, id: &SpiffeId) -> Result<Vec<IssuanceRecord>> {
        self.query(
            "SELECT record FROM sigil_issuances WHERE spiffe_id = $1 ORDER BY serial",
            &[&id.as_str()],
        )
        .await?
        .iter()
        .map(|r| json(r, 0))
        .collect()
    }

    async fn revoke_x509(&self, records: Vec<RevocationRecord>) -> Result<u64> {
        self.write(move |w| {
            Box::pin(async move {
                for r in &records {
                    exec(
                        &w.tx,
                        "INSERT INTO sigil_revocations (serial, not_after, record)
                         VALUES ($1, $2, $3) ON CONFLICT (serial) DO NOTHING",
                        &[&r.serial.as_str(), &secs_ceil(r.not_after)?, &Json(r)],
                    )
                    .await?;
                }
                let serials = records.iter().map(|r| r.serial.clone()).collect();
                w.change(Changed::Revocation { serials }).await
            })
        })
        .await
    }

    async fn list_revocations(&self) -> Result<Vec<RevocationRecord>> {
        self.query("SELECT record FROM sigil_revocations ORDER BY serial", &[])
            .await?
            .iter()
            .map(|r| json(r, 0))
            .collect()
    }

    async fn put_crl(&self, crl: CrlRecord) -> Result<()> {
        self.write(move |w| {
            Box::pin(async move {
                let written = exec(
                    &w.tx,
                    "INSERT INTO sigil_crls (issuer, number, not_after, record)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (issuer) DO UPDATE SET number = EXCLUDED.number,
                         not_after = EXCLUDED.not_after, record = EXCLUDED.record
                     WHERE sigil_crls.number <= EXCLUDED.number",
                    &[
                        &crl.issuer.as_str(),
                        &int(crl.number)?,
                        &secs_ceil(crl.not_after)?,
                        &Json(&crl),
                    ],
                )
                .await?;
                if written > 0 {
                    w.change(Changed::Crl {
                        issuer: crl.issuer.clone(),
                    })
                    .await?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn list_crls(&self) -> Result<Vec<CrlRecord>> {
        self.query("SELECT record FROM sigil_crls ORDER BY issuer", &[])
            .await?
            .iter()
            .map(|r| json(r, 0))
            .collect()
    }

    async fn prune_revocations(&self, now: SystemTime) -> Result<usize> {
        let now = secs_floor(now)?;
        let mut removed = 0;
        for sql in [
            "DELETE FROM sigil_issuances WHERE not_after < $1",
            "DELETE FROM sigil_revocations WHERE not_after < $1",
            "DELETE FROM sigil_crls WHERE not_after < $1",
        ] {
            let conn = self.conn().await?;
            let n = conn.execute(sql, &[&now]).await.map_err(db)?;
            removed += usize::try_from(n).unwrap_or(usize::MAX);
        }
        Ok(removed)
    }

    async fn fetch_ca_journal(&self, server: &ServerId) -> Result<Option<Vec<u8>>> {
        Ok(self
            .query_opt(
                "SELECT journal FROM sigil_ca_journals WHERE server_id = $1",
                &[&server.as_str()],
            )
            .await?
            .map(|row| row.get(0)))
    }

    async fn put_ca_journal(&self, server: &ServerId, journal: Vec<u8>) -> Result<()> {
        let server = server.clone();
        self.write(move |w| {
            Box::pin(async move {
                exec(
                    &w.tx,
                    "INSERT INTO sigil_ca_journals (server_id, journal) VALUES ($1, $2)
                     ON CONFLICT (server_id) DO UPDATE SET journal = EXCLUDED.journal",
                    &[&server.as_str(), &journal],
                )
                .await?;
                w.change(Changed::CaJournal {
                    server_id: server.clone(),
                })
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn list_ca_journals(&self) -> Result<Vec<(ServerId, Vec<u8>)>> {
        let rows = self
            .query(
                "SELECT server_id, journal FROM sigil_ca_journals ORDER BY server_id",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let id: &str = r.get(0);
                let id = id.parse::<ServerId>().map_err(|_| {
                    DatastoreError::Corrupt("a CA journal's server id is not valid".into())
                })?;
                Ok((id, r.get(1)))
            })
            .collect()
    }

    async fn append_audit(&self, events: Vec<AuditEvent>) -> Result<u64> {
        if events.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn().await?;
        let tx = conn
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
            .await
            .map_err(db)?;
        let last = put_audit(&tx, &events).await?;
        tx.commit().await.map_err(db)?;
        Ok(last)
    }

    async fn append_audit_unsynced(&self, events: Vec<AuditEvent>) -> Result<u64> {
        // Every write here is committed before it returns.
        self.append_audit(events).await
    }

    async fn sync(&self) -> Result<()> {
        Ok(())
    }

    async fn list_audit(&self, after: u64, limit: usize) -> Result<Vec<(u64, AuditEvent)>> {
        Ok(self
            .audit_records(after, limit)
            .await?
            .into_iter()
            .map(|r| (r.seq, r.event))
            .collect())
    }

    async fn prune_audit(&self, before: SystemTime) -> Result<usize> {
        let before = secs_ceil(before)?;
        let removed = self
            .singleton(LOCK_PRUNE_AUDIT, move |w| {
                Box::pin(async move {
                    let tx = &w.tx;
                    // The first record (in stored order) holding an event at
                    // or after the cut-off stays, with all after it.
                    let stop: Option<i64> = one(tx, "SELECT min(first_seq) FROM sigil_audit WHERE max_time >= $1",
                            &[&before]).await?
                        .get(0);
                    let stop = stop.unwrap_or(i64::MAX);
                    let Some(last) = opt(tx, "SELECT records FROM sigil_audit WHERE first_seq < $1 ORDER BY first_seq DESC LIMIT 1",
                            &[&stop]).await?
                    else {
                        return Ok(0);
                    };
                    let records: Vec<AuditRecord> = json(&last, 0)?;
                    let Some(last) = records.last() else {
                        return Err(DatastoreError::Corrupt("an empty audit record".into()));
                    };
                    let anchor = ChainHead {
                        seq: last.seq,
                        hash: last.prev.map_or(chain::ZERO, |_| chain::record_hash(last)),
                    };
                    let removed: i64 = one(tx, "WITH gone AS (DELETE FROM sigil_audit WHERE first_seq < $1 RETURNING records)
                             SELECT coalesce(sum(jsonb_array_length(records)), 0)::bigint FROM gone",
                            &[&stop]).await?
                        .get(0);
                    exec(tx, "UPDATE sigil_audit_chain SET anchor_seq = $1, anchor_hash = $2 WHERE id = 1",
                        &[&int(anchor.seq)?, &&anchor.hash[..]]).await?;
                    exec(tx, "DELETE FROM sigil_audit_checkpoints WHERE size < $1",
                        &[&int(anchor.seq)?]).await?;
                    Ok(uint(removed) as usize)
                })
            })
            .await?;
        Ok(removed.unwrap_or(0))
    }

    async fn audit_records(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>> {
        let wanted = after.saturating_add(1);
        // The record holding `wanted` starts at or before it.
        let start: Option<i64> = self
            .query(
                "SELECT max(first_seq) FROM sigil_audit WHERE first_seq <= $1",
                &[&int(wanted)?],
            )
            .await?
            .first()
            .and_then(|r| r.get(0));
        let mut from = start.unwrap_or(int(wanted)?);
        let mut out = Vec::new();
        loop {
            let rows = self
                .query(
                    "SELECT first_seq, records FROM sigil_audit WHERE first_seq >= $1 ORDER BY first_seq LIMIT 64",
                    &[&from],
                )
                .await?;
            let Some(last) = rows.last() else {
                return Ok(out);
            };
            from = last.get::<_, i64>(0) + 1;
            for row in &rows {
                let records: Vec<AuditRecord> = json(row, 1)?;
                for r in records {
                    // Kept in stored order, even one out of place (a
                    // verifier must see it), except before the start.
                    if r.seq < wanted && out.is_empty() {
                        continue;
                    }
                    if out.len() == limit {
                        return Ok(out);
                    }
                    out.push(r);
                }
            }
        }
    }

    async fn audit_chain(&self) -> Result<AuditChainState> {
        let rows = self
            .query(
                "SELECT head_seq, head_hash, anchor_seq, anchor_hash FROM sigil_audit_chain WHERE id = 1",
                &[],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Err(DatastoreError::Corrupt(
                "the audit chain row is missing".into(),
            ));
        };
        let anchor = match (row.get::<_, Option<i64>>(2), row.get::<_, Option<&[u8]>>(3)) {
            (Some(seq), Some(h)) => Some(ChainHead {
                seq: uint(seq),
                hash: hash(h)?,
            }),
            _ => None,
        };
        Ok(AuditChainState {
            head: ChainHead {
                seq: uint(row.get(0)),
                hash: hash(row.get(1))?,
            },
            anchor,
        })
    }

    async fn put_audit_checkpoint(&self, size: u64, note: String) -> Result<()> {
        let conn = self.conn().await?;
        conn.execute(
            "INSERT INTO sigil_audit_checkpoints (size, note) VALUES ($1, $2)
             ON CONFLICT (size) DO UPDATE SET note = EXCLUDED.note",
            &[&int(size)?, &note],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn audit_checkpoints(&self) -> Result<Vec<(u64, String)>> {
        let rows = self
            .query(
                "SELECT size, note FROM sigil_audit_checkpoints ORDER BY size",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (uint(r.get(0)), r.get(1))).collect())
    }

    async fn latest_audit_checkpoint(&self) -> Result<Option<(u64, String)>> {
        Ok(self
            .query_opt(
                "SELECT size, note FROM sigil_audit_checkpoints ORDER BY size DESC LIMIT 1",
                &[],
            )
            .await?
            .map(|r| (uint(r.get(0)), r.get(1))))
    }
}

#[cfg(test)]
mod tests;
