//! Copying a whole datastore (a sled directory) into PostgreSQL, for
//! `sigil-server datastore migrate`: entries with their revisions, agents,
//! join tokens, bundles, CA journals, and the audit log as written (its
//! records, chain head and anchor, and signed checkpoints, so `audit
//! verify` passes on the copy).
//!
//! Everything is written in one transaction: a failed run leaves the
//! target as it was, so it can simply be run again. A target holding data
//! is refused unless `force`, which replaces it. No change history is
//! copied: the revision counter and the feed's floor are set to the
//! source's current revision, so revisions never go back and any reader
//! reloads fully.

use tokio_postgres::types::Json;

use super::*;

/// How many of each kind were copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportSummary {
    pub entries: usize,
    pub agents: usize,
    pub join_tokens: usize,
    pub bundles: usize,
    pub ca_journals: usize,
    pub audit_records: usize,
    pub audit_checkpoints: usize,
    pub revision: u64,
}

/// Audit records per stored row (the source's batch boundaries are not
/// visible through the trait; the chain does not depend on them).
const AUDIT_BATCH: usize = 1000;

/// The tables, in an order that empties them safely.
const TABLES: &[&str] = &[
    "sigil_changes",
    "sigil_entries",
    "sigil_agents",
    "sigil_join_tokens",
    "sigil_bundles",
    "sigil_ca_journals",
    "sigil_audit",
    "sigil_audit_checkpoints",
];

impl PostgresDatastore {
    /// Whether the database holds anything (a revision, or any row).
    pub async fn is_empty(&self) -> Result<bool> {
        let conn = self.conn().await?;
        let mut sql = String::from(
            "SELECT (SELECT rev FROM sigil_revision WHERE id = 1) = 0
                AND (SELECT head_seq FROM sigil_audit_chain WHERE id = 1) = 0",
        );
        for t in TABLES {
            sql.push_str(&format!(" AND NOT EXISTS (SELECT 1 FROM {t})"));
        }
        let row = conn.query_one(&sql, &[]).await.map_err(db)?;
        Ok(row.get(0))
    }

    /// Copies everything in `from` (see the module documentation); a CA
    /// journal stored before replicas had ids becomes `server`'s.
    /// `progress` is told `(what, done)` as the copy goes.
    pub async fn import(
        &self,
        from: &SledDatastore,
        server: &ServerId,
        force: bool,
        progress: &mut (dyn FnMut(&str, usize) + Send),
    ) -> Result<ImportSummary> {
        let mut conn = self.conn().await?;
        let tx = conn
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
            .await
            .map_err(db)?;
        // Writers of running replicas wait (there should be none).
        tx.query_one(
            "SELECT rev FROM sigil_revision WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await
        .map_err(db)?;
        if !self.is_empty().await? {
            if !force {
                return Err(DatastoreError::AlreadyExists(
                    "data in the target database (run with --force to replace it)".into(),
                ));
            }
            tx.batch_execute(&format!("TRUNCATE {}", TABLES.join(", ")))
                .await
                .map_err(db)?;
            tx.batch_execute(
                "UPDATE sigil_audit_chain SET head_seq = 0, head_hash = '\\x0000000000000000000000000000000000000000000000000000000000000000', anchor_seq = NULL, anchor_hash = NULL WHERE id = 1",
            )
            .await
            .map_err(db)?;
        }
        let mut summary = ImportSummary {
            revision: from.current_revision().await?,
            ..ImportSummary::default()
        };

        let stmt = tx
            .prepare(
                "INSERT INTO sigil_entries (id, entry_key, spiffe_id, parent_id, owner, revision, body)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .await
            .map_err(db)?;
        for e in from.list_entries(&EntryFilter::default()).await? {
            summary.revision = summary.revision.max(e.revision);
            tx.execute(
                &stmt,
                &[
                    &e.id.as_str(),
                    &entry_key(&e),
                    &e.spiffe_id.as_str(),
                    &e.parent_id.as_str(),
                    &e.owner,
                    &int(e.revision)?,
                    &Json(&e),
                ],
            )
            .await
            .map_err(db)?;
            summary.entries += 1;
            if summary.entries.is_multiple_of(1000) {
                progress("entries", summary.entries);
            }
        }
        progress("entries", summary.entries);

        let stmt = tx
            .prepare(
                "INSERT INTO sigil_agents (id, banned, expires_at, body) VALUES ($1, $2, $3, $4)",
            )
            .await
            .map_err(db)?;
        for a in from.list_agents().await? {
            tx.execute(
                &stmt,
                &[
                    &a.id.as_str(),
                    &a.banned,
                    &secs_floor(a.expires_at)?,
                    &Json(&a),
                ],
            )
            .await
            .map_err(db)?;
            summary.agents += 1;
        }
        progress("agents", summary.agents);

        for t in from.join_tokens()? {
            tx.execute(
                "INSERT INTO sigil_join_tokens (hash, expires_at, body) VALUES ($1, $2, $3)",
                &[&t.hash.as_str(), &secs_floor(t.expires_at)?, &Json(&t)],
            )
            .await
            .map_err(db)?;
            summary.join_tokens += 1;
        }
        progress("join tokens", summary.join_tokens);

        for b in from.list_bundles().await? {
            tx.execute(
                "INSERT INTO sigil_bundles (trust_domain, sequence, body) VALUES ($1, $2, $3)",
                &[&b.trust_domain.as_str(), &int(b.sequence)?, &Json(&b)],
            )
            .await
            .map_err(db)?;
            summary.bundles += 1;
        }
        progress("bundles", summary.bundles);

        let mut journals = from.list_ca_journals().await?;
        if journals.is_empty() {
            // Written before replicas had ids: the journal of the server
            // whose data directory this is.
            if let Some(journal) = from.fetch_ca_journal(server).await? {
                journals.push((server.clone(), journal));
            }
        }
        for (id, journal) in journals {
            tx.execute(
                "INSERT INTO sigil_ca_journals (server_id, journal) VALUES ($1, $2)",
                &[&id.as_str(), &journal],
            )
            .await
            .map_err(db)?;
            summary.ca_journals += 1;
        }
        progress("CA journals", summary.ca_journals);

        let mut after = 0;
        loop {
            let records = from.audit_records(after, AUDIT_BATCH).await?;
            let (Some(first), Some(last)) = (records.first(), records.last()) else {
                break;
            };
            let max_time = records
                .iter()
                .map(|r| sigil_identity::clock::unix_seconds(r.event.time))
                .max()
                .unwrap_or(0);
            tx.execute(
                "INSERT INTO sigil_audit (first_seq, max_time, records) VALUES ($1, $2, $3)",
                &[&int(first.seq)?, &int(max_time)?, &Json(&records)],
            )
            .await
            .map_err(db)?;
            // Stored order is kept; the next page starts after the highest.
            after = records
                .iter()
                .map(|r| r.seq)
                .max()
                .unwrap_or(last.seq)
                .max(after + 1);
            summary.audit_records += records.len();
            progress("audit records", summary.audit_records);
        }
        let chain_state = from.audit_chain().await?;
        tx.execute(
            "UPDATE sigil_audit_chain SET head_seq = $1, head_hash = $2, anchor_seq = $3, anchor_hash = $4 WHERE id = 1",
            &[
                &int(chain_state.head.seq)?,
                &&chain_state.head.hash[..],
                &chain_state.anchor.map(|a| int(a.seq)).transpose()?,
                &chain_state.anchor.as_ref().map(|a| &a.hash[..]),
            ],
        )
        .await
        .map_err(db)?;
        for (size, note) in from.audit_checkpoints().await? {
            tx.execute(
                "INSERT INTO sigil_audit_checkpoints (size, note) VALUES ($1, $2)",
                &[&int(size)?, &note],
            )
            .await
            .map_err(db)?;
            summary.audit_checkpoints += 1;
        }
        progress("audit checkpoints", summary.audit_checkpoints);

        tx.execute(
            "UPDATE sigil_revision SET rev = $1, floor = $1 WHERE id = 1",
            &[&int(summary.revision)?],
        )
        .await
        .map_err(db)?;
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&CHANNEL, &summary.revision.to_string()],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        listen::bump(&self.hint, summary.revision);
        Ok(summary)
    }
}
