//! The conformance suite every [`Datastore`] implementation runs.
//!
//! An implementation's test module invokes [`datastore_conformance!`] with
//! an async factory that opens a store for a directory; the factory is
//! called again with the same directory to check what survives a reopen.
//! Each check is a named test in the implementation's module.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use sigil_identity::clock::from_unix_seconds;
use sigil_identity::{
    AgentId, Bundle, EntryId, JwtAuthority, RegistrationEntry, Selector, SpiffeId, TrustDomain,
};

use super::*;

/// Expands to one `#[tokio::test]` per conformance check, each calling the
/// check with `$open`, a `Fn(&Path) -> impl Future<Output = impl Datastore>`.
/// With `if $guard;` first, a test whose `$guard` is false returns at once
/// (an implementation whose database is not there says so in `$guard`).
macro_rules! datastore_conformance {
    (if $guard:expr; $open:expr) => {
        $crate::datastore::conformance::datastore_conformance!(@tests $guard; $open;
            entry_create_fetch_delete,
            entry_duplicate_id_or_registration_refused,
            entry_update_bumps_revision,
            entry_update_and_delete_of_unknown_id_fail,
            entry_list_filters,
            entry_batch_create_reports_per_item,
            entry_apply_is_all_or_nothing,
            entry_change_feed_resumes_from_revision,
            entries_and_revision_survive_reopen,
            agent_lifecycle_and_ban_persist,
            join_token_is_single_use,
            join_token_expired_is_refused,
            join_token_concurrent_consumers_one_wins,
            join_token_prune_removes_expired,
            bundle_sequence_never_goes_back,
            ca_journals_are_kept_per_server,
            audit_events_append_in_order,
            audited_mutations_write_their_event_only_when_made,
            entry_changes_and_expired_agents_are_pruned,
            audit_chain_holds_across_writers_pruning_and_reopen,
            every_mutation_is_in_the_feed_with_consecutive_revisions,
            change_floor_rises_with_pruning_and_survives_reopen,
            bundle_update_merges_and_bumps_the_sequence,
            bundle_update_that_changes_nothing_writes_nothing,
            concurrent_writers_get_gap_free_revisions,
            change_hint_wakes_a_reader_after_a_write,
            issuances_are_found_by_serial_and_spiffe_id_until_not_after,
            revocations_are_in_the_feed_keep_the_first_record_and_go_after_not_after,
            crl_is_kept_per_issuer_and_its_number_never_goes_back,
            bundle_taint_markers_persist_and_leave_with_their_authority,
        );
    };
    ($open:expr) => {
        $crate::datastore::conformance::datastore_conformance!(if true; $open);
    };
    (@tests $guard:expr; $open:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                if !$guard {
                    return;
                }
                let dir = tempfile::tempdir().unwrap();
                $crate::datastore::conformance::$name(&$open, dir.path()).await;
            }
        )*
    };
}
pub(crate) use datastore_conformance;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// A valid entry for `path` under a fixed agent, selected by `uid`.
pub fn entry(path: &str, uid: u32) -> RegistrationEntry {
    let selectors = [Selector::new("unix", &format!("uid:{uid}")).unwrap()]
        .into_iter()
        .collect();
    RegistrationEntry::new(
        td().id_from_segments(&[path]).unwrap(),
        SpiffeId::parse("spiffe://example.org/sigil/agent/join_token/a1").unwrap(),
        selectors,
    )
}

/// An audit event numbered `i`.
pub fn audit_event(i: u32) -> AuditEvent {
    AuditEvent {
        time: from_unix_seconds(1_000_000 + u64::from(i)),
        caller: "uid:0".into(),
        action: "entry.create".into(),
        target: format!("entry-{i}"),
        outcome: "ok".into(),
        expires_at: None,
        request_id: None,
    }
}

pub fn agent(name: &str) -> AgentRecord {
    AgentRecord {
        id: AgentId::from_segments(&td(), &["join_token", name]).unwrap(),
        attestor: "join_token".into(),
        serial: "01".into(),
        cert_sha256: "ab".into(),
        pending_cert_sha256: None,
        expires_at: from_unix_seconds(2_000_000_000),
        selectors: Default::default(),
        banned: false,
        can_reattest: false,
        created_at: from_unix_seconds(1_000_000_000),
    }
}

fn token(name: &str, expires_at: SystemTime) -> JoinTokenRecord {
    JoinTokenRecord {
        hash: TokenHash::of(name),
        expires_at,
        alias: None,
    }
}

/// An hour from now, in whole seconds as stores keep time.
fn later() -> SystemTime {
    from_unix_seconds(sigil_identity::clock::unix_seconds(SystemTime::now()) + 3600)
}

pub async fn entry_create_fetch_delete<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = open(dir).await;
    let e = ds.create_entry(entry("web", 1000)).await.unwrap();
    assert!(e.revision > 0, "the store assigns a revision");
    assert_eq!(ds.fetch_entry(&e.id).await.unwrap(), Some(e.clone()));
    assert_eq!(ds.count_entries().await.unwrap(), 1);
    let gone = ds.delete_entry(&e.id).await.unwrap();
    assert_eq!(gone.id, e.id);
    assert_eq!(ds.fetch_entry(&e.id).await.unwrap(), None);
    assert_eq!(ds.count_entries().await.unwrap(), 0);
}

pub async fn entry_duplicate_id_or_registration_refused<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = open(dir).await;
    let e = ds.create_entry(entry("web", 1000)).await.unwrap();
    let mut same_id = entry("other", 1);
    same_id.id = e.id.clone();
    assert!(matches!(
        ds.create_entry(same_id).await,
        Err(DatastoreError::AlreadyExists(_))
    ));
    // Same SPIFFE ID, parent and selectors under a new id.
    assert!(matches!(
        ds.create_entry(entry("web", 1000)).await,
        Err(DatastoreError::AlreadyExists(_))
    ));
    // A different selector set is a different registration.
    ds.create_entry(entry("web", 1001)).await.unwrap();
    // After deletion the registration can be made again.
    ds.delete_entry(&e.id).await.unwrap();
    ds.create_entry(entry("web", 1000)).await.unwrap();
}

pub async fn entry_update_bumps_revision<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = open(dir).await;
    let e = ds.create_entry(entry("web", 1000)).await.unwrap();
    let mut changed = e.clone();
    changed.hint = "blue".into();
    changed
        .selectors
        .insert(Selector::parse("unix:gid:10").unwrap());
    let u = ds.update_entry(changed).await.unwrap();
    assert!(u.revision > e.revision);
    assert_eq!(ds.fetch_entry(&e.id).await.unwrap().unwrap().hint, "blue");
    // The old registration key is free again, the new one is taken.
    ds.create_entry(entry("web", 1000)).await.unwrap();
    let mut clash = entry("web", 1000);
    clash.selectors = u.selectors.clone();
    assert!(matches!(
        ds.create_entry(clash).await,
        Err(DatastoreError::AlreadyExists(_))
    ));
    assert_eq!(ds.current_revision().await.unwrap(), u.revision + 1);
}

pub async fn entry_update_and_delete_of_unknown_id_fail<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = open(dir).await;
    assert!(matches!(
        ds.update_entry(entry("web", 1)).await,
        Err(DatastoreError::NotFound(_))
    ));
    assert!(matches!(
        ds.delete_entry(&EntryId::generate()).await,
        Err(DatastoreError::NotFound(_))
    ));
    assert_eq!(
        ds.current_revision().await.unwrap(),
        0,
        "failed calls change nothing"
    );
}

pub async fn entry_list_filters<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = open(dir).await;
    let a = ds.create_entry(entry("a", 1)).await.unwrap();
    let mut b = entry("b", 2);
    b.parent_id = SpiffeId::parse("spiffe://example.org/sigil/agent/join_token/a2").unwrap();
    let b = ds.create_entry(b).await.unwrap();
    ds.create_entry(entry("a", 3)).await.unwrap();
    assert_eq!(
        ds.list_entries(&EntryFilter::default())
            .await
            .unwrap()
            .len(),
        3
    );
    let by_id = EntryFilter {
        spiffe_id: Some(a.spiffe_id.clone()),
        ..Default::default()
    };
    assert_eq!(ds.list_entries(&by_id).await.unwrap().len(), 2);
    let by_parent = EntryFilter {
        parent_id: Some(b.parent_id.clone()),
        ..Default::default()
    };
    assert_eq!(ds.list_entries(&by_parent).await.unwrap(), vec![b.clone()]);
    let by_sel = EntryFilter {
        selectors: Some(a.selectors.clone()),
        ..Default::default()
    };
    assert_eq!(ds.list_entries(&by_sel).await.unwrap(), vec![a]);
}

pub async fn entry_batch_create_reports_per_item<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = open(dir).await;
    let results = ds
        .create_entries(vec![entry("a", 1), entry("a", 1), entry("b", 2)])
        .await
        .unwrap();
    assert!(results[0].is_ok());
    assert!(
        matches!(results[1], Err(DatastoreError::AlreadyExists(_))),
        "one bad item"
    );
    assert!(results[2].is_ok(), "does not fail the others");
    assert_eq!(ds.count_entries().await.unwrap(), 2);
}

pub async fn entry_apply_is_all_or_nothing<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = open(dir).await;
    let keep = ds.create_entry(entry("keep", 1)).await.unwrap();
    let gone = ds.create_entry(entry("gone", 2)).await.unwrap();
    let before = ds.current_revision().await.unwrap();
    let mut changed = keep.clone();
    changed.hint = "new".into();
    // The last creation collides with `keep`: nothing at all may change.
    let bad = EntryBatch {
        create: vec![entry("new", 3), entry("keep", 1)],
        update: vec![changed.clone()],
        delete: vec![(gone.id.clone(), gone.revision)],
        audit: vec![audit_event(1)],
    };
    assert!(matches!(
        ds.apply_entries(bad).await,
        Err(DatastoreError::AlreadyExists(_))
    ));
    assert_eq!(ds.current_revision().await.unwrap(), before);
    assert_eq!(
        ds.list_entries(&EntryFilter::default())
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(ds.fetch_entry(&keep.id).await.unwrap(), Some(keep.clone()));

    // A stale expected revision is refused the same way.
    let mut stale = changed.clone();
    stale.revision = keep.revision + 100;
    let r = ds
        .apply_entries(EntryBatch {
            update: vec![stale],
            ..Default::default()
        })
        .await;
    assert!(matches!(r, Err(DatastoreError::Conflict(_))), "{r:?}");

    // The good batch: a deletion freeing a registration that a creation
    // in the same batch takes.
    let mut reborn = entry("gone", 2);
    reborn.hint = "again".into();
    let made = ds
        .apply_entries(EntryBatch {
            create: vec![entry("new", 3), reborn],
            update: vec![changed],
            delete: vec![(gone.id.clone(), gone.revision)],
            audit: (2..6).map(audit_event).collect(),
        })
        .await
        .unwrap();
    let kinds: Vec<_> = made.iter().map(|c| c.as_entry().unwrap().0).collect();
    assert_eq!(
        kinds,
        [
            ChangeKind::Deleted,
            ChangeKind::Updated,
            ChangeKind::Created,
            ChangeKind::Created
        ]
    );
    assert_eq!(ds.current_revision().await.unwrap(), before + 4);
    let feed = ds.changes(before, 10).await.unwrap();
    assert_eq!(feed, made, "each change is in the feed with its revision");
    assert_eq!(ds.fetch_entry(&keep.id).await.unwrap().unwrap().hint, "new");
    assert_eq!(ds.fetch_entry(&gone.id).await.unwrap(), None);

    // The batch's audit events each have their own sequence number: an
    // event appended next follows all of them, and a reader paging from
    // any of them misses none.
    ds.append_audit(vec![audit_event(6)]).await.unwrap();
    let all = ds.list_audit(0, 100).await.unwrap();
    let seqs: Vec<u64> = all.iter().map(|(n, _)| *n).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let tail: Vec<AuditEvent> = all
        .iter()
        .rev()
        .take(5)
        .rev()
        .map(|(_, e)| e.clone())
        .collect();
    assert_eq!(tail, (2..7).map(audit_event).collect::<Vec<_>>());
    for (i, (n, _)) in all.iter().enumerate() {
        let rest = ds.list_audit(*n, 100).await.unwrap();
        assert_eq!(rest, all[i + 1..].to_vec(), "paging after {n}");
    }
}

pub async fn entry_change_feed_resumes_from_revision<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = open(dir).await;
    let a = ds.create_entry(entry("a", 1)).await.unwrap();
    let b = ds.create_entry(entry("b", 2)).await.unwrap();
    let mut a2 = a.clone();
    a2.hint = "x".into();
    ds.update_entry(a2).await.unwrap();
    ds.delete_entry(&b.id).await.unwrap();
    let all = ds.changes(0, 100).await.unwrap();
    let kinds: Vec<_> = all
        .iter()
        .map(|c| {
            let (kind, e) = c.as_entry().expect("only entries were changed");
            (kind, e.id.clone())
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            (ChangeKind::Created, a.id.clone()),
            (ChangeKind::Created, b.id.clone()),
            (ChangeKind::Updated, a.id.clone()),
            (ChangeKind::Deleted, b.id.clone()),
        ]
    );
    assert!(all.windows(2).all(|w| w[0].revision < w[1].revision));
    let tail = ds.changes(all[1].revision, 100).await.unwrap();
    assert_eq!(tail, all[2..].to_vec());
    assert_eq!(
        ds.changes(0, 1).await.unwrap().len(),
        1,
        "limit is honoured"
    );
    assert_eq!(ds.current_revision().await.unwrap(), all[3].revision);
}

pub async fn entries_and_revision_survive_reopen<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let (e, rev) = {
        let ds = open(dir).await;
        let e = ds.create_entry(entry("web", 1000)).await.unwrap();
        (e, ds.current_revision().await.unwrap())
    };
    let ds = open(dir).await;
    assert_eq!(ds.fetch_entry(&e.id).await.unwrap(), Some(e));
    assert_eq!(ds.current_revision().await.unwrap(), rev);
    let next = ds.create_entry(entry("api", 1)).await.unwrap();
    assert!(next.revision > rev, "revisions keep growing after a reopen");
}

pub async fn agent_lifecycle_and_ban_persist<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let a = agent("n1");
    {
        let ds = open(dir).await;
        ds.create_agent(a.clone()).await.unwrap();
        assert!(matches!(
            ds.create_agent(a.clone()).await,
            Err(DatastoreError::AlreadyExists(_))
        ));
        let mut banned = a.clone();
        banned.banned = true;
        ds.update_agent(banned).await.unwrap();
        assert!(matches!(
            ds.update_agent(agent("nobody")).await,
            Err(DatastoreError::NotFound(_))
        ));
    }
    let ds = open(dir).await;
    assert!(
        ds.fetch_agent(&a.id).await.unwrap().unwrap().banned,
        "a ban stays after reopen"
    );
    assert_eq!(ds.list_agents().await.unwrap().len(), 1);
    ds.delete_agent(&a.id).await.unwrap();
    assert_eq!(ds.fetch_agent(&a.id).await.unwrap(), None);
    assert!(matches!(
        ds.delete_agent(&a.id).await,
        Err(DatastoreError::NotFound(_))
    ));
}

pub async fn join_token_is_single_use<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let t = token("secret-1", later());
    {
        let ds = open(dir).await;
        ds.create_join_token(t.clone()).await.unwrap();
        assert_eq!(
            ds.consume_join_token(&t.hash, SystemTime::now())
                .await
                .unwrap(),
            t
        );
        assert!(matches!(
            ds.consume_join_token(&t.hash, SystemTime::now()).await,
            Err(DatastoreError::NotFound(_))
        ));
    }
    let ds = open(dir).await;
    assert!(
        matches!(
            ds.consume_join_token(&t.hash, SystemTime::now()).await,
            Err(DatastoreError::NotFound(_))
        ),
        "a consumed token stays consumed after reopen"
    );
}

pub async fn join_token_expired_is_refused<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = open(dir).await;
    let t = token("old", from_unix_seconds(1000));
    ds.create_join_token(t.clone()).await.unwrap();
    assert_eq!(
        ds.consume_join_token(&t.hash, SystemTime::now()).await,
        Err(DatastoreError::TokenExpired)
    );
}

pub async fn join_token_concurrent_consumers_one_wins<
    D: Datastore + 'static,
    F: Future<Output = D>,
>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = Arc::new(open(dir).await);
    for round in 0..20 {
        let t = token(&format!("race-{round}"), later());
        ds.create_join_token(t.clone()).await.unwrap();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let ds = Arc::clone(&ds);
            let hash = t.hash.clone();
            tasks.push(tokio::spawn(async move {
                ds.consume_join_token(&hash, SystemTime::now())
                    .await
                    .is_ok()
            }));
        }
        let mut winners = 0;
        for task in tasks {
            winners += usize::from(task.await.unwrap());
        }
        assert_eq!(winners, 1, "round {round}: exactly one consumer wins");
    }
}

pub async fn join_token_prune_removes_expired<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = open(dir).await;
    ds.create_join_token(token("a", from_unix_seconds(10)))
        .await
        .unwrap();
    ds.create_join_token(token("b", from_unix_seconds(20)))
        .await
        .unwrap();
    let live = token("c", later());
    ds.create_join_token(live.clone()).await.unwrap();
    assert_eq!(ds.prune_join_tokens(SystemTime::now()).await.unwrap(), 2);
    assert!(
        ds.consume_join_token(&live.hash, SystemTime::now())
            .await
            .is_ok()
    );
}

pub async fn bundle_sequence_never_goes_back<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let mut b = Bundle::new(td());
    let kp = rcgen::KeyPair::generate().unwrap();
    let key = sigil_identity::keys::PublicKey::from_spki_der(
        &rcgen::PublicKeyData::subject_public_key_info(&kp),
    )
    .unwrap();
    b.jwt_authorities.push(JwtAuthority {
        kid: "k".into(),
        public_key: key,
    });
    b.sequence = 5;
    {
        let ds = open(dir).await;
        ds.put_bundle(&b).await.unwrap();
        let mut older = b.clone();
        older.sequence = 4;
        assert!(matches!(
            ds.put_bundle(&older).await,
            Err(DatastoreError::SequenceRegression { .. })
        ));
        older.sequence = 5;
        assert!(matches!(
            ds.put_bundle(&older).await,
            Err(DatastoreError::SequenceRegression { .. })
        ));
    }
    let ds = open(dir).await;
    assert_eq!(ds.fetch_bundle(&td()).await.unwrap(), Some(b.clone()));
    let mut stale = b.clone();
    stale.sequence = 1;
    assert!(
        matches!(
            ds.put_bundle(&stale).await,
            Err(DatastoreError::SequenceRegression {
                stored: 5,
                given: 1,
                ..
            })
        ),
        "the sequence does not go back after a reopen either"
    );
    let mut other = Bundle::new(TrustDomain::new("other.org").unwrap());
    other.sequence = 1;
    ds.put_bundle(&other).await.unwrap();
    assert_eq!(ds.list_bundles().await.unwrap().len(), 2);
    ds.delete_bundle(&other.trust_domain).await.unwrap();
    assert_eq!(ds.list_bundles().await.unwrap(), vec![b]);
}

fn server(name: &str) -> ServerId {
    name.parse().unwrap()
}

pub async fn ca_journals_are_kept_per_server<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let (a, b) = (server("server-a"), server("server-b"));
    {
        let ds = open(dir).await;
        assert_eq!(ds.fetch_ca_journal(&a).await.unwrap(), None);
        assert_eq!(ds.list_ca_journals().await.unwrap(), vec![]);
        ds.put_ca_journal(&a, b"journal a1".to_vec()).await.unwrap();
        ds.put_ca_journal(&b, b"journal b1".to_vec()).await.unwrap();
        ds.put_ca_journal(&a, b"journal a2".to_vec()).await.unwrap();
    }
    let ds = open(dir).await;
    assert_eq!(
        ds.fetch_ca_journal(&a).await.unwrap().as_deref(),
        Some(&b"journal a2"[..])
    );
    assert_eq!(
        ds.fetch_ca_journal(&b).await.unwrap().as_deref(),
        Some(&b"journal b1"[..])
    );
    assert_eq!(ds.fetch_ca_journal(&server("c")).await.unwrap(), None);
    assert_eq!(
        ds.list_ca_journals().await.unwrap(),
        vec![
            (a.clone(), b"journal a2".to_vec()),
            (b.clone(), b"journal b1".to_vec())
        ]
    );
    // Each put is one revision naming its server.
    let feed: Vec<_> = ds
        .changes(0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.revision, c.changed))
        .collect();
    let journal = |server_id: &ServerId| Changed::CaJournal {
        server_id: server_id.clone(),
    };
    assert_eq!(
        feed,
        vec![(1, journal(&a)), (2, journal(&b)), (3, journal(&a))]
    );
}

pub async fn audit_events_append_in_order<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = open(dir).await;
    let mut seqs = Vec::new();
    for i in 0..3 {
        seqs.push(ds.append_audit(vec![audit_event(i)]).await.unwrap());
    }
    seqs.push(
        ds.append_audit(vec![audit_event(3), audit_event(4)])
            .await
            .unwrap(),
    );
    assert_eq!(ds.append_audit(vec![]).await.unwrap(), 0);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let all = ds.list_audit(0, 100).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|(_, e)| e.target.clone())
            .collect::<Vec<_>>(),
        (0..5).map(|i| format!("entry-{i}")).collect::<Vec<_>>()
    );
    let tail = ds.list_audit(seqs[2], 100).await.unwrap();
    assert_eq!(tail.len(), 2, "a batch appends every event");
    // Sequence numbers are per event, also inside a batch: resuming after
    // the batch's first event, or stopping at a limit inside it, works.
    let ids: Vec<u64> = all.iter().map(|(id, _)| *id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(
        ids[4], seqs[3],
        "the batch's last event has the number returned"
    );
    let last = ds.list_audit(ids[3], 100).await.unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0], all[4]);
    let first_four = ds.list_audit(0, 4).await.unwrap();
    assert_eq!(first_four, all[..4]);
    assert_eq!(ds.list_audit(seqs[3], 100).await.unwrap(), vec![]);
}

pub async fn audited_mutations_write_their_event_only_when_made<
    D: Datastore,
    F: Future<Output = D>,
>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = open(dir).await;
    let ev = |action: &str, i: u32| AuditEvent {
        action: action.into(),
        ..audit_event(i)
    };
    let e = entry("web", 1);
    let made = ds
        .create_entries_audited(vec![
            (e.clone(), Some(ev("entry.create", 1))),
            // The same id again: refused, so its event is not written.
            (e.clone(), Some(ev("entry.create", 2))),
        ])
        .await
        .unwrap();
    assert!(made[0].is_ok() && made[1].is_err());
    ds.update_entry_audited(e.clone(), Some(ev("entry.update", 3)))
        .await
        .unwrap();
    ds.delete_entry_audited(&e.id, Some(ev("entry.delete", 4)))
        .await
        .unwrap();
    ds.delete_entry_audited(&e.id, Some(ev("entry.delete", 5)))
        .await
        .unwrap_err();
    let a = agent("a1");
    ds.create_agent_audited(a.clone(), Some(ev("agent.attest", 6)))
        .await
        .unwrap();
    ds.create_agent_audited(a.clone(), Some(ev("agent.attest", 7)))
        .await
        .unwrap_err();
    ds.update_agent_audited(a.clone(), Some(ev("agent.ban", 8)))
        .await
        .unwrap();
    ds.delete_agent_audited(&a.id, Some(ev("agent.evict", 9)))
        .await
        .unwrap();
    let t = token("t1", from_unix_seconds(2_000_000_000));
    ds.create_join_token_audited(t.clone(), Some(ev("token.generate", 10)))
        .await
        .unwrap();
    ds.create_join_token_audited(t, Some(ev("token.generate", 11)))
        .await
        .unwrap_err();
    drop(ds);
    let ds = open(dir).await;
    let written: Vec<String> = ds
        .list_audit(0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.target)
        .collect();
    assert_eq!(
        written,
        [1, 3, 4, 6, 8, 9, 10].map(|i| format!("entry-{i}")),
        "exactly the events of the mutations made, in order"
    );
}

pub async fn entry_changes_and_expired_agents_are_pruned<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = open(dir).await;
    for i in 0..5 {
        ds.create_entry(entry(&format!("w{i}"), i)).await.unwrap();
    }
    assert_eq!(ds.prune_changes(3).await.unwrap(), 3);
    let left: Vec<u64> = ds
        .changes(0, 100)
        .await
        .unwrap()
        .iter()
        .map(|c| c.revision)
        .collect();
    assert_eq!(left, [4, 5]);
    assert_eq!(ds.count_entries().await.unwrap(), 5);
    assert_eq!(ds.current_revision().await.unwrap(), 5);

    let old = AgentRecord {
        expires_at: from_unix_seconds(1_000),
        ..agent("old")
    };
    let banned = AgentRecord {
        banned: true,
        ..agent("banned")
    };
    let banned = AgentRecord {
        expires_at: from_unix_seconds(1_000),
        ..banned
    };
    let current = agent("current");
    for a in [&old, &banned, &current] {
        ds.create_agent(a.clone()).await.unwrap();
    }
    let gone = ds.prune_agents(from_unix_seconds(2_000)).await.unwrap();
    assert_eq!(gone, std::slice::from_ref(&old.id));
    drop(ds);
    let ds = open(dir).await;
    assert!(ds.fetch_agent(&old.id).await.unwrap().is_none());
    assert!(ds.fetch_agent(&banned.id).await.unwrap().is_some());
    assert!(ds.fetch_agent(&current.id).await.unwrap().is_some());
}

/// Every audit write path chains its records (concurrent writers
/// included), the chain verifies, pruning leaves an anchor verification
/// starts from, and a reopened store continues the same chain.
pub async fn audit_chain_holds_across_writers_pruning_and_reopen<
    D: Datastore + 'static,
    F: Future<Output = D>,
>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    use crate::audit::review::{VerifyOptions, verify};
    let ds = Arc::new(open(dir).await);
    let e = entry("chained", 1);
    ds.create_entries_audited(vec![(e.clone(), Some(audit_event(1)))])
        .await
        .unwrap();
    ds.update_entry_audited(e.clone(), Some(audit_event(2)))
        .await
        .unwrap();
    ds.apply_entries(EntryBatch {
        delete: vec![(e.id.clone(), 2)],
        audit: vec![audit_event(3), audit_event(4)],
        ..EntryBatch::default()
    })
    .await
    .unwrap();
    ds.create_agent_audited(agent("chained"), Some(audit_event(5)))
        .await
        .unwrap();
    // Writers racing for the head: the chain stays one line.
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let ds = ds.clone();
            tokio::spawn(async move {
                for j in 0..10 {
                    ds.append_audit_unsynced(vec![audit_event(10 + i * 10 + j); 3])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    ds.sync().await.unwrap();
    let opts = VerifyOptions::default();
    let report = verify(ds.as_ref(), &opts).await.unwrap();
    assert_eq!(report.records, 5 + 8 * 10 * 3);
    assert_eq!(report.head, ds.audit_chain().await.unwrap().head);

    // Events 1-5 are older than event 6: pruning them leaves an anchor.
    assert_eq!(ds.prune_audit(audit_event(6).time).await.unwrap(), 5);
    let state = ds.audit_chain().await.unwrap();
    assert_eq!(state.anchor.map(|a| a.seq), Some(5));
    let report = verify(ds.as_ref(), &opts).await.unwrap();
    assert_eq!(report.records, 8 * 10 * 3);
    assert_eq!(report.anchor, state.anchor);

    drop(ds);
    let ds = open(dir).await;
    ds.append_audit(vec![audit_event(99)]).await.unwrap();
    let report = verify(&ds, &opts).await.unwrap();
    assert_eq!(report.head.seq, 5 + 240 + 1);
}

/// A self-signed CA certificate (DER), distinct per call.
fn ca_cert() -> Vec<u8> {
    let kp = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.self_signed(&kp).unwrap().der().to_vec()
}

/// A JWT authority `kid` with a fresh key.
fn jwt_authority(kid: &str) -> JwtAuthority {
    let kp = rcgen::KeyPair::generate().unwrap();
    JwtAuthority {
        kid: kid.into(),
        public_key: sigil_identity::keys::PublicKey::from_spki_der(
            &rcgen::PublicKeyData::subject_public_key_info(&kp),
        )
        .unwrap(),
    }
}

/// Every kind of mutation records its change, whole, at the next revision;
/// a failed mutation records nothing; audit appends take no revision.
pub async fn every_mutation_is_in_the_feed_with_consecutive_revisions<
    D: Datastore,
    F: Future<Output = D>,
>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = open(dir).await;
    let e = ds.create_entry(entry("web", 1)).await.unwrap();
    let mut e2 = e.clone();
    e2.hint = "h".into();
    let e2 = ds.update_entry(e2).await.unwrap();
    let e3 = ds.delete_entry(&e.id).await.unwrap();
    let batch = ds
        .apply_entries(EntryBatch {
            create: vec![entry("a", 2), entry("b", 3)],
            ..Default::default()
        })
        .await
        .unwrap();
    ds.append_audit(vec![audit_event(1)]).await.unwrap();
    let a = ds.create_agent(agent("n1")).await.unwrap();
    let banned = ds
        .update_agent(AgentRecord {
            banned: true,
            ..a.clone()
        })
        .await
        .unwrap();
    ds.delete_agent(&a.id).await.unwrap();
    let expired = AgentRecord {
        expires_at: from_unix_seconds(1_000),
        ..agent("old")
    };
    ds.create_agent(expired.clone()).await.unwrap();
    assert_eq!(
        ds.prune_agents(from_unix_seconds(2_000)).await.unwrap(),
        vec![expired.id.clone()]
    );
    let t = token("t", later());
    ds.create_join_token(t.clone()).await.unwrap();
    ds.consume_join_token(&t.hash, SystemTime::now())
        .await
        .unwrap();
    let old_token = token("old", from_unix_seconds(10));
    ds.create_join_token(old_token.clone()).await.unwrap();
    assert_eq!(ds.prune_join_tokens(SystemTime::now()).await.unwrap(), 1);
    let mut foreign = Bundle::new(TrustDomain::new("other.org").unwrap());
    foreign.sequence = 1;
    ds.put_bundle(&foreign).await.unwrap();
    ds.delete_bundle(&foreign.trust_domain).await.unwrap();
    let edit = BundleEdit {
        add_jwt: vec![jwt_authority("k1")],
        ..Default::default()
    };
    let own = ds.update_bundle(&td(), edit).await.unwrap();
    ds.put_ca_journal(&server("s1"), b"j".to_vec())
        .await
        .unwrap();
    // Failures change nothing and take no revision.
    ds.delete_agent(&a.id).await.unwrap_err();
    ds.consume_join_token(&t.hash, SystemTime::now())
        .await
        .unwrap_err();
    ds.delete_bundle(&foreign.trust_domain).await.unwrap_err();

    let agent_change = |record: Option<&AgentRecord>, id: &AgentId| Changed::Agent {
        id: id.clone(),
        record: record.cloned(),
    };
    let token_change = |t: &JoinTokenRecord, live: bool| Changed::JoinToken {
        hash: t.hash.clone(),
        record: live.then(|| t.clone()),
    };
    let bundle_change = |b: Option<&Bundle>, td: TrustDomain| Changed::Bundle {
        trust_domain: td,
        bundle: b.cloned(),
    };
    let want = vec![
        Change::entry(ChangeKind::Created, e.clone()).changed,
        Change::entry(ChangeKind::Updated, e2.clone()).changed,
        Change::entry(ChangeKind::Deleted, e3.clone()).changed,
        batch[0].changed.clone(),
        batch[1].changed.clone(),
        agent_change(Some(&a), &a.id),
        agent_change(Some(&banned), &a.id),
        agent_change(None, &a.id),
        agent_change(Some(&expired), &expired.id),
        agent_change(None, &expired.id),
        token_change(&t, true),
        token_change(&t, false),
        token_change(&old_token, true),
        token_change(&old_token, false),
        bundle_change(Some(&foreign), foreign.trust_domain.clone()),
        bundle_change(None, foreign.trust_domain.clone()),
        bundle_change(Some(&own), td()),
        Changed::CaJournal {
            server_id: server("s1"),
        },
    ];
    let feed = ds.changes(0, 1000).await.unwrap();
    let revisions: Vec<u64> = feed.iter().map(|c| c.revision).collect();
    assert_eq!(revisions, (1..=want.len() as u64).collect::<Vec<_>>());
    let got: Vec<Changed> = feed.into_iter().map(|c| c.changed).collect();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "change {}", i + 1);
    }
    assert_eq!(ds.current_revision().await.unwrap(), want.len() as u64);
    assert_eq!(
        (e.revision, e2.revision, e3.revision),
        (1, 2, 3),
        "an entry's revision is that of its change"
    );
}

/// Pruning raises the floor (never lowers it, never past the current
/// revision); the floor and what is left survive a reopen.
pub async fn change_floor_rises_with_pruning_and_survives_reopen<
    D: Datastore,
    F: Future<Output = D>,
>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    {
        let ds = open(dir).await;
        assert_eq!(ds.change_floor().await.unwrap(), 0);
        for i in 0..4 {
            ds.create_entry(entry(&format!("w{i}"), i)).await.unwrap();
        }
        ds.create_agent(agent("a")).await.unwrap();
        assert_eq!(ds.prune_changes(2).await.unwrap(), 2);
        assert_eq!(ds.change_floor().await.unwrap(), 2);
        assert_eq!(ds.prune_changes(1).await.unwrap(), 0);
        assert_eq!(ds.change_floor().await.unwrap(), 2, "never lowered");
    }
    let ds = open(dir).await;
    assert_eq!(ds.change_floor().await.unwrap(), 2);
    let left: Vec<u64> = ds
        .changes(0, 100)
        .await
        .unwrap()
        .iter()
        .map(|c| c.revision)
        .collect();
    assert_eq!(left, [3, 4, 5]);
    assert_eq!(ds.prune_changes(1_000).await.unwrap(), 3);
    assert_eq!(
        ds.change_floor().await.unwrap(),
        5,
        "not past the current revision"
    );
    assert_eq!(ds.changes(0, 100).await.unwrap(), vec![]);
    let next = ds.create_entry(entry("after", 9)).await.unwrap();
    assert_eq!(next.revision, 6);
    assert_eq!(ds.changes(5, 100).await.unwrap().len(), 1);
}

/// `update_bundle` edits the stored bundle in place: adds and removes
/// authorities, takes the next sequence and one revision.
pub async fn bundle_update_merges_and_bumps_the_sequence<D: Datastore, F: Future<Output = D>>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = open(dir).await;
    let (k1, k2, k2b) = (
        jwt_authority("k1"),
        jwt_authority("k2"),
        jwt_authority("k2"),
    );
    let [c1, c2, c3, c9] = [(); 4].map(|()| ca_cert());
    let first = ds
        .update_bundle(
            &td(),
            BundleEdit {
                add_x509: vec![c1.clone(), c2.clone()],
                add_jwt: vec![k1.clone()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(first.sequence, 1, "a new bundle starts at 1");
    assert_eq!(first.x509_authorities, vec![c1.clone(), c2.clone()]);
    // Another replica's edit keeps what the first added.
    let second = ds
        .update_bundle(
            &td(),
            BundleEdit {
                add_x509: vec![c3.clone(), c1.clone()],
                add_jwt: vec![k2.clone()],
                refresh_hint: Some(std::time::Duration::from_secs(60)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(second.sequence, 2);
    assert_eq!(
        second.x509_authorities,
        vec![c1.clone(), c2.clone(), c3.clone()]
    );
    assert_eq!(second.jwt_authorities, vec![k1.clone(), k2.clone()]);
    assert_eq!(
        second.refresh_hint,
        Some(std::time::Duration::from_secs(60))
    );
    let third = ds
        .update_bundle(
            &td(),
            BundleEdit {
                remove_x509: vec![c2.clone(), c9],
                remove_jwt: vec!["k1".into()],
                add_jwt: vec![k2b.clone()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(third.sequence, 3);
    assert_eq!(third.x509_authorities, vec![c1, c3]);
    assert_eq!(third.jwt_authorities, vec![k2b], "same kid: replaced");
    assert_eq!(third.refresh_hint, second.refresh_hint, "kept when None");
    assert_eq!(ds.fetch_bundle(&td()).await.unwrap(), Some(third.clone()));
    let feed = ds.changes(0, 100).await.unwrap();
    assert_eq!(feed.len(), 3, "one revision per edit");
    assert_eq!(
        feed[2].changed,
        Changed::Bundle {
            trust_domain: td(),
            bundle: Some(third.clone()),
        }
    );
    // A whole-bundle put still refuses to go back.
    let mut stale = third.clone();
    stale.sequence = 3;
    assert!(matches!(
        ds.put_bundle(&stale).await,
        Err(DatastoreError::SequenceRegression { .. })
    ));
}

pub async fn bundle_update_that_changes_nothing_writes_nothing<
    D: Datastore,
    F: Future<Output = D>,
>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = open(dir).await;
    let k1 = jwt_authority("k1");
    let edit = BundleEdit {
        add_x509: vec![ca_cert()],
        add_jwt: vec![k1.clone()],
        ..Default::default()
    };
    let stored = ds.update_bundle(&td(), edit.clone()).await.unwrap();
    let revision = ds.current_revision().await.unwrap();
    // The same additions, removals of what is absent, no edit at all.
    let again = ds.update_bundle(&td(), edit).await.unwrap();
    let absent = BundleEdit {
        remove_x509: vec![ca_cert()],
        remove_jwt: vec!["nope".into()],
        ..Default::default()
    };
    let absent = ds.update_bundle(&td(), absent).await.unwrap();
    let empty = ds
        .update_bundle(&td(), BundleEdit::default())
        .await
        .unwrap();
    for b in [again, absent, empty] {
        assert_eq!(b, stored, "the stored bundle is returned");
    }
    assert_eq!(ds.current_revision().await.unwrap(), revision);
    assert_eq!(ds.fetch_bundle(&td()).await.unwrap().unwrap().sequence, 1);
}

/// Writers racing on every kind of object: revisions 1..=400 are all in
/// the feed, in order, once each.
pub async fn concurrent_writers_get_gap_free_revisions<
    D: Datastore + 'static,
    F: Future<Output = D>,
>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = Arc::new(open(dir).await);
    let tasks: Vec<_> = (0..8u32)
        .map(|task| {
            let ds = ds.clone();
            tokio::spawn(async move {
                for i in 0..50u32 {
                    let n = task * 100 + i;
                    match i % 5 {
                        0 | 1 => {
                            ds.create_entry(entry(&format!("c{n}"), n)).await.unwrap();
                        }
                        2 => {
                            let t = token(&format!("t{n}"), later());
                            ds.create_join_token(t).await.unwrap();
                        }
                        3 => {
                            ds.create_agent(agent(&format!("a{n}"))).await.unwrap();
                        }
                        _ => {
                            let edit = BundleEdit {
                                add_x509: vec![ca_cert()],
                                ..Default::default()
                            };
                            ds.update_bundle(&td(), edit).await.unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    // A reader following the feed meanwhile never sees a gap.
    let reader = {
        let ds = ds.clone();
        tokio::spawn(async move {
            let mut at = 0;
            while at < 400 {
                for c in ds.changes(at, 1000).await.unwrap() {
                    assert_eq!(c.revision, at + 1, "the reader saw a gap");
                    at = c.revision;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::timeout(std::time::Duration::from_secs(30), reader)
        .await
        .expect("the reader caught up")
        .unwrap();
    let revisions: Vec<u64> = ds
        .changes(0, 1000)
        .await
        .unwrap()
        .iter()
        .map(|c| c.revision)
        .collect();
    assert_eq!(revisions, (1..=400).collect::<Vec<_>>());
    let bundle = ds.fetch_bundle(&td()).await.unwrap().unwrap();
    assert_eq!(bundle.sequence, 80);
    assert_eq!(bundle.x509_authorities.len(), 80, "no edit lost");
}

/// The hint moves to (at least) the revision of a finished write.
pub async fn change_hint_wakes_a_reader_after_a_write<
    D: Datastore + 'static,
    F: Future<Output = D>,
>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = Arc::new(open(dir).await);
    let mut hint = ds.change_hint();
    let start = *hint.borrow_and_update();
    let writer = {
        let ds = ds.clone();
        tokio::spawn(async move { ds.create_agent(agent("woken")).await.unwrap() })
    };
    let woken = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        hint.wait_for(|r| *r > start),
    )
    .await
    .expect("the hint moved after the write")
    .map(|r| *r)
    .unwrap();
    writer.await.unwrap();
    let feed = ds.changes(start, 100).await.unwrap();
    assert!(
        feed.iter().any(|c| c.revision <= woken),
        "the write the hint announced is readable"
    );
}

fn issuance(serial: &str, id: &str, not_after: u64) -> IssuanceRecord {
    IssuanceRecord {
        serial: serial.into(),
        spiffe_id: SpiffeId::parse(id).unwrap(),
        issuer: "ca1".into(),
        not_after: from_unix_seconds(not_after),
    }
}

pub async fn issuances_are_found_by_serial_and_spiffe_id_until_not_after<
    D: Datastore,
    F: Future<Output = D>,
>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    {
        let ds = open(dir).await;
        ds.record_issuances(vec![
            issuance("0a", "spiffe://example.org/web", 100),
            issuance("0b", "spiffe://example.org/web", 200),
            issuance("0c", "spiffe://example.org/db", 200),
        ])
        .await
        .unwrap();
        ds.record_issuances(vec![]).await.unwrap();
        ds.sync().await.unwrap();
    }
    let ds = open(dir).await;
    assert_eq!(
        ds.fetch_issuance("0b").await.unwrap(),
        Some(issuance("0b", "spiffe://example.org/web", 200))
    );
    assert_eq!(ds.fetch_issuance("ff").await.unwrap(), None);
    let web = SpiffeId::parse("spiffe://example.org/web").unwrap();
    let serials = |v: Vec<IssuanceRecord>| v.into_iter().map(|r| r.serial).collect::<Vec<_>>();
    assert_eq!(
        serials(ds.list_issuances_of(&web).await.unwrap()),
        ["0a", "0b"]
    );
    // A prefix of another SPIFFE ID is not that ID.
    let we = SpiffeId::parse("spiffe://example.org/we").unwrap();
    assert!(ds.list_issuances_of(&we).await.unwrap().is_empty());
    // Not in the change feed.
    assert_eq!(ds.current_revision().await.unwrap(), 0);
    // Kept until NotAfter, gone after it.
    assert_eq!(
        ds.prune_revocations(from_unix_seconds(100)).await.unwrap(),
        0
    );
    assert_eq!(
        ds.prune_revocations(from_unix_seconds(101)).await.unwrap(),
        1
    );
    assert_eq!(serials(ds.list_issuances_of(&web).await.unwrap()), ["0b"]);
    assert_eq!(ds.fetch_issuance("0a").await.unwrap(), None);
}

pub async fn revocations_are_in_the_feed_keep_the_first_record_and_go_after_not_after<
    D: Datastore,
    F: Future<Output = D>,
>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let first = issuance("0a", "spiffe://example.org/web", 100)
        .revoke(from_unix_seconds(10), RevocationReason::KeyCompromise);
    let other = issuance("0b", "spiffe://example.org/web", 200)
        .revoke(from_unix_seconds(10), RevocationReason::Unspecified);
    {
        let ds = open(dir).await;
        assert!(ds.list_revocations().await.unwrap().is_empty());
        let rev = ds.revoke_x509(vec![first.clone()]).await.unwrap();
        assert_eq!(rev, 1);
        let again = issuance("0a", "spiffe://example.org/web", 100)
            .revoke(from_unix_seconds(20), RevocationReason::Superseded);
        let rev = ds.revoke_x509(vec![again, other.clone()]).await.unwrap();
        assert_eq!(rev, 2);
    }
    let ds = open(dir).await;
    assert_eq!(
        ds.list_revocations().await.unwrap(),
        vec![first, other.clone()]
    );
    let feed: Vec<_> = ds
        .changes(0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.revision, c.changed))
        .collect();
    assert_eq!(
        feed,
        vec![
            (
                1,
                Changed::Revocation {
                    serials: vec!["0a".into()]
                }
            ),
            (
                2,
                Changed::Revocation {
                    serials: vec!["0a".into(), "0b".into()]
                }
            ),
        ]
    );
    assert_eq!(
        ds.prune_revocations(from_unix_seconds(150)).await.unwrap(),
        1
    );
    assert_eq!(ds.list_revocations().await.unwrap(), vec![other]);
}

pub async fn crl_is_kept_per_issuer_and_its_number_never_goes_back<
    D: Datastore,
    F: Future<Output = D>,
>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let crl = |issuer: &str, number: u64, not_after: u64| CrlRecord {
        issuer: issuer.into(),
        number,
        not_after: from_unix_seconds(not_after),
        der: vec![number as u8],
    };
    {
        let ds = open(dir).await;
        ds.put_crl(crl("ca1", 5, 100)).await.unwrap();
        ds.put_crl(crl("ca2", 1, 300)).await.unwrap();
        ds.put_crl(crl("ca1", 7, 100)).await.unwrap();
        // An older CRL (a slow replica) does not replace a newer one.
        ds.put_crl(crl("ca1", 6, 100)).await.unwrap();
    }
    let ds = open(dir).await;
    assert_eq!(
        ds.list_crls().await.unwrap(),
        vec![crl("ca1", 7, 100), crl("ca2", 1, 300)]
    );
    let feed: Vec<_> = ds
        .changes(0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.changed)
        .collect();
    let changed = |issuer: &str| Changed::Crl {
        issuer: issuer.into(),
    };
    assert_eq!(feed, vec![changed("ca1"), changed("ca2"), changed("ca1")]);
    assert_eq!(
        ds.prune_revocations(from_unix_seconds(200)).await.unwrap(),
        1
    );
    assert_eq!(ds.list_crls().await.unwrap(), vec![crl("ca2", 1, 300)]);
}

/// Taint markers set through a bundle edit are stored, reach the change
/// feed, survive a reopen, and go when their authority is removed.
pub async fn bundle_taint_markers_persist_and_leave_with_their_authority<
    D: Datastore,
    F: Future<Output = D>,
>(
    open: &impl Fn(&Path) -> F,
    dir: &Path,
) {
    let ds = open(dir).await;
    let (old, new) = (ca_cert(), ca_cert());
    let k1 = jwt_authority("k1");
    ds.update_bundle(
        &td(),
        BundleEdit {
            add_x509: vec![old.clone(), new.clone()],
            add_jwt: vec![k1.clone(), jwt_authority("k2")],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let since = ds.current_revision().await.unwrap();
    let tainted = ds
        .update_bundle(
            &td(),
            BundleEdit {
                taint_x509: vec![old.clone(), ca_cert()],
                taint_jwt: vec!["k1".into(), "absent".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(tainted.tainted_x509_authorities, vec![old.clone()]);
    assert_eq!(tainted.tainted_jwt_kids, vec!["k1".to_owned()]);
    assert_eq!(tainted.sequence, 2, "a taint is a bundle change");
    let feed = ds.changes(since, 10).await.unwrap();
    assert!(
        feed.iter().any(|c| matches!(&c.changed,
            Changed::Bundle { bundle: Some(b), .. } if b.tainted_jwt_kids == ["k1"])),
        "the change feed carries the markers"
    );
    drop(ds);
    let ds = open(dir).await;
    let stored = ds.fetch_bundle(&td()).await.unwrap().unwrap();
    assert_eq!(stored, tainted);
    let revoked = ds
        .update_bundle(
            &td(),
            BundleEdit {
                remove_x509: vec![old],
                remove_jwt: vec!["k1".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(!revoked.has_taint());
    assert_eq!(revoked.x509_authorities, vec![new]);
}
