//! The tamper-evident audit log, end to end: a real server writes audit
//! records, is stopped, and `sigil-server audit verify` checks its data
//! directory. Tampering is done the way an intruder with write access to
//! the data directory would: straight in the sled files, server stopped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;
use sigil_tests::process::{ServerOptions, ServerProcess};

/// A stopped server's data directory with `n` entry creations audited.
struct Log {
    _tmp: tempfile::TempDir,
    server: ServerProcess,
}

impl Log {
    fn new(n: usize, extra: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let options = ServerOptions {
            extra: extra.into(),
            ..ServerOptions::default()
        };
        let server = ServerProcess::start(tmp.path(), &options).unwrap();
        for i in 0..n {
            server
                .create_entry(
                    &format!("spiffe://example.org/w{i}"),
                    "spiffe://example.org/agent",
                    &["--selector", &format!("unix:uid:{i}")],
                )
                .unwrap();
        }
        Self { _tmp: tmp, server }
    }

    fn data(&self) -> PathBuf {
        self.server.dir().join("data")
    }

    /// A copy of the data directory, to tamper with.
    fn copy(&self, name: &str) -> PathBuf {
        let to = self.server.dir().join(name);
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(self.data())
            .arg(&to)
            .status()
            .unwrap();
        assert!(status.success());
        to
    }

    fn audit(&self, args: &[&str]) -> Output {
        let mut all = vec!["audit"];
        all.extend_from_slice(args);
        self.server.cli(&all).unwrap()
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn verify(log: &Log, data: &Path, extra: &[&str]) -> Output {
    let dir = data.display().to_string();
    let mut args = vec!["verify", "--data-dir", dir.as_str()];
    args.extend_from_slice(extra);
    log.audit(&args)
}

fn assert_fails_naming(o: &Output, words: &[&str]) {
    let t = text(o);
    assert!(!o.status.success(), "verify passed on a tampered log: {t}");
    for w in words {
        assert!(t.contains(w), "expected {w:?} in: {t}");
    }
}

/// The sled database of a data directory.
fn open(data: &Path) -> sled::Db {
    sled::open(data.join("datastore")).unwrap()
}

/// Stored audit records: (key, records held).
fn records(db: &sled::Db) -> Vec<(sled::IVec, Vec<Value>)> {
    db.open_tree("audit")
        .unwrap()
        .iter()
        .map(|item| {
            let (k, v) = item.unwrap();
            (k, serde_json::from_slice(&v).unwrap())
        })
        .collect()
}

/// The stored record holding `seq`, as (key, records).
fn find(db: &sled::Db, seq: u64) -> (sled::IVec, Vec<Value>) {
    records(db)
        .into_iter()
        .find(|(_, rs)| rs.iter().any(|r| r["seq"] == seq))
        .unwrap_or_else(|| panic!("no record {seq}"))
}

fn put(db: &sled::Db, key: &[u8], records: &[Value]) {
    db.open_tree("audit")
        .unwrap()
        .insert(key, serde_json::to_vec(records).unwrap())
        .unwrap();
    db.flush().unwrap();
}

#[test]
fn verify_passes_on_an_untouched_log_and_names_each_tampered_record() {
    let mut log = Log::new(6, "");
    log.server.stop().unwrap();
    let data = log.data();
    let cp = log.server.dir().join("exported.checkpoint");
    let cp_arg = cp.display().to_string();
    let ok = log.audit(&[
        "checkpoint",
        "--data-dir",
        &data.display().to_string(),
        "--write",
        &cp_arg,
    ]);
    assert!(ok.status.success(), "{}", text(&ok));
    // The public key, kept elsewhere along with the checkpoint.
    let key = log.server.dir().join("exported.pub");
    std::fs::copy(data.join("audit-key.pub"), &key).unwrap();
    let key_arg = key.display().to_string();
    let external = [
        "--checkpoint",
        cp_arg.as_str(),
        "--public-key",
        key_arg.as_str(),
    ];

    let untouched = verify(&log, &data, &external);
    assert!(untouched.status.success(), "{}", text(&untouched));
    assert!(
        text(&untouched).contains("verified"),
        "{}",
        text(&untouched)
    );
    let last = {
        let db = open(&data);
        let all = records(&db);
        all.last().unwrap().1.last().unwrap()["seq"]
            .as_u64()
            .unwrap()
    };
    assert!(last >= 6, "one record per entry creation, got {last}");

    // Changing one field of record 3.
    let changed = log.copy("changed");
    {
        let db = open(&changed);
        let (k, mut rs) = find(&db, 3);
        let r = rs.iter_mut().find(|r| r["seq"] == 3).unwrap();
        r["event"]["outcome"] = Value::from("denied");
        put(&db, &k, &rs);
    }
    assert_fails_naming(&verify(&log, &changed, &[]), &["record 3 ", "changed"]);

    // Deleting record 3.
    let deleted = log.copy("deleted");
    {
        let db = open(&deleted);
        let (k, rs) = find(&db, 3);
        assert_eq!(rs.len(), 1, "one event per entry creation");
        db.open_tree("audit").unwrap().remove(&k).unwrap();
        db.flush().unwrap();
    }
    assert_fails_naming(
        &verify(&log, &deleted, &[]),
        &["record 3 is missing", "the next record found is 4"],
    );

    // Swapping records 2 and 3.
    let swapped = log.copy("swapped");
    {
        let db = open(&swapped);
        let (k2, r2) = find(&db, 2);
        let (k3, r3) = find(&db, 3);
        put(&db, &k2, &r3);
        put(&db, &k3, &r2);
    }
    assert_fails_naming(
        &verify(&log, &swapped, &[]),
        &["record 2 is missing or out of place", "found is 3"],
    );

    // Truncating the last two records, covering the tracks: the chain head
    // and the stored checkpoints are rewritten to match the shorter log.
    // Only the checkpoint kept elsewhere shows it.
    let truncated = log.copy("truncated");
    {
        let db = open(&truncated);
        let (k, first_gone) = find(&db, last - 1);
        let (k_last, _) = find(&db, last);
        let prev = first_gone[0]["prev"].as_str().unwrap().to_owned();
        let audit = db.open_tree("audit").unwrap();
        audit.remove(&k).unwrap();
        audit.remove(&k_last).unwrap();
        let mut head = (last - 2).to_be_bytes().to_vec();
        for i in 0..32 {
            head.push(u8::from_str_radix(&prev[2 * i..2 * i + 2], 16).unwrap());
        }
        db.open_tree("meta")
            .unwrap()
            .insert("audit_head", head)
            .unwrap();
        let cps = db.open_tree("audit_checkpoints").unwrap();
        for k in cps.range((last - 1).to_be_bytes()..).keys() {
            cps.remove(k.unwrap()).unwrap();
        }
        db.flush().unwrap();
    }
    let consistent = verify(&log, &truncated, &["--public-key", &key_arg]);
    assert!(
        consistent.status.success(),
        "without the exported checkpoint the shorter log is consistent: {}",
        text(&consistent)
    );
    assert_fails_naming(
        &verify(&log, &truncated, &external),
        &[
            "truncated",
            &format!("up to {last}"),
            &format!("ends at record {}", last - 2),
        ],
    );
}

#[test]
fn checkpoints_are_signed_while_the_server_runs_and_exported_from_it() {
    let log = Log::new(3, "[audit]\ncheckpoint_records = 2\n");
    let data = log.data();
    let file = data.join("audit-checkpoint");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&file).is_ok_and(|t| t.lines().nth(1) == Some("3")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint of size 3 in {}",
            file.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The running server holds the datastore: export reads its file.
    let out = log.server.dir().join("cp");
    let o = log.audit(&[
        "checkpoint",
        "--data-dir",
        &data.display().to_string(),
        "--write",
        &out.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let note = std::fs::read_to_string(&out).unwrap();
    assert!(note.starts_with("sigil/example.org/audit\n3\n"), "{note}");
    assert!(
        note.contains("\n\n\u{2014} sigil/example.org/audit "),
        "{note}"
    );
    // Offline commands refuse to run beside the server, and say why.
    let busy = verify(&log, &data, &[]);
    assert!(!busy.status.success());
    assert!(text(&busy).contains("stop it first"), "{}", text(&busy));
}

#[test]
fn show_lists_records_filtered_by_action_and_actor() {
    let mut log = Log::new(2, "");
    log.server.cli_ok(&["token", "generate"]).unwrap();
    log.server.stop().unwrap();
    let dir = log.data().display().to_string();
    let o = log.audit(&["show", "--data-dir", &dir, "--action", "entry.create"]);
    assert!(o.status.success(), "{}", text(&o));
    let all: Value = {
        let o = log
            .server
            .cli(&["--output", "json", "audit", "show", "--data-dir", &dir])
            .unwrap();
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let all = all.as_array().unwrap();
    let creates = all
        .iter()
        .filter(|r| r["event"]["action"] == "entry.create")
        .count();
    assert_eq!(creates, 2, "{all:?}");
    assert!(all.iter().any(|r| r["event"]["action"] == "token.generate"));
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2);
    let nobody = log.audit(&[
        "show",
        "--data-dir",
        &dir,
        "--actor",
        "spiffe://example.org/nobody",
    ]);
    assert!(nobody.status.success());
    assert!(nobody.stdout.is_empty());
}

#[test]
fn a_wiped_log_posing_as_pruned_fails_against_a_checkpoint_kept_elsewhere() {
    let mut log = Log::new(3, "");
    log.server.stop().unwrap();
    let data = log.data();
    let cp = log.server.dir().join("exported.checkpoint");
    let cp_arg = cp.display().to_string();
    let ok = log.audit(&[
        "checkpoint",
        "--data-dir",
        &data.display().to_string(),
        "--write",
        &cp_arg,
    ]);
    assert!(ok.status.success(), "{}", text(&ok));
    let key = log.server.dir().join("exported.pub");
    std::fs::copy(data.join("audit-key.pub"), &key).unwrap();
    let key_arg = key.display().to_string();

    // The intruder deletes every record and fakes retention pruning: the
    // anchor is set to the head, which the exported checkpoint also covers.
    let wiped = log.copy("wiped");
    {
        let db = open(&wiped);
        db.open_tree("audit").unwrap().clear().unwrap();
        let meta = db.open_tree("meta").unwrap();
        let head = meta.get("audit_head").unwrap().unwrap();
        meta.insert("audit_anchor", head).unwrap();
        db.flush().unwrap();
    }
    let external = [
        "--checkpoint",
        cp_arg.as_str(),
        "--public-key",
        key_arg.as_str(),
    ];
    assert_fails_naming(
        &verify(&log, &wiped, &external),
        &["pruned", "--allow-pruned"],
    );
    // Accepting pruning is an explicit choice, and the output names the
    // anchor the records were checked from and the key's source.
    let mut allowed = external.to_vec();
    allowed.push("--allow-pruned");
    let o = verify(&log, &wiped, &allowed);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("anchor"), "{}", text(&o));
}

#[test]
fn verify_reports_where_the_public_key_came_from() {
    let mut log = Log::new(1, "");
    log.server.stop().unwrap();
    let data = log.data();
    let key = log.server.dir().join("exported.pub");
    std::fs::copy(data.join("audit-key.pub"), &key).unwrap();
    let key_arg = key.display().to_string();
    let json = |extra: &[&str]| -> Value {
        let dir = data.display().to_string();
        let mut args = vec![
            "--output",
            "json",
            "audit",
            "verify",
            "--data-dir",
            dir.as_str(),
        ];
        args.extend_from_slice(extra);
        let o = log.server.cli(&args).unwrap();
        assert!(o.status.success(), "{}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    assert_eq!(json(&[])["public_key"], "data_dir");
    assert_eq!(json(&["--public-key", &key_arg])["public_key"], "given");
    std::fs::remove_file(data.join("audit-key.pub")).unwrap();
    assert_eq!(json(&[])["public_key"], "none");
    let text_out = text(&verify(&log, &data, &[]));
    assert!(text_out.contains("public key: none"), "{text_out}");
}
