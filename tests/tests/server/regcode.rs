//! Registration files against a real server: `entry plan`, `entry apply`
//! (with `--prune` and `--dry-run`) and `entry export`, through the real
//! CLI binary.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

use serde_json::Value;
use sigil_tests::process::ServerProcess;

const AGENT: &str = "spiffe://example.org/sigil/agent/join_token/0123456789abcdef0123456789abcdef";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts the exit code and returns stdout.
fn exit(out: &Output, code: i32) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn write(s: &ServerProcess, name: &str, body: &str) -> PathBuf {
    let path = s.dir().join(name);
    std::fs::write(&path, body).unwrap();
    path
}

/// One `[[entry]]` table under the test agent.
fn entry(name: &str, path: &str, uid: u32, extra: &str) -> String {
    format!(
        "[[entry]]\nname = \"{name}\"\nspiffe_id = \"spiffe://example.org/{path}\"\nparent_id = \"{AGENT}\"\nselectors = [\"unix:uid:{uid}\"]\n{extra}\n"
    )
}

fn node(name: &str, path: &str) -> String {
    format!(
        "[[node]]\nname = \"{name}\"\nspiffe_id = \"spiffe://example.org/{path}\"\nselectors = [\"k8s_psat:cluster:{name}\"]\n\n"
    )
}

fn plan_json(s: &ServerProcess, file: &Path, extra: &[&str], code: i32) -> Value {
    let mut args = vec![
        "--output",
        "json",
        "entry",
        "plan",
        "--file",
        file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&exit(&s.cli(&args).unwrap(), code)).unwrap()
}

/// All entries, as `entry show --output json` prints them.
fn entries(s: &ServerProcess) -> Vec<Value> {
    let out = exit(&s.cli(&["--output", "json", "entry", "show"]).unwrap(), 0);
    serde_json::from_str::<Vec<Value>>(&out).unwrap()
}

fn kinds(plan: &Value) -> Vec<(String, String)> {
    plan["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["kind"].as_str().unwrap().to_owned(),
                c["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pair(kind: &str, name: &str) -> (String, String) {
    (kind.to_owned(), name.to_owned())
}

#[tokio::test]
async fn plan_apply_edit_and_prune_only_the_owners_entries() {
    let s = crate::start("");
    let v1 = format!(
        "{}{}{}",
        node("prod", "node/prod"),
        entry("web", "web", 1, "hint = \"blue\""),
        entry("api", "api", 2, "x509_svid_ttl = \"1h\"")
    );
    let file = write(&s, "team.toml", &v1);
    let f = file.to_str().unwrap();

    // Plan on an empty server: three creations, exit 2, nothing changed.
    let plan = plan_json(&s, &file, &["--owner", "team"], 2);
    assert_eq!(
        kinds(&plan),
        [
            pair("create", "api"),
            pair("create", "prod"),
            pair("create", "web")
        ]
    );
    assert_eq!(plan["applied"], false);
    assert!(entries(&s).is_empty(), "plan changes nothing");

    let applied = exit(
        &s.cli(&["entry", "apply", "--file", f, "--owner", "team"])
            .unwrap(),
        0,
    );
    assert!(applied.contains("Applied: 3 to create"), "{applied}");
    let stored = entries(&s);
    assert_eq!(stored.len(), 3);
    assert!(stored.iter().all(|e| e["owner"] == "team"), "{stored:?}");
    let web = stored.iter().find(|e| e["name"] == "web").unwrap();
    assert_eq!(web["hint"], "blue");
    let prod = stored.iter().find(|e| e["name"] == "prod").unwrap();
    assert_eq!(prod["parent_id"], "spiffe://example.org/sigil/server");

    // Applied: the plan is empty and exits 0.
    let out = exit(
        &s.cli(&["entry", "plan", "--file", f, "--owner", "team"])
            .unwrap(),
        0,
    );
    assert!(out.contains("No changes"), "{out}");

    // An entry made by hand and one of another owner.
    exit(
        &s.cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/by-hand",
            "--parent-id",
            AGENT,
            "--selector",
            "unix:uid:9",
        ])
        .unwrap(),
        0,
    );
    let other = write(&s, "other.toml", &entry("api", "other-api", 7, ""));
    exit(
        &s.cli(&[
            "entry",
            "apply",
            "--file",
            other.to_str().unwrap(),
            "--owner",
            "other",
        ])
        .unwrap(),
        0,
    );
    // Neither is in team's plan.
    exit(
        &s.cli(&["entry", "plan", "--file", f, "--owner", "team"])
            .unwrap(),
        0,
    );

    // Edit one field: the plan shows exactly that field.
    let v2 = v1.replace("hint = \"blue\"", "hint = \"green\"");
    std::fs::write(&file, &v2).unwrap();
    let plan = plan_json(&s, &file, &["--owner", "team"], 2);
    assert_eq!(kinds(&plan), [pair("update", "web")]);
    let fields = plan["changes"][0]["fields"].as_array().unwrap();
    assert_eq!(fields.len(), 1, "{fields:?}");
    assert_eq!(fields[0]["field"], "hint");
    assert_eq!(fields[0]["old"], "blue");
    assert_eq!(fields[0]["new"], "green");
    let web_id = plan["changes"][0]["id"].as_str().unwrap().to_owned();
    exit(
        &s.cli(&["entry", "apply", "--file", f, "--owner", "team"])
            .unwrap(),
        0,
    );
    let web = &entries(&s)
        .into_iter()
        .find(|e| e["id"] == web_id.as_str())
        .unwrap();
    assert_eq!(web["hint"], "green", "updated in place, same id");

    // Drop "api" from the file: without --prune it is kept and the plan
    // reports it without counting it as a change.
    let v3 = format!(
        "{}{}",
        node("prod", "node/prod"),
        entry("web", "web", 1, "hint = \"green\"")
    );
    std::fs::write(&file, &v3).unwrap();
    let plan = plan_json(&s, &file, &["--owner", "team"], 0);
    assert_eq!(kinds(&plan), [pair("orphan", "api")]);
    exit(
        &s.cli(&["entry", "apply", "--file", f, "--owner", "team"])
            .unwrap(),
        0,
    );
    assert_eq!(entries(&s).len(), 5, "nothing deleted without --prune");

    let plan = plan_json(&s, &file, &["--owner", "team", "--prune"], 2);
    assert_eq!(kinds(&plan), [pair("delete", "api")]);
    // --dry-run shows the same and changes nothing.
    let dry = exit(
        &s.cli(&[
            "entry",
            "apply",
            "--file",
            f,
            "--owner",
            "team",
            "--prune",
            "--dry-run",
        ])
        .unwrap(),
        2,
    );
    assert!(dry.contains("- delete \"api\""), "{dry}");
    assert_eq!(entries(&s).len(), 5);

    exit(
        &s.cli(&["entry", "apply", "--file", f, "--owner", "team", "--prune"])
            .unwrap(),
        0,
    );
    let left: Vec<String> = entries(&s)
        .iter()
        .map(|e| e["spiffe_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(left.len(), 4, "{left:?}");
    assert!(!left.contains(&"spiffe://example.org/api".to_owned()));
    assert!(
        left.contains(&"spiffe://example.org/by-hand".to_owned()),
        "the hand-made entry survives prune"
    );
    assert!(
        left.contains(&"spiffe://example.org/other-api".to_owned()),
        "another owner's entry of the same name survives prune"
    );
    exit(
        &s.cli(&["entry", "plan", "--file", f, "--owner", "team", "--prune"])
            .unwrap(),
        0,
    );

    // Every change was audited with the owner.
    let log = s.log();
    for action in ["entry.create", "entry.update", "entry.delete"] {
        assert!(
            log.lines()
                .any(|l| l.contains(action) && l.contains("owner=team")),
            "no {action} audit line with the owner:\n{log}"
        );
    }
}

#[tokio::test]
async fn an_invalid_file_changes_nothing_and_names_the_line() {
    let s = crate::start("");
    // Line 17 has a key that does not exist ("selector").
    let bad = format!(
        "{}{}[[entry]]\nname = \"typo\"\nspiffe_id = \"spiffe://example.org/typo\"\nparent_id = \"{AGENT}\"\nselector = [\"unix:uid:3\"]\n",
        entry("a", "a", 1, ""),
        entry("b", "b", 2, "")
    );
    assert_eq!(bad.lines().nth(16), Some("selector = [\"unix:uid:3\"]"));
    let file = write(&s, "bad.toml", &bad);
    let out = s
        .cli(&["entry", "apply", "--file", file.to_str().unwrap()])
        .unwrap();
    exit(&out, 1);
    let err = text(&out.stderr);
    assert!(err.contains("bad.toml:17:"), "{err}");
    assert!(err.contains("entry \"typo\""), "{err}");
    assert!(err.contains("selector"), "{err}");
    assert!(entries(&s).is_empty());

    // Duplicate name and duplicate registration, each with its line.
    let dup = format!(
        "{}{}{}",
        entry("a", "a", 1, ""),
        entry("a", "a2", 2, ""),
        entry("c", "a", 1, "")
    );
    let file = write(&s, "dup.toml", &dup);
    let out = s
        .cli(&["entry", "plan", "--file", file.to_str().unwrap()])
        .unwrap();
    exit(&out, 1);
    let err = text(&out.stderr);
    assert!(
        err.contains("dup.toml:7: entry \"a\": name is also used by the entry on line 1"),
        "{err}"
    );
    assert!(
        err.contains("dup.toml:13: entry \"c\": same SPIFFE ID, parent and selectors as entry \"a\" on line 1"),
        "{err}"
    );

    // What only the server can check (here: a registration another owner
    // holds) fails the whole apply: the valid entries before it are not
    // created either, and the error names the entry.
    let theirs = write(&s, "theirs.toml", &entry("x", "shared", 5, ""));
    exit(
        &s.cli(&[
            "entry",
            "apply",
            "--file",
            theirs.to_str().unwrap(),
            "--owner",
            "them",
        ])
        .unwrap(),
        0,
    );
    let mine = write(
        &s,
        "mine.toml",
        &format!(
            "{}{}",
            entry("first", "first", 4, ""),
            entry("clash", "shared", 5, "")
        ),
    );
    let out = s
        .cli(&["entry", "apply", "--file", mine.to_str().unwrap()])
        .unwrap();
    exit(&out, 1);
    let err = text(&out.stderr);
    assert!(err.contains("entry \"clash\""), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    assert_eq!(entries(&s).len(), 1, "only the other owner's entry");

    // A change the datastore itself refuses (an update onto a registration
    // made by hand under another id, found only inside the transaction)
    // undoes the creation planned with it.
    exit(
        &s.cli(&[
            "entry",
            "apply",
            "--file",
            write(&s, "w.toml", &entry("w", "w", 8, ""))
                .to_str()
                .unwrap(),
        ])
        .unwrap(),
        0,
    );
    exit(
        &s.cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/taken",
            "--parent-id",
            AGENT,
            "--selector",
            "unix:uid:9",
        ])
        .unwrap(),
        0,
    );
    let clash = write(
        &s,
        "w.toml",
        &format!(
            "{}{}",
            entry("new", "new", 10, ""),
            entry("w", "taken", 9, "hint = \"x\"")
        ),
    );
    let out = s
        .cli(&["entry", "apply", "--file", clash.to_str().unwrap()])
        .unwrap();
    exit(&out, 1);
    let err = text(&out.stderr);
    assert!(err.contains("spiffe://example.org/taken"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    let now = entries(&s);
    assert_eq!(now.len(), 3, "{now:?}");
    assert!(
        now.iter()
            .all(|e| e["spiffe_id"] != "spiffe://example.org/new")
    );
    assert!(
        now.iter()
            .any(|e| e["spiffe_id"] == "spiffe://example.org/w")
    );

    // A server-side field check names entry and field.
    let reserved_parent = entry("p", "p", 6, "").replace(AGENT, "spiffe://example.org/sigil/x");
    let file = write(&s, "parent.toml", &reserved_parent);
    let out = s
        .cli(&["entry", "apply", "--file", file.to_str().unwrap()])
        .unwrap();
    exit(&out, 1);
    let err = text(&out.stderr);
    assert!(err.contains("entry \"p\": parent id"), "{err}");
    assert_eq!(entries(&s).len(), 3);
}

/// The fields `export` must carry over (not id, revision, owner or name).
fn comparable(mut list: Vec<Value>) -> Vec<Value> {
    for e in &mut list {
        let o = e.as_object_mut().unwrap();
        for k in ["id", "revision", "owner", "name"] {
            o.remove(k);
        }
    }
    list.sort_by_key(|e| e["spiffe_id"].as_str().unwrap().to_owned());
    list
}

#[tokio::test]
async fn export_then_apply_reproduces_the_entries() {
    let a = crate::start("");
    exit(
        &a.cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/full",
            "--parent-id",
            AGENT,
            "--selector",
            "unix:uid:1",
            "--selector",
            "unix:gid:2",
            "--x509-ttl",
            "10m",
            "--jwt-ttl",
            "90s",
            "--dns",
            "full.example.org",
            "--federates-with",
            "other.org",
            "--admin",
            "--hint",
            "a \"quoted\" hint",
            "--expires-at",
            "2030-01-01T00:00:00Z",
        ])
        .unwrap(),
        0,
    );
    exit(
        &a.cli(&[
            "entry",
            "create",
            "--node",
            "--spiffe-id",
            "spiffe://example.org/node/prod",
            "--selector",
            "k8s_psat:cluster:prod",
        ])
        .unwrap(),
        0,
    );
    // What an installation that made its entries by hand exports.
    let hand_made = exit(&a.cli(&["entry", "export"]).unwrap(), 0);
    let file = write(&a, "team.toml", &entry("web", "web", 3, ""));
    exit(
        &a.cli(&[
            "entry",
            "apply",
            "--file",
            file.to_str().unwrap(),
            "--owner",
            "team",
        ])
        .unwrap(),
        0,
    );

    let exported = exit(&a.cli(&["entry", "export"]).unwrap(), 0);
    let b = crate::start("");
    let path = write(&b, "exported.toml", &exported);
    let p = path.to_str().unwrap();
    exit(
        &b.cli(&["entry", "apply", "--file", p, "--owner", "all"])
            .unwrap(),
        0,
    );
    assert_eq!(
        comparable(entries(&b)),
        comparable(entries(&a)),
        "{exported}"
    );
    exit(
        &b.cli(&["entry", "plan", "--file", p, "--owner", "all"])
            .unwrap(),
        0,
    );

    // One owner's export holds only its entries, under their names.
    let team = exit(&a.cli(&["entry", "export", "--owner", "team"]).unwrap(), 0);
    assert_eq!(team.matches("[[entry]]").count(), 1, "{team}");
    assert!(team.contains("name = \"web\""), "{team}");

    // Moving an installation to files: applying the export on the same
    // server adopts the hand-made entries instead of colliding.
    let path = write(&a, "hand-made.toml", &hand_made);
    let p = path.to_str().unwrap();
    let plan = exit(
        &a.cli(&["entry", "plan", "--file", p, "--owner", "ops"])
            .unwrap(),
        2,
    );
    assert_eq!(plan.matches(" made by hand)").count(), 2, "{plan}");
    let before = comparable(entries(&a));
    exit(
        &a.cli(&["entry", "apply", "--file", p, "--owner", "ops"])
            .unwrap(),
        0,
    );
    assert_eq!(comparable(entries(&a)), before, "adoption changes no field");
    exit(
        &a.cli(&["entry", "plan", "--file", p, "--owner", "ops"])
            .unwrap(),
        0,
    );
}

#[tokio::test]
async fn apply_of_ten_thousand_entries() {
    let s = crate::start("");
    let mut body = String::new();
    for i in 0..10_000 {
        body.push_str(&entry(&format!("e{i}"), &format!("w/{i}"), i, ""));
    }
    let file = write(&s, "big.toml", &body);
    let f = file.to_str().unwrap();
    let started = Instant::now();
    let out = exit(&s.cli(&["entry", "apply", "--file", f]).unwrap(), 0);
    eprintln!("apply of 10,000 entries took {:?}", started.elapsed());
    assert!(
        out.contains("Applied: 10000 to create"),
        "{}",
        &out[out.len() - 200..]
    );
    assert_eq!(
        exit(&s.cli(&["entry", "count"]).unwrap(), 0).trim(),
        "10000"
    );
    let started = Instant::now();
    exit(&s.cli(&["entry", "plan", "--file", f]).unwrap(), 0);
    eprintln!(
        "plan of 10,000 unchanged entries took {:?}",
        started.elapsed()
    );
}
