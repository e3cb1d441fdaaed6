use std::process::Command;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyUsagePurpose};
use sigil_identity::TrustDomain;
use sigil_identity::clock::from_unix_seconds;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use super::*;
use crate::ca::keys::{KeyAlgorithm, PrivateKey};
use crate::ca::x509::X509Authority;

const HOUR: Duration = Duration::from_secs(3600);

fn now() -> SystemTime {
    from_unix_seconds(1_800_000_000)
}

fn ca() -> (X509Authority, CaKey) {
    let key = PrivateKey::generate(KeyAlgorithm::EcP256)
        .unwrap()
        .signer()
        .unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let ca = X509Authority::create(&td, &key, now() - HOUR, now() + 24 * HOUR, None).unwrap();
    (ca, key)
}

fn revoked(serial: &str, issuer: &str, not_after: SystemTime) -> RevocationRecord {
    RevocationRecord {
        serial: serial.into(),
        spiffe_id: sigil_identity::SpiffeId::parse("spiffe://example.org/web").unwrap(),
        issuer: issuer.into(),
        not_after,
        revoked_at: now() - HOUR,
        reason: RevocationReason::KeyCompromise,
    }
}

fn serials(der: &[u8]) -> Vec<String> {
    let (_, crl) = CertificateRevocationList::from_der(der).unwrap();
    crl.iter_revoked_certificates()
        .map(|r| sigil_identity::x509::serial_hex_of(r.raw_serial()))
        .collect()
}

#[test]
fn crl_lists_this_cas_unexpired_serials_only() {
    let (ca, key) = ca();
    let id = ca_key_id(ca.cert_der()).unwrap();
    let records = vec![
        revoked("0a1b", &id, now() + HOUR),
        revoked("ff", "other-ca", now() + HOUR),
        revoked("1c", &id, now() - Duration::from_secs(1)),
    ];
    let crl = sign_crl(ca.cert_der(), &key, &records, 7, now(), HOUR).unwrap();
    assert_eq!(crl.issuer, id);
    assert_eq!(crl.listed, 1);
    assert_eq!(serials(&crl.der), ["0a1b"]);
    let (_, parsed) = CertificateRevocationList::from_der(&crl.der).unwrap();
    assert_eq!(parsed.crl_number().map(|n| n.to_string()), Some("7".into()));
    assert_eq!(
        parsed.next_update().map(|t| t.timestamp()),
        Some(sigil_identity::clock::unix_seconds(now() + HOUR) as i64)
    );
}

#[test]
fn serial_leaves_the_crl_after_its_not_after() {
    let (ca, key) = ca();
    let id = ca_key_id(ca.cert_der()).unwrap();
    let not_after = now() + HOUR;
    let records = vec![revoked("0a", &id, not_after)];
    let at = |t: SystemTime| {
        serials(
            &sign_crl(ca.cert_der(), &key, &records, 1, t, HOUR)
                .unwrap()
                .der,
        )
    };
    assert_eq!(at(now()), ["0a"]);
    assert_eq!(at(not_after), ["0a"], "still listed at NotAfter itself");
    assert!(at(not_after + Duration::from_secs(1)).is_empty());
}

#[test]
fn crl_verifies_against_the_ca_with_openssl() {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("openssl not installed; skipping");
        return;
    }
    let (ca, key) = ca();
    let id = ca_key_id(ca.cert_der()).unwrap();
    let crl = sign_crl(
        ca.cert_der(),
        &key,
        &[revoked("0a", &id, now() + HOUR)],
        3,
        now(),
        HOUR,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = dir.path().join("ca.pem");
    let crl_der = dir.path().join("crl.der");
    std::fs::write(
        &ca_pem,
        sigil_identity::pem::encode("CERTIFICATE", ca.cert_der()),
    )
    .unwrap();
    std::fs::write(&crl_der, &crl.der).unwrap();
    let out = Command::new("openssl")
        .args(["crl", "-inform", "DER", "-noout", "-text", "-in"])
        .arg(&crl_der)
        .arg("-CAfile")
        .arg(&ca_pem)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("verify OK"), "{text}");
    assert!(
        text.to_ascii_uppercase().contains("SERIAL NUMBER: 0A"),
        "{text}"
    );
}

#[test]
fn ca_without_crl_sign_is_refused_with_its_id() {
    let key = PrivateKey::generate(KeyAlgorithm::EcP256)
        .unwrap()
        .signer()
        .unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org".try_into().unwrap(),
    )];
    let cert = p.self_signed(&RcgenKey(key.as_ref())).unwrap();
    let err = sign_crl(cert.der(), &key, &[], 1, now(), HOUR).unwrap_err();
    assert!(err.to_string().contains("cRLSign"), "{err}");
}

#[test]
fn odd_length_serials_parse() {
    assert_eq!(serial_bytes("a").unwrap(), [0x0a]);
    assert_eq!(serial_bytes("0a1b").unwrap(), [0x0a, 0x1b]);
    assert!(serial_bytes("zz").is_err());
    assert!(serial_bytes("").is_err());
}
