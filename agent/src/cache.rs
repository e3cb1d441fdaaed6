//! The agent's view of its entries and the SVIDs it holds for them.
//!
//! Fed by the Sync stream (full snapshots, changes since a revision, single
//! upserts and removals, bundle updates), as domain events converted at the
//! edge ([`SyncUpdate`]), and by issuance. Readers subscribe
//! to a generation counter that moves on every change.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use sigil_identity::clock::{Clock, SystemClock};
use sigil_identity::{Bundle, EntryId, RegistrationEntry, SelectorSet, TrustDomain, rotation};
use sigil_proto::convert::{SyncEvent, SyncUpdate};
use tokio::sync::watch;
use zeroize::Zeroizing;

/// An X509-SVID the agent holds for an entry.
#[derive(Clone)]
pub struct CachedSvid {
    pub entry: Arc<RegistrationEntry>,
    /// PKCS#8 of the key generated for this entry.
    pub key: Zeroizing<Vec<u8>>,
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When to renew: half-life with ±10 % jitter.
    pub renew_at: SystemTime,
}

impl std::fmt::Debug for CachedSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedSvid")
            .field("spiffe_id", &self.entry.spiffe_id)
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// What a Sync message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The cache changed (or nothing needed to).
    Ok,
    /// The server revoked this agent.
    Revoked(String),
}

/// Whether an SVID issued for `issued_for` may still be served for `now`.
fn same_identity(now: &RegistrationEntry, issued_for: &RegistrationEntry) -> bool {
    now.spiffe_id == issued_for.spiffe_id
        && now.selectors == issued_for.selectors
        && now.dns_names == issued_for.dns_names
}

#[derive(Default)]
struct State {
    revision: u64,
    entries: BTreeMap<EntryId, Arc<RegistrationEntry>>,
    /// Behind `Arc`: a map slot is then a pointer, not the whole record
    /// (a hash map keeps spare slots), and readers share SVIDs instead of
    /// copying keys and chains.
    svids: HashMap<EntryId, Arc<CachedSvid>>,
    bundle: Option<Arc<Bundle>>,
    /// Bundles of federated trust domains, as the server sends them.
    federated: BTreeMap<TrustDomain, Arc<Bundle>>,
    /// Why the server revoked this agent, until it attests again.
    revoked: Option<String>,
    /// The trust domain's CRLs, as last sent with the bundle.
    crls: Arc<crate::crl::CrlSet>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Cache {
    state: Mutex<State>,
    generation: watch::Sender<u64>,
    /// When an SVID arrived, for its renewal time.
    clock: Arc<dyn Clock>,
}

impl Default for Cache {
    /// A cache on the system clock.
    fn default() -> Self {
        Self::new(Arc::new(SystemClock))
    }
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("revision", &self.revision)
            .field("entries", &self.entries.len())
            .finish()
    }
}

/// A freshly issued SVID to store: its entry, PKCS#8 key and DER chain.
pub type Issued = (Arc<RegistrationEntry>, Zeroizing<Vec<u8>>, Vec<Vec<u8>>);

impl Cache {
    /// An empty cache that reads `clock` when SVIDs arrive.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            generation: watch::channel(0).0,
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// A receiver whose value moves on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The last server revision applied.
    pub fn revision(&self) -> u64 {
        self.lock().revision
    }

    /// The current bundle, if any was received.
    pub fn bundle(&self) -> Option<Arc<Bundle>> {
        self.lock().bundle.clone()
    }

    /// The trust domain's CRLs (empty until the server sends any).
    pub fn crls(&self) -> Arc<crate::crl::CrlSet> {
        self.lock().crls.clone()
    }

    /// Replaces the CRLs; streams are woken only when they changed. An
    /// SVID held whose serial is now revoked is due for renewal at once:
    /// it is served until its replacement arrives (a workload without an
    /// SVID is worse off than one whose peers refuse one), and the
    /// returned count says how many were so marked.
    pub fn set_crls(&self, crls: crate::crl::CrlSet) -> usize {
        let mut st = self.lock();
        if *st.crls == crls {
            return 0;
        }
        let mut marked = 0;
        for svid in st.svids.values_mut() {
            let revoked = svid.chain.first().is_some_and(|leaf| crls.is_revoked(leaf));
            if revoked && svid.renew_at > SystemTime::UNIX_EPOCH {
                *svid = Arc::new(CachedSvid {
                    entry: svid.entry.clone(),
                    key: svid.key.clone(),
                    chain: svid.chain.clone(),
                    not_before: svid.not_before,
                    not_after: svid.not_after,
                    renew_at: SystemTime::UNIX_EPOCH,
                });
                marked += 1;
            }
        }
        st.crls = Arc::new(crls);
        drop(st);
        self.bump();
        marked
    }

    /// The bundles of the federated trust domains `entries` federate with
    /// that the server has sent, ordered by trust domain: what a workload
    /// matching `entries` is given besides its own bundle.
    pub fn federated_for<'a>(
        &self,
        entries: impl IntoIterator<Item = &'a RegistrationEntry>,
    ) -> Vec<Arc<Bundle>> {
        let wanted: std::collections::BTreeSet<&TrustDomain> = entries
            .into_iter()
            .flat_map(|e| &e.federates_with)
            .collect();
        let st = self.lock();
        wanted
            .into_iter()
            .filter_map(|td| st.federated.get(td).cloned())
            .collect()
    }

    /// Every federated bundle held, ordered by trust domain.
    pub fn federated_bundles(&self) -> Vec<Arc<Bundle>> {
        self.lock().federated.values().cloned().collect()
    }

    /// Every SVID held.
    pub fn svids(&self) -> Vec<Arc<CachedSvid>> {
        let mut v: Vec<_> = self.lock().svids.values().cloned().collect();
        v.sort_by(|a, b| a.entry.id.cmp(&b.entry.id));
        v
    }

    /// Every entry known.
    pub fn entries(&self) -> Vec<Arc<RegistrationEntry>> {
        self.lock().entries.values().cloned().collect()
    }

    /// The entries a workload with `selectors` matches (unexpired at
    /// `now`), and the unexpired SVIDs held for them, both in entry order.
    /// Only what matches is copied: a workload with one identity costs the
    /// same however many the agent holds.
    pub fn matching(
        &self,
        selectors: &SelectorSet,
        now: SystemTime,
    ) -> (Vec<Arc<RegistrationEntry>>, Vec<Arc<CachedSvid>>) {
        let state = self.lock();
        let mut entries = Vec::new();
        let mut svids = Vec::new();
        for entry in state.entries.values() {
            if entry.is_expired(now) || !entry.selectors.is_subset(selectors) {
                continue;
            }
            if let Some(svid) = state.svids.get(&entry.id)
                && svid.not_after > now
            {
                svids.push(svid.clone());
            }
            entries.push(entry.clone());
        }
        (entries, svids)
    }

    /// Applies one Sync message, converted from the wire (and validated)
    /// by [`SyncUpdate`]'s `TryFrom`.
    pub fn apply(&self, update: SyncUpdate) -> Applied {
        let mut st = self.lock();
        let outcome = match update.event {
            SyncEvent::Snapshot {
                full,
                entries,
                removed,
                bundle,
                federated_bundles,
            } => {
                // The server always sends the complete federated set.
                st.federated = federated_bundles
                    .into_iter()
                    .map(|b| (b.trust_domain.clone(), Arc::new(b)))
                    .collect();
                if full {
                    st.entries.clear();
                }
                for id in removed {
                    st.entries.remove(&id);
                }
                for e in entries {
                    st.entries.insert(e.id.clone(), Arc::new(e));
                }
                if let Some(b) = bundle {
                    st.bundle = Some(Arc::new(b));
                }
                Applied::Ok
            }
            SyncEvent::EntryUpsert(e) => {
                st.entries.insert(e.id.clone(), Arc::new(e));
                Applied::Ok
            }
            SyncEvent::EntryRemoved(id) => {
                st.entries.remove(&id);
                Applied::Ok
            }
            SyncEvent::Bundle(b) => {
                st.bundle = Some(Arc::new(b));
                Applied::Ok
            }
            SyncEvent::FederatedBundle(b) => {
                st.federated.insert(b.trust_domain.clone(), Arc::new(b));
                Applied::Ok
            }
            SyncEvent::FederatedBundleRemoved(td) => {
                st.federated.remove(&td);
                Applied::Ok
            }
            SyncEvent::Revoked(why) => {
                // Nothing more is served from the moment the message lands.
                st.entries.clear();
                st.svids.clear();
                st.revoked = Some(why.clone());
                Applied::Revoked(why)
            }
            SyncEvent::Nothing => Applied::Ok,
        };
        st.revision = st.revision.max(update.revision);
        // An SVID leaves with its entry, and is never served for an entry
        // whose identity-bearing fields changed (SPIFFE ID, selectors, DNS
        // names): a new one is issued for those.
        let State { entries, svids, .. } = &mut *st;
        svids.retain(|id, s| entries.get(id).is_some_and(|e| same_identity(e, &s.entry)));
        drop(st);
        self.bump();
        outcome
    }

    /// Drops every entry and SVID because the server revoked this agent
    /// (`why`): workloads get no identity until [`Cache::reinstate`]. The
    /// bundle stays.
    pub fn revoke(&self, why: &str) {
        let mut st = self.lock();
        st.entries.clear();
        st.svids.clear();
        st.revision = 0;
        st.revoked = Some(why.to_owned());
        drop(st);
        self.bump();
    }

    /// The agent attested again after a revocation.
    pub fn reinstate(&self) {
        self.lock().revoked = None;
    }

    /// Why the server revoked this agent, while it is revoked.
    pub fn revoked(&self) -> Option<String> {
        self.lock().revoked.clone()
    }

    /// Forgets the revision so the next Sync asks for the full set (after a
    /// message could not be applied).
    pub fn reset_revision(&self) {
        self.lock().revision = 0;
    }

    /// Entries that need an SVID at `now`: none held, renewal due, or the
    /// entry changed since its SVID was issued.
    pub fn due(&self, now: SystemTime) -> Vec<Arc<RegistrationEntry>> {
        let st = self.lock();
        st.entries
            .values()
            .filter(|e| !e.is_expired(now))
            .filter(|e| match st.svids.get(&e.id) {
                None => true,
                Some(s) => now >= s.renew_at || s.entry.revision != e.revision,
            })
            .cloned()
            .collect()
    }

    /// Stores a freshly issued SVID for `entry`, if the entry is still
    /// there at the same revision.
    pub fn store(
        &self,
        entry: Arc<RegistrationEntry>,
        key: Zeroizing<Vec<u8>>,
        chain: Vec<Vec<u8>>,
    ) -> Result<(), String> {
        self.store_all(vec![(entry, key, chain)])
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Stores freshly issued SVIDs (entry, key, chain) whose entries are
    /// still there at the same revision, as one change: readers are woken once for the whole
    /// batch, not once per SVID. One result per item, in order.
    pub fn store_all(&self, items: Vec<Issued>) -> Vec<Result<(), String>> {
        let mut results = Vec::with_capacity(items.len());
        let mut ready = Vec::with_capacity(items.len());
        for (entry, key, mut chain) in items {
            // Decoded from the wire with room to grow; held for the SVID's
            // whole life.
            chain.shrink_to_fit();
            let parsed = chain
                .first()
                .ok_or_else(|| "empty chain".to_owned())
                .and_then(|leaf| sigil_identity::x509::parse(leaf).map_err(|e| e.to_string()))
                .map(|leaf| sigil_identity::x509::validity(&leaf));
            match parsed {
                Ok((not_before, not_after)) => {
                    // Servers backdate NotBefore against clock skew; the
                    // half-life is counted from when the SVID arrived, or a
                    // 10 s SVID backdated 10 s would be due on arrival.
                    let renew_at = rotation::renewal_time(
                        not_before.max(self.clock.now()),
                        not_after,
                        sigil_identity::random::jitter_unit(),
                    );
                    ready.push(CachedSvid {
                        entry,
                        key,
                        chain,
                        not_before,
                        not_after,
                        renew_at,
                    });
                    results.push(Ok(()));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        let mut st = self.lock();
        let mut changed = false;
        for svid in ready {
            // Issued for the entry as it was when the request left: if a
            // Sync update changed it meanwhile (other selectors, say), the
            // SVID is for an identity the entry no longer has. Dropped; the
            // entry stays due and gets one for its current revision.
            if st
                .entries
                .get(&svid.entry.id)
                .is_some_and(|now| now.revision == svid.entry.revision)
            {
                st.svids.insert(svid.entry.id.clone(), Arc::new(svid));
                changed = true;
            }
        }
        drop(st);
        if changed {
            self.bump();
        }
        results
    }
}

impl Cache {
    /// Moves the renewal of the SVIDs of `due` (entry, time) forward to the
    /// time given, never later than it already was; the SVIDs stay served
    /// until their replacements are stored. Returns how many moved. Used
    /// when their authority is tainted ([`crate::taint`]).
    pub fn renew_early(&self, due: &[(EntryId, SystemTime)]) -> usize {
        let mut st = self.lock();
        let mut moved = 0;
        for (id, at) in due {
            if let Some(svid) = st.svids.get_mut(id)
                && svid.renew_at > *at
            {
                let mut early = (**svid).clone();
                early.renew_at = *at;
                *svid = Arc::new(early);
                moved += 1;
            }
        }
        drop(st);
        if moved > 0 {
            self.bump();
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_identity::{Selector, SpiffeId};

    fn entry(path: &str, rev: u64) -> RegistrationEntry {
        let mut e = RegistrationEntry::new(
            SpiffeId::parse(&format!("spiffe://example.org/{path}")).unwrap(),
            SpiffeId::parse("spiffe://example.org/sigil/agent/join_token/a").unwrap(),
            [Selector::parse("unix:uid:0").unwrap()]
                .into_iter()
                .collect(),
        );
        e.revision = rev;
        e
    }

    fn upsert(e: &RegistrationEntry) -> SyncUpdate {
        SyncUpdate {
            event: SyncEvent::EntryUpsert(e.clone()),
            revision: e.revision,
        }
    }

    fn put_svid(cache: &Cache, e: &RegistrationEntry) {
        let mut st = cache.lock();
        let now = SystemTime::now();
        st.svids.insert(
            e.id.clone(),
            Arc::new(CachedSvid {
                entry: Arc::new(e.clone()),
                key: Zeroizing::new(vec![1]),
                chain: vec![],
                not_before: now,
                not_after: now,
                renew_at: now,
            }),
        );
    }

    #[test]
    fn half_life_counts_from_arrival_not_from_a_backdated_not_before() {
        let cache = Cache::default();
        let e = entry("short", 1);
        cache.apply(upsert(&e));
        let now = time::OffsetDateTime::now_utc();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.not_before = now - time::Duration::seconds(10);
        params.not_after = now + time::Duration::seconds(10);
        let cert = params.self_signed(&key).unwrap();
        cache
            .store(
                Arc::new(e.clone()),
                Zeroizing::new(key.serialize_der()),
                vec![cert.der().to_vec()],
            )
            .unwrap();
        let held = cache.svids().remove(0);
        let wait = held
            .renew_at
            .duration_since(SystemTime::now())
            .expect("not due on arrival");
        assert!(
            wait >= std::time::Duration::from_secs(4),
            "due {wait:?} after arrival; half of the 10 s left is about 5 s"
        );
        assert!(cache.due(SystemTime::now()).is_empty());
    }

    #[test]
    fn renewal_is_timed_on_the_injected_clock() {
        use sigil_identity::clock::FakeClock;
        use std::time::Duration;
        // The agent's clock is an hour behind the system's: the half-life
        // of an SVID valid for two more hours on its clock is an hour away.
        let agent_now = SystemTime::now() - Duration::from_secs(3600);
        let clock = Arc::new(FakeClock::new(agent_now));
        let cache = Cache::new(clock.clone());
        let e = entry("clocked", 1);
        cache.apply(upsert(&e));
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.not_before = time::OffsetDateTime::from(agent_now - Duration::from_secs(7200));
        params.not_after = time::OffsetDateTime::from(agent_now + Duration::from_secs(7200));
        let cert = params.self_signed(&key).unwrap();
        cache
            .store(
                Arc::new(e.clone()),
                Zeroizing::new(key.serialize_der()),
                vec![cert.der().to_vec()],
            )
            .unwrap();
        let after_arrival = cache.svids()[0].renew_at.duration_since(agent_now).unwrap();
        assert!(
            after_arrival > Duration::from_secs(3000) && after_arrival < Duration::from_secs(4300),
            "renewal {after_arrival:?} after arrival on the agent's clock; about an hour expected"
        );
        assert!(cache.due(clock.now()).is_empty());
        clock.advance(Duration::from_secs(4400));
        assert_eq!(
            cache.due(clock.now()).len(),
            1,
            "due once the clock passes half-life"
        );
    }

    /// An SVID for `e` from a throwaway self-signed certificate.
    fn issued_for(e: &RegistrationEntry) -> Issued {
        let now = time::OffsetDateTime::now_utc();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.not_before = now - time::Duration::seconds(10);
        params.not_after = now + time::Duration::seconds(600);
        let cert = params.self_signed(&key).unwrap();
        (
            Arc::new(e.clone()),
            Zeroizing::new(key.serialize_der()),
            vec![cert.der().to_vec()],
        )
    }

    // At the cache level because the race is between an issuance in flight
    // and a Sync update landing before it is stored; against the real
    // binaries that window is a few milliseconds and cannot be hit on
    // demand.
    #[test]
    fn an_svid_issued_for_an_older_revision_is_not_stored() {
        let cache = Cache::default();
        let old = entry("db", 1);
        cache.apply(upsert(&old));
        // The issue loop takes the entry at revision 1 and asks for an SVID...
        let in_flight = issued_for(&cache.due(SystemTime::now()).remove(0));
        // ...meanwhile the entry moves to other selectors.
        let mut moved = old.clone();
        moved.selectors = [Selector::parse("unix:uid:1000").unwrap()]
            .into_iter()
            .collect();
        moved.revision = 2;
        cache.apply(upsert(&moved));
        let (entry, key, chain) = in_flight;
        cache.store(entry, key, chain).unwrap();
        assert!(
            cache.svids().is_empty(),
            "the SVID for revision 1 was stored after the entry changed"
        );
        let (entries, svids) = cache.matching(&moved.selectors, SystemTime::now());
        assert_eq!(entries.len(), 1, "the new selectors match the entry");
        assert!(svids.is_empty(), "but get no SVID issued for the old one");
        // The entry is still due, so one for revision 2 is issued and kept.
        let due = cache.due(SystemTime::now());
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].revision, 2);
        let (entry, key, chain) = issued_for(&due[0]);
        cache.store(entry, key, chain).unwrap();
        assert_eq!(
            cache.matching(&moved.selectors, SystemTime::now()).1.len(),
            1
        );
    }

    #[test]
    fn an_svid_is_never_served_for_a_changed_identity() {
        let cache = Cache::default();
        let e = entry("db-admin", 1);
        cache.apply(upsert(&e));
        put_svid(&cache, &e);
        // A hint change keeps the SVID until a new one is issued.
        let mut hinted = e.clone();
        hinted.hint = "x".into();
        hinted.revision = 2;
        cache.apply(upsert(&hinted));
        assert_eq!(cache.svids().len(), 1);
        // A new SPIFFE ID drops it at once.
        let mut renamed = hinted.clone();
        renamed.spiffe_id = SpiffeId::parse("spiffe://example.org/web").unwrap();
        renamed.revision = 3;
        cache.apply(upsert(&renamed));
        assert!(cache.svids().is_empty());
    }

    #[test]
    fn a_full_snapshot_replaces_the_entries() {
        let cache = Cache::default();
        cache.apply(upsert(&entry("web", 1)));
        cache.apply(upsert(&entry("db", 2)));
        let kept = entry("api", 3);
        cache.apply(SyncUpdate {
            revision: 3,
            event: SyncEvent::Snapshot {
                full: true,
                entries: vec![kept.clone()],
                removed: vec![],
                bundle: None,
                federated_bundles: vec![],
            },
        });
        let ids: Vec<_> = cache.entries().iter().map(|e| e.id.clone()).collect();
        assert_eq!(ids, vec![kept.id]);
        assert_eq!(cache.revision(), 3);
    }

    fn fed(td: &str) -> Bundle {
        Bundle::new(TrustDomain::new(td).unwrap())
    }

    /// A workload gets only the federated bundles its entries name; a
    /// snapshot replaces the set, a removal drops one.
    #[test]
    fn federated_bundles_follow_the_server_and_go_only_to_entries_naming_them() {
        let cache = Cache::default();
        let mut web = entry("web", 1);
        web.federates_with
            .insert(TrustDomain::new("td2.org").unwrap());
        let db = entry("db", 2);
        cache.apply(SyncUpdate {
            revision: 2,
            event: SyncEvent::Snapshot {
                full: true,
                entries: vec![web.clone(), db.clone()],
                removed: vec![],
                bundle: None,
                federated_bundles: vec![fed("td2.org"), fed("td3.org")],
            },
        });
        let tds = |b: Vec<Arc<Bundle>>| -> Vec<String> {
            b.iter().map(|b| b.trust_domain.to_string()).collect()
        };
        assert_eq!(tds(cache.federated_for([&web])), ["td2.org"]);
        assert!(cache.federated_for([&db]).is_empty());
        cache.apply(SyncUpdate {
            revision: 3,
            event: SyncEvent::FederatedBundleRemoved(TrustDomain::new("td2.org").unwrap()),
        });
        assert!(cache.federated_for([&web]).is_empty());
        cache.apply(SyncUpdate {
            revision: 4,
            event: SyncEvent::FederatedBundle(fed("td2.org")),
        });
        assert_eq!(tds(cache.federated_for([&web])), ["td2.org"]);
        cache.apply(SyncUpdate {
            revision: 5,
            event: SyncEvent::Snapshot {
                full: false,
                entries: vec![],
                removed: vec![],
                bundle: None,
                federated_bundles: vec![fed("td3.org")],
            },
        });
        assert_eq!(tds(cache.federated_bundles()), ["td3.org"]);
    }
}
