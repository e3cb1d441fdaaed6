//! The hash chain of the audit log.
//!
//! Every stored audit record carries its sequence number and the SHA-256
//! of the record before it, so changing, removing or reordering a record
//! breaks the chain at that point. [`chain`] is the one rule that assigns
//! both: every datastore calls it inside the transaction of the mutation it
//! records, with the chain head it read in that transaction, and stores
//! the records and the new head it returns in the same transaction.
//!
//! A record's hash is SHA-256 over its canonical encoding
//! ([`canonical`]): a version tag, then named, length-prefixed fields in a
//! fixed order. A field added later (a request id) is appended in that
//! order and left out when empty, so records written before it existed
//! keep their hash.
//!
//! Sequence numbers are contiguous from 1. Records written before the
//! chain existed carry no hash ("legacy"): they can only precede the
//! chain, which then starts after the last of them from the zero hash.
//! Retention removes the oldest records; it keeps the sequence number and
//! hash of the last one removed (the anchor), and verification starts
//! from there.

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};
use sigil_identity::clock::{serde_opt_unix_seconds, serde_unix_seconds, unix_seconds};
use std::time::SystemTime;

/// An audit record: who did what to what, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    #[serde(with = "serde_unix_seconds")]
    pub time: SystemTime,
    /// The caller (uid, SPIFFE ID, or "server").
    pub caller: String,
    /// The action, e.g. `entry.create`.
    pub action: String,
    /// What it acted on, e.g. an entry id.
    pub target: String,
    /// `ok` or the error.
    pub outcome: String,
    /// Optional expiry of what was issued.
    #[serde(with = "serde_opt_unix_seconds", default)]
    pub expires_at: Option<SystemTime>,
    /// The request id of the gRPC call that made the event (also in that
    /// call's log lines); `None` for events of background work and for
    /// records written before request ids existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The hash before the first record.
pub const ZERO: Hash = [0; 32];

/// Tags the encoding; a different encoding gets a different tag.
const DOMAIN: &[u8] = b"sigil-audit-v1\0";

/// Where the chain ends: the sequence number and hash of the last record
/// (0 and [`ZERO`] before the first one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: Hash,
}

impl ChainHead {
    /// 8 bytes of sequence number (big-endian), then the hash: how
    /// datastores store a head or an anchor.
    pub fn to_bytes(self) -> [u8; 40] {
        let mut b = [0; 40];
        b[..8].copy_from_slice(&self.seq.to_be_bytes());
        b[8..].copy_from_slice(&self.hash);
        b
    }

    /// The inverse of [`ChainHead::to_bytes`]; `None` for any other length.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let b: &[u8; 40] = b.try_into().ok()?;
        let (seq, hash) = b.split_at(8);
        Some(Self {
            seq: u64::from_be_bytes(seq.try_into().ok()?),
            hash: hash.try_into().ok()?,
        })
    }
}

/// One stored audit record: an event, its place in the log and the hash
/// of the record before it (`None` for a legacy record, written before
/// the chain existed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    #[serde(with = "hex_hash", default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<Hash>,
    pub event: AuditEvent,
}

/// Appends `events` to the chain ending at `head`: returns their records
/// (consecutive numbers, each holding the hash of the one before) and the
/// new head. Pure: the caller stores both in one transaction.
pub fn chain(head: ChainHead, events: &[AuditEvent]) -> (Vec<AuditRecord>, ChainHead) {
    let mut head = head;
    let records = events
        .iter()
        .map(|event| {
            let record = AuditRecord {
                seq: head.seq + 1,
                prev: Some(head.hash),
                event: event.clone(),
            };
            head = ChainHead {
                seq: record.seq,
                hash: record_hash(&record),
            };
            record
        })
        .collect();
    (records, head)
}

/// The hash of a record: SHA-256 of [`canonical`].
pub fn record_hash(r: &AuditRecord) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&canonical(r));
    let mut out = ZERO;
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The canonical encoding of a record: [`DOMAIN`], then each field as
/// name length (u16), name, value length (u32), value, all big-endian, in
/// this order: seq, prev, time (unix seconds, as stored), caller, action,
/// target, outcome, expires_at (left out when absent), request_id (left
/// out when absent). New fields go at the end and are left out when empty,
/// so records written before a field existed keep their hash.
pub fn canonical(r: &AuditRecord) -> Vec<u8> {
    let e = &r.event;
    let mut out = Vec::with_capacity(
        128 + e.caller.len() + e.action.len() + e.target.len() + e.outcome.len(),
    );
    out.extend_from_slice(DOMAIN);
    field(&mut out, "seq", &r.seq.to_be_bytes());
    field(&mut out, "prev", &r.prev.unwrap_or(ZERO));
    field(&mut out, "time", &unix_seconds(e.time).to_be_bytes());
    field(&mut out, "caller", e.caller.as_bytes());
    field(&mut out, "action", e.action.as_bytes());
    field(&mut out, "target", e.target.as_bytes());
    field(&mut out, "outcome", e.outcome.as_bytes());
    if let Some(t) = e.expires_at {
        field(&mut out, "expires_at", &unix_seconds(t).to_be_bytes());
    }
    if let Some(id) = &e.request_id {
        field(&mut out, "request_id", id.as_bytes());
    }
    out
}

fn field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    // Names are short literals and values are bounded by the datastore's
    // record size, far below u16 and u32: saturating keeps this total.
    out.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&u32::try_from(value.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(value);
}

/// Where and why the chain is broken: the first record that does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    #[error("record {expected} is missing or out of place: the next record found is {found}")]
    Missing { expected: u64, found: u64 },
    #[error("record {found} is out of order: found after record {after}")]
    OutOfOrder { found: u64, after: u64 },
    #[error(
        "record {seq} does not follow record {prev}: the hash it holds of record {prev} does not match, so record {prev} was changed or replaced (or record {seq} was)"
    )]
    HashMismatch { seq: u64, prev: u64 },
    #[error("record {seq} has no chain hash but follows chained records")]
    Unchained { seq: u64 },
}

impl ChainBreak {
    /// The record named first in the message.
    pub fn seq(&self) -> u64 {
        match *self {
            Self::Missing { expected, .. } => expected,
            Self::OutOfOrder { found, .. } => found,
            Self::HashMismatch { prev, .. } => prev,
            Self::Unchained { seq } => seq,
        }
    }
}

/// Checks records one at a time, oldest first.
#[derive(Debug, Clone)]
pub struct Verifier {
    head: ChainHead,
    chained: u64,
    legacy: u64,
}

impl Verifier {
    /// Starts after `anchor` (the last pruned record), or at the start of
    /// the log.
    pub fn new(anchor: Option<ChainHead>) -> Self {
        Self {
            head: anchor.unwrap_or_default(),
            chained: 0,
            legacy: 0,
        }
    }

    /// Checks the next record and moves past it.
    pub fn push(&mut self, r: &AuditRecord) -> Result<(), ChainBreak> {
        let Some(prev) = r.prev else {
            // Legacy records only precede the chain (their numbers may
            // skip, so only the order is checked).
            if self.chained > 0 || self.head.hash != ZERO {
                return Err(ChainBreak::Unchained { seq: r.seq });
            }
            if r.seq <= self.head.seq {
                return Err(ChainBreak::OutOfOrder {
                    found: r.seq,
                    after: self.head.seq,
                });
            }
            self.head.seq = r.seq;
            self.legacy += 1;
            return Ok(());
        };
        let expected = self.head.seq + 1;
        if r.seq > expected {
            return Err(ChainBreak::Missing {
                expected,
                found: r.seq,
            });
        }
        if r.seq < expected {
            return Err(ChainBreak::OutOfOrder {
                found: r.seq,
                after: self.head.seq,
            });
        }
        if prev != self.head.hash {
            return Err(ChainBreak::HashMismatch {
                seq: r.seq,
                prev: self.head.seq,
            });
        }
        self.head = ChainHead {
            seq: r.seq,
            hash: record_hash(r),
        };
        self.chained += 1;
        Ok(())
    }

    /// The last record checked.
    pub fn head(&self) -> ChainHead {
        self.head
    }

    /// Chained records checked.
    pub fn chained(&self) -> u64 {
        self.chained
    }

    /// Legacy (unchained) records passed over.
    pub fn legacy(&self) -> u64 {
        self.legacy
    }
}

/// Lower-case hex, as [`sigil_identity::random::hex`] writes it.
pub fn from_hex(s: &str) -> Option<Hash> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16);
    let mut out = ZERO;
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let v = nibble(pair[0])? * 16 + nibble(pair[1])?;
        out[i] = u8::try_from(v).ok()?;
    }
    Some(out)
}

mod hex_hash {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &Option<Hash>, s: S) -> Result<S::Ok, S::Error> {
        match h {
            Some(h) => s.serialize_str(&sigil_identity::random::hex(h)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Hash>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| {
                from_hex(&s).ok_or_else(|| serde::de::Error::custom("prev: not a SHA-256 in hex"))
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::datastore::conformance::audit_event;

    #[test]
    fn a_chain_verifies_and_each_kind_of_tampering_is_named() {
        let events: Vec<_> = (0..5).map(audit_event).collect();
        let (records, head) = chain(ChainHead::default(), &events);
        assert_eq!(head.seq, 5);
        let check = |rs: &[AuditRecord]| {
            let mut v = Verifier::new(None);
            rs.iter().try_for_each(|r| v.push(r)).map(|()| v.head())
        };
        assert_eq!(check(&records), Ok(head));

        let mut changed = records.clone();
        changed[1].event.outcome = "denied".into();
        assert_eq!(
            check(&changed),
            Err(ChainBreak::HashMismatch { seq: 3, prev: 2 })
        );
        let mut deleted = records.clone();
        deleted.remove(2);
        assert_eq!(
            check(&deleted),
            Err(ChainBreak::Missing {
                expected: 3,
                found: 4
            })
        );
        let mut swapped = records.clone();
        swapped.swap(1, 2);
        assert_eq!(
            check(&swapped),
            Err(ChainBreak::Missing {
                expected: 2,
                found: 3
            })
        );
    }

    #[test]
    fn the_chain_continues_from_an_anchor_and_after_legacy_records() {
        let events: Vec<_> = (0..4).map(audit_event).collect();
        let (records, _) = chain(ChainHead::default(), &events);
        let anchor = ChainHead {
            seq: 2,
            hash: record_hash(&records[1]),
        };
        let mut v = Verifier::new(Some(anchor));
        records[2..].iter().for_each(|r| v.push(r).unwrap());
        // Without the anchor, the remaining records do not start a chain.
        let mut v = Verifier::new(None);
        assert!(v.push(&records[2]).is_err());

        let legacy = |seq| AuditRecord {
            seq,
            prev: None,
            event: audit_event(0),
        };
        let (after, _) = chain(ChainHead { seq: 9, hash: ZERO }, &events);
        let mut v = Verifier::new(None);
        v.push(&legacy(3)).unwrap();
        v.push(&legacy(9)).unwrap();
        after.iter().for_each(|r| v.push(r).unwrap());
        assert_eq!((v.legacy(), v.chained()), (2, 4));
        assert_eq!(v.push(&legacy(20)), Err(ChainBreak::Unchained { seq: 20 }));
    }

    #[test]
    fn the_encoding_separates_fields_and_omits_an_absent_expiry() {
        let (a, _) = chain(ChainHead::default(), &[audit_event(1)]);
        let mut b = a[0].clone();
        // Moving a character from one field to the next changes the hash.
        b.event.caller.push('x');
        b.event.action.insert(0, 'x');
        let mut a2 = a[0].clone();
        a2.event.caller.push('x');
        a2.event.caller.push('x');
        assert_ne!(record_hash(&a[0]), record_hash(&b));
        assert_ne!(record_hash(&b), record_hash(&a2));
        let mut with = a[0].clone();
        with.event.expires_at = Some(with.event.time);
        let has_expiry = |r: &AuditRecord| canonical(r).windows(10).any(|w| w == b"expires_at");
        assert!(has_expiry(&with));
        assert!(!has_expiry(&a[0]));
    }

    #[test]
    fn the_request_id_is_covered_by_the_hash() {
        let mut event = audit_event(1);
        event.request_id = Some("req-1".into());
        let (records, head) = chain(ChainHead::default(), &[event]);
        let mut edited = records[0].clone();
        edited.event.request_id = Some("req-2".into());
        assert_ne!(record_hash(&edited), head.hash);
        let mut removed = records[0].clone();
        removed.event.request_id = None;
        assert_ne!(record_hash(&removed), head.hash);
    }

    #[test]
    fn hex_round_trips() {
        let h = record_hash(&chain(ChainHead::default(), &[audit_event(1)]).0[0]);
        assert_eq!(from_hex(&sigil_identity::random::hex(&h)), Some(h));
        assert_eq!(from_hex("zz"), None);
    }
}
