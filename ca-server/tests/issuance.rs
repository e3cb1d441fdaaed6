//! SPEC.md "X.509-SVIDs the CA issues", checked on what the CA really
//! issues, plus a property test against two independent verifiers: the
//! `spiffe` crate and `openssl verify -x509_strict`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use proptest::prelude::*;
use rcgen::{CertificateParams, CustomExtension, IsCa, KeyPair, SanType};
use sigil_identity::keys::KeyError;
use sigil_identity::x509 as svid;
use sigil_identity::{DnsName, SpiffeId};
use sigil_server::ca::CaError;
use sigil_server::ca::csr::{CsrError, MAX_CSR_LEN};
use x509_parser::extensions::{GeneralName, ParsedExtension};

fn web() -> SpiffeId {
    SpiffeId::parse("spiffe://example.org/web").unwrap()
}

fn csr_der(params: &CertificateParams, key: &KeyPair) -> Vec<u8> {
    params.serialize_request(key).unwrap().der().to_vec()
}

fn plain_csr() -> (Vec<u8>, KeyPair) {
    let key = KeyPair::generate().unwrap();
    (csr_der(&CertificateParams::default(), &key), key)
}

fn ski(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<u8> {
    svid::subject_key_id(cert).expect("SKI present")
}

fn aki(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<u8> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .expect("AKI present")
}

#[tokio::test]
async fn csr_asks_for_more_and_gets_only_what_the_entry_says() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path(), None).await;
    let key = KeyPair::generate().unwrap();
    let mut greedy = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    greedy.subject_alt_names.push(SanType::URI(
        "spiffe://example.org/admin".try_into().unwrap(),
    ));
    greedy.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    greedy.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    greedy.custom_extensions = vec![CustomExtension::from_oid_content(
        &[1, 3, 6, 1, 4, 1, 99999, 1],
        vec![0x05, 0x00],
    )];
    let csr = csr_der(&greedy, &key);
    let dns = vec![DnsName::new("web.example.org").unwrap()];
    let issued = ca
        .issue_x509_svid(&web(), &dns, Some(Duration::from_secs(600)), &csr)
        .unwrap();
    assert_eq!(
        issued.chain.len(),
        1,
        "self-signed CA: the chain is the leaf alone"
    );
    let leaf = svid::parse(&issued.chain[0]).unwrap();

    let sans = leaf.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = sans
        .value
        .general_names
        .iter()
        .filter_map(|n| {
            if let GeneralName::URI(u) = n {
                Some(*u)
            } else {
                None
            }
        })
        .collect();
    let dnss: Vec<_> = sans
        .value
        .general_names
        .iter()
        .filter_map(|n| {
            if let GeneralName::DNSName(d) = n {
                Some(*d)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        uris,
        vec!["spiffe://example.org/web"],
        "exactly one URI SAN, the entry's"
    );
    assert_eq!(
        dnss,
        vec!["web.example.org"],
        "DNS SANs only from the entry"
    );

    let bc = leaf
        .basic_constraints()
        .unwrap()
        .expect("BasicConstraints present");
    assert!(!bc.value.ca, "cA=false");
    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(ku.critical, "KeyUsage critical");
    assert!(
        ku.value.digital_signature() && ku.value.key_encipherment() && ku.value.key_agreement()
    );
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);
    assert!(leaf.subject().iter().next().is_some(), "non-empty subject");
    assert!(
        !leaf
            .extensions()
            .iter()
            .any(|e| e.oid.to_id_string() == "1.3.6.1.4.1.99999.1"),
        "requested extensions are ignored"
    );
    let (nb, na) = svid::validity(&leaf);
    assert_eq!(
        na.duration_since(nb).unwrap(),
        Duration::from_secs(610),
        "TTL from the entry + 10 s backdating"
    );
    // The public key is the CSR's.
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        rcgen::PublicKeyData::der_bytes(&key)
    );
}

#[tokio::test]
async fn ca_certificate_profile() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path(), None).await;
    let bundle = ca.bundle();
    let cert = svid::parse(&bundle.x509_authorities[0]).unwrap();
    svid::check_ca(&cert, &td()).unwrap();
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
    let uris: Vec<_> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| {
            if let GeneralName::URI(u) = n {
                Some(*u)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        uris,
        vec!["spiffe://example.org"],
        "CA URI SAN is the trust domain ID with no path"
    );
    assert!(
        cert.name_constraints().unwrap().is_none(),
        "no name constraints"
    );
    assert_eq!(
        aki(&cert),
        ski(&cert),
        "a self-signed CA's AKI is its own SKI"
    );
    let (nb, na) = svid::validity(&cert);
    assert_eq!(
        na.duration_since(nb).unwrap(),
        Duration::from_secs(24 * 3600 + 10),
        "CA TTL 24 h by default"
    );
}

#[tokio::test]
async fn serials_are_random_positive_128_bit_and_aki_links_to_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path(), None).await;
    let ca_cert_der = ca.bundle().x509_authorities[0].clone();
    let ca_ski = ski(&svid::parse(&ca_cert_der).unwrap());
    let (csr, _) = plain_csr();
    let mut serials = std::collections::HashSet::new();
    let mut ones = 0u32;
    let n = 500;
    for _ in 0..n {
        let issued = ca.issue_x509_svid(&web(), &[], None, &csr).unwrap();
        let leaf = svid::parse(&issued.chain[0]).unwrap();
        let raw = leaf.raw_serial();
        assert_eq!(raw[0] & 0x80, 0, "positive");
        assert!(raw.len() <= 17, "at most 128 bits plus a sign byte");
        assert_eq!(aki(&leaf), ca_ski, "AKI = issuer SKI");
        ski(&leaf);
        let bytes = leaf.serial.to_bytes_be();
        ones += bytes.iter().map(|b| b.count_ones()).sum::<u32>();
        assert!(serials.insert(issued.serial), "serials never repeat");
    }
    // 128 random bits per serial: about 64 ones each. Leading zero bytes are
    // dropped by the integer encoding, which only lowers the count slightly.
    let mean = f64::from(ones) / f64::from(n);
    assert!((58.0..70.0).contains(&mean), "mean popcount {mean}");
}

#[tokio::test]
async fn accepted_and_refused_workload_keys() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path(), None).await;
    for alg in [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
    ] {
        let key = KeyPair::generate_for(alg).unwrap();
        let csr = csr_der(&CertificateParams::default(), &key);
        ca.issue_x509_svid(&web(), &[], None, &csr).unwrap();
    }
    for bits in [2048, 4096] {
        let (csr, key) = openssl_rsa_csr(dir.path(), bits);
        let issued = ca
            .issue_x509_svid(&web(), &[], None, &csr)
            .unwrap_or_else(|e| panic!("RSA {bits}: {e}"));
        let chain: Vec<u8> = issued.chain.concat();
        spiffe::X509Svid::parse_from_der(&chain, &key).unwrap();
    }
    let (weak, _) = openssl_rsa_csr(dir.path(), 1024);
    assert!(matches!(
        ca.issue_x509_svid(&web(), &[], None, &weak),
        Err(CaError::Csr(CsrError::Key(KeyError::RsaSize(1024))))
    ));
    let (big, _) = openssl_rsa_csr(dir.path(), 4608);
    assert!(matches!(
        ca.issue_x509_svid(&web(), &[], None, &big),
        Err(CaError::Csr(CsrError::Key(KeyError::RsaSize(4608))))
    ));
    let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let csr = csr_der(&CertificateParams::default(), &ed);
    assert!(matches!(
        ca.issue_x509_svid(&web(), &[], None, &csr),
        Err(CaError::Csr(CsrError::Key(KeyError::UnsupportedKeyType)))
    ));
}

#[tokio::test]
async fn bad_csr_input_is_a_typed_error_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path(), None).await;
    let (good, _) = plain_csr();
    let mut bad_sig = good.clone();
    let n = bad_sig.len();
    bad_sig[n - 2] ^= 0x01;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("junk", b"hello".to_vec()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("oversized", vec![0x30; MAX_CSR_LEN + 1]),
        ("bad signature", bad_sig),
    ];
    for (name, der) in cases {
        match ca.issue_x509_svid(&web(), &[], None, &der) {
            Err(CaError::Csr(e)) => {
                let expected = match name {
                    "oversized" => matches!(e, CsrError::TooLarge),
                    "bad signature" => matches!(e, CsrError::Signature(_) | CsrError::Malformed),
                    _ => matches!(e, CsrError::Malformed),
                };
                assert!(expected, "{name}: {e}");
            }
            other => panic!("{name}: expected a CSR error, got {other:?}"),
        }
    }
    // Random bytes of every length up to 2 KiB: no panic, always an error.
    let mut seed = 0x9e3779b97f4a7c15u64;
    for len in 0..2048 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        assert!(ca.issue_x509_svid(&web(), &[], None, &bytes).is_err());
    }
}

#[tokio::test]
async fn upstream_mode_chains_to_the_operator_root() {
    let dir = tempfile::tempdir().unwrap();
    let root_key = KeyPair::generate().unwrap();
    let mut root_params = CertificateParams::default();
    root_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    root_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Operator Root");
    root_params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    root_params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365);
    let root = root_params.self_signed(&root_key).unwrap();
    let cert_pem = root.pem();
    let key_pem = root_key.serialize_pem();
    std::fs::write(dir.path().join("up.crt"), &cert_pem).unwrap();
    std::fs::write(dir.path().join("up.key"), &key_pem).unwrap();
    let upstream = sigil_server::ca::x509::UpstreamCa::load(
        &dir.path().join("up.crt"),
        &dir.path().join("up.key"),
        &td(),
    )
    .unwrap();
    let ca = ca_in(&dir.path().join("data"), Some(upstream)).await;
    let bundle = ca.bundle();
    assert_eq!(
        bundle.x509_authorities,
        vec![root.der().to_vec()],
        "the bundle holds the operator root"
    );

    let key = KeyPair::generate().unwrap();
    let issued = ca
        .issue_x509_svid(
            &web(),
            &[],
            None,
            &csr_der(&CertificateParams::default(), &key),
        )
        .unwrap();
    assert_eq!(issued.chain.len(), 2, "leaf and Sigil's intermediate");
    svid::verify_svid(&issued.chain, &bundle, std::time::SystemTime::now()).unwrap();
    let (ok, out) = openssl::openssl_verify(
        dir.path(),
        &issued.chain[0],
        &issued.chain[1..],
        &bundle.x509_authorities,
    )
    .unwrap();
    assert!(ok, "{out}");
    spiffe::X509Svid::parse_from_der(&issued.chain.concat(), &key.serialize_der()).unwrap();

    // A key that does not match the certificate is refused.
    let other = KeyPair::generate().unwrap().serialize_pem();
    let err = sigil_server::ca::x509::UpstreamCa::from_pem(&cert_pem, &other, &td()).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    // A certificate that is not a CA is refused.
    let leaf_pem = sigil_identity::pem::encode("CERTIFICATE", &issued.chain[0]);
    let err = sigil_server::ca::x509::UpstreamCa::from_pem(&leaf_pem, &key.serialize_pem(), &td())
        .unwrap_err();
    assert!(err.to_string().contains("not a usable CA"), "{err}");
}

fn segment() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._-]{1,12}".prop_filter("no dot segments", |s| s != "." && s != "..")
}

fn dns_name() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", 1..4)
        .prop_map(|labels| labels.join("."))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// Every SVID the CA mints passes Sigil's validator, parses with the
    /// `spiffe` crate, and verifies with `openssl verify -x509_strict`.
    #[test]
    fn every_minted_svid_passes_three_verifiers(
        path in prop::collection::vec(segment(), 1..5),
        dns in prop::collection::vec(dns_name(), 0..3),
        ttl_secs in 60u64..200_000,
        p384 in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = rt.block_on(ca_in(dir.path(), None));
        let id = td().id_from_segments(&path).unwrap();
        let dns: Vec<DnsName> = dns.iter().map(|d| DnsName::new(d).unwrap()).collect();
        let alg = if p384 { &rcgen::PKCS_ECDSA_P384_SHA384 } else { &rcgen::PKCS_ECDSA_P256_SHA256 };
        let key = KeyPair::generate_for(alg).unwrap();
        let csr = csr_der(&CertificateParams::default(), &key);
        let issued = ca.issue_x509_svid(&id, &dns, Some(Duration::from_secs(ttl_secs)), &csr).unwrap();
        let bundle = ca.bundle();

        let got = svid::verify_svid(&issued.chain, &bundle, std::time::SystemTime::now()).unwrap();
        prop_assert_eq!(&got, &id);
        let parsed = spiffe::X509Svid::parse_from_der(&issued.chain.concat(), &key.serialize_der()).unwrap();
        prop_assert_eq!(parsed.spiffe_id().to_string(), id.to_string());
        let (ok, out) = openssl::openssl_verify(dir.path(), &issued.chain[0], &issued.chain[1..], &bundle.x509_authorities).unwrap();
        prop_assert!(ok, "openssl verify failed: {}", out);
    }
}
