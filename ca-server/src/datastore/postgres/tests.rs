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

/// A cluster of this test's own (so it can stop it): initdb and pg_ctl as
/// the postgres user, from `SIGIL_PG_BIN` or the newest Debian install.
struct OwnCluster {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    options: String,
}

impl OwnCluster {
    fn start() -> Self {
        Self::start_with("")
    }

    /// `options`: more `-c name=value` settings for the server.
    fn start_with(options: &str) -> Self {
        let bin = std::env::var_os("SIGIL_PG_BIN")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
                    .unwrap()
                    .map(|e| e.unwrap().path().join("bin"))
                    .filter(|b| b.join("initdb").exists())
                    .collect();
                found.sort();
                found.pop().unwrap()
            });
        let dir = tempfile::Builder::new()
            .prefix("sigil-pg-")
            .tempdir()
            .unwrap();
        let ok = std::process::Command::new("chown")
            .arg("postgres:postgres")
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(ok.success());
        let c = Self {
            dir,
            bin,
            options: options.to_owned(),
        };
        c.pg(&[
            "initdb",
            "-D",
            &c.data(),
            "-A",
            "trust",
            "-U",
            "sigil",
            "--no-sync",
        ]);
        c.up();
        c
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn connection(&self) -> String {
        format!(
            "host={} user=sigil dbname=postgres",
            self.dir.path().display()
        )
    }

    fn up(&self) {
        let log = self.dir.path().join("pg.log").display().to_string();
        let opts = format!(
            "-c listen_addresses='' -k {} -c fsync=off {}",
            self.dir.path().display(),
            self.options
        );
        self.pg(&[
            "pg_ctl",
            "-D",
            &self.data(),
            "-l",
            &log,
            "-w",
            "-o",
            &opts,
            "start",
        ]);
    }

    fn stop(&self) {
        self.pg(&["pg_ctl", "-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    fn pg(&self, args: &[&str]) {
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(args[0]))
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            args[0],
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_database_is_unavailable_at_once_and_the_store_recovers_by_itself() {
    if !available() {
        return;
    }
    let cluster = OwnCluster::start();
    let settings = PgSettings::parse(&cluster.connection(), None).unwrap();
    let ds = PostgresDatastore::open(settings, options()).await.unwrap();
    let e = crate::datastore::conformance::entry;
    ds.create_entry(e("before", 1)).await.unwrap();
    let mut hint = ds.change_hint();

    cluster.stop();
    let started = std::time::Instant::now();
    let err = ds.create_entry(e("during", 2)).await.unwrap_err();
    assert!(matches!(err, DatastoreError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("no change was made"), "{err}");
    let err = ds.list_entries(&EntryFilter::default()).await.unwrap_err();
    assert!(matches!(err, DatastoreError::Unavailable(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Back: the pool and the listener reconnect; the listener wakes
    // readers after it has re-subscribed, so they catch up.
    // Nothing bumps the hint while the database is down.
    hint.borrow_and_update();
    cluster.up();
    tokio::time::timeout(Duration::from_secs(15), hint.changed())
        .await
        .expect("the listener woke readers after reconnecting")
        .unwrap();
    let made = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match ds.create_entry(e("after", 3)).await {
                Ok(m) => return m,
                Err(DatastoreError::Unavailable(_)) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(other) => panic!("{other:?}"),
            }
        }
    })
    .await
    .expect("writes work again without reopening the store");
    assert_eq!(made.revision, 2, "the refused write took no revision");
    assert_eq!(ds.count_entries().await.unwrap(), 2);
}

/// A CA and a server certificate for `localhost` signed by it, as PEM.
fn tls_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .unwrap();
    (ca_pem, leaf.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_checks_the_root_and_the_host_name() {
    if !available() {
        return;
    }
    let (ca, cert, key) = tls_pki();
    let files = tempfile::tempdir().unwrap();
    let path = |name: &str| files.path().join(name);
    std::fs::write(path("ca.pem"), &ca).unwrap();
    std::fs::write(path("server.pem"), &cert).unwrap();
    std::fs::write(path("server.key"), &key).unwrap();
    std::fs::write(path("other-ca.pem"), tls_pki().0).unwrap();
    // The server reads its key as the postgres user, mode 0600.
    for f in ["server.pem", "server.key"] {
        let ok = std::process::Command::new("chown")
            .arg("postgres:postgres")
            .arg(path(f))
            .status()
            .unwrap();
        assert!(ok.success());
    }
    std::fs::set_permissions(
        path("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::set_permissions(
        files.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _cluster = OwnCluster::start_with(&format!(
        "-c listen_addresses=127.0.0.1 -c port={port} -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
        path("server.pem").display(),
        path("server.key").display()
    ));
    let connect = |host: &str, mode: &str, root: &str| {
        let conn = format!(
            "host={host} port={port} user=sigil dbname=postgres sslmode={mode} sslrootcert={}",
            path(root).display()
        );
        async move {
            let settings = PgSettings::parse(&conn, None).unwrap();
            let (client, connection) = settings
                .config
                .connect(tls::connector(&settings).unwrap())
                .await
                .map_err(|e| redact(&e))?;
            tokio::spawn(connection);
            let row = client
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .map_err(|e| redact(&e))?;
            Ok::<bool, String>(row.get(0))
        }
    };
    assert_eq!(
        connect("localhost", "verify-full", "ca.pem").await,
        Ok(true)
    );
    let err = connect("localhost", "verify-full", "other-ca.pem")
        .await
        .unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    // The certificate names localhost, not 127.0.0.1.
    let err = connect("127.0.0.1", "verify-full", "ca.pem")
        .await
        .unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    assert_eq!(connect("127.0.0.1", "verify-ca", "ca.pem").await, Ok(true));
    // The datastore itself over verified TLS.
    let settings = PgSettings::parse(
        &format!(
            "host=localhost port={port} user=sigil dbname=postgres sslmode=verify-full sslrootcert={}",
            path("ca.pem").display()
        ),
        None,
    )
    .unwrap();
    let ds = PostgresDatastore::open(settings, options()).await.unwrap();
    ds.create_entry(crate::datastore::conformance::entry("tls", 1))
        .await
        .unwrap();
}
