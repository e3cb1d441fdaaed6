#![allow(clippy::unwrap_used)]

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

use super::*;
use crate::TrustDomain;
use crate::spiffe_id::SpiffeId;
use crate::tls::{
    SharedBundle, SpiffeClientVerifier, SpiffeServerVerifier, SvidResolver, authorize_id,
    certified_key, client_config, server_config,
};

struct Ca {
    der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
    let cert = p.self_signed(&key).unwrap();
    Ca {
        der: cert.der().to_vec(),
        issuer: Issuer::new(p, key),
    }
}

fn svid(ca: &Ca, id: &str, serial: u64) -> (Vec<u8>, Arc<CertifiedKey>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(SerialNumber::from(serial));
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    let der = cert.der().to_vec();
    (
        der.clone(),
        certified_key(&[der], &key.serialize_der()).unwrap(),
    )
}

fn crl(ca: &Ca, serials: &[u64]) -> Vec<u8> {
    let now = OffsetDateTime::now_utc();
    CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::hours(1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from(*s),
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

fn bundle(cas: &[&Ca]) -> Bundle {
    let mut b = Bundle::new(TrustDomain::new("example.org").unwrap());
    b.x509_authorities = cas.iter().map(|c| c.der.clone()).collect();
    b
}

/// Whether a client presenting `client` is accepted by a server whose
/// verifier checks `crls`.
fn client_accepted(
    bundle: &Bundle,
    crls: Revoked,
    server: Arc<CertifiedKey>,
    client: Arc<CertifiedKey>,
) -> bool {
    let shared = Arc::new(SharedBundle::new(bundle.clone()));
    let crls_shared = Arc::new(SharedCrls::default());
    crls_shared.set(crls);
    let any: crate::tls::Authorizer = Arc::new(|_: &SpiffeId| true);
    let server = Arc::new(
        server_config(
            Arc::new(SvidResolver::new(server)),
            Arc::new(
                SpiffeClientVerifier::new(shared.clone(), any.clone(), true)
                    .with_crls(crls_shared.clone()),
            ),
        )
        .unwrap(),
    );
    let server_id = SpiffeId::parse("spiffe://example.org/server").unwrap();
    let client = Arc::new(
        client_config(
            Arc::new(
                SpiffeServerVerifier::new(shared, authorize_id(server_id)).with_crls(crls_shared),
            ),
            Some(Arc::new(SvidResolver::new(client))),
        )
        .unwrap(),
    );
    let mut c = rustls::ClientConnection::new(
        client,
        rustls::pki_types::ServerName::try_from("svid.test").unwrap(),
    )
    .unwrap();
    let mut s = rustls::ServerConnection::new(server).unwrap();
    let mut buf = Vec::new();
    for _ in 0..20 {
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        s.read_tls(&mut buf.as_slice()).unwrap();
        if s.process_new_packets().is_err() {
            return false;
        }
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        c.read_tls(&mut buf.as_slice()).unwrap();
        if c.process_new_packets().is_err() {
            return false;
        }
        if !c.is_handshaking() && !s.is_handshaking() {
            return true;
        }
    }
    false
}

#[test]
fn revoked_client_is_refused_and_others_from_the_same_ca_accepted() {
    let a = ca();
    let b = bundle(&[&a]);
    let (_, server) = svid(&a, "spiffe://example.org/server", 1);
    let (_, good) = svid(&a, "spiffe://example.org/good", 2);
    let (bad_der, bad) = svid(&a, "spiffe://example.org/bad", 3);
    let (revoked, errors) = Revoked::verified(&[crl(&a, &[3])], &b);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(revoked.is_revoked(&bad_der));
    assert!(client_accepted(&b, revoked.clone(), server.clone(), good));
    assert!(!client_accepted(&b, revoked, server, bad));
}

#[test]
fn revoked_server_is_refused_by_the_client() {
    let a = ca();
    let b = bundle(&[&a]);
    let (_, server) = svid(&a, "spiffe://example.org/server", 1);
    let (_, client) = svid(&a, "spiffe://example.org/client", 2);
    let (revoked, _) = Revoked::verified(&[crl(&a, &[1])], &b);
    assert!(!client_accepted(&b, revoked, server, client));
}

#[test]
fn ca_without_a_crl_is_allowed() {
    // Two CAs; only `a` has a CRL. What `c` issued is still accepted.
    let (a, c) = (ca(), ca());
    let b = bundle(&[&a, &c]);
    let (_, server) = svid(&a, "spiffe://example.org/server", 1);
    let (_, from_c) = svid(&c, "spiffe://example.org/other", 3);
    let (revoked, _) = Revoked::verified(&[crl(&a, &[3])], &b);
    assert_eq!(revoked.issuers(), 1);
    assert!(
        client_accepted(&b, revoked, server, from_c),
        "serial 3 of another CA"
    );
}

#[test]
fn crls_not_signed_by_a_bundle_authority_are_not_taken() {
    let (a, stranger) = (ca(), ca());
    let b = bundle(&[&a]);
    let (bad_der, _) = svid(&a, "spiffe://example.org/bad", 3);
    let (revoked, errors) = Revoked::verified(&[crl(&stranger, &[3]), b"junk".to_vec()], &b);
    assert_eq!(errors, vec![CrlError::UnknownIssuer, CrlError::Parse]);
    assert!(!revoked.is_revoked(&bad_der));
    // A CRL whose signature was tampered with.
    let mut forged = crl(&a, &[3]);
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let (revoked, errors) = Revoked::verified(&[forged], &b);
    assert_eq!(errors, vec![CrlError::Signature]);
    assert!(!revoked.is_revoked(&bad_der));
}
