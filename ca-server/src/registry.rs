//! The server's in-memory view of entries and agents.
//!
//! It answers "which entries is this agent authorized for" without touching
//! the datastore, and pushes every change to the Sync streams of exactly the
//! agents it affects. It follows the datastore's change feed
//! ([`Registry::catch_up`]), so a change made through any path — this
//! process's admin or node API, or another replica — arrives the same way:
//! entries, and agents (attestation, renewal, ban, eviction, pruning).
//! [`Registry::follow`] is the one loop per process reading the feed: on
//! every change hint and every safety poll it catches up, and passes each
//! change on to the [`ChangeListener`]s (the CA follows its bundle so).
//! A position that fell below the feed's floor (pruned) reloads fully.
//!
//! An agent is authorized for an entry when the entry's parent is the agent
//! itself, or a node alias whose selectors are all among the agent's node
//! selectors. A workload entry change costs work proportional to the agents
//! under its parent; a node alias change re-evaluates alias membership of
//! every agent.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use sigil_identity::{AdminRole, AgentId, EntryId, RegistrationEntry, SpiffeId, TrustDomain};
use tokio::sync::mpsc;
use tracing::debug;

use crate::datastore::{
    AgentRecord, Change, ChangeKind, Changed, Datastore, DatastoreError, EntryFilter,
};

/// Changes read from the datastore per call while catching up.
const CATCH_UP_BATCH: usize = 1000;

/// Something else in the process that follows the change feed, fed by the
/// registry's catch-up in revision order (one reader of the feed per
/// process).
#[async_trait::async_trait]
pub trait ChangeListener: Send + Sync {
    /// One change, in revision order (every kind, entries included).
    async fn changed(&self, change: &Change);
    /// Changes were pruned before they were read: re-read whatever is
    /// cached from the datastore.
    async fn reload(&self);
}

/// How many recent changes are remembered for resuming Sync streams.
const CHANGE_LOG_LEN: usize = 100_000;
/// Events buffered per Sync stream before it is cut off as too slow.
const SUBSCRIBER_BUFFER: usize = 1024;
/// Changes per chunk of the change log. A Sync stream that resumes takes
/// the chunks it needs by reference and reads them after the lock is
/// released; appending copies only a chunk someone still holds.
const LOG_CHUNK: usize = 1024;
/// Sync streams one agent may hold open. An agent needs one; a second
/// covers a reconnect while the server has not yet noticed the old
/// connection died. A newer stream displaces the oldest.
pub const MAX_SYNC_STREAMS_PER_AGENT: usize = 2;

/// What a Sync stream is told.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    /// An entry was created or changed (and is authorized for the agent).
    Upsert(Arc<RegistrationEntry>),
    /// An entry is no longer authorized for the agent, as of this revision.
    Removed(EntryId, u64),
    /// The agent's alias membership changed: send the full set again.
    Resync,
    /// The agent was banned or evicted.
    Revoked(&'static str),
    /// The agent's SVID was replaced (renewal or re-attestation): streams
    /// opened with the old one end.
    Superseded,
    /// The agent opened more Sync streams than it may hold: this, its
    /// oldest, ends.
    Displaced,
}

/// A remembered change: its revision, the entry, and the parents involved
/// (before and after), so a resuming agent learns only of its own.
#[derive(Clone)]
struct LoggedChange {
    revision: u64,
    id: EntryId,
    parents: [Option<SpiffeId>; 2],
    alias: bool,
}

/// The initial message of a Sync stream.
#[derive(Debug, Clone)]
pub struct SyncStart {
    /// Whether `entries` is the full set (otherwise only changes).
    pub full: bool,
    pub entries: Vec<Arc<RegistrationEntry>>,
    pub removed: Vec<EntryId>,
    pub revision: u64,
}

struct Subscriber {
    id: u64,
    tx: mpsc::Sender<AgentEvent>,
}

/// The entries under one parent.
type Siblings = BTreeMap<EntryId, Arc<RegistrationEntry>>;

/// What a Sync stream starts from, taken under the lock (references only)
/// and turned into a [`SyncStart`] after it is released.
struct AgentView {
    /// The entry sets of the agent and of its node aliases.
    parents: Vec<Arc<Siblings>>,
    /// The agent and its node aliases.
    relevant: BTreeSet<SpiffeId>,
    revision: u64,
    log_floor: u64,
    /// When the agent's alias membership last changed.
    membership_changed: Option<u64>,
    /// The log chunks holding changes after the revision asked for.
    changes: Vec<Arc<Vec<LoggedChange>>>,
}

/// Entries in `parents` that are not expired at `now`, by id.
fn authorized_in(parents: &[Arc<Siblings>], now: SystemTime) -> Vec<Arc<RegistrationEntry>> {
    let mut out: Vec<_> = parents
        .iter()
        .flat_map(|set| set.values())
        .filter(|e| !e.is_expired(now))
        .cloned()
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out.dedup_by(|a, b| a.id == b.id);
    out
}

#[derive(Default)]
struct State {
    revision: u64,
    entries: HashMap<EntryId, Arc<RegistrationEntry>>,
    /// Entries by parent, each set shared with the Sync streams being
    /// started (copied on write only while one holds it).
    by_parent: HashMap<SpiffeId, Arc<Siblings>>,
    /// Node alias entries (parented to the server).
    aliases: HashMap<EntryId, Arc<RegistrationEntry>>,
    /// Entries with `admin = true`: few, looked up on every remote admin call.
    admins: HashMap<EntryId, Arc<RegistrationEntry>>,
    agents: HashMap<AgentId, AgentRecord>,
    agent_aliases: HashMap<AgentId, BTreeSet<SpiffeId>>,
    alias_members: HashMap<SpiffeId, BTreeSet<AgentId>>,
    subscribers: HashMap<AgentId, Vec<Subscriber>>,
    next_subscriber: u64,
    /// Recent changes, oldest first, in chunks of at most [`LOG_CHUNK`].
    log: VecDeque<Arc<Vec<LoggedChange>>>,
    /// How many changes `log` holds.
    log_len: usize,
    /// Revision at which each agent's alias membership last changed.
    membership_changed: HashMap<AgentId, u64>,
    /// Revision before the oldest change in `log`.
    log_floor: u64,
}

/// See the module documentation.
pub struct Registry {
    store: Arc<dyn Datastore>,
    /// The server's SPIFFE ID: entries under it are node aliases.
    server_spiffe_id: SpiffeId,
    state: Mutex<State>,
    catch_up: tokio::sync::Mutex<()>,
    listeners: std::sync::RwLock<Vec<Arc<dyn ChangeListener>>>,
    /// Full reloads because the position fell below the change floor.
    reloads: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("server_spiffe_id", &self.server_spiffe_id)
            .finish_non_exhaustive()
    }
}

impl State {
    fn is_alias(&self, e: &RegistrationEntry, server_id: &SpiffeId) -> bool {
        e.parent_id == *server_id
    }

    /// Whether entries under `parent` may grant an admin role: `parent` is
    /// the server, an agent that is present and not banned, or a node alias
    /// with at least one such agent. An admin SVID thus stops working when
    /// the node it was issued for is banned or evicted.
    fn parent_may_grant_admin(&self, parent: &SpiffeId, server_id: &SpiffeId) -> bool {
        let good = |id: &AgentId| self.agents.get(id).is_some_and(|a| !a.banned);
        parent == server_id
            || AgentId::try_from(parent.clone()).is_ok_and(|a| good(&a))
            || self
                .alias_members
                .get(parent)
                .is_some_and(|members| members.iter().any(good))
    }

    /// Agents whose authorization depends on entries under `parent`.
    fn agents_under(&self, parent: &SpiffeId) -> BTreeSet<AgentId> {
        let mut out = self.alias_members.get(parent).cloned().unwrap_or_default();
        if let Ok(agent) = AgentId::try_from(parent.clone()) {
            out.insert(agent);
        }
        out
    }

    fn aliases_for(&self, agent: &AgentRecord) -> BTreeSet<SpiffeId> {
        self.aliases
            .values()
            .filter(|a| a.selectors.is_subset(&agent.selectors))
            .map(|a| a.spiffe_id.clone())
            .collect()
    }

    /// Recomputes one agent's alias set; returns whether it changed.
    fn refresh_agent_aliases(&mut self, id: &AgentId) -> bool {
        let new = self
            .agents
            .get(id)
            .map(|a| self.aliases_for(a))
            .unwrap_or_default();
        let old = self.agent_aliases.remove(id).unwrap_or_default();
        for alias in old.difference(&new) {
            if let Some(m) = self.alias_members.get_mut(alias) {
                m.remove(id);
                if m.is_empty() {
                    self.alias_members.remove(alias);
                }
            }
        }
        for alias in new.difference(&old) {
            self.alias_members
                .entry(alias.clone())
                .or_default()
                .insert(id.clone());
        }
        let changed = old != new;
        if changed {
            self.membership_changed.insert(id.clone(), self.revision);
        }
        if !new.is_empty() {
            self.agent_aliases.insert(id.clone(), new);
        }
        changed
    }

    /// Stores `record` as is and tells the agent's streams what changed.
    fn set_agent(&mut self, record: AgentRecord) {
        let id = record.id.clone();
        let banned = record.banned;
        self.agents.insert(id.clone(), record);
        if self.refresh_agent_aliases(&id) {
            self.send(&id, &AgentEvent::Resync);
        }
        if banned {
            self.send(&id, &AgentEvent::Revoked("agent banned"));
        }
    }

    /// Forgets agent `id` and ends its streams.
    fn drop_agent(&mut self, id: &AgentId) {
        self.agents.remove(id);
        self.refresh_agent_aliases(id);
        self.send(id, &AgentEvent::Revoked("agent evicted"));
        self.subscribers.remove(id);
    }

    fn send(&mut self, agent: &AgentId, event: &AgentEvent) {
        let Some(subs) = self.subscribers.get_mut(agent) else {
            return;
        };
        // A subscriber whose buffer is full is cut off; its stream ends and
        // the agent reconnects and resumes. Nobody else waits for it.
        subs.retain(|s| s.tx.try_send(event.clone()).is_ok());
        if subs.is_empty() {
            self.subscribers.remove(agent);
        }
    }

    fn index(&mut self, e: &Arc<RegistrationEntry>, server_id: &SpiffeId) {
        if self.is_alias(e, server_id) {
            self.aliases.insert(e.id.clone(), e.clone());
        }
        if e.admin {
            self.admins.insert(e.id.clone(), e.clone());
        }
        Arc::make_mut(self.by_parent.entry(e.parent_id.clone()).or_default())
            .insert(e.id.clone(), e.clone());
        self.entries.insert(e.id.clone(), e.clone());
    }

    fn unindex(&mut self, e: &RegistrationEntry) {
        self.aliases.remove(&e.id);
        self.admins.remove(&e.id);
        if let Some(set) = self.by_parent.get_mut(&e.parent_id) {
            Arc::make_mut(set).remove(&e.id);
            if set.is_empty() {
                self.by_parent.remove(&e.parent_id);
            }
        }
        self.entries.remove(&e.id);
    }

    /// Appends `logged` to the change log, dropping the oldest changes
    /// beyond [`CHANGE_LOG_LEN`].
    fn push_log(&mut self, logged: LoggedChange) {
        match self.log.back_mut() {
            Some(chunk) if chunk.len() < LOG_CHUNK => Arc::make_mut(chunk).push(logged),
            _ => self.log.push_back(Arc::new(vec![logged])),
        }
        self.log_len += 1;
        while self.log_len > CHANGE_LOG_LEN {
            let Some(oldest) = self.log.pop_front() else {
                break;
            };
            self.log_len -= oldest.len();
            if let Some(c) = oldest.last() {
                self.log_floor = c.revision;
            }
        }
    }

    /// Forgets the change log: it now starts after `revision`.
    fn reset_log(&mut self, revision: u64) {
        self.log.clear();
        self.log_len = 0;
        self.log_floor = revision;
    }

    /// Applies one entry change made at `revision`.
    fn apply_entry(
        &mut self,
        revision: u64,
        kind: ChangeKind,
        entry: RegistrationEntry,
        server_id: &SpiffeId,
    ) {
        self.revision = self.revision.max(revision);
        let id = entry.id.clone();
        let old = self.entries.get(&id).cloned();
        let alias = self.is_alias(&entry, server_id)
            || old.as_ref().is_some_and(|e| self.is_alias(e, server_id));
        let logged = LoggedChange {
            revision,
            id: id.clone(),
            parents: [
                old.as_ref().map(|e| e.parent_id.clone()),
                Some(entry.parent_id.clone()),
            ],
            alias,
        };
        self.push_log(logged);
        let before = old
            .as_ref()
            .map(|e| self.agents_under(&e.parent_id))
            .unwrap_or_default();
        if let Some(old) = &old {
            self.unindex(old);
        }
        let new = (kind != ChangeKind::Deleted).then(|| Arc::new(entry));
        if let Some(new) = &new {
            self.index(new, server_id);
        }
        let alias_touched = old.as_ref().is_some_and(|e| self.is_alias(e, server_id))
            || new.as_ref().is_some_and(|e| self.is_alias(e, server_id));
        if alias_touched {
            let agents: Vec<AgentId> = self.agents.keys().cloned().collect();
            for agent in agents {
                if self.refresh_agent_aliases(&agent) {
                    self.send(&agent, &AgentEvent::Resync);
                }
            }
        }
        let after = new
            .as_ref()
            .map(|e| self.agents_under(&e.parent_id))
            .unwrap_or_default();
        for agent in before.difference(&after) {
            self.send(agent, &AgentEvent::Removed(id.clone(), revision));
        }
        if let Some(new) = &new {
            for agent in &after {
                self.send(agent, &AgentEvent::Upsert(new.clone()));
            }
        }
    }

    /// The agent and its node aliases.
    fn relevant(&self, agent: &AgentId) -> BTreeSet<SpiffeId> {
        std::iter::once(agent.as_spiffe_id())
            .chain(self.agent_aliases.get(agent).into_iter().flatten())
            .cloned()
            .collect()
    }

    /// The entry sets `agent` is authorized from, by reference: cheap
    /// under the lock, read after it.
    fn parents_of(&self, relevant: &BTreeSet<SpiffeId>) -> Vec<Arc<Siblings>> {
        relevant
            .iter()
            .filter_map(|p| self.by_parent.get(p).cloned())
            .collect()
    }

    /// What a Sync stream of `agent` resuming after `since` starts from.
    fn view(&self, agent: &AgentId, since: u64) -> AgentView {
        let relevant = self.relevant(agent);
        let changes = if since > 0 && since >= self.log_floor {
            // Chunks are in revision order: skip those wholly at or before
            // `since` without reading them.
            let first = self
                .log
                .partition_point(|c| c.last().is_some_and(|l| l.revision <= since));
            self.log.range(first..).cloned().collect()
        } else {
            Vec::new()
        };
        AgentView {
            parents: self.parents_of(&relevant),
            relevant,
            revision: self.revision,
            log_floor: self.log_floor,
            membership_changed: self.membership_changed.get(agent).copied(),
            changes,
        }
    }

    fn is_authorized(&self, agent: &AgentId, e: &RegistrationEntry, now: SystemTime) -> bool {
        !e.is_expired(now)
            && (e.parent_id == *agent.as_spiffe_id()
                || self
                    .agent_aliases
                    .get(agent)
                    .is_some_and(|a| a.contains(&e.parent_id)))
    }
}

/// Removes its subscriber from the registry when the Sync stream ends.
pub struct Subscription {
    registry: Arc<Registry>,
    agent: AgentId,
    id: u64,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("agent", &self.agent)
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut state = self.registry.lock();
        if let Some(subs) = state.subscribers.get_mut(&self.agent) {
            subs.retain(|s| s.id != self.id);
            if subs.is_empty() {
                state.subscribers.remove(&self.agent);
            }
        }
    }
}

impl State {
    /// Every entry and agent in `store`, as of the returned state's
    /// revision or later (what is listed after it is applied again by
    /// catch-up, which is idempotent).
    async fn load(
        store: &dyn Datastore,
        server_spiffe_id: &SpiffeId,
    ) -> Result<Self, DatastoreError> {
        // Revision first: anything listed after it is applied again.
        let revision = store.current_revision().await?;
        let entries = store.list_entries(&EntryFilter::default()).await?;
        let agents = store.list_agents().await?;
        let mut state = State {
            revision,
            log_floor: revision,
            ..State::default()
        };
        for e in entries {
            state.index(&Arc::new(e), server_spiffe_id);
        }
        for a in agents {
            let id = a.id.clone();
            state.agents.insert(id.clone(), a);
            state.refresh_agent_aliases(&id);
        }
        Ok(state)
    }

    /// Takes back a saved change history and appends the feed's entry
    /// changes made after it, up to this state's revision (see
    /// [`history`]). A history that does not connect to the feed is left
    /// out.
    async fn restore_history(
        &mut self,
        store: &dyn Datastore,
        saved: history::Saved,
        server_id: &SpiffeId,
    ) -> Result<(), DatastoreError> {
        let upto = self.revision;
        if saved.revision > upto
            || upto - saved.revision > CHANGE_LOG_LEN as u64
            || store.change_floor().await? > saved.revision
        {
            debug!(
                saved = saved.revision,
                revision = upto,
                "saved Sync history does not connect to the change feed; not used"
            );
            return Ok(());
        }
        let mut parents = history::Parents::seed(&saved.changes);
        self.reset_log(saved.floor);
        for c in saved.changes {
            self.push_log(LoggedChange {
                revision: c.revision,
                id: c.id,
                parents: [c.before, c.after],
                alias: c.alias,
            });
        }
        let mut from = saved.revision;
        while from < upto {
            let changes = store.changes(from, CATCH_UP_BATCH).await?;
            let Some(last) = changes.last().map(|c| c.revision) else {
                break;
            };
            for c in changes.iter().filter(|c| c.revision <= upto) {
                let Some((kind, entry)) = c.as_entry() else {
                    continue;
                };
                let before = match kind {
                    ChangeKind::Created => Some(None),
                    ChangeKind::Deleted => Some(Some(entry.parent_id.clone())),
                    ChangeKind::Updated => parents.before(&entry.id),
                };
                let after = (kind != ChangeKind::Deleted).then(|| entry.parent_id.clone());
                parents.set(entry.id.clone(), after);
                let Some(before) = before else {
                    // Who held the entry before is not known: no resuming
                    // from before this change.
                    self.reset_log(c.revision);
                    continue;
                };
                let alias = entry.parent_id == *server_id || before.as_ref() == Some(server_id);
                self.push_log(LoggedChange {
                    revision: c.revision,
                    id: entry.id.clone(),
                    parents: [before, Some(entry.parent_id.clone())],
                    alias,
                });
            }
            from = last;
        }
        debug!(
            floor = self.log_floor,
            changes = self.log_len,
            "Sync history restored"
        );
        Ok(())
    }

    /// Applies one change of the feed (entries and agents; other kinds
    /// only move the revision).
    fn apply(&mut self, change: &Change, server_spiffe_id: &SpiffeId) {
        match &change.changed {
            Changed::Entry { kind, entry } => {
                debug!(entry_id = %entry.id, revision = change.revision, ?kind, "applying entry change");
                self.apply_entry(change.revision, *kind, entry.clone(), server_spiffe_id);
            }
            Changed::Agent { id, record } => {
                debug!(agent_id = %id, revision = change.revision, removed = record.is_none(), "applying agent change");
                self.revision = self.revision.max(change.revision);
                match record {
                    Some(r) => self.set_agent(r.clone()),
                    None => self.drop_agent(id),
                }
            }
            _ => self.revision = self.revision.max(change.revision),
        }
    }
}

impl Registry {
    /// Loads every entry and agent from `store`.
    pub async fn load(
        store: Arc<dyn Datastore>,
        trust_domain: &TrustDomain,
    ) -> Result<Arc<Self>, DatastoreError> {
        Self::load_resumable(store, trust_domain, None).await
    }

    /// [`Registry::load`], taking back the change history saved at
    /// `history` by [`Registry::save_history`] (see [`history`]), so Sync
    /// streams resume across the restart.
    pub async fn load_resumable(
        store: Arc<dyn Datastore>,
        trust_domain: &TrustDomain,
        history: Option<&std::path::Path>,
    ) -> Result<Arc<Self>, DatastoreError> {
        let server_spiffe_id = SpiffeId::server(trust_domain);
        let mut state = State::load(store.as_ref(), &server_spiffe_id).await?;
        if let Some(saved) = history.and_then(history::read) {
            state
                .restore_history(store.as_ref(), saved, &server_spiffe_id)
                .await?;
        }
        let registry = Arc::new(Self {
            store,
            server_spiffe_id,
            state: Mutex::new(state),
            catch_up: tokio::sync::Mutex::new(()),
            listeners: std::sync::RwLock::default(),
            reloads: std::sync::atomic::AtomicU64::new(0),
        });
        registry.catch_up().await?;
        Ok(registry)
    }

    /// Saves the change history to `path` (see [`history`]), for the next
    /// start of the server to take back.
    pub fn save_history(&self, path: &std::path::Path) -> std::io::Result<()> {
        let saved = {
            let state = self.lock();
            let changes = state
                .log
                .iter()
                .flat_map(|chunk| chunk.iter())
                .map(|c| history::SavedChange {
                    revision: c.revision,
                    id: c.id.clone(),
                    before: c.parents[0].clone(),
                    after: c.parents[1].clone(),
                    alias: c.alias,
                })
                .collect();
            history::saved(state.log_floor, state.revision, changes)
        };
        history::write(path, &saved)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a listener: it gets every change applied from now on.
    pub fn add_listener(&self, listener: Arc<dyn ChangeListener>) {
        self.listeners
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(listener);
    }

    fn listeners(&self) -> Vec<Arc<dyn ChangeListener>> {
        self.listeners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many full reloads a pruned position has caused.
    pub fn full_reloads(&self) -> u64 {
        self.reloads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Applies every datastore change not yet seen, in revision order, and
    /// passes each on to the listeners. A handler that wrote calls this
    /// before replying, so its own change is applied.
    pub async fn catch_up(&self) -> Result<(), DatastoreError> {
        let _one_at_a_time = self.catch_up.lock().await;
        loop {
            let from = self.lock().revision;
            let changes = self.store.changes(from, CATCH_UP_BATCH).await?;
            let contiguous = changes.first().is_some_and(|c| c.revision == from + 1);
            if !contiguous && from < self.store.change_floor().await? {
                self.reload().await?;
                continue;
            }
            if changes.is_empty() {
                return Ok(());
            }
            {
                let mut state = self.lock();
                for c in &changes {
                    state.apply(c, &self.server_spiffe_id);
                }
            }
            for l in self.listeners() {
                for c in &changes {
                    l.changed(c).await;
                }
            }
        }
    }

    /// The position fell below the change floor: the changes in between
    /// are gone, so everything is read again. Open Sync streams are told
    /// to take the full set (or end, for agents now gone or banned).
    async fn reload(&self) -> Result<(), DatastoreError> {
        let fresh = State::load(self.store.as_ref(), &self.server_spiffe_id).await?;
        let count = self
            .reloads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        {
            let mut state = self.lock();
            tracing::warn!(
                position = state.revision,
                revision = fresh.revision,
                full_reloads = count,
                "registry fell behind the pruned change feed; reloaded every entry and agent"
            );
            let subscribers = std::mem::take(&mut state.subscribers);
            let next_subscriber = state.next_subscriber;
            *state = State {
                subscribers,
                next_subscriber,
                ..fresh
            };
            let agents: Vec<AgentId> = state.subscribers.keys().cloned().collect();
            for id in agents {
                match state.agents.get(&id).map(|a| a.banned) {
                    None => {
                        state.send(&id, &AgentEvent::Revoked("agent evicted"));
                        state.subscribers.remove(&id);
                    }
                    Some(true) => state.send(&id, &AgentEvent::Revoked("agent banned")),
                    Some(false) => state.send(&id, &AgentEvent::Resync),
                }
            }
        }
        for l in self.listeners() {
            l.reload().await;
        }
        Ok(())
    }

    /// Follows the change feed until `stop` turns true: catches up on
    /// every change hint and at least every `poll_interval` (a safety net
    /// for a missed hint). The one loop per process reading the feed.
    pub async fn follow(
        self: Arc<Self>,
        poll_interval: std::time::Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut hint = self.store.change_hint();
        let mut hint_open = true;
        loop {
            if let Err(e) = self.catch_up().await {
                tracing::warn!(error = %e, "registry catch-up failed; retrying at the next hint or poll");
            }
            tokio::select! {
                _ = stop.changed() => return,
                changed = hint.changed(), if hint_open => hint_open = changed.is_ok(),
                () = tokio::time::sleep(poll_interval) => {}
            }
            if *stop.borrow() {
                return;
            }
        }
    }

    /// Catches up (see [`Registry::catch_up`]) and returns the agent's
    /// record as it is now: what a handler that wrote it replies from.
    pub async fn caught_up_agent(
        &self,
        id: &AgentId,
    ) -> Result<Option<AgentRecord>, DatastoreError> {
        self.catch_up().await?;
        Ok(self.agent(id))
    }

    /// The last applied revision.
    pub fn revision(&self) -> u64 {
        self.lock().revision
    }

    /// Entries `agent` is authorized for at `now`.
    pub fn authorized_entries(
        &self,
        agent: &AgentId,
        now: SystemTime,
    ) -> Vec<Arc<RegistrationEntry>> {
        self.full_set(agent, now).entries
    }

    /// The full set of entries `agent` is authorized for at `now`, and the
    /// revision it is as of (built after the lock is released).
    pub fn full_set(&self, agent: &AgentId, now: SystemTime) -> SyncStart {
        let (parents, revision) = {
            let state = self.lock();
            (state.parents_of(&state.relevant(agent)), state.revision)
        };
        SyncStart {
            full: true,
            entries: authorized_in(&parents, now),
            removed: Vec::new(),
            revision,
        }
    }

    /// The entry `id`, if `agent` is authorized for it at `now`.
    pub fn authorized_entry(
        &self,
        agent: &AgentId,
        id: &EntryId,
        now: SystemTime,
    ) -> Option<Arc<RegistrationEntry>> {
        let state = self.lock();
        state
            .entries
            .get(id)
            .filter(|e| state.is_authorized(agent, e, now))
            .cloned()
    }

    /// The strongest admin role that entries with `admin = true` for `id`
    /// grant at `now` (expired entries grant nothing).
    pub fn admin_role(&self, id: &SpiffeId, now: SystemTime) -> Option<AdminRole> {
        let state = self.lock();
        state
            .admins
            .values()
            .filter(|e| e.spiffe_id == *id && !e.is_expired(now))
            .filter(|e| state.parent_may_grant_admin(&e.parent_id, &self.server_spiffe_id))
            .filter_map(|e| e.admin_access())
            .max()
    }

    /// One agent's record.
    pub fn agent(&self, id: &AgentId) -> Option<AgentRecord> {
        self.lock().agents.get(id).cloned()
    }

    /// Number of agents known.
    pub fn agent_count(&self) -> usize {
        self.lock().agents.len()
    }

    /// Ends every open stream of `agent`: its SVID was replaced.
    pub fn supersede(&self, agent: &AgentId) {
        let mut state = self.lock();
        state.send(agent, &AgentEvent::Superseded);
        state.subscribers.remove(agent);
    }

    /// Starts a Sync stream for `agent`: the initial message and a receiver
    /// for later events, registered atomically so nothing falls between.
    /// `since` > 0 asks for the changes after that revision; when the
    /// server no longer remembers that far back the full set is sent.
    pub fn subscribe(
        self: &Arc<Self>,
        agent: &AgentId,
        since: u64,
        now: SystemTime,
    ) -> (SyncStart, mpsc::Receiver<AgentEvent>, Subscription) {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let (view, id) = {
            let mut state = self.lock();
            let view = state.view(agent, since);
            let id = state.next_subscriber;
            state.next_subscriber += 1;
            let subs = state.subscribers.entry(agent.clone()).or_default();
            while subs.len() >= MAX_SYNC_STREAMS_PER_AGENT {
                let oldest = subs.remove(0);
                // If its buffer is full, dropping the sender ends it anyway.
                let _ = oldest.tx.try_send(AgentEvent::Displaced);
            }
            subs.push(Subscriber { id, tx });
            (view, id)
        };
        // The lock is released: the snapshot and the change scan read only
        // what `view` holds, as of `view.revision`; later changes reach
        // the stream as events.
        let authorized = authorized_in(&view.parents, now);
        let since_changes = || {
            view.changes
                .iter()
                .flat_map(|chunk| chunk.iter())
                .filter(move |c| c.revision > since)
        };
        // Resuming needs the history, and a stable alias membership since then.
        let can_resume = since > 0
            && since >= view.log_floor
            && since <= view.revision
            && view.membership_changed.is_none_or(|rev| rev <= since)
            && !since_changes().any(|c| c.alias);
        let start = if can_resume {
            let authorized_ids: BTreeSet<&EntryId> = authorized.iter().map(|e| &e.id).collect();
            let removed: BTreeSet<EntryId> = since_changes()
                .filter(|c| {
                    c.parents
                        .iter()
                        .flatten()
                        .any(|p| view.relevant.contains(p))
                })
                .filter(|c| !authorized_ids.contains(&c.id))
                .map(|c| c.id.clone())
                .collect();
            let entries = authorized
                .iter()
                .filter(|e| e.revision > since)
                .cloned()
                .collect();
            SyncStart {
                full: false,
                entries,
                removed: removed.into_iter().collect(),
                revision: view.revision,
            }
        } else {
            SyncStart {
                full: true,
                entries: authorized,
                removed: Vec::new(),
                revision: view.revision,
            }
        };
        (
            start,
            rx,
            Subscription {
                registry: self.clone(),
                agent: agent.clone(),
                id,
            },
        )
    }
}

pub mod history;

#[cfg(test)]
mod tests;
