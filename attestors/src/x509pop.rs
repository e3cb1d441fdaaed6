//! X.509 proof-of-possession node attestation.
//!
//! The agent presents a certificate chain (leaf first) issued by a CA the
//! server is configured to trust, then signs a fresh server nonce with the
//! leaf's private key. Oversized input is refused before any path building:
//! more than [`MAX_CHAIN_LEN`] certificates, or an RSA key over 8192 bits.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use ring::rand::SystemRandom;
use ring::signature::{self as sig, EcdsaKeyPair};
use sigil_identity::attestation::{
    AgentNodeAttestor, AttestError, Attestation, Challenger, ServerNodeAttestor,
};
use sigil_identity::clock::Clock;
use sigil_identity::keys::{Curve, PublicKey, Verifier};
use sigil_identity::x509 as certs;
use sigil_identity::{AgentId, Selector, SelectorSet, TrustDomain};
use tracing::info;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

/// The attestor name on the wire.
pub const NAME: &str = "x509pop";
/// Most certificates accepted in the agent's chain.
pub const MAX_CHAIN_LEN: usize = 4;
/// Largest evidence accepted, in bytes.
pub const MAX_EVIDENCE_LEN: usize = 64 * 1024;
/// Bytes of fresh randomness in each challenge.
pub const NONCE_LEN: usize = 32;
/// Domain separation for the signed challenge.
const CONTEXT: &[u8] = b"sigil x509pop v1\0";

fn signed_message(nonce: &[u8]) -> Vec<u8> {
    [CONTEXT, nonce].concat()
}

/// Splits concatenated DER certificates, refusing more than the limit.
fn split_chain(evidence: &[u8]) -> Result<Vec<&[u8]>, AttestError> {
    if evidence.len() > MAX_EVIDENCE_LEN {
        return Err(AttestError::Malformed("x509pop evidence too large"));
    }
    let mut rest = evidence;
    let mut out = Vec::new();
    while !rest.is_empty() {
        if out.len() == MAX_CHAIN_LEN {
            return Err(AttestError::Rejected("certificate chain longer than 4"));
        }
        let (after, _) = X509Certificate::from_der(rest)
            .map_err(|_| AttestError::Malformed("certificate is not DER"))?;
        out.push(&rest[..rest.len() - after.len()]);
        rest = after;
    }
    if out.is_empty() {
        return Err(AttestError::Malformed("no certificate"));
    }
    Ok(out)
}

/// The leaf signs the challenge and authenticates a client: a KeyUsage
/// extension, if present, must allow digitalSignature, and an
/// ExtendedKeyUsage extension, if present, clientAuth (or any).
fn check_leaf_usage(leaf: &X509Certificate<'_>) -> Result<(), AttestError> {
    let ku = leaf
        .key_usage()
        .map_err(|_| AttestError::Malformed("node certificate key usage"))?;
    if ku.is_some_and(|ku| !ku.value.digital_signature()) {
        return Err(AttestError::Rejected(
            "node certificate key usage does not allow digitalSignature",
        ));
    }
    let eku = leaf
        .extended_key_usage()
        .map_err(|_| AttestError::Malformed("node certificate extended key usage"))?;
    if eku.is_some_and(|eku| !(eku.value.client_auth || eku.value.any)) {
        return Err(AttestError::Rejected(
            "node certificate extended key usage does not allow clientAuth",
        ));
    }
    Ok(())
}

/// A CA certificate that signed the next one down: its KeyUsage, if
/// present, must allow keyCertSign, and its pathLen constraint, if any,
/// must allow the `intermediates_below` CA certificates under it.
fn check_issuer(ca: &X509Certificate<'_>, intermediates_below: usize) -> Result<(), AttestError> {
    let ku = ca
        .key_usage()
        .map_err(|_| AttestError::Malformed("CA certificate key usage"))?;
    if ku.is_some_and(|ku| !ku.value.key_cert_sign()) {
        return Err(AttestError::Rejected(
            "CA certificate key usage does not allow keyCertSign",
        ));
    }
    let path_len = ca
        .basic_constraints()
        .map_err(|_| AttestError::Malformed("CA certificate basic constraints"))?
        .and_then(|bc| bc.value.path_len_constraint);
    if path_len.is_some_and(|n| usize::try_from(n).is_ok_and(|n| n < intermediates_below)) {
        return Err(AttestError::Rejected(
            "certificate chain exceeds a CA's path length constraint",
        ));
    }
    Ok(())
}

/// Server half.
#[derive(Debug)]
pub struct X509PopAttestor {
    trust_domain: TrustDomain,
    roots: Vec<Vec<u8>>,
    clock: Arc<dyn Clock>,
}

impl X509PopAttestor {
    /// Trusts the CA certificates `roots` (DER).
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<Vec<u8>>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, AttestError> {
        if roots.is_empty() {
            return Err(AttestError::Internal(
                "x509pop needs at least one CA certificate".into(),
            ));
        }
        for r in &roots {
            certs::parse(r)
                .map_err(|e| AttestError::Internal(format!("x509pop CA certificate: {e}")))?;
        }
        Ok(Self {
            trust_domain,
            roots,
            clock,
        })
    }

    /// Reads the trusted CA certificates from a PEM file.
    pub fn from_pem_file(
        trust_domain: TrustDomain,
        path: &std::path::Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, AttestError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            AttestError::Internal(format!(
                "cannot read x509pop CA bundle {}: {e}",
                path.display()
            ))
        })?;
        let roots = sigil_identity::pem::decode_all("CERTIFICATE", &text).map_err(|e| {
            AttestError::Internal(format!("x509pop CA bundle {}: {e}", path.display()))
        })?;
        Self::new(trust_domain, roots, clock)
    }

    /// Verifies the chain and returns the index of the root that anchors it.
    fn verify_chain(
        &self,
        chain: &[X509Certificate<'_>],
        now: SystemTime,
    ) -> Result<usize, AttestError> {
        let roots: Vec<X509Certificate<'_>> = self
            .roots
            .iter()
            .filter_map(|r| certs::parse(r).ok())
            .collect();
        let in_time = |c: &X509Certificate<'_>| {
            let (nb, na) = certs::validity(c);
            nb <= now && now <= na
        };
        let signed_by = |child: &X509Certificate<'_>, parent: &X509Certificate<'_>| {
            child.issuer() == parent.subject()
                && PublicKey::from_spki(parent.public_key())
                    .and_then(|k| {
                        k.verify_x509(
                            &child.signature_algorithm,
                            child.tbs_certificate.as_ref(),
                            &child.signature_value.data,
                        )
                    })
                    .is_ok()
        };
        let is_ca =
            |c: &X509Certificate<'_>| matches!(c.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        for (i, cert) in chain.iter().enumerate() {
            if !in_time(cert) {
                return Err(AttestError::Rejected(
                    "certificate outside its validity period",
                ));
            }
            if i == 0 {
                if is_ca(cert) {
                    return Err(AttestError::Rejected(
                        "node certificate is a CA certificate",
                    ));
                }
                check_leaf_usage(cert)?;
            } else {
                if !is_ca(cert) {
                    return Err(AttestError::Rejected("intermediate is not a CA"));
                }
                // chain[1..i] are the intermediates it vouches for.
                check_issuer(cert, i - 1)?;
            }
            if let Some(root) = roots.iter().position(|r| signed_by(cert, r)) {
                if !in_time(&roots[root]) {
                    return Err(AttestError::Rejected(
                        "trusted CA outside its validity period",
                    ));
                }
                check_issuer(&roots[root], i)?;
                return Ok(root);
            }
            match chain.get(i + 1) {
                Some(next) if signed_by(cert, next) => {}
                _ => {
                    return Err(AttestError::Rejected(
                        "certificate chain does not lead to a trusted CA",
                    ));
                }
            }
        }
        Err(AttestError::Rejected(
            "certificate chain does not lead to a trusted CA",
        ))
    }
}

#[async_trait]
impl ServerNodeAttestor for X509PopAttestor {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn attest(
        &self,
        evidence: &[u8],
        challenger: &mut dyn Challenger,
    ) -> Result<Attestation, AttestError> {
        let ders = split_chain(evidence)?;
        let chain: Vec<X509Certificate<'_>> = ders
            .iter()
            .map(|d| certs::parse(d))
            .collect::<Result<_, _>>()
            .map_err(|_| AttestError::Malformed("certificate"))?;
        // Key types and sizes first: an 8192+ bit RSA key is refused before
        // any signature work.
        let keys = chain
            .iter()
            .map(|c| PublicKey::from_spki(c.public_key()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| AttestError::Rejected("unsupported or oversized key in chain"))?;
        let root = self.verify_chain(&chain, self.clock.now())?;

        let nonce = sigil_identity::random::bytes::<NONCE_LEN>().to_vec();
        let response = challenger.challenge(nonce.clone()).await?;
        let verifier = match &keys[0] {
            PublicKey::Ec {
                curve: Curve::P256, ..
            } => Verifier::Ecdsa(&sig::ECDSA_P256_SHA256_ASN1),
            PublicKey::Ec {
                curve: Curve::P384, ..
            } => Verifier::Ecdsa(&sig::ECDSA_P384_SHA384_ASN1),
            PublicKey::Rsa { .. } => Verifier::Rsa(&sig::RSA_PKCS1_2048_8192_SHA256),
        };
        keys[0]
            .verify_with(verifier, &signed_message(&nonce), &response)
            .map_err(|_| AttestError::Rejected("proof of possession failed"))?;

        let leaf = &chain[0];
        let fingerprint = crate::sha256_hex(ders[0]);
        let agent_id = AgentId::from_segments(&self.trust_domain, &[NAME, &fingerprint])
            .map_err(|e| AttestError::Internal(e.to_string()))?;
        let mut selectors = SelectorSet::new();
        let mut add = |v: String| {
            if let Ok(s) = Selector::new(NAME, &v) {
                selectors.insert(s);
            }
        };
        if let Some(cn) = leaf
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
        {
            add(format!("subject:cn:{cn}"));
        }
        add(format!(
            "ca:fingerprint:{}",
            crate::sha256_hex(&self.roots[root])
        ));
        add(format!("serialnumber:{}", certs::serial_hex(leaf)));
        info!(attestor = NAME, agent_id = %agent_id, "node attested");
        Ok(Attestation {
            agent_id,
            selectors,
            can_reattest: true,
        })
    }
}

/// Agent half: presents a chain and signs challenges with an EC key.
pub struct X509PopAgent {
    chain: Vec<Vec<u8>>,
    key: EcdsaKeyPair,
}

impl std::fmt::Debug for X509PopAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509PopAgent")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl X509PopAgent {
    /// Uses `chain` (DER, leaf first) and the leaf's PKCS#8 EC key
    /// (P-256 or P-384).
    pub fn new(chain: Vec<Vec<u8>>, pkcs8: &[u8]) -> Result<Self, AttestError> {
        let leaf = chain
            .first()
            .ok_or(AttestError::Malformed("empty certificate chain"))?;
        let cert = certs::parse(leaf).map_err(|_| AttestError::Malformed("leaf certificate"))?;
        let alg = match PublicKey::from_spki(cert.public_key()) {
            Ok(PublicKey::Ec {
                curve: Curve::P256, ..
            }) => &sig::ECDSA_P256_SHA256_ASN1_SIGNING,
            Ok(PublicKey::Ec {
                curve: Curve::P384, ..
            }) => &sig::ECDSA_P384_SHA384_ASN1_SIGNING,
            _ => {
                return Err(AttestError::Malformed(
                    "x509pop agent keys must be EC P-256 or P-384",
                ));
            }
        };
        let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8, &SystemRandom::new()).map_err(|_| {
            AttestError::Malformed("x509pop key is not a PKCS#8 key matching the certificate")
        })?;
        use ring::signature::KeyPair as _;
        if key.public_key().as_ref() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(AttestError::Malformed(
                "x509pop key does not match the certificate",
            ));
        }
        Ok(Self { chain, key })
    }

    /// Reads the chain (PEM) and key (PKCS#8 PEM) from files.
    pub fn from_pem_files(
        cert_path: &std::path::Path,
        key_path: &std::path::Path,
    ) -> Result<Self, AttestError> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .map_err(|e| AttestError::Internal(format!("cannot read {}: {e}", p.display())))
        };
        let chain = sigil_identity::pem::decode_all("CERTIFICATE", &read(cert_path)?)
            .map_err(|e| AttestError::Internal(format!("{}: {e}", cert_path.display())))?;
        let key = sigil_identity::pem::decode_all("PRIVATE KEY", &read(key_path)?)
            .map_err(|e| AttestError::Internal(format!("{}: {e}", key_path.display())))?;
        Self::new(chain, &key[0])
    }
}

impl AgentNodeAttestor for X509PopAgent {
    fn name(&self) -> &'static str {
        NAME
    }

    fn evidence(&self) -> Result<Vec<u8>, AttestError> {
        Ok(self.chain.concat())
    }

    fn respond(&self, challenge: &[u8]) -> Result<Vec<u8>, AttestError> {
        if challenge.len() != NONCE_LEN {
            return Err(AttestError::Malformed("unexpected challenge size"));
        }
        let sig = self
            .key
            .sign(&SystemRandom::new(), &signed_message(challenge))
            .map_err(|_| AttestError::Challenge)?;
        Ok(sig.as_ref().to_vec())
    }
}

#[cfg(test)]
mod tests;
