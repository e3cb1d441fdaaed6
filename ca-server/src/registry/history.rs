//! The registry's recent entry changes, kept across a restart so agents
//! resume their Sync streams from the revision they had instead of taking
//! a full snapshot.
//!
//! A resuming agent learns only of changes that touched its own entries,
//! which needs each change's parent before and after. The datastore's
//! change feed carries every entry after its change (and a deleted one as
//! it was), but not an updated entry's previous parent. So the server
//! saves its in-memory history ([`Saved`]) to a file when it stops, and on
//! the next start takes it back and appends the feed's changes made since:
//! creations and deletions are complete, and so is an update of an entry
//! seen earlier in that history; an update whose previous parent is not
//! known ends the history there (agents resuming from before it take a
//! full snapshot, as before). Without a usable file the history starts at
//! the revision loaded, as it always did.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write as _};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sigil_identity::{EntryId, SpiffeId};

/// Format version of the saved file.
const VERSION: u32 = 1;

/// The saved history.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Saved {
    pub version: u32,
    /// Revision before the oldest change in `changes`.
    pub floor: u64,
    /// The registry's revision when it was saved.
    pub revision: u64,
    pub changes: Vec<SavedChange>,
}

/// One saved entry change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct SavedChange {
    pub revision: u64,
    pub id: EntryId,
    /// The entry's parent before the change (none for a creation).
    pub before: Option<SpiffeId>,
    /// The entry's parent after it.
    pub after: Option<SpiffeId>,
    /// Whether a node alias was involved.
    pub alias: bool,
}

/// Writes `saved` to `path` atomically (a temporary file, synced, then
/// renamed over it).
pub(super) fn write(path: &Path, saved: &Saved) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let file = std::fs::File::create(&tmp)?;
    let mut out = BufWriter::new(file);
    serde_json::to_writer(&mut out, saved).map_err(std::io::Error::other)?;
    out.flush()?;
    out.get_ref().sync_all()?;
    drop(out);
    std::fs::rename(&tmp, path)
}

/// Reads the history saved at `path`: `None` when there is none, or it is
/// unreadable or of another format version (the history then starts
/// afresh; nothing else depends on it).
pub(super) fn read(path: &Path) -> Option<Saved> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the saved Sync history; agents resuming from before this start take a full snapshot");
            return None;
        }
    };
    match serde_json::from_reader::<_, Saved>(BufReader::new(file)) {
        Ok(s) if s.version == VERSION && s.floor <= s.revision => Some(s),
        Ok(s) => {
            tracing::warn!(path = %path.display(), version = s.version, "saved Sync history of another format; starting afresh");
            None
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "saved Sync history is corrupt; starting afresh");
            None
        }
    }
}

/// A new saved history at `revision`.
pub(super) fn saved(floor: u64, revision: u64, changes: Vec<SavedChange>) -> Saved {
    Saved {
        version: VERSION,
        floor,
        revision,
        changes,
    }
}

/// Tracks each entry's parent through the changes appended after a saved
/// history, to know an update's previous parent.
#[derive(Debug, Default)]
pub(super) struct Parents(HashMap<EntryId, Option<SpiffeId>>);

impl Parents {
    /// Remembers the parents `changes` leave their entries with.
    pub fn seed(changes: &[SavedChange]) -> Self {
        let mut p = Self::default();
        for c in changes {
            p.0.insert(c.id.clone(), c.after.clone());
        }
        p
    }

    /// The parent `id` had before a change, if known: `Some(None)` means
    /// it did not exist.
    pub fn before(&self, id: &EntryId) -> Option<Option<SpiffeId>> {
        self.0.get(id).cloned()
    }

    /// Records `id`'s parent after a change.
    pub fn set(&mut self, id: EntryId, after: Option<SpiffeId>) {
        self.0.insert(id, after);
    }
}
