use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, IsCa, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};
use sigil_identity::TrustDomain;
use time::OffsetDateTime;

use super::*;

struct Ca {
    der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = p.self_signed(&key).unwrap();
    Ca {
        der: cert.der().to_vec(),
        issuer: Issuer::new(p, key),
    }
}

fn crl(ca: &Ca, serials: &[&[u8]]) -> Vec<u8> {
    let now = OffsetDateTime::now_utc();
    CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::hours(1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from_slice(s),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&ca.issuer)
    .unwrap()
    .der()
    .to_vec()
}

fn leaf(ca: &Ca, serial: &[u8]) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.serial_number = Some(SerialNumber::from_slice(serial));
    p.use_authority_key_identifier_extension = true;
    p.signed_by(&key, &ca.issuer).unwrap().der().to_vec()
}

fn bundle(cas: &[&Ca]) -> Bundle {
    let mut b = Bundle::new(TrustDomain::new("example.org").unwrap());
    b.x509_authorities = cas.iter().map(|c| c.der.clone()).collect();
    b
}

#[test]
fn revoked_serials_are_found_by_issuer_and_serial() {
    let (a, b) = (ca(), ca());
    let (set, rejected) = CrlSet::parse(&[crl(&a, &[&[0x0a, 0x1b]]), crl(&b, &[])]);
    assert_eq!(rejected, 0);
    assert_eq!(set.crls.len(), 2);
    assert!(set.is_revoked(&leaf(&a, &[0x0a, 0x1b])));
    assert!(!set.is_revoked(&leaf(&a, &[0x0a, 0x1c])), "another serial");
    assert!(
        !set.is_revoked(&leaf(&b, &[0x0a, 0x1b])),
        "same serial, other CA"
    );
}

#[test]
fn garbage_is_dropped_and_counted() {
    let a = ca();
    let (set, rejected) = CrlSet::parse(&[b"not a crl".to_vec(), vec![], crl(&a, &[])]);
    assert_eq!(rejected, 2);
    assert_eq!(set.crls.len(), 1);
}

#[test]
fn sds_bundle_gets_crl_blocks_only_when_every_ca_has_a_crl() {
    let (a, b) = (ca(), ca());
    let (only_a, _) = CrlSet::parse(&[crl(&a, &[&[1]])]);
    let (both, _) = CrlSet::parse(&[crl(&a, &[&[1]]), crl(&b, &[])]);
    let two = bundle(&[&a, &b]);
    let pem = both.bundle_pem(&two);
    assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
    assert_eq!(pem.matches("-----BEGIN X509 CRL-----").count(), 2);
    assert!(pem.starts_with(&two.x509_pem()));
    // CA b has no CRL: Envoy would refuse everything b issued.
    assert_eq!(only_a.bundle_pem(&two), two.x509_pem());
    assert_eq!(
        only_a
            .bundle_pem(&bundle(&[&a]))
            .matches("X509 CRL-----")
            .count(),
        2
    );
    assert_eq!(CrlSet::default().bundle_pem(&two), two.x509_pem());
}

#[test]
fn crls_are_taken_from_bundle_carrying_sync_messages_only() {
    use sigil_proto::node::{self as pb, sync_response::Event};
    let bundle = pb::Bundle {
        crls: vec![vec![1], vec![2]],
        ..Default::default()
    };
    let msg = |event| pb::SyncResponse {
        event: Some(event),
        revision: 1,
    };
    assert_eq!(
        carried(&msg(Event::Bundle(bundle.clone()))),
        Some(vec![vec![1], vec![2]])
    );
    let snapshot = pb::Snapshot {
        bundle: Some(bundle),
        ..Default::default()
    };
    assert_eq!(
        carried(&msg(Event::Snapshot(snapshot))).map(|c| c.len()),
        Some(2)
    );
    assert_eq!(carried(&msg(Event::EntryRemoved("x".into()))), None);
}

#[test]
fn a_revoked_svid_held_is_due_for_renewal_at_once() {
    use sigil_identity::{RegistrationEntry, SelectorSet, SpiffeId};
    use sigil_proto::convert::{SyncEvent, SyncUpdate};
    use std::sync::Arc;
    use std::time::SystemTime;

    let a = ca();
    let cache = crate::cache::Cache::default();
    let mut entry = RegistrationEntry::new(
        SpiffeId::parse("spiffe://example.org/web").unwrap(),
        SpiffeId::parse("spiffe://example.org/sigil/agent/x").unwrap(),
        SelectorSet::default(),
    );
    entry.revision = 1;
    cache.apply(SyncUpdate {
        revision: 1,
        event: SyncEvent::Snapshot {
            full: true,
            entries: vec![entry.clone()],
            removed: vec![],
            bundle: None,
            federated_bundles: vec![],
        },
    });
    let leaf = leaf(&a, &[0x42]);
    cache
        .store(
            Arc::new(entry),
            zeroize::Zeroizing::new(vec![1]),
            vec![leaf],
        )
        .unwrap();
    let now = SystemTime::now();
    assert!(cache.due(now).is_empty(), "fresh SVID");
    let (other, _) = CrlSet::parse(&[crl(&a, &[&[0x43]])]);
    assert_eq!(cache.set_crls(other), 0, "another serial");
    assert!(cache.due(now).is_empty());
    let (revoking, _) = CrlSet::parse(&[crl(&a, &[&[0x43], &[0x42]])]);
    assert_eq!(cache.set_crls(revoking.clone()), 1);
    assert_eq!(cache.due(now).len(), 1, "re-issued at once");
    assert_eq!(*cache.crls(), revoking);
    assert_eq!(cache.set_crls(revoking), 0, "unchanged CRLs change nothing");
}
