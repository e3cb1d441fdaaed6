//! The server's in-memory view of entries and agents.
//!
//! It answers "which entries is this agent authorized for" without touching
//! the datastore, and pushes every change to the Sync streams of exactly the
//! agents it affects. It follows the datastore's change feed
//! ([`Registry::catch_up`]), so a change made through any path — this
//! process's admin API, or later another replica — arrives the same way.
//!
//! An agent is authorized for an entry when the entry's parent is the agent
//! itself, or a node alias whose selectors are all among the agent's node
//! selectors. A workload entry change costs work proportional to the agents
//! under its parent; a node alias change re-evaluates alias membership of
//! every agent.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use sigil_identity::{EntryId, RegistrationEntry, SpiffeId, TrustDomain};
use tokio::sync::mpsc;
use tracing::debug;

use crate::datastore::{
    AgentRecord, ChangeKind, Datastore, DatastoreError, EntryChange, EntryFilter,
};

/// How many recent changes are remembered for resuming Sync streams.
const CHANGE_LOG_LEN: usize = 100_000;
/// Events buffered per Sync stream before it is cut off as too slow.
const SUBSCRIBER_BUFFER: usize = 1024;

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
}

/// A remembered change: its revision, the entry, and the parents involved
/// (before and after), so a resuming agent learns only of its own.
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

#[derive(Default)]
struct State {
    revision: u64,
    entries: HashMap<EntryId, Arc<RegistrationEntry>>,
    by_parent: HashMap<SpiffeId, BTreeSet<EntryId>>,
    /// Node alias entries (parented to the server).
    aliases: HashMap<EntryId, Arc<RegistrationEntry>>,
    agents: HashMap<SpiffeId, AgentRecord>,
    agent_aliases: HashMap<SpiffeId, BTreeSet<SpiffeId>>,
    alias_members: HashMap<SpiffeId, BTreeSet<SpiffeId>>,
    subscribers: HashMap<SpiffeId, Vec<Subscriber>>,
    next_subscriber: u64,
    /// Recent changes, oldest first.
    log: VecDeque<LoggedChange>,
    /// Revision at which each agent's alias membership last changed.
    membership_changed: HashMap<SpiffeId, u64>,
    /// Revision before the oldest change in `log`.
    log_floor: u64,
}

/// See the module documentation.
pub struct Registry {
    store: Arc<dyn Datastore>,
    server_id: SpiffeId,
    state: Mutex<State>,
    catch_up: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("server_id", &self.server_id)
            .finish_non_exhaustive()
    }
}

impl State {
    fn is_alias(&self, e: &RegistrationEntry, server_id: &SpiffeId) -> bool {
        e.parent_id == *server_id
    }

    /// Agents whose authorization depends on entries under `parent`.
    fn agents_under(&self, parent: &SpiffeId) -> BTreeSet<SpiffeId> {
        let mut out = self.alias_members.get(parent).cloned().unwrap_or_default();
        if parent.is_agent() {
            out.insert(parent.clone());
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
    fn refresh_agent_aliases(&mut self, id: &SpiffeId) -> bool {
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

    fn send(&mut self, agent: &SpiffeId, event: &AgentEvent) {
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
        self.by_parent
            .entry(e.parent_id.clone())
            .or_default()
            .insert(e.id.clone());
        self.entries.insert(e.id.clone(), e.clone());
    }

    fn unindex(&mut self, e: &RegistrationEntry) {
        self.aliases.remove(&e.id);
        if let Some(set) = self.by_parent.get_mut(&e.parent_id) {
            set.remove(&e.id);
            if set.is_empty() {
                self.by_parent.remove(&e.parent_id);
            }
        }
        self.entries.remove(&e.id);
    }

    fn apply(&mut self, change: EntryChange, server_id: &SpiffeId) {
        self.revision = self.revision.max(change.revision);
        let id = change.entry.id.clone();
        let old = self.entries.get(&id).cloned();
        let alias = self.is_alias(&change.entry, server_id)
            || old.as_ref().is_some_and(|e| self.is_alias(e, server_id));
        self.log.push_back(LoggedChange {
            revision: change.revision,
            id: id.clone(),
            parents: [
                old.as_ref().map(|e| e.parent_id.clone()),
                Some(change.entry.parent_id.clone()),
            ],
            alias,
        });
        while self.log.len() > CHANGE_LOG_LEN {
            if let Some(c) = self.log.pop_front() {
                self.log_floor = c.revision;
            }
        }
        let before = old
            .as_ref()
            .map(|e| self.agents_under(&e.parent_id))
            .unwrap_or_default();
        if let Some(old) = &old {
            self.unindex(old);
        }
        let new = (change.kind != ChangeKind::Deleted).then(|| Arc::new(change.entry));
        if let Some(new) = &new {
            self.index(new, server_id);
        }
        let alias_touched = old.as_ref().is_some_and(|e| self.is_alias(e, server_id))
            || new.as_ref().is_some_and(|e| self.is_alias(e, server_id));
        if alias_touched {
            let agents: Vec<SpiffeId> = self.agents.keys().cloned().collect();
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
            self.send(agent, &AgentEvent::Removed(id.clone(), change.revision));
        }
        if let Some(new) = &new {
            for agent in &after {
                self.send(agent, &AgentEvent::Upsert(new.clone()));
            }
        }
    }

    fn authorized(&self, agent: &SpiffeId, now: SystemTime) -> Vec<Arc<RegistrationEntry>> {
        let mut parents = vec![agent];
        if let Some(aliases) = self.agent_aliases.get(agent) {
            parents.extend(aliases.iter());
        }
        let mut out: Vec<_> = parents
            .into_iter()
            .filter_map(|p| self.by_parent.get(p))
            .flat_map(|ids| ids.iter().filter_map(|id| self.entries.get(id)))
            .filter(|e| !e.is_expired(now))
            .cloned()
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out.dedup_by(|a, b| a.id == b.id);
        out
    }

    fn is_authorized(&self, agent: &SpiffeId, e: &RegistrationEntry, now: SystemTime) -> bool {
        !e.is_expired(now)
            && (e.parent_id == *agent
                || self
                    .agent_aliases
                    .get(agent)
                    .is_some_and(|a| a.contains(&e.parent_id)))
    }
}

/// Removes its subscriber from the registry when the Sync stream ends.
pub struct Subscription {
    registry: Arc<Registry>,
    agent: SpiffeId,
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

impl Registry {
    /// Loads every entry and agent from `store`.
    pub async fn load(
        store: Arc<dyn Datastore>,
        trust_domain: &TrustDomain,
    ) -> Result<Arc<Self>, DatastoreError> {
        // Revision first: anything listed after it is re-applied by catch_up,
        // which is idempotent.
        let revision = store.current_revision().await?;
        let entries = store.list_entries(&EntryFilter::default()).await?;
        let agents = store.list_agents().await?;
        let server_id = SpiffeId::server(trust_domain);
        let mut state = State {
            revision,
            log_floor: revision,
            ..State::default()
        };
        for e in entries {
            state.index(&Arc::new(e), &server_id);
        }
        for a in agents {
            let id = a.id.clone();
            state.agents.insert(id.clone(), a);
            state.refresh_agent_aliases(&id);
        }
        let registry = Arc::new(Self {
            store,
            server_id,
            state: Mutex::new(state),
            catch_up: tokio::sync::Mutex::new(()),
        });
        registry.catch_up().await?;
        Ok(registry)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies every datastore change not yet seen, in revision order.
    pub async fn catch_up(&self) -> Result<(), DatastoreError> {
        let _one_at_a_time = self.catch_up.lock().await;
        loop {
            let from = self.lock().revision;
            let changes = self.store.entry_changes(from, 1000).await?;
            if changes.is_empty() {
                return Ok(());
            }
            let mut state = self.lock();
            for c in changes {
                debug!(entry_id = %c.entry.id, revision = c.revision, kind = ?c.kind, "applying entry change");
                state.apply(c, &self.server_id);
            }
        }
    }

    /// The last applied revision.
    pub fn revision(&self) -> u64 {
        self.lock().revision
    }

    /// Entries `agent` is authorized for at `now`.
    pub fn authorized_entries(
        &self,
        agent: &SpiffeId,
        now: SystemTime,
    ) -> Vec<Arc<RegistrationEntry>> {
        self.lock().authorized(agent, now)
    }

    /// The entry `id`, if `agent` is authorized for it at `now`.
    pub fn authorized_entry(
        &self,
        agent: &SpiffeId,
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

    /// One agent's record.
    pub fn agent(&self, id: &SpiffeId) -> Option<AgentRecord> {
        self.lock().agents.get(id).cloned()
    }

    /// Number of agents known.
    pub fn agent_count(&self) -> usize {
        self.lock().agents.len()
    }

    /// Records a new or changed agent (already written to the datastore).
    /// As in the datastore, a ban is sticky until the agent is removed.
    pub fn put_agent(&self, mut record: AgentRecord) {
        let mut state = self.lock();
        let id = record.id.clone();
        record.banned |= state.agents.get(&id).is_some_and(|old| old.banned);
        let banned = record.banned;
        state.agents.insert(id.clone(), record);
        if state.refresh_agent_aliases(&id) {
            state.send(&id, &AgentEvent::Resync);
        }
        if banned {
            state.send(&id, &AgentEvent::Revoked("agent banned"));
        }
    }

    /// Ends every open stream of `agent`: its SVID was replaced.
    pub fn supersede(&self, agent: &SpiffeId) {
        let mut state = self.lock();
        state.send(agent, &AgentEvent::Superseded);
        state.subscribers.remove(agent);
    }

    /// Forgets an evicted agent (already removed from the datastore).
    pub fn remove_agent(&self, id: &SpiffeId) {
        let mut state = self.lock();
        state.agents.remove(id);
        state.refresh_agent_aliases(id);
        state.send(id, &AgentEvent::Revoked("agent evicted"));
        state.subscribers.remove(id);
    }

    /// Starts a Sync stream for `agent`: the initial message and a receiver
    /// for later events, registered atomically so nothing falls between.
    /// `since` > 0 asks for the changes after that revision; when the
    /// server no longer remembers that far back the full set is sent.
    pub fn subscribe(
        self: &Arc<Self>,
        agent: &SpiffeId,
        since: u64,
        now: SystemTime,
    ) -> (SyncStart, mpsc::Receiver<AgentEvent>, Subscription) {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let mut state = self.lock();
        let authorized = state.authorized(agent, now);
        let relevant: BTreeSet<&SpiffeId> = std::iter::once(agent)
            .chain(state.agent_aliases.get(agent).into_iter().flatten())
            .collect();
        let since_changes = || state.log.iter().filter(move |c| c.revision > since);
        // Resuming needs the history, and a stable alias membership since then.
        let can_resume = since > 0
            && since >= state.log_floor
            && since <= state.revision
            && state
                .membership_changed
                .get(agent)
                .is_none_or(|rev| *rev <= since)
            && !since_changes().any(|c| c.alias);
        let start = if can_resume {
            let authorized_ids: BTreeSet<&EntryId> = authorized.iter().map(|e| &e.id).collect();
            let removed: BTreeSet<EntryId> = since_changes()
                .filter(|c| c.parents.iter().flatten().any(|p| relevant.contains(p)))
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
                revision: state.revision,
            }
        } else {
            SyncStart {
                full: true,
                entries: authorized,
                removed: Vec::new(),
                revision: state.revision,
            }
        };
        let id = state.next_subscriber;
        state.next_subscriber += 1;
        state
            .subscribers
            .entry(agent.clone())
            .or_default()
            .push(Subscriber { id, tx });
        drop(state);
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

#[cfg(test)]
mod tests;
