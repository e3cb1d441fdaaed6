//! The agent's view of its entries and the SVIDs it holds for them.
//!
//! Fed by the Sync stream (full snapshots, changes since a revision, single
//! upserts and removals, bundle updates) and by issuance. Readers subscribe
//! to a generation counter that moves on every change.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use sigil_identity::{Bundle, EntryId, RegistrationEntry, rotation};
use sigil_proto::node as pb;
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

#[derive(Default)]
struct State {
    revision: u64,
    entries: BTreeMap<EntryId, Arc<RegistrationEntry>>,
    svids: HashMap<EntryId, CachedSvid>,
    bundle: Option<Arc<Bundle>>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Cache {
    state: Mutex<State>,
    generation: watch::Sender<u64>,
}

impl Default for Cache {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::default()),
            generation: watch::channel(0).0,
        }
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

impl Cache {
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

    /// Every SVID held.
    pub fn svids(&self) -> Vec<CachedSvid> {
        let mut v: Vec<_> = self.lock().svids.values().cloned().collect();
        v.sort_by(|a, b| a.entry.id.cmp(&b.entry.id));
        v
    }

    /// Every entry known.
    pub fn entries(&self) -> Vec<Arc<RegistrationEntry>> {
        self.lock().entries.values().cloned().collect()
    }

    /// Applies one Sync message. Invalid entries from the wire are skipped
    /// (and reported), never half-applied.
    pub fn apply(&self, msg: pb::SyncResponse) -> Result<Applied, String> {
        use pb::sync_response::Event;
        let mut st = self.lock();
        let outcome = match msg.event {
            Some(Event::Snapshot(s)) => {
                let entries: Vec<RegistrationEntry> = s
                    .entries
                    .into_iter()
                    .map(RegistrationEntry::try_from)
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?;
                if s.full {
                    st.entries.clear();
                }
                for id in s.removed {
                    if let Ok(id) = EntryId::new(&id) {
                        st.entries.remove(&id);
                    }
                }
                for e in entries {
                    st.entries.insert(e.id.clone(), Arc::new(e));
                }
                if let Some(b) = s.bundle {
                    st.bundle = Some(Arc::new(Bundle::try_from(&b).map_err(|e| e.to_string())?));
                }
                Applied::Ok
            }
            Some(Event::EntryUpsert(e)) => {
                let e = RegistrationEntry::try_from(e).map_err(|e| e.to_string())?;
                st.entries.insert(e.id.clone(), Arc::new(e));
                Applied::Ok
            }
            Some(Event::EntryRemoved(id)) => {
                if let Ok(id) = EntryId::new(&id) {
                    st.entries.remove(&id);
                }
                Applied::Ok
            }
            Some(Event::Bundle(b)) => {
                st.bundle = Some(Arc::new(Bundle::try_from(&b).map_err(|e| e.to_string())?));
                Applied::Ok
            }
            Some(Event::Revoked(why)) => Applied::Revoked(why),
            None => Applied::Ok,
        };
        st.revision = st.revision.max(msg.revision);
        // SVIDs of entries that are gone go with them.
        let State { entries, svids, .. } = &mut *st;
        svids.retain(|id, _| entries.contains_key(id));
        drop(st);
        self.bump();
        Ok(outcome)
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
    /// there.
    pub fn store(
        &self,
        entry: Arc<RegistrationEntry>,
        key: Zeroizing<Vec<u8>>,
        chain: Vec<Vec<u8>>,
    ) -> Result<(), String> {
        let leaf = sigil_identity::x509::parse(chain.first().ok_or("empty chain")?)
            .map_err(|e| e.to_string())?;
        let (not_before, not_after) = sigil_identity::x509::validity(&leaf);
        let renew_at =
            rotation::renewal_time(not_before, not_after, sigil_identity::random::jitter_unit());
        let mut st = self.lock();
        if st.entries.contains_key(&entry.id) {
            st.svids.insert(
                entry.id.clone(),
                CachedSvid {
                    entry,
                    key,
                    chain,
                    not_before,
                    not_after,
                    renew_at,
                },
            );
            drop(st);
            self.bump();
        }
        Ok(())
    }
}
