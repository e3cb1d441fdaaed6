//! The mTLS example: two processes with SVIDs from the agent talk over
//! mutual TLS, authorize each other by SPIFFE ID, and pick up rotated
//! SVIDs without a restart.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sigil_tests::process::{ServerOptions, example, free_port};

use crate::common::Deployment;

const SERVER: &str = "spiffe://example.org/mtls/server";
const CLIENT: &str = "spiffe://example.org/mtls/client";
const INTRUDER: &str = "spiffe://example.org/mtls/intruder";

/// The value of `key=` in a line of `key=value` words.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn client(d: &Deployment, addr: &str, id: &str, allow: &str, count: u32) -> std::process::Output {
    Command::new(example("mtls").unwrap())
        .args(["--id", id, "--allow", allow, "client", "--connect", addr])
        .args(["--count", &count.to_string(), "--interval-ms", "500"])
        .env("SPIFFE_ENDPOINT_SOCKET", d.agent.endpoint())
        .output()
        .unwrap()
}

#[test]
fn mtls_peers_authorize_by_spiffe_id_and_follow_rotation() {
    let d = Deployment::start(&ServerOptions::default());
    // 6 s SVIDs rotate about every 3 s.
    for name in ["mtls/server", "mtls/client", "mtls/intruder"] {
        d.register_me(name, &["--x509-ttl", "6s"]);
    }
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let mut server = Command::new(example("mtls").unwrap())
        .args([
            "--id", SERVER, "--allow", CLIENT, "server", "--listen", &addr,
        ])
        .env("SPIFFE_ENDPOINT_SOCKET", d.agent.endpoint())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, server_lines) = mpsc::channel();
    let stdout = server.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = server_lines.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(first.starts_with("listening"), "{first}");

    // 30 requests over about 15 s, each a new TLS session.
    let out = client(&d, &addr, CLIENT, SERVER, 30);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok: Vec<&str> = stdout.lines().filter(|l| l.starts_with("ok ")).collect();
    assert_eq!(ok.len(), 30, "every request succeeded:\n{stdout}");
    assert!(ok.iter().all(|l| field(l, "server") == Some(SERVER)));
    let server_serials: HashSet<_> = ok
        .iter()
        .filter_map(|l| field(l, "server_serial"))
        .collect();

    // A client the server does not allow, and a server the client does
    // not allow, both fail.
    let intruder = client(&d, &addr, INTRUDER, SERVER, 1);
    assert!(!intruder.status.success());
    let wrong_server = client(&d, &addr, CLIENT, "spiffe://example.org/someone-else", 1);
    assert!(!wrong_server.status.success());
    assert!(
        String::from_utf8_lossy(&wrong_server.stdout).contains("error"),
        "{wrong_server:?}"
    );

    server.kill().ok();
    server.wait().ok();
    // The reader reaches EOF once the server is gone: every line is in.
    reader.join().unwrap();
    let seen: Vec<String> = server_lines.try_iter().collect();
    let accepted: Vec<&String> = seen.iter().filter(|l| l.starts_with("accepted")).collect();
    assert_eq!(accepted.len(), 30, "{seen:#?}");
    assert!(accepted.iter().all(|l| field(l, "peer") == Some(CLIENT)));
    let client_serials: HashSet<_> = accepted
        .iter()
        .filter_map(|l| field(l, "peer_serial"))
        .collect();
    assert!(
        seen.iter()
            .any(|l| l.starts_with("refused") && !l.contains(CLIENT)),
        "the intruder was refused: {seen:#?}"
    );
    println!(
        "mtls: 30 sessions; the client saw {} server SVIDs, the server saw {} client SVIDs",
        server_serials.len(),
        client_serials.len()
    );
    assert!(
        server_serials.len() >= 3 && client_serials.len() >= 3,
        "both sides rotated at least twice without a restart; client stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
