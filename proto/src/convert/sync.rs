//! The Sync stream's messages as domain events: what the agent applies to
//! its cache. A message converts whole or not at all, so a cache never
//! holds half of one.

use sigil_identity::{Bundle, EntryId, RegistrationEntry, TrustDomain};

use super::WireError;
use crate::node;

/// One Sync message: the server's revision after it, and what changed.
#[derive(Debug, Clone)]
pub struct SyncUpdate {
    /// The server's registry revision this message brings the agent to.
    pub revision: u64,
    /// What changed.
    pub event: SyncEvent,
}

/// What one Sync message changes.
#[derive(Debug, Clone)]
pub enum SyncEvent {
    /// The agent's entries: all of them (`full`), or those changed and
    /// removed since the revision the agent asked from; with the bundle
    /// when it is sent along.
    Snapshot {
        full: bool,
        entries: Vec<RegistrationEntry>,
        removed: Vec<EntryId>,
        bundle: Option<Bundle>,
        /// Every federated trust domain's bundle (the complete set).
        federated_bundles: Vec<Bundle>,
    },
    /// One entry added or changed.
    EntryUpsert(RegistrationEntry),
    /// One entry removed.
    EntryRemoved(EntryId),
    /// A new trust bundle.
    Bundle(Bundle),
    /// The server revoked this agent, for this reason.
    Revoked(String),
    /// A federated trust domain's bundle, new or changed.
    FederatedBundle(Bundle),
    /// A trust domain no longer federated with: its bundle is dropped.
    FederatedBundleRemoved(TrustDomain),
    /// Nothing changed (a message with no event, or a removal of an ID that
    /// names no entry); only the revision moves.
    Nothing,
}

impl TryFrom<node::SyncResponse> for SyncUpdate {
    type Error = WireError;

    /// Validates every entry and the bundle. Removed IDs that are not
    /// valid entry IDs name no entry the agent can hold, so they are
    /// skipped rather than refused.
    fn try_from(msg: node::SyncResponse) -> Result<Self, WireError> {
        use node::sync_response::Event;
        let event = match msg.event {
            Some(Event::Snapshot(s)) => SyncEvent::Snapshot {
                full: s.full,
                entries: s
                    .entries
                    .into_iter()
                    .map(RegistrationEntry::try_from)
                    .collect::<Result<_, _>>()?,
                removed: s
                    .removed
                    .iter()
                    .filter_map(|id| EntryId::new(id).ok())
                    .collect(),
                bundle: s.bundle.as_ref().map(Bundle::try_from).transpose()?,
                federated_bundles: s
                    .federated_bundles
                    .iter()
                    .map(Bundle::try_from)
                    .collect::<Result<_, _>>()?,
            },
            Some(Event::EntryUpsert(e)) => SyncEvent::EntryUpsert(RegistrationEntry::try_from(e)?),
            Some(Event::EntryRemoved(id)) => match EntryId::new(&id) {
                Ok(id) => SyncEvent::EntryRemoved(id),
                Err(_) => SyncEvent::Nothing,
            },
            Some(Event::Bundle(b)) => SyncEvent::Bundle(Bundle::try_from(&b)?),
            Some(Event::Revoked(why)) => SyncEvent::Revoked(why),
            Some(Event::FederatedBundle(b)) => SyncEvent::FederatedBundle(Bundle::try_from(&b)?),
            Some(Event::FederatedBundleRemoved(td)) => match TrustDomain::new(&td) {
                Ok(td) => SyncEvent::FederatedBundleRemoved(td),
                Err(e) => return Err(WireError::new("federated_bundle_removed", e)),
            },
            None => SyncEvent::Nothing,
        };
        Ok(Self {
            revision: msg.revision,
            event,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_with_a_bad_bundle_does_not_convert() {
        let bad = node::Snapshot {
            full: true,
            bundle: Some(node::Bundle {
                trust_domain: "example.org".into(),
                jwks: b"not json".to_vec(),
                sequence: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let msg = node::SyncResponse {
            event: Some(node::sync_response::Event::Snapshot(bad)),
            revision: 9,
        };
        assert_eq!(SyncUpdate::try_from(msg).unwrap_err().field, "jwks");
    }

    #[test]
    fn a_bad_entry_id_removes_nothing_and_moves_the_revision() {
        let msg = node::SyncResponse {
            event: Some(node::sync_response::Event::EntryRemoved("../x".into())),
            revision: 4,
        };
        let update = SyncUpdate::try_from(msg).unwrap();
        assert_eq!(update.revision, 4);
        assert!(matches!(update.event, SyncEvent::Nothing));
    }
}
