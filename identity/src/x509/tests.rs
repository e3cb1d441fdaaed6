//! Tables for SPEC.md "X.509-SVIDs the CA issues", as seen by the validator.

use super::*;
use crate::bundle::Bundle;
use crate::testutil::{self, ca, leaf_params};
use rcgen::{ExtendedKeyUsagePurpose as Eku, IsCa, KeyUsagePurpose as Ku, SanType, SerialNumber};

const ID: &str = "spiffe://example.org/web";

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn bundle_of(ca: &testutil::TestCa) -> Bundle {
    let mut b = Bundle::new(td());
    b.x509_authorities.push(ca.der.clone());
    b
}

#[test]
fn well_formed_leaf_passes_every_check() {
    let ca = ca("example.org");
    let leaf = ca.issue(&leaf_params(ID));
    let id = check_leaf(&parse(&leaf).unwrap()).unwrap();
    assert_eq!(id.as_str(), ID);
    check_ca(&parse(&ca.der).unwrap(), &td()).unwrap();
    let issuer = IssuerInfo {
        ski: subject_key_id(&parse(&ca.der).unwrap()).unwrap(),
        not_after: validity(&parse(&ca.der).unwrap()).1,
    };
    assert_eq!(check_issued(&leaf, &issuer).unwrap().as_str(), ID);
    let got = verify_svid(&[leaf], &bundle_of(&ca), SystemTime::now()).unwrap();
    assert_eq!(got.as_str(), ID);
}

/// Each row breaks exactly one leaf rule and names the error it must give.
#[test]
fn leaf_rule_table() {
    type Mutate = fn(&mut rcgen::CertificateParams);
    let rows: Vec<(&str, Mutate, SvidError)> = vec![
        (
            "no uri san",
            |p| p.subject_alt_names.clear(),
            SvidError::UriSanCount(0),
        ),
        (
            "two uri sans",
            |p| {
                p.subject_alt_names.push(SanType::URI(
                    "spiffe://example.org/other".try_into().unwrap(),
                ))
            },
            SvidError::UriSanCount(2),
        ),
        (
            "uri san not spiffe",
            |p| {
                p.subject_alt_names =
                    vec![SanType::URI("https://example.org/x".try_into().unwrap())]
            },
            SvidError::BadSpiffeId(IdError::WrongScheme),
        ),
        (
            "ip san",
            |p| {
                p.subject_alt_names
                    .push(SanType::IpAddress([127, 0, 0, 1].into()))
            },
            SvidError::OtherSanType,
        ),
        (
            "no basic constraints",
            |p| p.is_ca = IsCa::NoCa,
            SvidError::MissingBasicConstraints,
        ),
        (
            "leaf is ca",
            |p| p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained),
            SvidError::LeafIsCa,
        ),
        (
            "no key usage",
            |p| p.key_usages.clear(),
            SvidError::MissingKeyUsage,
        ),
        (
            "no digital signature",
            |p| p.key_usages = vec![Ku::KeyEncipherment],
            SvidError::MissingDigitalSignature,
        ),
        (
            "key cert sign",
            |p| p.key_usages.push(Ku::KeyCertSign),
            SvidError::LeafCanSign,
        ),
        (
            "crl sign",
            |p| p.key_usages.push(Ku::CrlSign),
            SvidError::LeafCanSign,
        ),
        (
            "no eku",
            |p| p.extended_key_usages.clear(),
            SvidError::MissingEku,
        ),
        (
            "eku server only",
            |p| p.extended_key_usages = vec![Eku::ServerAuth],
            SvidError::MissingEku,
        ),
        (
            "eku client only",
            |p| p.extended_key_usages = vec![Eku::ClientAuth],
            SvidError::MissingEku,
        ),
        (
            "empty subject",
            |p| p.distinguished_name = rcgen::DistinguishedName::new(),
            SvidError::EmptySubject,
        ),
        (
            "zero serial",
            |p| p.serial_number = Some(SerialNumber::from_slice(&[0])),
            SvidError::BadSerial,
        ),
        (
            "serial too long",
            |p| p.serial_number = Some(SerialNumber::from_slice(&[0x11; 21])),
            SvidError::BadSerial,
        ),
    ];
    let ca = ca("example.org");
    for (name, mutate, want) in rows {
        let mut p = leaf_params(ID);
        mutate(&mut p);
        let der = ca.issue(&p);
        let got = check_leaf(&parse(&der).unwrap());
        assert_eq!(got, Err(want), "{name}");
    }
}

#[test]
fn negative_serial_is_refused() {
    // rcgen always encodes a positive serial, so flip the sign in the DER:
    // `02 11 00 80…` (positive, padded) becomes `02 11 80 80…` (negative).
    let ca = ca("example.org");
    let mut p = leaf_params(ID);
    p.serial_number = Some(SerialNumber::from_slice(&[0x80; 16]));
    let mut der = ca.issue(&p);
    let mut pattern = vec![0x02, 0x11, 0x00];
    pattern.extend_from_slice(&[0x80; 16]);
    let at = der
        .windows(pattern.len())
        .position(|w| w == pattern)
        .unwrap();
    der[at + 2] = 0x80;
    assert_eq!(check_leaf(&parse(&der).unwrap()), Err(SvidError::BadSerial));
}

#[test]
fn issued_leaf_must_link_to_its_issuer() {
    let ca = ca("example.org");
    let parsed = parse(&ca.der).unwrap();
    let ski = subject_key_id(&parsed).unwrap();
    let ca_not_after = validity(&parsed).1;

    let mut p = leaf_params(ID);
    p.use_authority_key_identifier_extension = false;
    let info = IssuerInfo {
        ski: ski.clone(),
        not_after: ca_not_after,
    };
    assert_eq!(
        check_issued(&ca.issue(&p), &info),
        Err(SvidError::MissingAki)
    );

    let other = IssuerInfo {
        ski: vec![1, 2, 3],
        not_after: ca_not_after,
    };
    assert_eq!(
        check_issued(&ca.issue(&leaf_params(ID)), &other),
        Err(SvidError::AkiMismatch)
    );

    let mut p = leaf_params(ID);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3);
    assert_eq!(
        check_issued(&ca.issue(&p), &info),
        Err(SvidError::OutlivesIssuer)
    );
}

#[test]
fn ca_rule_table() {
    type Mutate = fn(&mut rcgen::CertificateParams);
    let rows: Vec<(&str, Mutate, SvidError)> = vec![
        (
            "not ca",
            |p| p.is_ca = IsCa::ExplicitNoCa,
            SvidError::CaNotCa,
        ),
        (
            "no cert sign",
            |p| p.key_usages = vec![Ku::CrlSign],
            SvidError::CaCannotSign,
        ),
        (
            "uri with path",
            |p| {
                p.subject_alt_names =
                    vec![SanType::URI("spiffe://example.org/ca".try_into().unwrap())]
            },
            SvidError::CaUriSan,
        ),
        (
            "uri of other td",
            |p| p.subject_alt_names = vec![SanType::URI("spiffe://other.org".try_into().unwrap())],
            SvidError::CaUriSan,
        ),
        (
            "name constraints",
            |p| {
                p.name_constraints = Some(rcgen::NameConstraints {
                    permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName("example.org".into())],
                    excluded_subtrees: vec![],
                })
            },
            SvidError::NameConstraints,
        ),
    ];
    for (name, mutate, want) in rows {
        let mut p = testutil::ca_params("example.org");
        mutate(&mut p);
        let ca = testutil::ca_with(p);
        assert_eq!(
            check_ca(&parse(&ca.der).unwrap(), &td()),
            Err(want),
            "{name}"
        );
    }
}

#[test]
fn verify_rejects_unknown_authority_expired_and_foreign() {
    let ca1 = ca("example.org");
    let ca2 = ca("example.org");
    let leaf = ca1.issue(&leaf_params(ID));
    let now = SystemTime::now();
    assert_eq!(
        verify_svid(std::slice::from_ref(&leaf), &bundle_of(&ca2), now),
        Err(SvidError::UnknownAuthority)
    );
    let later = now + std::time::Duration::from_secs(2 * 3600);
    assert_eq!(
        verify_svid(std::slice::from_ref(&leaf), &bundle_of(&ca1), later),
        Err(SvidError::Expired)
    );
    let earlier = now - std::time::Duration::from_secs(3600);
    assert_eq!(
        verify_svid(std::slice::from_ref(&leaf), &bundle_of(&ca1), earlier),
        Err(SvidError::NotYetValid)
    );
    let foreign = ca1.issue(&leaf_params("spiffe://other.org/web"));
    assert!(matches!(
        verify_svid(&[foreign], &bundle_of(&ca1), now),
        Err(SvidError::ForeignTrustDomain(_))
    ));
    assert_eq!(
        verify_svid(&[], &bundle_of(&ca1), now),
        Err(SvidError::ChainLength)
    );
    assert_eq!(
        verify_svid(&vec![leaf; 5], &bundle_of(&ca1), now),
        Err(SvidError::ChainLength)
    );
}

#[test]
fn verify_follows_an_intermediate() {
    let root = ca("example.org");
    let inter_key = rcgen::KeyPair::generate().unwrap();
    let mut ip = testutil::ca_params("example.org");
    ip.distinguished_name
        .push(rcgen::DnType::CommonName, "intermediate");
    ip.use_authority_key_identifier_extension = true;
    let root_issuer = rcgen::Issuer::from_params(&root.params, &root.key);
    let inter_der = ip
        .signed_by(&inter_key, &root_issuer)
        .unwrap()
        .der()
        .to_vec();
    let inter = testutil::TestCa {
        der: inter_der.clone(),
        params: ip,
        key: inter_key,
    };
    let leaf = inter.issue(&leaf_params(ID));
    let got = verify_svid(
        &[leaf.clone(), inter_der],
        &bundle_of(&root),
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(got.as_str(), ID);
    // Without the intermediate the chain does not reach the root.
    assert_eq!(
        verify_svid(&[leaf], &bundle_of(&root), SystemTime::now()),
        Err(SvidError::UnknownAuthority)
    );
}

#[test]
fn garbage_is_malformed_not_a_panic() {
    for bytes in [&[][..], &[0x30], &[0x30, 0x82, 0xff, 0xff], &[0u8; 64][..]] {
        assert_eq!(parse(bytes).err(), Some(SvidError::Malformed));
    }
    let ca = ca("example.org");
    let mut trailing = ca.issue(&leaf_params(ID));
    trailing.push(0);
    assert_eq!(parse(&trailing).err(), Some(SvidError::Malformed));
}
