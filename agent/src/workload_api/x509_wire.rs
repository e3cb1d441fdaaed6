//! `X509SVIDResponse` written straight from the cache's SVIDs, in pieces.
//!
//! Each response carries the full state (every SVID with its key and
//! bundle), so with many SVIDs it is large: 10,000 SVIDs make about 13 MB.
//! Building it as protobuf structs copies every chain, key and bundle into
//! a new struct, encodes that into a buffer the size of the message (which
//! the gRPC layer keeps for the life of the stream) and keeps the previous
//! struct to compare against. Here a response is only its parts
//! ([`X509Parts`]: shared pointers to the cached SVIDs and the bundle),
//! compared by pointer, and its bytes are written from those parts a
//! [`CHUNK`] at a time as the connection takes them. An update therefore
//! builds nothing per unchanged SVID beyond a pointer, and holds no copy of
//! the message.
//!
//! The bytes are exactly what `prost` makes of the same
//! [`X509svidResponse`] (fields in tag order, empty fields left out), which
//! the tests check.
//!
//! Adding a response field: a field of [`X509Parts`], a line in its
//! `PartialEq`, in [`X509Parts::tail_len`] and in [`X509Parts::write_tail`]
//! (`crl` and `federated_bundles` already go there), and in
//! [`X509Parts::to_message`].

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{encode_varint, encoded_len_varint};
use sigil_proto::workload::{X509svid, X509svidResponse};

use crate::cache::CachedSvid;

/// About how many bytes of a response are written at once.
pub(super) const CHUNK: usize = 64 * 1024;

/// Wire type 2 (length-delimited) key of field `tag` (all tags here are < 16).
const fn key(tag: u8) -> u8 {
    (tag << 3) | 2
}

/// Bytes of a length-delimited field of `len` bytes, left out when empty.
fn field_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        1 + encoded_len_varint(len as u64) + len
    }
}

/// Bytes of a length-delimited field of `len` bytes written even when
/// empty (elements of repeated fields, map entries).
fn element_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

fn put_header(out: &mut BytesMut, tag: u8, len: usize) {
    out.put_u8(key(tag));
    encode_varint(len as u64, out);
}

/// Writes `bytes` as field `tag`, unless empty.
fn put_field(out: &mut BytesMut, tag: u8, bytes: &[u8]) {
    if !bytes.is_empty() {
        put_header(out, tag, bytes.len());
        out.put_slice(bytes);
    }
}

/// One `X509SVIDResponse` as parts: full state, per the specification.
#[derive(Clone, Debug)]
pub(super) struct X509Parts {
    /// `svids` (field 1), in entry order.
    pub svids: Vec<Arc<CachedSvid>>,
    /// `X509SVID.bundle` (field 4) of every SVID: the CA certificates of
    /// the agent's trust domain, DER, concatenated. Shared by all SVIDs.
    pub bundle: Bytes,
    /// `crl` (field 2): DER CRLs.
    pub crl: Vec<Bytes>,
    /// `federated_bundles` (field 3): trust domain SPIFFE ID → concatenated
    /// DER CA certificates, in the order written.
    pub federated_bundles: Vec<(String, Bytes)>,
}

impl PartialEq for X509Parts {
    /// The same SVIDs (the same cached values, by pointer: a renewed SVID
    /// is a new one) and equal bundles and CRLs.
    fn eq(&self, other: &Self) -> bool {
        self.svids.len() == other.svids.len()
            && self
                .svids
                .iter()
                .zip(&other.svids)
                .all(|(a, b)| Arc::ptr_eq(a, b))
            && self.bundle == other.bundle
            && self.crl == other.crl
            && self.federated_bundles == other.federated_bundles
    }
}

/// Length of the `X509SVID` message of `svid` with `bundle`.
fn svid_len(svid: &CachedSvid, bundle: usize) -> usize {
    field_len(svid.entry.spiffe_id.as_str().len())
        + field_len(svid.chain.iter().map(Vec::len).sum())
        + field_len(svid.key.len())
        + field_len(bundle)
        + field_len(svid.entry.hint.len())
}

/// Writes the `X509SVID` message of `svid` (`len` bytes, from [`svid_len`])
/// as an element of `svids`.
fn put_svid(out: &mut BytesMut, svid: &CachedSvid, len: usize, bundle: &[u8]) {
    put_header(out, 1, len);
    put_field(out, 1, svid.entry.spiffe_id.as_str().as_bytes());
    let chain: usize = svid.chain.iter().map(Vec::len).sum();
    if chain > 0 {
        put_header(out, 2, chain);
        for der in &svid.chain {
            out.put_slice(der);
        }
    }
    put_field(out, 3, &svid.key);
    put_field(out, 4, bundle);
    put_field(out, 5, svid.entry.hint.as_bytes());
}

impl X509Parts {
    /// The response for `svids` and the CA certificates `bundle`, with no
    /// CRLs or federated bundles.
    pub fn new(svids: Vec<Arc<CachedSvid>>, bundle: Bytes) -> Self {
        Self {
            svids,
            bundle,
            crl: Vec::new(),
            federated_bundles: Vec::new(),
        }
    }

    /// Bytes of the fields after `svids`.
    fn tail_len(&self) -> usize {
        let crl: usize = self.crl.iter().map(|c| element_len(c.len())).sum();
        let federated: usize = self
            .federated_bundles
            .iter()
            .map(|(td, der)| element_len(field_len(td.len()) + field_len(der.len())))
            .sum();
        crl + federated
    }

    /// Writes the fields after `svids` (small: written in one piece).
    fn write_tail(&self, out: &mut BytesMut) {
        for c in &self.crl {
            put_header(out, 2, c.len());
            out.put_slice(c);
        }
        for (td, der) in &self.federated_bundles {
            put_header(out, 3, field_len(td.len()) + field_len(der.len()));
            put_field(out, 1, td.as_bytes());
            put_field(out, 2, der);
        }
    }

    /// The encoded length of the whole message.
    pub fn encoded_len(&self) -> usize {
        let bundle = self.bundle.len();
        self.svids
            .iter()
            .map(|s| element_len(svid_len(s, bundle)))
            .sum::<usize>()
            + self.tail_len()
    }

    /// A writer of this message as one gRPC message (its 5-byte prefix
    /// first).
    pub fn into_writer(self) -> Writer {
        Writer {
            len: self.encoded_len(),
            parts: self,
            next: 0,
            started: false,
        }
    }

    /// The same response as a protobuf struct (for the generated service;
    /// the agent serves the parts with [`Writer`]).
    pub fn to_message(&self) -> X509svidResponse {
        X509svidResponse {
            svids: self
                .svids
                .iter()
                .map(|s| X509svid {
                    spiffe_id: s.entry.spiffe_id.to_string(),
                    x509_svid: s.chain.concat(),
                    x509_svid_key: s.key.to_vec(),
                    bundle: self.bundle.to_vec(),
                    hint: s.entry.hint.clone(),
                })
                .collect(),
            crl: self.crl.iter().map(|c| c.to_vec()).collect(),
            federated_bundles: self
                .federated_bundles
                .iter()
                .map(|(td, der)| (td.clone(), der.to_vec()))
                .collect(),
        }
    }
}

/// Writes one [`X509Parts`] as a gRPC message, [`CHUNK`] by chunk.
#[derive(Debug)]
pub(super) struct Writer {
    parts: X509Parts,
    /// The protobuf message's length.
    len: usize,
    /// The next SVID to write.
    next: usize,
    started: bool,
}

impl Writer {
    /// The next piece, `None` once all is written.
    pub fn next_chunk(&mut self) -> Option<Bytes> {
        if self.started && self.next > self.parts.svids.len() {
            return None;
        }
        let mut out = BytesMut::with_capacity(CHUNK + 4 * 1024);
        if !self.started {
            self.started = true;
            // The gRPC length prefix: not compressed, then the length (a
            // message over 4 GiB cannot be framed; clients refuse far less).
            out.put_u8(0);
            out.put_u32(u32::try_from(self.len).unwrap_or(u32::MAX));
        }
        let bundle = self.parts.bundle.len();
        while let Some(svid) = self.parts.svids.get(self.next) {
            if out.len() >= CHUNK {
                return Some(out.freeze());
            }
            put_svid(&mut out, svid, svid_len(svid, bundle), &self.parts.bundle);
            self.next += 1;
        }
        self.parts.write_tail(&mut out);
        self.next = self.parts.svids.len() + 1;
        Some(out.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use sigil_identity::{RegistrationEntry, Selector, SpiffeId};
    use std::time::SystemTime;
    use zeroize::Zeroizing;

    fn svid(i: usize, hint: &str, chain: Vec<Vec<u8>>) -> Arc<CachedSvid> {
        let mut e = RegistrationEntry::new(
            SpiffeId::parse(&format!("spiffe://example.org/w/{i}")).unwrap(),
            SpiffeId::parse("spiffe://example.org/sigil/agent/x").unwrap(),
            [Selector::parse("unix:uid:0").unwrap()]
                .into_iter()
                .collect(),
        );
        e.hint = hint.into();
        let now = SystemTime::now();
        Arc::new(CachedSvid {
            entry: Arc::new(e),
            key: Zeroizing::new(vec![i as u8; 138]),
            chain,
            not_before: now,
            not_after: now,
            renew_at: now,
        })
    }

    fn written(parts: X509Parts) -> Vec<u8> {
        let mut w = parts.into_writer();
        let mut all = Vec::new();
        let mut pieces = 0;
        while let Some(b) = w.next_chunk() {
            assert!(b.len() <= CHUNK + 4 * 1024, "a piece of {} bytes", b.len());
            all.extend_from_slice(&b);
            pieces += 1;
        }
        assert!(pieces >= 1);
        all
    }

    /// The gRPC frame of `msg` as tonic's prost codec writes it.
    fn framed(msg: &X509svidResponse) -> Vec<u8> {
        let body = msg.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn the_bytes_are_those_prost_writes_for_the_same_response() {
        let leaf = vec![0x30; 600];
        let ca = vec![0x31; 300];
        let mut parts = X509Parts::new(
            (0..300)
                .map(|i| {
                    let chain = if i % 3 == 0 {
                        vec![leaf.clone(), ca.clone()]
                    } else {
                        vec![leaf.clone()]
                    };
                    svid(i, if i % 2 == 0 { "" } else { "db" }, chain)
                })
                .collect(),
            Bytes::from(vec![0x32; 700]),
        );
        let all = written(parts.clone());
        assert!(all.len() > 3 * CHUNK, "several pieces were written");
        assert_eq!(all, framed(&parts.to_message()));
        // With CRLs (one empty) and a federated bundle.
        parts.crl = vec![Bytes::from_static(b"crl-1"), Bytes::new()];
        parts.federated_bundles = vec![(
            "spiffe://other.org".into(),
            Bytes::from_static(b"other-cas"),
        )];
        assert_eq!(written(parts.clone()), framed(&parts.to_message()));
        let decoded = X509svidResponse::decode(&written(parts.clone())[5..]).unwrap();
        assert_eq!(decoded, parts.to_message());
    }

    #[test]
    fn an_empty_response_and_empty_fields_match_prost() {
        let parts = X509Parts::new(vec![svid(1, "", vec![])], Bytes::new());
        assert_eq!(written(parts.clone()), framed(&parts.to_message()));
        let none = X509Parts::new(vec![], Bytes::new());
        assert_eq!(written(none.clone()), framed(&none.to_message()));
    }

    #[test]
    fn parts_are_equal_only_for_the_same_cached_svids() {
        let a = svid(1, "", vec![vec![1]]);
        let bundle = Bytes::from_static(b"ca");
        let one = X509Parts::new(vec![a.clone()], bundle.clone());
        assert_eq!(one, X509Parts::new(vec![a.clone()], bundle.clone()));
        // An equal-looking but renewed SVID is a change.
        let renewed = Arc::new((*a).clone());
        assert_ne!(one, X509Parts::new(vec![renewed], bundle.clone()));
        assert_ne!(
            one,
            X509Parts::new(vec![a.clone()], Bytes::from_static(b"new ca"))
        );
        let mut with_crl = one.clone();
        with_crl.crl.push(Bytes::from_static(b"crl"));
        assert_ne!(one, with_crl);
    }
}
