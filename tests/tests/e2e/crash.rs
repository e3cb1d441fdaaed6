//! Crash: SIGKILL of the server while `entry create` calls are in flight.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sigil_tests::process::{ServerOptions, ServerProcess};

const ROUNDS: usize = 3;
const WRITERS: usize = 3;

#[test]
fn every_acknowledged_entry_survives_a_server_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &ServerOptions::default()).unwrap();
    let server_bin = sigil_tests::process::binary("sigil-server").unwrap();
    let mut acknowledged: Vec<String> = Vec::new();
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let stop = stop.clone();
                let bin = server_bin.clone();
                let socket = server.admin_socket.clone();
                std::thread::spawn(move || {
                    let mut ok = Vec::new();
                    let mut failures = 0;
                    for i in 0.. {
                        let out = std::process::Command::new(&bin)
                            .arg("--admin-socket")
                            .arg(&socket)
                            .args([
                                "entry",
                                "create",
                                "--spiffe-id",
                                &format!("spiffe://example.org/crash/r{round}/w{w}/e{i}"),
                                "--parent-id",
                                "spiffe://example.org/sigil/agent/join_token/none",
                                "--selector",
                                "unix:uid:1",
                            ])
                            .output()
                            .unwrap();
                        if out.status.success() {
                            ok.push(String::from_utf8(out.stdout).unwrap().trim().to_owned());
                        } else {
                            failures += 1;
                        }
                        // Keep going until the server is gone and the
                        // test says stop.
                        if stop.load(Ordering::SeqCst) && failures > 0 {
                            break;
                        }
                    }
                    ok
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(700 + 300 * round as u64));
        server.kill().unwrap();
        stop.store(true, Ordering::SeqCst);
        let before = acknowledged.len();
        for w in writers {
            acknowledged.extend(w.join().unwrap());
        }
        assert!(
            acknowledged.len() > before,
            "round {round}: some creates succeeded before the kill"
        );
        server.restart().unwrap();
        let stored: HashSet<String> = server
            .cli_json(&["entry", "show"])
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        let lost: Vec<_> = acknowledged
            .iter()
            .filter(|id| !stored.contains(*id))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} acknowledged entries lost after SIGKILL: {lost:?}",
            lost.len()
        );
    }
    println!(
        "crash: {} acknowledged creates over {ROUNDS} SIGKILLs, none lost",
        acknowledged.len()
    );
}
