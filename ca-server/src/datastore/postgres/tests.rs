//! The conformance suite and PostgreSQL-specific checks, on the database
//! server named by `SIGIL_POSTGRES` (skipped when it is unset, unless
//! `SIGIL_REQUIRE_POSTGRES=1`). Each test gets a fresh database.

use std::path::Path;

use super::*;

/// Whether PostgreSQL tests can run; says why not, or panics when they
/// are required.
pub(crate) fn available() -> bool {
    match std::env::var("SIGIL_POSTGRES") {
        Ok(s) if !s.is_empty() => true,
        _ => {
            assert!(
                std::env::var("SIGIL_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "SIGIL_REQUIRE_POSTGRES=1 but SIGIL_POSTGRES is not set"
            );
            eprintln!("skipped: SIGIL_POSTGRES not set");
            false
        }
    }
}

fn base() -> String {
    std::env::var("SIGIL_POSTGRES").unwrap()
}

/// Creates a new empty database and returns the connection string to it.
pub(crate) async fn fresh_database() -> String {
    let name = format!(
        "t_{}",
        sigil_identity::random::hex(&sigil_identity::random::bytes::<8>())
    );
    let (client, conn) = tokio_postgres::connect(&base(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE template0"))
        .await
        .unwrap();
    drop(client);
    let _ = driver.await;
    format!("{} dbname={name}", base())
}

fn options() -> PgOptions {
    PgOptions {
        pool_size: 4,
        poll_interval: Duration::from_millis(500),
    }
}

/// The store of the database kept for `dir` (created on first use), so
/// reopening the same directory reopens the same database.
pub(crate) async fn open_in(dir: &Path) -> PostgresDatastore {
    let marker = dir.join("connection");
    let connection = match std::fs::read_to_string(&marker) {
        Ok(c) => c,
        Err(_) => {
            let c = fresh_database().await;
            std::fs::write(&marker, &c).unwrap();
            c
        }
    };
    let settings = PgSettings::parse(&connection, None).unwrap();
    PostgresDatastore::open(settings, options()).await.unwrap()
}

crate::datastore::conformance::datastore_conformance!(if available(); |dir: &std::path::Path| {
    let dir = dir.to_path_buf();
    async move { open_in(&dir).await }
});

#[tokio::test]
async fn a_refused_connection_is_unavailable_and_never_shows_the_password() {
    // A socket directory where no server listens: refused at once.
    let dir = tempfile::tempdir().unwrap();
    let settings = PgSettings::parse(
        &format!(
            "host={} user=sigil password=secret dbname=x",
            dir.path().display()
        ),
        None,
    )
    .unwrap();
    let err = PostgresDatastore::open(settings, options())
        .await
        .unwrap_err();
    assert!(matches!(err, DatastoreError::Unavailable(_)), "{err:?}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("secret"), "{shown}");
    assert!(shown.contains("cannot connect to PostgreSQL"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_newer_than_the_binary_is_refused_with_a_clear_message() {
    if !available() {
        return;
    }
    let connection = fresh_database().await;
    let settings = PgSettings::parse(&connection, None).unwrap();
    drop(
        PostgresDatastore::open(settings.clone(), options())
            .await
            .unwrap(),
    );
    // As a newer release would leave it.
    let (client, conn) = tokio_postgres::connect(&connection, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    client
        .execute(
            "INSERT INTO sigil_schema (version) VALUES ($1)",
            &[&(schema::current() + 1)],
        )
        .await
        .unwrap();
    drop(client);
    let _ = driver.await;
    let err = PostgresDatastore::open(settings, options())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("newer than this sigil-server knows"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_once() {
    if !available() {
        return;
    }
    let connection = fresh_database().await;
    let settings = PgSettings::parse(&connection, None).unwrap();
    let opens: Vec<_> = (0..4)
        .map(|_| tokio::spawn(PostgresDatastore::open(settings.clone(), options())))
        .collect();
    let mut stores = Vec::new();
    for o in opens {
        stores.push(o.await.unwrap().unwrap());
    }
    let (client, conn) = tokio_postgres::connect(&connection, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let rows = client
        .query("SELECT version FROM sigil_schema", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), schema::current() as usize);
    drop(client);
    let _ = driver.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_by_another_replica_wakes_the_listener() {
    if !available() {
        return;
    }
    let connection = fresh_database().await;
    let settings = PgSettings::parse(&connection, None).unwrap();
    let a = PostgresDatastore::open(settings.clone(), options())
        .await
        .unwrap();
    let b = PostgresDatastore::open(settings, options()).await.unwrap();
    let mut hint = b.change_hint();
    hint.borrow_and_update();
    let made = a
        .create_entry(crate::datastore::conformance::entry("web", 1))
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        hint.wait_for(|r| *r >= made.revision),
    )
    .await
    .expect("the NOTIFY reached the other replica")
    .unwrap();
}
