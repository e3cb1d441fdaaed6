//! The README's first command: `sigil-quickstart` starts a server and an
//! agent, gets the invoking user an SVID, prints the two `export` lines,
//! stops cleanly on SIGTERM, and resumes its data when run again.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sigil_tests::process::{binary, current_uid};

/// A running quickstart and the stdout lines it printed up to "Press Ctrl-C".
struct Quickstart {
    child: Child,
    lines: Vec<String>,
    rest: mpsc::Receiver<String>,
}

impl Quickstart {
    fn start(dir: &Path) -> Self {
        let mut child = Command::new(binary("sigil-quickstart").unwrap())
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    let done = line.starts_with("Press Ctrl-C");
                    lines.push(line);
                    if done {
                        break;
                    }
                }
                Err(e) => {
                    child.kill().ok();
                    let out = child.wait_with_output().unwrap();
                    panic!(
                        "quickstart did not get ready ({e}); stdout so far:\n{}\nstderr:\n{}",
                        lines.join("\n"),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        Self {
            child,
            lines,
            rest: rx,
        }
    }

    fn line_starting(&self, prefix: &str) -> &str {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{}", self.lines.join("\n")))
    }

    /// Sends `signal` (TERM, INT); waits for a clean exit and returns the
    /// remaining stdout.
    fn stop(mut self, signal: &str) -> Vec<String> {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "quickstart exited with {status}");
                return self.rest.try_iter().collect();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill().ok();
        panic!("quickstart did not stop within 10 s of SIGTERM");
    }
}

#[test]
fn quickstart_serves_an_svid_prints_exports_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sigil");
    let uid = current_uid().unwrap();
    let my_id = format!("spiffe://example.org/local/uid/{uid}");

    let first = Quickstart::start(&dir);
    assert_eq!(first.line_starting("SPIFFE ID : "), my_id);
    assert_eq!(first.line_starting("Serial    : ").len(), 32);
    assert!(first.line_starting("Expires   : ").ends_with('Z'));
    assert!(
        first
            .line_starting("  agent    ")
            .contains("fresh join token")
    );
    let endpoint = first
        .line_starting("export SPIFFE_ENDPOINT_SOCKET=")
        .to_owned();
    let admin = first.line_starting("export SIGIL_ADMIN_SOCKET=").to_owned();
    let socket = endpoint.strip_prefix("unix://").expect("a unix:// URI");
    assert!(Path::new(socket).is_absolute() && Path::new(socket).exists());
    assert!(Path::new(&admin).is_absolute() && Path::new(&admin).exists());

    // The printed exports are all another terminal needs.
    let fetched = Command::new(binary("sigil-agent").unwrap())
        .args(["api", "fetch", "x509"])
        .env("SPIFFE_ENDPOINT_SOCKET", &endpoint)
        .output()
        .unwrap();
    assert!(fetched.status.success(), "{fetched:?}");
    assert!(String::from_utf8_lossy(&fetched.stdout).contains(&my_id));
    let entries = Command::new(binary("sigil-server").unwrap())
        .args(["entry", "show"])
        .env("SIGIL_ADMIN_SOCKET", &admin)
        .output()
        .unwrap();
    assert!(entries.status.success(), "{entries:?}");
    assert!(String::from_utf8_lossy(&entries.stdout).contains(&my_id));

    // A second one on the same data says so instead of breaking the first.
    let second = Command::new(binary("sigil-quickstart").unwrap())
        .arg("--dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already running"));

    let tail = first.stop("TERM");
    assert!(tail.iter().any(|l| l.starts_with("Stopped.")), "{tail:?}");

    // Run again: same agent, same entry, a fresh SVID; Ctrl-C stops it.
    let again = Quickstart::start(&dir);
    assert_eq!(again.line_starting("SPIFFE ID : "), my_id);
    assert!(
        again
            .line_starting("  agent    ")
            .contains("resumed its stored identity")
    );
    assert!(
        again
            .line_starting("  entry    ")
            .contains("already registered")
    );
    let tail = again.stop("INT");
    assert!(tail.iter().any(|l| l.starts_with("Stopped.")), "{tail:?}");

    // The agent's state lost: a new agent joins and the user's one entry
    // moves to it.
    std::fs::remove_file(dir.join("agent/data/agent.pem")).unwrap();
    let rejoined = Quickstart::start(&dir);
    assert!(
        rejoined
            .line_starting("  agent    ")
            .contains("fresh join token")
    );
    assert!(
        rejoined
            .line_starting("  entry    ")
            .contains("moved to this agent")
    );
    assert_eq!(rejoined.line_starting("SPIFFE ID : "), my_id);
    let admin = rejoined
        .line_starting("export SIGIL_ADMIN_SOCKET=")
        .to_owned();
    let count = Command::new(binary("sigil-server").unwrap())
        .args(["--output", "json", "entry", "show", "--spiffe-id", &my_id])
        .env("SIGIL_ADMIN_SOCKET", &admin)
        .output()
        .unwrap();
    let entries: serde_json::Value = serde_json::from_slice(&count.stdout).unwrap();
    assert_eq!(entries.as_array().unwrap().len(), 1, "{entries}");
    rejoined.stop("TERM");
}

/// Copies the files of `from` into `to` (created), keeping their modes.
fn copy_tree(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

#[test]
fn a_quickstarts_sled_data_migrated_to_postgres_serves_its_workload() {
    let Some(base) = sigil_tests::postgres::connection() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sigil");
    let uid = current_uid().unwrap();
    let my_id = format!("spiffe://example.org/local/uid/{uid}");
    let qs = Quickstart::start(&dir);
    assert_eq!(qs.line_starting("SPIFFE ID : "), my_id);
    qs.stop("TERM");

    // The quickstart's server data (CA keys, server id) becomes a
    // PostgreSQL-backed server's data directory; its sled store is copied
    // into the database.
    let server_dir = tmp.path().join("server");
    std::fs::create_dir_all(&server_dir).unwrap();
    copy_tree(&dir.join("server/data"), &server_dir.join("data"));
    let db = rt
        .block_on(sigil_tests::postgres::fresh_database(&base))
        .unwrap();
    let config = tmp.path().join("pg.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\n{}",
            server_dir.join("data").display(),
            sigil_tests::postgres::datastore_toml(&db)
        ),
    )
    .unwrap();
    let migrated = Command::new(binary("sigil-server").unwrap())
        .args(["datastore", "migrate", "--from-sled"])
        .arg(dir.join("server/data"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&migrated.stdout);
    assert!(
        migrated.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    assert!(stdout.contains("entries: "), "{stdout}");

    let server = sigil_tests::process::ServerProcess::start(
        &server_dir,
        &sigil_tests::process::ServerOptions::with_extra(&sigil_tests::postgres::datastore_toml(
            &db,
        )),
    )
    .unwrap();
    // The quickstart's agent, with its stored identity (no join token is
    // valid any more: it must resume, not attest).
    let agent_dir = tmp.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    copy_tree(&dir.join("agent/data"), &agent_dir.join("data"));
    let agent = sigil_tests::process::AgentProcess::start(
        &agent_dir,
        &server,
        &sigil_tests::process::NodeAttestation::JoinToken("spent".into()),
    )
    .unwrap();
    let endpoint = format!("unix://{}", agent.socket.display());
    let mut last = String::new();
    for _ in 0..100 {
        let fetched = Command::new(binary("sigil-agent").unwrap())
            .args(["api", "fetch", "x509"])
            .env("SPIFFE_ENDPOINT_SOCKET", &endpoint)
            .output()
            .unwrap();
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&fetched.stdout),
            String::from_utf8_lossy(&fetched.stderr)
        );
        if fetched.status.success() && last.contains(&my_id) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(last.contains(&my_id), "the workload got no SVID: {last}");
    // One agent, the quickstart's: it resumed rather than attested anew.
    assert_eq!(server.agent_ids().unwrap().len(), 1);
    drop(agent);
    drop(server);
}
