use super::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use sigil_identity::clock::SystemClock;

struct Pki {
    root_der: Vec<u8>,
    root_params: CertificateParams,
    root_key: KeyPair,
}

fn new_pki() -> Pki {
    let root_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.distinguished_name.push(DnType::CommonName, "Node CA");
    let root_der = p.self_signed(&root_key).unwrap().der().to_vec();
    Pki {
        root_der,
        root_params: p,
        root_key,
    }
}

fn node_cert(pki: &Pki, cn: &str) -> (Vec<u8>, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    let issuer = Issuer::from_params(&pki.root_params, &pki.root_key);
    (p.signed_by(&key, &issuer).unwrap().der().to_vec(), key)
}

fn attestor(pki: &Pki) -> X509PopAttestor {
    X509PopAttestor::new(
        TrustDomain::new("example.org").unwrap(),
        vec![pki.root_der.clone()],
        Arc::new(SystemClock),
    )
    .unwrap()
}

/// Plays the agent's part of the exchange in-process.
struct AgentSide<'a>(&'a dyn AgentNodeAttestor);

#[async_trait]
impl Challenger for AgentSide<'_> {
    async fn challenge(&mut self, c: Vec<u8>) -> Result<Vec<u8>, AttestError> {
        self.0.respond(&c)
    }
}

/// Answers every challenge with the signature of another key.
struct Impostor(KeyPair);

#[async_trait]
impl Challenger for Impostor {
    async fn challenge(&mut self, c: Vec<u8>) -> Result<Vec<u8>, AttestError> {
        let agent = X509PopAgent {
            chain: vec![],
            key: EcdsaKeyPair::from_pkcs8(
                &sig::ECDSA_P256_SHA256_ASN1_SIGNING,
                &self.0.serialize_der(),
                &SystemRandom::new(),
            )
            .unwrap(),
        };
        agent.respond(&c)
    }
}

#[tokio::test]
async fn attests_with_proof_of_possession() {
    let pki = new_pki();
    let (leaf, key) = node_cert(&pki, "node-1");
    let agent = X509PopAgent::new(vec![leaf.clone()], &key.serialize_der()).unwrap();
    let got = attestor(&pki)
        .attest(&agent.evidence().unwrap(), &mut AgentSide(&agent))
        .await
        .unwrap();
    assert_eq!(
        got.agent_id.path(),
        format!("/sigil/agent/x509pop/{}", crate::sha256_hex(&leaf))
    );
    assert!(got.can_reattest);
    assert!(
        got.selectors
            .contains(&Selector::parse("x509pop:subject:cn:node-1").unwrap())
    );
    let fp = format!(
        "x509pop:ca:fingerprint:{}",
        crate::sha256_hex(&pki.root_der)
    );
    assert!(got.selectors.contains(&Selector::parse(&fp).unwrap()));
}

#[tokio::test]
async fn refuses_wrong_key_unknown_ca_and_long_chains() {
    let pki = new_pki();
    let (leaf, _key) = node_cert(&pki, "node-1");
    let a = attestor(&pki);
    let err = a
        .attest(&leaf, &mut Impostor(KeyPair::generate().unwrap()))
        .await
        .unwrap_err();
    assert_eq!(err, AttestError::Rejected("proof of possession failed"));

    let other = new_pki();
    let (foreign, fkey) = node_cert(&other, "node-2");
    let agent = X509PopAgent::new(vec![foreign.clone()], &fkey.serialize_der()).unwrap();
    let err = a
        .attest(&foreign, &mut AgentSide(&agent))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        AttestError::Rejected("certificate chain does not lead to a trusted CA")
    );

    let five = [
        leaf.clone(),
        leaf.clone(),
        leaf.clone(),
        leaf.clone(),
        leaf.clone(),
    ]
    .concat();
    let err = a
        .attest(&five, &mut Impostor(KeyPair::generate().unwrap()))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        AttestError::Rejected("certificate chain longer than 4")
    );

    assert!(matches!(
        a.attest(b"garbage", &mut Impostor(KeyPair::generate().unwrap()))
            .await,
        Err(AttestError::Malformed(_))
    ));
    assert!(matches!(
        a.attest(&[], &mut Impostor(KeyPair::generate().unwrap()))
            .await,
        Err(AttestError::Malformed(_))
    ));
}

#[tokio::test]
async fn follows_an_intermediate() {
    let pki = new_pki();
    let inter_key = KeyPair::generate().unwrap();
    let mut ip = CertificateParams::default();
    ip.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    ip.distinguished_name
        .push(DnType::CommonName, "Node Intermediate");
    let root_issuer = Issuer::from_params(&pki.root_params, &pki.root_key);
    let inter = ip
        .signed_by(&inter_key, &root_issuer)
        .unwrap()
        .der()
        .to_vec();
    let leaf_key = KeyPair::generate().unwrap();
    let mut lp = CertificateParams::default();
    lp.distinguished_name.push(DnType::CommonName, "node-3");
    let leaf = lp
        .signed_by(&leaf_key, &Issuer::from_params(&ip, &inter_key))
        .unwrap()
        .der()
        .to_vec();
    let agent = X509PopAgent::new(vec![leaf, inter], &leaf_key.serialize_der()).unwrap();
    attestor(&pki)
        .attest(&agent.evidence().unwrap(), &mut AgentSide(&agent))
        .await
        .unwrap();
}

#[tokio::test]
async fn refuses_expired_certificates() {
    let pki = new_pki();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(10);
    p.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let leaf = p
        .signed_by(&key, &Issuer::from_params(&pki.root_params, &pki.root_key))
        .unwrap()
        .der()
        .to_vec();
    let agent = X509PopAgent::new(vec![leaf.clone()], &key.serialize_der()).unwrap();
    let err = attestor(&pki)
        .attest(&leaf, &mut AgentSide(&agent))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        AttestError::Rejected("certificate outside its validity period")
    );
}

#[tokio::test]
async fn refuses_a_ca_certificate_as_node_identity() {
    let pki = new_pki();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let leaf = p
        .signed_by(&key, &Issuer::from_params(&pki.root_params, &pki.root_key))
        .unwrap()
        .der()
        .to_vec();
    let agent = X509PopAgent::new(vec![leaf.clone()], &key.serialize_der()).unwrap();
    let err = attestor(&pki)
        .attest(&leaf, &mut AgentSide(&agent))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        AttestError::Rejected("node certificate is a CA certificate")
    );
}

#[test]
fn agent_refuses_mismatched_key() {
    let pki = new_pki();
    let (leaf, _) = node_cert(&pki, "n");
    let other = KeyPair::generate().unwrap();
    assert!(X509PopAgent::new(vec![leaf], &other.serialize_der()).is_err());
}

/// An RSA public key of `bits` bits with a random modulus: enough to put in
/// a certificate, which the attestor must refuse before any signature work.
struct FakeRsa(Vec<u8>);

impl FakeRsa {
    fn new(bits: usize) -> Self {
        let mut n = vec![0u8; bits.div_ceil(8)];
        sigil_identity::random::fill(&mut n);
        n[0] = 1 << ((bits - 1) % 8);
        n.insert(0, 0);
        let len = |l: usize| -> Vec<u8> {
            if l < 128 {
                vec![l as u8]
            } else {
                vec![0x82, (l >> 8) as u8, l as u8]
            }
        };
        let mut int_n = vec![0x02];
        int_n.extend(len(n.len()));
        int_n.extend(&n);
        let int_e = vec![0x02, 0x03, 0x01, 0x00, 0x01];
        let mut seq = vec![0x30];
        seq.extend(len(int_n.len() + int_e.len()));
        seq.extend(int_n);
        seq.extend(int_e);
        FakeRsa(seq)
    }
}

impl rcgen::PublicKeyData for FakeRsa {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_RSA_SHA256
    }
}

#[tokio::test]
async fn refuses_rsa_keys_over_8192_bits_before_path_building() {
    let pki = new_pki();
    let issuer = Issuer::from_params(&pki.root_params, &pki.root_key);
    let big = CertificateParams::default()
        .signed_by(&FakeRsa::new(8200), &issuer)
        .unwrap()
        .der()
        .to_vec();
    let err = attestor(&pki)
        .attest(&big, &mut Impostor(KeyPair::generate().unwrap()))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        AttestError::Rejected("unsupported or oversized key in chain")
    );
    // The same shape at 4096 bits passes the key check and fails later, at
    // the proof of possession.
    let ok_size = CertificateParams::default()
        .signed_by(&FakeRsa::new(4096), &issuer)
        .unwrap()
        .der()
        .to_vec();
    let err = attestor(&pki)
        .attest(&ok_size, &mut Impostor(KeyPair::generate().unwrap()))
        .await
        .unwrap_err();
    assert_eq!(err, AttestError::Rejected("proof of possession failed"));
}

/// A CA certificate signed by `issuer` (CN `cn`), with `key_usages` and a
/// path length constraint.
fn sub_ca(
    issuer: &Issuer<'_, &KeyPair>,
    cn: &str,
    key_usages: Vec<KeyUsagePurpose>,
    path_len: Option<u8>,
) -> (Vec<u8>, CertificateParams, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(path_len.map_or(BasicConstraints::Unconstrained, |n| {
        BasicConstraints::Constrained(n)
    }));
    p.key_usages = key_usages;
    p.distinguished_name.push(DnType::CommonName, cn);
    let der = p.signed_by(&key, issuer).unwrap().der().to_vec();
    (der, p, key)
}

/// Attests with `chain` (leaf first, `leaf_key` its key) against `roots`.
async fn attest_chain(
    roots: Vec<Vec<u8>>,
    chain: Vec<Vec<u8>>,
    leaf_key: &KeyPair,
) -> Result<Attestation, AttestError> {
    let a = X509PopAttestor::new(
        TrustDomain::new("example.org").unwrap(),
        roots,
        Arc::new(SystemClock),
    )
    .unwrap();
    let agent = X509PopAgent::new(chain, &leaf_key.serialize_der()).unwrap();
    a.attest(&agent.evidence().unwrap(), &mut AgentSide(&agent))
        .await
}

/// A leaf signed by `issuer`, shaped by `shape`.
fn leaf_with(
    issuer: &Issuer<'_, &KeyPair>,
    shape: impl FnOnce(&mut CertificateParams),
) -> (Vec<u8>, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "node");
    shape(&mut p);
    (p.signed_by(&key, issuer).unwrap().der().to_vec(), key)
}

#[tokio::test]
async fn refuses_a_leaf_whose_key_usage_forbids_signing() {
    let pki = new_pki();
    let root = Issuer::from_params(&pki.root_params, &pki.root_key);
    let (leaf, key) = leaf_with(&root, |p| {
        p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    });
    let err = attest_chain(vec![pki.root_der.clone()], vec![leaf], &key)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        AttestError::Rejected("node certificate key usage does not allow digitalSignature")
    );
    // digitalSignature present: accepted.
    let (leaf, key) = leaf_with(&root, |p| {
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    });
    attest_chain(vec![pki.root_der.clone()], vec![leaf], &key)
        .await
        .unwrap();
}

#[tokio::test]
async fn refuses_a_leaf_whose_extended_key_usage_excludes_client_auth() {
    let pki = new_pki();
    let root = Issuer::from_params(&pki.root_params, &pki.root_key);
    let (leaf, key) = leaf_with(&root, |p| {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    });
    let err = attest_chain(vec![pki.root_der.clone()], vec![leaf], &key)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        AttestError::Rejected("node certificate extended key usage does not allow clientAuth")
    );
}

#[tokio::test]
async fn refuses_an_intermediate_without_key_cert_sign() {
    let pki = new_pki();
    let root = Issuer::from_params(&pki.root_params, &pki.root_key);
    let (inter, ip, ikey) = sub_ca(
        &root,
        "Inter",
        vec![KeyUsagePurpose::DigitalSignature],
        None,
    );
    let (leaf, key) = leaf_with(&Issuer::from_params(&ip, &ikey), |_| {});
    let err = attest_chain(vec![pki.root_der.clone()], vec![leaf, inter], &key)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        AttestError::Rejected("CA certificate key usage does not allow keyCertSign")
    );
}

#[tokio::test]
async fn refuses_chains_longer_than_a_path_length_constraint() {
    // Root with pathLen 0: it may sign only end-entity certificates.
    let root_key = KeyPair::generate().unwrap();
    let mut rp = CertificateParams::default();
    rp.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    rp.distinguished_name
        .push(DnType::CommonName, "Root pathLen 0");
    let root_der = rp.self_signed(&root_key).unwrap().der().to_vec();
    let root = Issuer::from_params(&rp, &root_key);
    let (inter, ip, ikey) = sub_ca(&root, "Inter", vec![KeyUsagePurpose::KeyCertSign], None);
    let (leaf, key) = leaf_with(&Issuer::from_params(&ip, &ikey), |_| {});
    let err = attest_chain(vec![root_der.clone()], vec![leaf, inter], &key)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        AttestError::Rejected("certificate chain exceeds a CA's path length constraint")
    );
    // Directly under that root: accepted.
    let (leaf, key) = leaf_with(&root, |_| {});
    attest_chain(vec![root_der], vec![leaf], &key)
        .await
        .unwrap();

    // Intermediate with pathLen 0 above another intermediate.
    let pki = new_pki();
    let root = Issuer::from_params(&pki.root_params, &pki.root_key);
    let (upper, up, ukey) = sub_ca(&root, "Upper", vec![KeyUsagePurpose::KeyCertSign], Some(0));
    let (lower, lp, lkey) = sub_ca(
        &Issuer::from_params(&up, &ukey),
        "Lower",
        vec![KeyUsagePurpose::KeyCertSign],
        None,
    );
    let (leaf, key) = leaf_with(&Issuer::from_params(&lp, &lkey), |_| {});
    let err = attest_chain(vec![pki.root_der.clone()], vec![leaf, lower, upper], &key)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        AttestError::Rejected("certificate chain exceeds a CA's path length constraint")
    );
}
