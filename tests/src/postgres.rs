//! PostgreSQL for the suites: the server named by `SIGIL_POSTGRES` (a libpq
//! `key=value` string; `scripts/test.sh` starts one), fresh databases on
//! it, and throwaway clusters of a test's own (for outages it causes).
//!
//! A suite calls [`connection`] first: when `SIGIL_POSTGRES` is unset it
//! prints "skipped: SIGIL_POSTGRES not set" and the test returns, unless
//! `SIGIL_REQUIRE_POSTGRES=1`, which makes that a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The base connection string, or `None` (the test skips) when none is
/// configured; panics when PostgreSQL tests are required.
pub fn connection() -> Option<String> {
    match std::env::var("SIGIL_POSTGRES") {
        Ok(s) if !s.is_empty() => Some(s),
        _ => {
            assert!(
                std::env::var("SIGIL_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "SIGIL_REQUIRE_POSTGRES=1 but SIGIL_POSTGRES is not set"
            );
            eprintln!("skipped: SIGIL_POSTGRES not set");
            None
        }
    }
}

/// Creates an empty database on the server of `base` and returns the
/// connection string to it.
pub async fn fresh_database(base: &str) -> Result<String> {
    let name = format!(
        "t_{}",
        sigil_identity::random::hex(&sigil_identity::random::bytes::<8>())
    );
    let (client, conn) = tokio_postgres::connect(base, tokio_postgres::NoTls)
        .await
        .context("cannot connect to SIGIL_POSTGRES")?;
    let driver = tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE template0"))
        .await
        .context("CREATE DATABASE")?;
    drop(client);
    let _ = driver.await;
    Ok(format!("{base} dbname={name}"))
}

/// The `[datastore]` section of a server on `connection`.
pub fn datastore_toml(connection: &str) -> String {
    format!(
        "[datastore]\ntype = \"postgres\"\nconnection = \"{connection}\"\npool_size = 4\npoll_interval = \"1s\"\n"
    )
}

/// Runs one query on `connection` and returns the first column of each
/// row as text.
pub async fn query(connection: &str, sql: &str) -> Result<Vec<String>> {
    let (client, conn) = tokio_postgres::connect(connection, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(conn);
    let mut out = Vec::new();
    for m in client.simple_query(sql).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            out.push(r.get(0).unwrap_or("").to_owned());
        }
    }
    drop(client);
    let _ = driver.await;
    Ok(out)
}

/// A PostgreSQL cluster of a test's own in a temporary directory (Unix
/// socket only), so the test can stop and start it. Stopped on drop.
#[derive(Debug)]
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Cluster {
    /// initdb and start, as the `postgres` user (initdb refuses root);
    /// the binaries from `SIGIL_PG_BIN` or the newest Debian install.
    pub fn start() -> Result<Self> {
        let bin = match std::env::var_os("SIGIL_PG_BIN") {
            Some(b) => PathBuf::from(b),
            None => newest_debian_bin()?,
        };
        let dir = tempfile::Builder::new().prefix("sigil-pg-").tempdir()?;
        chown_postgres(dir.path())?;
        let cluster = Self { dir, bin };
        cluster.pg(&[
            "initdb",
            "-D",
            &cluster.data(),
            "-A",
            "trust",
            "-U",
            "sigil",
            "--no-sync",
            "-E",
            "UTF8",
        ])?;
        cluster.up()?;
        Ok(cluster)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// The connection string of its `postgres` database.
    pub fn connection(&self) -> String {
        format!(
            "host={} user=sigil dbname=postgres",
            self.dir.path().display()
        )
    }

    /// Starts it again after [`Cluster::stop`].
    pub fn up(&self) -> Result<()> {
        self.pg_ctl(&["start"])
    }

    /// Stops it (fast: open sessions are ended).
    pub fn stop(&self) -> Result<()> {
        self.pg(&["pg_ctl", "-D", &self.data(), "-m", "fast", "-w", "stop"])
    }

    /// `pg_ctl restart -m fast`: sessions are ended, the server stops
    /// after a checkpoint and starts again; returns once it accepts
    /// connections.
    pub fn restart_fast(&self) -> Result<()> {
        self.pg_ctl(&["-m", "fast", "restart"])
    }

    /// `pg_ctl` starting the server as this cluster runs it (Unix socket
    /// in its directory only, no fsync), waiting up to 60 s, then `args`.
    fn pg_ctl(&self, args: &[&str]) -> Result<()> {
        let log = self.dir.path().join("pg.log").display().to_string();
        let opts = format!(
            "-c listen_addresses='' -k {} -c fsync=off",
            self.dir.path().display()
        );
        let data = self.data();
        let mut all = vec![
            "pg_ctl", "-D", &data, "-l", &log, "-w", "-t", "60", "-o", &opts,
        ];
        all.extend_from_slice(args);
        self.pg(&all)
    }

    fn pg(&self, args: &[&str]) -> Result<()> {
        let program = self.bin.join(args[0]);
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&program)
            .args(&args[1..])
            .output()
            .with_context(|| format!("cannot run {}", program.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed: {}{}",
                args[0],
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg(&["pg_ctl", "-D", &self.data(), "-m", "immediate", "stop"]);
    }
}

fn newest_debian_bin() -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no PostgreSQL in /usr/lib/postgresql (set SIGIL_PG_BIN)")?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort();
    found
        .pop()
        .context("no initdb under /usr/lib/postgresql (set SIGIL_PG_BIN)")
}

fn chown_postgres(dir: &Path) -> Result<()> {
    let status = Command::new("chown")
        .arg("postgres:postgres")
        .arg(dir)
        .status()?;
    if !status.success() {
        bail!("cannot give {} to the postgres user", dir.display());
    }
    Ok(())
}
