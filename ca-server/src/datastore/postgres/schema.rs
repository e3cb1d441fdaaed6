//! The schema: numbered SQL migrations embedded in the binary, applied at
//! startup under a session advisory lock so replicas starting together
//! apply each once. `sigil_schema` holds one row per applied version.

use tokio_postgres::Client;

use super::{LOCK_MIGRATE, db};
use crate::datastore::{DatastoreError, Result};

/// The migrations, in order; version = index + 1.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_revocations.sql"),
];

/// The schema version this binary writes.
pub fn current() -> i32 {
    // The list is a constant of a handful of items.
    i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX)
}

/// Why the schema cannot be used.
fn too_new(found: i32) -> DatastoreError {
    DatastoreError::Backend(format!(
        "the database schema is version {found}, newer than this sigil-server knows (version {}): it was migrated by a newer release; run that release (or newer) instead of downgrading",
        current()
    ))
}

/// Brings the schema to [`current`]; refuses a newer one. `client` is a
/// dedicated connection (the lock is held by its session).
pub async fn migrate(client: &mut Client) -> Result<i32> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_MIGRATE])
        .await
        .map_err(db)?;
    let result = apply(client).await;
    // The lock also goes with the session if this fails.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_MIGRATE])
        .await;
    result
}

async fn apply(client: &mut Client) -> Result<i32> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS sigil_schema (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(db)?;
    let mut version = stored_version(client).await?;
    if version > current() {
        return Err(too_new(version));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let next = version + 1;
        let tx = client.transaction().await.map_err(db)?;
        tx.batch_execute(sql).await.map_err(|e| {
            DatastoreError::Backend(format!("schema migration {} failed: {}", i + 1, db(e)))
        })?;
        tx.execute("INSERT INTO sigil_schema (version) VALUES ($1)", &[&next])
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        tracing::info!(schema_version = next, "database schema migrated");
        version = next;
    }
    Ok(version)
}

/// The version stored (0 for a database without Sigil's tables).
pub async fn stored_version(client: &Client) -> Result<i32> {
    let row = client
        .query_one("SELECT coalesce(max(version), 0) FROM sigil_schema", &[])
        .await
        .map_err(db)?;
    Ok(row.get(0))
}
