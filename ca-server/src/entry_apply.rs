//! `ApplyEntries`: makes one owner's registration entries match a
//! registration file in one all-or-nothing datastore step.
//!
//! Wanted entries are matched to stored ones by (owner, name). A wanted
//! entry with no match takes over ("adopts") an entry made by hand with the
//! same SPIFFE ID, parent and selectors, so an installation can move to
//! files; otherwise it is created. The owner's stored entries the file no
//! longer lists are deleted with `prune` and reported as orphans without.
//! Entries of other owners are never touched. The admin API serves the
//! call; this module only validates and plans.

use std::collections::{HashMap, HashSet};

use sigil_identity::RegistrationEntry;
use sigil_identity::entry::is_valid_name;
use sigil_proto::admin as pb;
use tonic::Status;

use crate::datastore::entry_key;
use crate::registration_file::diff;

/// One planned change, before it is made.
pub(crate) struct Planned {
    pub(crate) kind: &'static str,
    pub(crate) entry: RegistrationEntry,
    pub(crate) fields: Vec<(&'static str, String, String)>,
}

impl Planned {
    /// The change on the wire; a creation not made has no id yet.
    pub(crate) fn message(&self, applied: bool) -> pb::PlannedChange {
        let id = if self.kind == "create" && !applied {
            String::new()
        } else {
            self.entry.id.to_string()
        };
        pb::PlannedChange {
            kind: self.kind.to_owned(),
            name: self.entry.name.clone(),
            id,
            spiffe_id: self.entry.spiffe_id.to_string(),
            fields: self
                .fields
                .iter()
                .map(|(f, old, new)| pb::FieldChange {
                    field: (*f).to_owned(),
                    old: old.clone(),
                    new: new.clone(),
                })
                .collect(),
        }
    }
}

/// The wanted entries, validated, each with the owner set.
pub(crate) fn wanted(
    check: impl Fn(&RegistrationEntry) -> Result<(), Status>,
    owner: &str,
    wire: Vec<sigil_proto::node::Entry>,
) -> Result<Vec<RegistrationEntry>, Status> {
    let mut names = HashSet::new();
    let mut keys = HashMap::new();
    let mut out = Vec::with_capacity(wire.len());
    for w in wire {
        let name = w.name.clone();
        let bad = |msg: String| Status::invalid_argument(format!("entry {name:?}: {msg}"));
        if !is_valid_name(&name) {
            return Err(bad(
                "name must be 1 to 128 characters of a-z, A-Z, 0-9, '-', '_', '.' or '/'".into(),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(bad("name is listed twice".into()));
        }
        let mut e = RegistrationEntry::try_from(sigil_proto::node::Entry {
            id: String::new(),
            revision: 0,
            ..w
        })
        .map_err(|err| bad(err.to_string()))?;
        e.owner = owner.to_owned();
        check(&e).map_err(|s| bad(s.message().to_owned()))?;
        if let Some(other) = keys.insert(entry_key(&e), name.clone()) {
            return Err(bad(format!(
                "same SPIFFE ID, parent and selectors as entry {other:?}"
            )));
        }
        out.push(e);
    }
    Ok(out)
}

/// Works out what to change to make `owner`'s entries match `wanted`.
pub(crate) fn plan(
    owner: &str,
    wanted: Vec<RegistrationEntry>,
    stored: Vec<RegistrationEntry>,
    prune: bool,
) -> Result<Vec<Planned>, Status> {
    let mut mine: HashMap<String, RegistrationEntry> = HashMap::new();
    let mut by_key: HashMap<Vec<u8>, RegistrationEntry> = HashMap::new();
    for e in stored {
        if e.owner == owner {
            mine.insert(e.name.clone(), e.clone());
        }
        by_key.insert(entry_key(&e), e);
    }
    let wanted_names: HashSet<String> = wanted.iter().map(|e| e.name.clone()).collect();
    let mut out = Vec::new();
    for mut e in wanted {
        let key = entry_key(&e);
        let matched = match mine.get(&e.name) {
            Some(old) => Some(("update", old)),
            None => match by_key.get(&key) {
                Some(old) if old.owner.is_empty() => Some(("adopt", old)),
                Some(old) if old.owner != owner => {
                    return Err(Status::already_exists(format!(
                        "entry {:?}: entry {} of owner {:?} already has this SPIFFE ID ({}), parent and selectors; nothing was changed",
                        e.name, old.id, old.owner, e.spiffe_id
                    )));
                }
                // Held by another of this owner's entries: freed earlier in
                // the same batch (it is renamed or deleted), or the
                // datastore refuses the whole batch.
                _ => None,
            },
        };
        let Some((kind, old)) = matched else {
            out.push(Planned {
                kind: "create",
                entry: e,
                fields: Vec::new(),
            });
            continue;
        };
        e.id = old.id.clone();
        e.revision = old.revision;
        let fields = diff(old, &e);
        if !fields.is_empty() {
            out.push(Planned {
                kind,
                entry: e,
                fields,
            });
        }
    }
    for (name, e) in mine {
        if !wanted_names.contains(&name) {
            out.push(Planned {
                kind: if prune { "delete" } else { "orphan" },
                entry: e,
                fields: Vec::new(),
            });
        }
    }
    out.sort_by(|a, b| a.entry.name.cmp(&b.entry.name));
    Ok(out)
}
