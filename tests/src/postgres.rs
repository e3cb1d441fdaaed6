//! PostgreSQL for the suites and benchmarks: the server named by
//! `SIGIL_POSTGRES` (a libpq `key=value` connection string; the suites may
//! `CREATE DATABASE` there), a fresh database on it per test, and a
//! cluster of a test's own (initdb, pg_ctl) for tests that restart the
//! database. Everything runs the PostgreSQL client programs (`psql`,
//! `pg_ctl`, `initdb`) from `pg_config --bindir`, or
//! `/usr/lib/postgresql/<version>/bin`.
//!
//! The skip rule: without `SIGIL_POSTGRES` a PostgreSQL test prints
//! `skipped: SIGIL_POSTGRES not set` and returns, unless
//! `SIGIL_REQUIRE_POSTGRES=1` (as `scripts/test.sh` sets), when it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// `SIGIL_POSTGRES`, or `None` after printing that `test` is skipped.
/// Panics when it is unset and `SIGIL_REQUIRE_POSTGRES=1`.
pub fn from_env(test: &str) -> Option<String> {
    match std::env::var("SIGIL_POSTGRES") {
        Ok(c) if !c.trim().is_empty() => Some(c),
        _ => {
            assert!(
                std::env::var("SIGIL_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "{test}: SIGIL_REQUIRE_POSTGRES=1 but SIGIL_POSTGRES is not set"
            );
            println!("{test}: skipped: SIGIL_POSTGRES not set");
            None
        }
    }
}

/// The directory of the PostgreSQL programs.
pub fn bin_dir() -> Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("pg_ctl").is_file() {
            return Ok(dir);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("pg_ctl").is_file())
        .collect();
    found.sort();
    found.pop().context(
        "no PostgreSQL programs: pg_config --bindir has no pg_ctl and there is no \
         /usr/lib/postgresql/*/bin (install Debian's postgresql package)",
    )
}

/// `conn` with `dbname` set to `db` (a `key=value` string: a later key
/// overrides an earlier one; a `postgresql://` URL: its path replaced).
pub fn with_dbname(conn: &str, db: &str) -> String {
    for scheme in ["postgresql://", "postgres://"] {
        if let Some(rest) = conn.strip_prefix(scheme) {
            let (base, query) = match rest.split_once('?') {
                Some((b, q)) => (b, format!("?{q}")),
                None => (rest, String::new()),
            };
            let hosts = base.split_once('/').map_or(base, |(h, _)| h);
            return format!("{scheme}{hosts}/{db}{query}");
        }
    }
    format!("{conn} dbname={db}")
}

/// Runs SQL with psql on `conn`; its output (unaligned, tuples only).
pub fn psql(conn: &str, sql: &str) -> Result<String> {
    let out = Command::new(bin_dir()?.join("psql"))
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conn,
            "-c",
            sql,
        ])
        .output()
        .context("cannot run psql")?;
    if !out.status.success() {
        // psql's errors do not repeat the connection string's password.
        bail!(
            "psql failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A new empty database on the server at `conn`; its connection string.
pub fn fresh_database(conn: &str) -> Result<String> {
    let name = format!("sigil_t_{}", sigil_identity::random::hex_id());
    psql(conn, &format!("CREATE DATABASE {name}"))?;
    Ok(with_dbname(conn, &name))
}

/// A PostgreSQL cluster of a test's own, in a temporary directory: Unix
/// socket only, `trust` authentication for user `sigil`, fsync off. Run
/// as root, the programs run as the `postgres` user (`runuser`). Stopped
/// (immediately) and removed when dropped.
#[derive(Debug)]
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl PgCluster {
    /// initdb and start.
    pub fn start() -> Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("sigil-pg.")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let cluster = Self { dir, bin };
        if crate::process::current_uid()? == 0 {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(cluster.dir.path())
                .status()
                .context("cannot run chown")?;
            if !status.success() {
                bail!("chown postgres {} failed", cluster.dir.path().display());
            }
        }
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data().display().to_string(),
                "-A",
                "trust",
                "-U",
                "sigil",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )?;
        cluster.pg_ctl(&["start", "-w"])?;
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The socket directory.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A connection string to database `postgres` as user `sigil`.
    pub fn connection(&self) -> String {
        format!(
            "host={} user=sigil dbname=postgres",
            self.dir.path().display()
        )
    }

    /// Runs PostgreSQL program `program` (as user postgres when root).
    fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let path = self.bin.join(program);
        let mut cmd = if crate::process::current_uid()? == 0 {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = cmd
            .args(args)
            .output()
            .with_context(|| format!("cannot run {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<String> {
        let data = self.data().display().to_string();
        let log = self.dir.path().join("pg.log").display().to_string();
        let options = format!(
            "-c listen_addresses='' -k {} -c fsync=off",
            self.dir.path().display()
        );
        let mut all = vec!["-D", &data, "-l", &log, "-o", &options];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all)
    }

    /// `pg_ctl restart -m fast`: sessions are disconnected, the server
    /// stops after a checkpoint and starts again; returns once it accepts
    /// connections.
    pub fn restart_fast(&self) -> Result<()> {
        self.pg_ctl(&["restart", "-m", "fast", "-w"]).map(drop)
    }

    /// `pg_ctl stop -m fast`.
    pub fn stop(&self) -> Result<()> {
        self.pg_ctl(&["stop", "-m", "fast", "-w"]).map(drop)
    }

    /// `pg_ctl start`.
    pub fn start_again(&self) -> Result<()> {
        self.pg_ctl(&["start", "-w"]).map(drop)
    }

    /// The cluster's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pg.log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w"]);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_own_cluster_starts_restarts_and_holds_fresh_databases() {
        if from_env("an_own_cluster_starts_restarts_and_holds_fresh_databases").is_none() {
            return;
        }
        let pg = PgCluster::start().unwrap();
        let db = fresh_database(&pg.connection()).unwrap();
        psql(&db, "CREATE TABLE t (x int); INSERT INTO t VALUES (7)").unwrap();
        pg.restart_fast().unwrap();
        assert_eq!(psql(&db, "SELECT x FROM t").unwrap(), "7");
        let err = psql(&with_dbname(&pg.connection(), "nope"), "SELECT 1").unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn the_database_name_is_replaced() {
        assert_eq!(
            with_dbname("host=/tmp/x user=sigil dbname=postgres", "t1"),
            "host=/tmp/x user=sigil dbname=postgres dbname=t1"
        );
        assert_eq!(
            with_dbname(
                "postgresql://u@h1:5432,h2:5432/postgres?sslmode=require",
                "t1"
            ),
            "postgresql://u@h1:5432,h2:5432/t1?sslmode=require"
        );
        assert_eq!(with_dbname("postgres://h", "t1"), "postgres://h/t1");
    }
}
