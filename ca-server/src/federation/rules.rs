//! The rules a foreign bundle fetched from a bundle endpoint must pass to
//! replace the stored one, and how long to wait before the next fetch.
//!
//! A refused bundle changes nothing: the last good bundle stays in use.

use std::time::Duration;

use sigil_identity::bundle::BundleError;
use sigil_identity::{Bundle, TrustDomain};

/// What to do with a fetched bundle that passed every rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Store it: it is new (or the first).
    Store(Bundle),
    /// The stored bundle is this one already (same sequence, same keys);
    /// the fetched refresh hint still schedules the next poll.
    Unchanged { refresh_hint: Option<Duration> },
}

/// Why a fetched bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    #[error("the response is not a SPIFFE bundle: {0}")]
    NotABundle(BundleError),
    #[error(
        "X.509 authority {index} is not a CA certificate of trust domain {trust_domain} ({reason}): the endpoint serves another trust domain's bundle"
    )]
    WrongTrustDomain {
        trust_domain: TrustDomain,
        index: usize,
        reason: String,
    },
    #[error(
        "spiffe_sequence went back from {stored} to {fetched}: an old or replayed bundle is not accepted"
    )]
    SequenceWentBack { stored: u64, fetched: u64 },
    #[error(
        "the keys changed but spiffe_sequence stayed {sequence}: a bundle must get a new sequence on every change"
    )]
    ChangedWithoutNewSequence { sequence: u64 },
}

/// Checks `body`, fetched for trust domain `td`, against the `stored`
/// bundle: it must be a SPIFFE bundle (JWK Set), its X.509 authorities CA
/// certificates of `td`, and its sequence not lower than the stored one
/// (equal only when nothing changed).
pub fn check(td: &TrustDomain, stored: Option<&Bundle>, body: &[u8]) -> Result<Verdict, Refused> {
    let fetched = Bundle::from_jwks(td.clone(), body).map_err(Refused::NotABundle)?;
    check_trust_domain(td, &fetched)?;
    let Some(stored) = stored else {
        return Ok(Verdict::Store(fetched));
    };
    check_sequence(stored, fetched)
}

/// Every X.509 authority is a CA certificate whose URI SAN (when present)
/// names `td`: a bundle of another trust domain is refused.
pub fn check_trust_domain(td: &TrustDomain, bundle: &Bundle) -> Result<(), Refused> {
    for (index, der) in bundle.x509_authorities.iter().enumerate() {
        let wrong = |reason: String| Refused::WrongTrustDomain {
            trust_domain: td.clone(),
            index,
            reason,
        };
        let cert = sigil_identity::x509::parse(der).map_err(|e| wrong(e.to_string()))?;
        sigil_identity::x509::check_ca(&cert, td).map_err(|e| wrong(e.to_string()))?;
    }
    Ok(())
}

/// The sequence never goes back; an equal sequence must mean the same keys.
pub fn check_sequence(stored: &Bundle, fetched: Bundle) -> Result<Verdict, Refused> {
    if fetched.sequence < stored.sequence {
        return Err(Refused::SequenceWentBack {
            stored: stored.sequence,
            fetched: fetched.sequence,
        });
    }
    if fetched.sequence == stored.sequence {
        return if fetched.same_authorities(stored) {
            Ok(Verdict::Unchanged {
                refresh_hint: fetched.refresh_hint,
            })
        } else {
            Err(Refused::ChangedWithoutNewSequence {
                sequence: fetched.sequence,
            })
        };
    }
    Ok(Verdict::Store(fetched))
}

/// How long to wait before the next fetch: the bundle's refresh hint
/// ([`super::DEFAULT_REFRESH`] without one), kept within `[min, max]`.
pub fn next_poll(hint: Option<Duration>, min: Duration, max: Duration) -> Duration {
    hint.unwrap_or(super::DEFAULT_REFRESH)
        .clamp(min, max.max(min))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose as Ku, SanType,
    };

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    /// A CA certificate for `of` (URI SAN `spiffe://<of>`).
    fn ca(of: &str) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign];
        p.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{of}").as_str().try_into().unwrap(),
        )];
        p.use_authority_key_identifier_extension = false;
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn bundle(of: &str, cas: &[Vec<u8>], sequence: u64) -> Bundle {
        let mut b = Bundle::new(td(of));
        b.x509_authorities = cas.to_vec();
        b.sequence = sequence;
        b
    }

    #[test]
    fn garbage_is_refused() {
        for body in [&b"not json"[..], b"{}", b"[1,2]", b"{\"keys\": 5}"] {
            assert!(
                matches!(
                    check(&td("td2.org"), None, body),
                    Err(Refused::NotABundle(_))
                ),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn the_first_valid_bundle_is_stored() {
        let b = bundle("td2.org", &[ca("td2.org")], 3);
        assert_eq!(
            check(&td("td2.org"), None, &b.to_jwks_bytes()),
            Ok(Verdict::Store(b))
        );
    }

    #[test]
    fn a_bundle_of_another_trust_domain_is_refused() {
        let other = bundle("td3.org", &[ca("td3.org")], 9);
        let err = check(&td("td2.org"), None, &other.to_jwks_bytes()).unwrap_err();
        assert!(
            matches!(err, Refused::WrongTrustDomain { index: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_lower_sequence_is_refused() {
        let stored = bundle("td2.org", &[ca("td2.org")], 5);
        let older = bundle("td2.org", &[ca("td2.org")], 4);
        assert_eq!(
            check(&td("td2.org"), Some(&stored), &older.to_jwks_bytes()),
            Err(Refused::SequenceWentBack {
                stored: 5,
                fetched: 4
            })
        );
    }

    #[test]
    fn the_same_sequence_with_the_same_keys_is_unchanged() {
        let stored = bundle("td2.org", &[ca("td2.org")], 5);
        let mut served = stored.clone();
        served.refresh_hint = Some(Duration::from_secs(7));
        assert_eq!(
            check(&td("td2.org"), Some(&stored), &served.to_jwks_bytes()),
            Ok(Verdict::Unchanged {
                refresh_hint: Some(Duration::from_secs(7))
            })
        );
    }

    #[test]
    fn the_same_sequence_with_other_keys_is_refused() {
        let stored = bundle("td2.org", &[ca("td2.org")], 5);
        let changed = bundle("td2.org", &[ca("td2.org")], 5);
        assert_eq!(
            check(&td("td2.org"), Some(&stored), &changed.to_jwks_bytes()),
            Err(Refused::ChangedWithoutNewSequence { sequence: 5 })
        );
    }

    #[test]
    fn a_higher_sequence_replaces_the_stored_bundle() {
        let stored = bundle("td2.org", &[ca("td2.org")], 5);
        let newer = bundle("td2.org", &[ca("td2.org"), ca("td2.org")], 6);
        assert_eq!(
            check(&td("td2.org"), Some(&stored), &newer.to_jwks_bytes()),
            Ok(Verdict::Store(newer))
        );
    }

    /// An empty key set means every key of the trust domain is revoked
    /// (SPIFFE bundle format): it is stored, so its SVIDs stop verifying.
    #[test]
    fn an_empty_bundle_with_a_new_sequence_is_stored() {
        let stored = bundle("td2.org", &[ca("td2.org")], 5);
        let empty = bundle("td2.org", &[], 6);
        assert_eq!(
            check(&td("td2.org"), Some(&stored), &empty.to_jwks_bytes()),
            Ok(Verdict::Store(empty))
        );
    }

    #[test]
    fn polls_follow_the_refresh_hint_within_bounds() {
        let (min, max) = (Duration::from_secs(10), Duration::from_secs(600));
        let s = Duration::from_secs;
        assert_eq!(next_poll(Some(s(60)), min, max), s(60));
        assert_eq!(next_poll(Some(s(1)), min, max), min);
        assert_eq!(next_poll(Some(s(86_400)), min, max), max);
        assert_eq!(next_poll(None, min, max), super::super::DEFAULT_REFRESH);
    }
}
