//! Authorization and fan-out of the in-memory registry.

use std::time::Duration;

use sigil_identity::clock::from_unix_seconds;
use sigil_identity::{Selector, SelectorSet};

use super::*;
use crate::datastore::SledDatastore;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn agent_id(n: &str) -> AgentId {
    AgentId::from_segments(&td(), &["join_token", n]).unwrap()
}

fn sels(v: &[&str]) -> SelectorSet {
    v.iter().map(|s| Selector::parse(s).unwrap()).collect()
}

fn agent(n: &str, selectors: &[&str]) -> AgentRecord {
    AgentRecord {
        id: agent_id(n),
        attestor: "join_token".into(),
        serial: "01".into(),
        cert_sha256: "ab".into(),
        pending_cert_sha256: None,
        expires_at: from_unix_seconds(4_000_000_000),
        selectors: sels(selectors),
        banned: false,
        can_reattest: false,
        created_at: from_unix_seconds(1),
    }
}

fn entry(path: &str, parent: &SpiffeId, selectors: &[&str]) -> RegistrationEntry {
    RegistrationEntry::new(
        td().id_from_segments(&[path]).unwrap(),
        parent.clone(),
        sels(selectors),
    )
}

async fn setup() -> (tempfile::TempDir, Arc<SledDatastore>, Arc<Registry>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledDatastore::open(dir.path()).unwrap());
    for a in [
        agent("a1", &["k8s:cluster:prod"]),
        agent("a2", &["k8s:cluster:dev"]),
    ] {
        store.create_agent(a).await.unwrap();
    }
    let registry = Registry::load(store.clone(), &td()).await.unwrap();
    (dir, store, registry)
}

fn now() -> SystemTime {
    SystemTime::now()
}

#[tokio::test]
async fn agent_sees_only_its_own_and_alias_entries() {
    let (_d, store, reg) = setup().await;
    let web = store
        .create_entry(entry("web", &agent_id("a1"), &["unix:uid:1"]))
        .await
        .unwrap();
    let other = store
        .create_entry(entry("db", &agent_id("a2"), &["unix:uid:2"]))
        .await
        .unwrap();
    let alias = entry(
        "prod-nodes",
        &SpiffeId::server(&td()),
        &["k8s:cluster:prod"],
    );
    store.create_entry(alias.clone()).await.unwrap();
    let via_alias = store
        .create_entry(entry("api", &alias.spiffe_id, &["unix:uid:3"]))
        .await
        .unwrap();
    reg.catch_up().await.unwrap();

    let ids = |a: &str| {
        reg.authorized_entries(&agent_id(a), now())
            .iter()
            .map(|e| e.id.clone())
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(
        ids("a1"),
        [web.id.clone(), via_alias.id.clone()].into_iter().collect()
    );
    assert_eq!(ids("a2"), [other.id.clone()].into_iter().collect());
    assert!(
        reg.authorized_entry(&agent_id("a1"), &other.id, now())
            .is_none(),
        "never another agent's entry"
    );
    assert!(
        reg.authorized_entry(&agent_id("a2"), &via_alias.id, now())
            .is_none()
    );
    assert!(
        reg.authorized_entry(&agent_id("a1"), &via_alias.id, now())
            .is_some()
    );
}

#[tokio::test]
async fn expired_entries_are_not_authorized() {
    let (_d, store, reg) = setup().await;
    let mut e = entry("web", &agent_id("a1"), &["unix:uid:1"]);
    e.expires_at = Some(now() - Duration::from_secs(1));
    let e = store.create_entry(e).await.unwrap();
    reg.catch_up().await.unwrap();
    assert!(
        reg.authorized_entry(&agent_id("a1"), &e.id, now())
            .is_none()
    );
}

#[tokio::test]
async fn changes_reach_exactly_the_affected_agents() {
    let (_d, store, reg) = setup().await;
    let (_s1, mut rx1, _g1) = reg.subscribe(&agent_id("a1"), 0, now());
    let (_s2, mut rx2, _g2) = reg.subscribe(&agent_id("a2"), 0, now());
    let e = store
        .create_entry(entry("web", &agent_id("a1"), &["unix:uid:1"]))
        .await
        .unwrap();
    reg.catch_up().await.unwrap();
    assert!(matches!(rx1.try_recv(), Ok(AgentEvent::Upsert(u)) if u.id == e.id));
    assert!(rx2.try_recv().is_err(), "a2 is not told about a1's entry");

    // Moving the entry to a2 removes it from a1 and adds it to a2.
    let mut moved = e.clone();
    moved.parent_id = agent_id("a2").into();
    store.update_entry(moved).await.unwrap();
    reg.catch_up().await.unwrap();
    assert!(matches!(rx1.try_recv(), Ok(AgentEvent::Removed(id, _)) if id == e.id));
    assert!(matches!(rx2.try_recv(), Ok(AgentEvent::Upsert(u)) if u.id == e.id));

    store.delete_entry(&e.id).await.unwrap();
    reg.catch_up().await.unwrap();
    assert!(matches!(rx2.try_recv(), Ok(AgentEvent::Removed(id, _)) if id == e.id));
    assert!(rx1.try_recv().is_err());
}

#[tokio::test]
async fn alias_changes_resync_member_agents() {
    let (_d, store, reg) = setup().await;
    let (_s1, mut rx1, _g1) = reg.subscribe(&agent_id("a1"), 0, now());
    let (_s2, mut rx2, _g2) = reg.subscribe(&agent_id("a2"), 0, now());
    store
        .create_entry(entry(
            "prod-nodes",
            &SpiffeId::server(&td()),
            &["k8s:cluster:prod"],
        ))
        .await
        .unwrap();
    reg.catch_up().await.unwrap();
    assert!(
        matches!(rx1.try_recv(), Ok(AgentEvent::Resync)),
        "a1 joined the alias"
    );
    assert!(rx2.try_recv().is_err(), "a2 did not");
}

#[tokio::test]
async fn ban_and_evict_revoke_open_streams() {
    let (_d, store, reg) = setup().await;
    let (_s, mut rx, _g) = reg.subscribe(&agent_id("a1"), 0, now());
    let mut banned = reg.agent(&agent_id("a1")).unwrap();
    banned.banned = true;
    store.update_agent(banned).await.unwrap();
    reg.catch_up().await.unwrap();
    assert!(matches!(
        rx.try_recv(),
        Ok(AgentEvent::Revoked("agent banned"))
    ));
    let (_s, mut rx, _g) = reg.subscribe(&agent_id("a2"), 0, now());
    store.delete_agent(&agent_id("a2")).await.unwrap();
    reg.catch_up().await.unwrap();
    assert!(matches!(
        rx.try_recv(),
        Ok(AgentEvent::Revoked("agent evicted"))
    ));
    assert!(reg.agent(&agent_id("a2")).is_none());
}

#[tokio::test]
async fn resume_sends_only_what_changed_since() {
    let (_d, store, reg) = setup().await;
    let keep = store
        .create_entry(entry("keep", &agent_id("a1"), &["unix:uid:1"]))
        .await
        .unwrap();
    let gone = store
        .create_entry(entry("gone", &agent_id("a1"), &["unix:uid:2"]))
        .await
        .unwrap();
    reg.catch_up().await.unwrap();
    let seen = reg.revision();
    store.delete_entry(&gone.id).await.unwrap();
    let added = store
        .create_entry(entry("new", &agent_id("a1"), &["unix:uid:3"]))
        .await
        .unwrap();
    reg.catch_up().await.unwrap();

    let (start, _rx, _g) = reg.subscribe(&agent_id("a1"), seen, now());
    assert!(!start.full);
    assert_eq!(
        start
            .entries
            .iter()
            .map(|e| e.id.clone())
            .collect::<Vec<_>>(),
        vec![added.id.clone()]
    );
    assert_eq!(start.removed, vec![gone.id.clone()]);
    let (full, _rx, _g) = reg.subscribe(&agent_id("a1"), 0, now());
    assert!(full.full);
    assert_eq!(full.entries.len(), 2);
    assert!(full.entries.iter().any(|e| e.id == keep.id));
    // Another agent's deleted entry is not reported to this one.
    let other = store
        .create_entry(entry("other", &agent_id("a2"), &["unix:uid:9"]))
        .await
        .unwrap();
    reg.catch_up().await.unwrap();
    let seen2 = reg.revision();
    store.delete_entry(&other.id).await.unwrap();
    reg.catch_up().await.unwrap();
    let (start, _rx, _g) = reg.subscribe(&agent_id("a1"), seen2, now());
    assert!(!start.full && start.removed.is_empty() && start.entries.is_empty());
    // A revision from the future (another server's numbering) gets the full set.
    let (future, _rx, _g) = reg.subscribe(&agent_id("a1"), seen + 1000, now());
    assert!(future.full);
}

#[tokio::test]
async fn alias_changes_since_the_revision_force_a_full_resync() {
    let (_d, store, reg) = setup().await;
    store
        .create_entry(entry("web", &agent_id("a1"), &["unix:uid:1"]))
        .await
        .unwrap();
    reg.catch_up().await.unwrap();
    let seen = reg.revision();
    store
        .create_entry(entry(
            "prod-nodes",
            &SpiffeId::server(&td()),
            &["k8s:cluster:prod"],
        ))
        .await
        .unwrap();
    reg.catch_up().await.unwrap();
    let (start, _rx, _g) = reg.subscribe(&agent_id("a1"), seen, now());
    assert!(
        start.full,
        "alias membership changed since the agent's revision"
    );
    let (start, _rx, _g) = reg.subscribe(&agent_id("a2"), seen, now());
    assert!(
        start.full,
        "any alias change since the revision asks for the full set"
    );
}

#[tokio::test]
async fn superseding_ends_open_streams() {
    let (_d, _store, reg) = setup().await;
    let (_s, mut rx, _g) = reg.subscribe(&agent_id("a1"), 0, now());
    reg.supersede(&agent_id("a1"));
    assert!(matches!(rx.try_recv(), Ok(AgentEvent::Superseded)));
    assert!(matches!(
        rx.try_recv(),
        Err(mpsc::error::TryRecvError::Disconnected)
    ));
}

#[tokio::test]
async fn slow_subscriber_is_cut_off_without_blocking_others() {
    let (_d, store, reg) = setup().await;
    let (_s, mut slow, _g1) = reg.subscribe(&agent_id("a1"), 0, now());
    let (_s, mut fast, _g2) = reg.subscribe(&agent_id("a1"), 0, now());
    for n in 0..(SUBSCRIBER_BUFFER + 10) {
        store
            .create_entry(entry(&format!("e{n}"), &agent_id("a1"), &["unix:uid:1"]))
            .await
            .unwrap();
        if n % 100 == 0 {
            reg.catch_up().await.unwrap();
            while fast.try_recv().is_ok() {}
        }
    }
    reg.catch_up().await.unwrap();
    while fast.try_recv().is_ok() {}
    let mut received = 0;
    while slow.try_recv().is_ok() {
        received += 1;
    }
    assert_eq!(
        received, SUBSCRIBER_BUFFER,
        "the slow reader got its buffer, then was dropped"
    );
    assert!(matches!(
        slow.try_recv(),
        Err(mpsc::error::TryRecvError::Disconnected)
    ));
}

#[tokio::test]
async fn a_third_sync_stream_displaces_the_oldest() {
    let (_d, _store, reg) = setup().await;
    let (_s1, mut rx1, _g1) = reg.subscribe(&agent_id("a1"), 0, now());
    let (_s2, mut rx2, _g2) = reg.subscribe(&agent_id("a1"), 0, now());
    let (_s3, mut rx3, _g3) = reg.subscribe(&agent_id("a1"), 0, now());
    assert!(matches!(rx1.try_recv(), Ok(AgentEvent::Displaced)));
    assert!(rx2.try_recv().is_err() && rx3.try_recv().is_err());
    // The two newest still get events.
    reg.supersede(&agent_id("a1"));
    assert!(matches!(rx2.try_recv(), Ok(AgentEvent::Superseded)));
    assert!(matches!(rx3.try_recv(), Ok(AgentEvent::Superseded)));
}

#[tokio::test]
async fn resume_reads_changes_across_log_chunks() {
    let (_d, store, reg) = setup().await;
    let gone = store
        .create_entry(entry("gone", &agent_id("a1"), &["unix:uid:1"]))
        .await
        .unwrap();
    reg.catch_up().await.unwrap();
    let seen = reg.revision();
    // More than two chunks of other agents' changes, then the deletion.
    let others: Vec<_> = (0..2 * LOG_CHUNK + 10)
        .map(|i| entry(&format!("o{i}"), &agent_id("a2"), &["unix:uid:2"]))
        .collect();
    for r in store.create_entries(others).await.unwrap() {
        r.unwrap();
    }
    store.delete_entry(&gone.id).await.unwrap();
    reg.catch_up().await.unwrap();
    let (start, _rx, _g) = reg.subscribe(&agent_id("a1"), seen, now());
    assert!(!start.full);
    assert!(start.entries.is_empty());
    assert_eq!(start.removed, vec![gone.id.clone()]);
    assert_eq!(start.revision, reg.revision());
}

#[tokio::test]
async fn admin_role_follows_admin_entries() {
    let (_d, store, reg) = setup().await;
    let id = td().id_from_segments(&["ops"]).unwrap();
    assert_eq!(reg.admin_role(&id, now()), None);
    let plain = store
        .create_entry(entry("ops", &agent_id("a1"), &["unix:uid:1"]))
        .await
        .unwrap();
    reg.catch_up().await.unwrap();
    assert_eq!(
        reg.admin_role(&id, now()),
        None,
        "admin = false grants nothing"
    );

    let mut reader = entry("ops", &agent_id("a2"), &["unix:uid:2"]);
    reader.admin = true;
    reader.admin_role = Some(AdminRole::Read);
    let reader = store.create_entry(reader).await.unwrap();
    reg.catch_up().await.unwrap();
    assert_eq!(reg.admin_role(&id, now()), Some(AdminRole::Read));

    // The strongest of the ID's admin entries counts.
    let mut full = plain.clone();
    full.admin = true;
    let full = store.update_entry(full).await.unwrap();
    reg.catch_up().await.unwrap();
    assert_eq!(reg.admin_role(&id, now()), Some(AdminRole::Admin));
    assert_eq!(
        reg.admin_role(&td().id_from_segments(&["other"]).unwrap(), now()),
        None
    );

    store.delete_entry(&full.id).await.unwrap();
    reg.catch_up().await.unwrap();
    assert_eq!(reg.admin_role(&id, now()), Some(AdminRole::Read));

    let mut expired = reader.clone();
    expired.expires_at = Some(now() - Duration::from_secs(1));
    store.update_entry(expired).await.unwrap();
    reg.catch_up().await.unwrap();
    assert_eq!(
        reg.admin_role(&id, now()),
        None,
        "an expired entry grants nothing"
    );
}

#[tokio::test]
async fn admin_role_needs_a_parent_in_good_standing() {
    let (_d, store, reg) = setup().await;
    let admin_under = |path: &str, parent: &SpiffeId| {
        let mut e = entry(path, parent, &["unix:uid:1"]);
        e.admin = true;
        e
    };
    let server = SpiffeId::server(&td());
    let id = |p: &str| td().id_from_segments(&[p]).unwrap();
    store
        .create_entry(admin_under("on-a1", &agent_id("a1")))
        .await
        .unwrap();
    store
        .create_entry(admin_under("on-nowhere", &agent_id("gone")))
        .await
        .unwrap();
    store
        .create_entry(admin_under("minted", &server))
        .await
        .unwrap();
    // A node alias of a1's cluster, and an admin entry under it.
    let alias = store
        .create_entry(entry("prod-nodes", &server, &["k8s:cluster:prod"]))
        .await
        .unwrap();
    store
        .create_entry(admin_under("on-alias", &alias.spiffe_id))
        .await
        .unwrap();
    reg.catch_up().await.unwrap();
    assert_eq!(reg.admin_role(&id("on-a1"), now()), Some(AdminRole::Admin));
    assert_eq!(reg.admin_role(&id("minted"), now()), Some(AdminRole::Admin));
    assert_eq!(
        reg.admin_role(&id("on-alias"), now()),
        Some(AdminRole::Admin)
    );
    assert_eq!(
        reg.admin_role(&id("on-nowhere"), now()),
        None,
        "an entry under an unknown agent grants nothing"
    );

    let mut banned = reg.agent(&agent_id("a1")).unwrap();
    banned.banned = true;
    store.update_agent(banned).await.unwrap();
    reg.catch_up().await.unwrap();
    assert_eq!(
        reg.admin_role(&id("on-a1"), now()),
        None,
        "the admin SVID of a banned node still works"
    );
    assert_eq!(
        reg.admin_role(&id("on-alias"), now()),
        None,
        "an alias whose only agent is banned still grants"
    );
    assert_eq!(reg.admin_role(&id("minted"), now()), Some(AdminRole::Admin));
}

#[tokio::test]
async fn a_position_below_the_change_floor_reloads_fully() {
    let (_d, store, reg) = setup().await;
    let (_s1, mut rx1, _g1) = reg.subscribe(&agent_id("a1"), 0, now());
    let (_s2, mut rx2, _g2) = reg.subscribe(&agent_id("a2"), 0, now());
    // Changes the registry never read, then pruned away.
    let web = store
        .create_entry(entry("web", &agent_id("a1"), &["unix:uid:1"]))
        .await
        .unwrap();
    store.delete_agent(&agent_id("a2")).await.unwrap();
    let current = store.current_revision().await.unwrap();
    store.prune_changes(current).await.unwrap();
    assert_eq!(reg.full_reloads(), 0);

    reg.catch_up().await.unwrap();
    assert_eq!(reg.full_reloads(), 1);
    assert_eq!(reg.revision(), current);
    assert_eq!(
        reg.authorized_entries(&agent_id("a1"), now())
            .iter()
            .map(|e| e.id.clone())
            .collect::<Vec<_>>(),
        vec![web.id]
    );
    assert!(reg.agent(&agent_id("a2")).is_none());
    assert!(matches!(rx1.try_recv(), Ok(AgentEvent::Resync)));
    assert!(matches!(
        rx2.try_recv(),
        Ok(AgentEvent::Revoked("agent evicted"))
    ));
    // A stream resuming from before the reload gets the full set.
    let (start, _rx, _g) = reg.subscribe(&agent_id("a1"), 1, now());
    assert!(start.full);
    // Later changes follow the feed again, without another reload.
    store
        .create_entry(entry("api", &agent_id("a1"), &["unix:uid:2"]))
        .await
        .unwrap();
    reg.catch_up().await.unwrap();
    assert_eq!(reg.authorized_entries(&agent_id("a1"), now()).len(), 2);
    assert_eq!(reg.full_reloads(), 1);
}

/// Records what a [`ChangeListener`] is told.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<u64>>,
    reloads: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl ChangeListener for Recorder {
    async fn changed(&self, change: &Change) {
        self.seen.lock().unwrap().push(change.revision);
    }
    async fn reload(&self) {
        self.reloads
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn listeners_get_every_change_in_order_and_the_follower_applies_agent_writes() {
    let (_d, store, reg) = setup().await;
    let recorder = Arc::new(Recorder::default());
    reg.add_listener(recorder.clone());
    let start = reg.revision();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    // A long poll: only the change hint can wake the follower in time.
    let follower = tokio::spawn(reg.clone().follow(Duration::from_secs(3600), stop));
    let (_s, mut rx, _g) = reg.subscribe(&agent_id("a1"), 0, now());
    let mut banned = reg.agent(&agent_id("a1")).unwrap();
    banned.banned = true;
    store.update_agent(banned).await.unwrap();
    let revoked = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the ban reached the stream through the feed");
    assert!(matches!(revoked, Some(AgentEvent::Revoked("agent banned"))));
    store
        .create_join_token(crate::datastore::JoinTokenRecord {
            hash: crate::datastore::TokenHash::of("t"),
            expires_at: from_unix_seconds(4_000_000_000),
            alias: None,
        })
        .await
        .unwrap();
    store
        .create_entry(entry("web", &agent_id("a2"), &["unix:uid:1"]))
        .await
        .unwrap();
    let current = store.current_revision().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while reg.revision() < current {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the follower caught up");
    assert!(reg.agent(&agent_id("a1")).unwrap().banned);
    assert_eq!(
        *recorder.seen.lock().unwrap(),
        (start + 1..=current).collect::<Vec<_>>()
    );
    stop_tx.send(true).unwrap();
    follower.await.unwrap();
    // A reload is passed on too.
    store.prune_changes(current).await.unwrap();
    store.delete_agent(&agent_id("a2")).await.unwrap();
    store.prune_changes(current + 1).await.unwrap();
    reg.catch_up().await.unwrap();
    assert_eq!(
        recorder.reloads.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert!(reg.agent(&agent_id("a2")).is_none());
}

#[tokio::test]
async fn saved_history_lets_streams_resume_after_a_restart() {
    let (dir, store, reg) = setup().await;
    let moved = store
        .create_entry(entry("moved", &agent_id("a1"), &["unix:uid:1"]))
        .await
        .unwrap();
    let kept = store
        .create_entry(entry("kept", &agent_id("a1"), &["unix:uid:2"]))
        .await
        .unwrap();
    reg.catch_up().await.unwrap();
    let seen = reg.revision();
    // Moved to another agent before the stop: a1 must be told it is gone.
    let mut to_a2 = moved.clone();
    to_a2.parent_id = agent_id("a2").as_spiffe_id().clone();
    store.update_entry(to_a2).await.unwrap();
    reg.catch_up().await.unwrap();
    let path = dir.path().join("sync-history.json");
    reg.save_history(&path).unwrap();
    // Made while the server was down (or after the save): a creation.
    let added = store
        .create_entry(entry("added", &agent_id("a1"), &["unix:uid:3"]))
        .await
        .unwrap();

    let restarted = Registry::load_resumable(store.clone(), &td(), Some(&path))
        .await
        .unwrap();
    let (start, _rx, _g) = restarted.subscribe(&agent_id("a1"), seen, now());
    assert!(!start.full, "resumed, not a full snapshot");
    let ids: Vec<_> = start.entries.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, vec![added.id.clone()]);
    assert_eq!(start.removed, vec![moved.id.clone()]);
    assert!(
        !ids.contains(&kept.id),
        "unchanged entries are not sent again"
    );
    // a2 learns of the entry it gained, and of nothing of a1's.
    let (start, _rx, _g) = restarted.subscribe(&agent_id("a2"), seen, now());
    assert!(!start.full && start.removed.is_empty());
    assert_eq!(start.entries.len(), 1);
    assert_eq!(start.entries[0].id, moved.id);

    // Without the saved history the same resume takes the full set.
    let fresh = Registry::load(store.clone(), &td()).await.unwrap();
    let (start, _rx, _g) = fresh.subscribe(&agent_id("a1"), seen, now());
    assert!(start.full);
}

#[tokio::test]
async fn an_update_of_unknown_parentage_after_the_saved_history_ends_it() {
    let (dir, store, reg) = setup().await;
    let e = store
        .create_entry(entry("e", &agent_id("a1"), &["unix:uid:1"]))
        .await
        .unwrap();
    reg.catch_up().await.unwrap();
    let path = dir.path().join("sync-history.json");
    // Saved before the entry existed in the history's window: an empty
    // history saved at an earlier registry knows nothing of `e`.
    let early = Registry::load(store.clone(), &td()).await.unwrap();
    early.save_history(&path).unwrap();
    let seen = early.revision();
    let mut to_a2 = e.clone();
    to_a2.parent_id = agent_id("a2").as_spiffe_id().clone();
    store.update_entry(to_a2).await.unwrap();

    let restarted = Registry::load_resumable(store.clone(), &td(), Some(&path))
        .await
        .unwrap();
    // a1 may have held `e`; who did is not known, so no resuming across it.
    let (start, _rx, _g) = restarted.subscribe(&agent_id("a1"), seen, now());
    assert!(start.full);
    assert!(start.entries.is_empty());
}

#[tokio::test]
async fn a_saved_history_that_does_not_connect_is_not_used() {
    let (dir, store, reg) = setup().await;
    store
        .create_entry(entry("e", &agent_id("a1"), &["unix:uid:1"]))
        .await
        .unwrap();
    reg.catch_up().await.unwrap();
    let seen = reg.revision();
    let path = dir.path().join("sync-history.json");
    reg.save_history(&path).unwrap();
    store
        .create_entry(entry("f", &agent_id("a1"), &["unix:uid:2"]))
        .await
        .unwrap();
    // The feed up to the saved revision is gone.
    store.prune_changes(seen + 1).await.unwrap();
    let restarted = Registry::load_resumable(store.clone(), &td(), Some(&path))
        .await
        .unwrap();
    let (start, _rx, _g) = restarted.subscribe(&agent_id("a1"), seen, now());
    assert!(start.full);
    // A corrupt file is ignored the same way.
    std::fs::write(&path, b"{not json").unwrap();
    let restarted = Registry::load_resumable(store.clone(), &td(), Some(&path))
        .await
        .unwrap();
    let (start, _rx, _g) = restarted.subscribe(&agent_id("a1"), seen, now());
    assert!(start.full);
    assert_eq!(start.entries.len(), 2);
}
