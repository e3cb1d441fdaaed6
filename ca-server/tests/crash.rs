//! Crash test for the sled datastore.
//!
//! A child process (this same binary, re-run with an environment variable)
//! creates entries and consumes join tokens, printing a line after each
//! acknowledged write. The parent kills it with SIGKILL at a random moment,
//! reopens the store and checks: every acknowledged entry is present and
//! whole (entry, uniqueness key and change-feed record together), and no
//! acknowledged token can be consumed again. This repeats 50 times on one
//! store, so later rounds also recover from earlier crashes.
//!
//! Runs without the libtest harness so that the child can be this binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_identity::{RegistrationEntry, Selector, SpiffeId};
use sigil_server::datastore::{
    ChangeKind, Datastore, DatastoreError, EntryFilter, JoinTokenRecord, SledDatastore, TokenHash,
};

const CHILD_DIR: &str = "SIGIL_CRASH_CHILD_DIR";
const CHILD_ROUND: &str = "SIGIL_CRASH_CHILD_ROUND";
const ROUNDS: u32 = 50;
const TOKENS_PER_ROUND: u32 = 40;

fn token_name(round: u32, i: u32) -> String {
    format!("crash-token-{round}-{i}")
}

fn entry(round: u32, n: u32) -> RegistrationEntry {
    let selectors = [Selector::new("unix", &format!("uid:{n}")).unwrap()]
        .into_iter()
        .collect();
    RegistrationEntry::new(
        SpiffeId::parse(&format!("spiffe://example.org/crash/r{round}-n{n}")).unwrap(),
        SpiffeId::parse("spiffe://example.org/sigil/agent/join_token/crash").unwrap(),
        selectors,
    )
}

/// The child: writes until killed, printing `E <id>` / `T <i>` after acks.
fn child(dir: &Path, round: u32) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Arc::new(SledDatastore::open(dir).unwrap());
        // Two writers at once, so acknowledgements come from shared syncs.
        let entries = {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0.. {
                    let e = store.create_entry(entry(round, n)).await.unwrap();
                    println!("E {}", e.id);
                }
            })
        };
        for i in 0..TOKENS_PER_ROUND {
            store
                .consume_join_token(&TokenHash::of(&token_name(round, i)), SystemTime::now())
                .await
                .unwrap();
            println!("T {i}");
        }
        entries.await.unwrap();
    });
}

struct Acked {
    entries: Vec<String>,
    tokens: Vec<u32>,
}

fn run_round(exe: &Path, dir: &Path, round: u32) -> Acked {
    let mut child = Command::new(exe)
        .env(CHILD_DIR, dir)
        .env(CHILD_ROUND, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut acked = Acked {
            entries: Vec::new(),
            tokens: Vec::new(),
        };
        // Only whole lines count: a line cut by the kill is not an ack.
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            match line.split_once(' ') {
                Some(("E", id)) => acked.entries.push(id.to_owned()),
                Some(("T", i)) => acked.tokens.push(i.parse().unwrap()),
                _ => {}
            }
        }
        acked
    });
    let jitter = u64::from_le_bytes(sigil_identity::random::bytes::<8>());
    std::thread::sleep(Duration::from_millis(30 + jitter % 400));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap()
}

async fn prepare_tokens(dir: &Path, round: u32) {
    let store = SledDatastore::open(dir).unwrap();
    for i in 0..TOKENS_PER_ROUND {
        let record = JoinTokenRecord {
            hash: TokenHash::of(&token_name(round, i)),
            expires_at: SystemTime::now() + Duration::from_secs(3600),
            alias: None,
        };
        store.create_join_token(record).await.unwrap();
    }
}

async fn check(dir: &Path, round: u32, acked: &Acked) -> usize {
    let store = SledDatastore::open(dir).unwrap();
    let all = store
        .list_entries(&EntryFilter::default())
        .await
        .expect("no entry is corrupt or partial");
    let changes = store.changes(0, usize::MAX).await.unwrap();
    let created: std::collections::HashSet<_> = changes
        .iter()
        .filter_map(|c| c.as_entry())
        .filter(|(kind, _)| *kind == ChangeKind::Created)
        .map(|(_, e)| e.id.clone())
        .collect();
    let revision = store.current_revision().await.unwrap();
    for e in &all {
        assert!(
            created.contains(&e.id),
            "round {round}: entry {} has no change-feed record",
            e.id
        );
        assert!(
            e.revision <= revision,
            "round {round}: revision counter behind entry {}",
            e.id
        );
    }
    for id in &acked.entries {
        let id = sigil_identity::EntryId::new(id).unwrap();
        let e = store.fetch_entry(&id).await.unwrap();
        let e = e.unwrap_or_else(|| panic!("round {round}: acknowledged entry {id} is missing"));
        // Its uniqueness key was written in the same transaction.
        let mut again = e.clone();
        again.id = sigil_identity::EntryId::generate();
        assert!(
            matches!(
                store.create_entry(again).await,
                Err(DatastoreError::AlreadyExists(_))
            ),
            "round {round}: entry {id} is present without its uniqueness key"
        );
    }
    for i in &acked.tokens {
        let r = store
            .consume_join_token(&TokenHash::of(&token_name(round, *i)), SystemTime::now())
            .await;
        assert!(
            matches!(r, Err(DatastoreError::NotFound(_))),
            "round {round}: consumed token {i} is usable again"
        );
    }
    all.len()
}

fn main() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        let round = std::env::var(CHILD_ROUND).unwrap().parse().unwrap();
        child(Path::new(&dir), round);
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut total_entries, mut total_tokens) = (0, 0);
    for round in 0..ROUNDS {
        rt.block_on(prepare_tokens(dir.path(), round));
        let acked = run_round(&exe, dir.path(), round);
        total_entries += acked.entries.len();
        total_tokens += acked.tokens.len();
        let stored = rt.block_on(check(dir.path(), round, &acked));
        assert!(
            stored >= total_entries,
            "round {round}: fewer entries than acknowledged"
        );
    }
    println!(
        "crash test: {ROUNDS} SIGKILL rounds, {total_entries} acknowledged entries and {total_tokens} consumed tokens all intact"
    );
    println!("1 passed, 0 failed");
}
