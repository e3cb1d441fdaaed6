#![no_main]
//! The agent cache's application of Sync messages: length-delimited
//! `sigil.node.v1.SyncResponse`s decoded from the input, converted to
//! domain events as the agent does and applied in order,
//! with an SVID stored for every entry after each message so the
//! invalidation rules have something to drop.
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sigil_agent::cache::{Applied, Cache};
use sigil_proto::convert::SyncUpdate;
use sigil_proto::node as pb;
use zeroize::Zeroizing;

fuzz_target!(|data: &[u8]| {
    let cache = Cache::default();
    let mut buf = data;
    let mut revision = 0u64;
    while !buf.is_empty() {
        let Ok(msg) = pb::SyncResponse::decode_length_delimited(&mut buf) else {
            break;
        };
        let msg_revision = msg.revision;
        // Converted at the edge, as the agent does; a message that does not
        // convert never reaches the cache.
        if let Ok(update) = SyncUpdate::try_from(msg) {
            revision = revision.max(msg_revision);
            if let Applied::Revoked(_) = cache.apply(update) {
                assert!(cache.entries().is_empty() && cache.svids().is_empty());
            }
        }
        assert_eq!(
            cache.revision(),
            revision,
            "revision moved backwards or jumped"
        );
        // Every SVID held belongs to an entry held, with the same identity.
        let entries = cache.entries();
        for svid in cache.svids() {
            let entry = entries
                .iter()
                .find(|e| e.id == svid.entry.id)
                .expect("an SVID without its entry");
            assert_eq!(entry.spiffe_id, svid.entry.spiffe_id);
            assert_eq!(entry.selectors, svid.entry.selectors);
            assert_eq!(entry.dns_names, svid.entry.dns_names);
        }
        let issued = entries
            .into_iter()
            .map(|e| {
                (
                    Arc::clone(&e),
                    Zeroizing::new(vec![1u8; 4]),
                    vec![sigil_fuzz::LEAF_CERT.to_vec()],
                )
            })
            .collect::<Vec<_>>();
        for r in cache.store_all(issued) {
            assert!(r.is_ok(), "storing the fixture SVID failed: {r:?}");
        }
        let _ = cache.due(sigil_fuzz::now());
    }
});
