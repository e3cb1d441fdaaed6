//! Certificate builders for this crate's tests: a CA and leaves shaped like
//! Sigil's profile, with knobs to break one rule at a time.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose as Eku, IsCa, Issuer,
    KeyPair, KeyUsagePurpose as Ku, SanType, SerialNumber,
};
use time::{Duration as TDuration, OffsetDateTime};

pub struct TestCa {
    pub der: Vec<u8>,
    pub params: CertificateParams,
    pub key: KeyPair,
}

pub fn ca_params(td: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign];
    p.distinguished_name.push(DnType::OrganizationName, "test");
    p.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
    p.serial_number = Some(SerialNumber::from_slice(&[0x11; 16]));
    let now = OffsetDateTime::now_utc();
    p.not_before = now - TDuration::minutes(1);
    p.not_after = now + TDuration::days(1);
    p
}

pub fn ca(td: &str) -> TestCa {
    ca_with(ca_params(td))
}

pub fn ca_with(params: CertificateParams) -> TestCa {
    let key = KeyPair::generate().unwrap();
    let der = params.self_signed(&key).unwrap().der().to_vec();
    TestCa { der, params, key }
}

pub fn leaf_params(id: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![Ku::DigitalSignature, Ku::KeyEncipherment, Ku::KeyAgreement];
    p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
    p.distinguished_name
        .push(DnType::OrganizationName, "SPIRE-compatible");
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.serial_number = Some(SerialNumber::from_slice(&[0x42; 16]));
    p.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - TDuration::seconds(10);
    p.not_after = now + TDuration::hours(1);
    p
}

impl TestCa {
    pub fn issue(&self, params: &CertificateParams) -> Vec<u8> {
        let leaf_key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        params.signed_by(&leaf_key, &issuer).unwrap().der().to_vec()
    }
}
