//! Join token node attestation.
//!
//! An operator generates a token (128 random bits); the agent presents it
//! once. The server stores only the token's SHA-256, consumes it atomically
//! (two agents racing with one token yield exactly one agent), and names
//! the agent after the hash, never after the token itself.

use std::sync::Arc;

use async_trait::async_trait;
use sigil_identity::attestation::{
    AgentNodeAttestor, AttestError, Attestation, Challenger, ServerNodeAttestor,
};
use sigil_identity::{AgentId, Selector, SelectorSet, TrustDomain};

/// The attestor name on the wire.
pub const NAME: &str = "join_token";
/// Longest token accepted; generated tokens are 32 characters.
pub const MAX_TOKEN_LEN: usize = 256;

/// A fresh token: 128 random bits as 32 hex characters.
pub fn generate_token() -> String {
    sigil_identity::random::hex_id()
}

/// The public identifier of a token: the first 32 hex digits of its
/// SHA-256. It names the agent and appears in its node selector.
pub fn token_id(token: &str) -> String {
    let mut h = crate::sha256_hex(token.as_bytes());
    h.truncate(32);
    h
}

/// The node selector an agent attested with `token` carries, used to attach
/// node alias entries to it.
pub fn selector_for(token: &str) -> Selector {
    // Hex digits always make a valid selector value.
    Selector::new(NAME, &token_id(token))
        .unwrap_or_else(|_| unreachable!("hex is a valid selector value"))
}

/// Where the server consumes tokens; the datastore implements it.
#[async_trait]
pub trait TokenStore: Send + Sync + std::fmt::Debug {
    /// Consumes `token`, failing if it is unknown, used or expired.
    async fn consume(&self, token: &str) -> Result<(), AttestError>;
}

/// Server half.
#[derive(Debug)]
pub struct JoinTokenAttestor {
    trust_domain: TrustDomain,
    store: Arc<dyn TokenStore>,
}

impl JoinTokenAttestor {
    /// A join token attestor for `trust_domain` consuming from `store`.
    pub fn new(trust_domain: TrustDomain, store: Arc<dyn TokenStore>) -> Self {
        Self {
            trust_domain,
            store,
        }
    }
}

#[async_trait]
impl ServerNodeAttestor for JoinTokenAttestor {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn attest(
        &self,
        evidence: &[u8],
        _challenger: &mut dyn Challenger,
    ) -> Result<Attestation, AttestError> {
        if evidence.is_empty() || evidence.len() > MAX_TOKEN_LEN {
            return Err(AttestError::Malformed("join token length"));
        }
        let token = std::str::from_utf8(evidence)
            .map_err(|_| AttestError::Malformed("join token is not text"))?;
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AttestError::Malformed("join token has invalid characters"));
        }
        self.store.consume(token).await?;
        let id = token_id(token);
        let agent_id = AgentId::from_segments(&self.trust_domain, &[NAME, &id])
            .map_err(|e| AttestError::Internal(e.to_string()))?;
        let selectors: SelectorSet = [selector_for(token)].into_iter().collect();
        Ok(Attestation {
            agent_id,
            selectors,
            can_reattest: false,
        })
    }
}

/// Agent half: presents the configured token.
#[derive(Clone)]
pub struct JoinTokenAgent {
    token: String,
}

impl std::fmt::Debug for JoinTokenAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinTokenAgent(<redacted>)")
    }
}

impl JoinTokenAgent {
    /// An agent attestor presenting `token`.
    pub fn new(token: impl Into<String>) -> Self {
        Self {
            token: token.into(),
        }
    }
}

impl AgentNodeAttestor for JoinTokenAgent {
    fn name(&self) -> &'static str {
        NAME
    }

    fn evidence(&self) -> Result<Vec<u8>, AttestError> {
        Ok(self.token.as_bytes().to_vec())
    }

    fn respond(&self, _challenge: &[u8]) -> Result<Vec<u8>, AttestError> {
        Err(AttestError::Malformed(
            "join_token attestation has no challenges",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    struct Tokens(Mutex<HashSet<String>>);

    #[async_trait]
    impl TokenStore for Tokens {
        async fn consume(&self, token: &str) -> Result<(), AttestError> {
            if self.0.lock().unwrap().remove(token) {
                Ok(())
            } else {
                Err(AttestError::Rejected("unknown or used join token"))
            }
        }
    }

    struct NoChallenges;

    #[async_trait]
    impl Challenger for NoChallenges {
        async fn challenge(&mut self, _c: Vec<u8>) -> Result<Vec<u8>, AttestError> {
            Err(AttestError::Challenge)
        }
    }

    #[test]
    fn tokens_have_128_random_bits() {
        let a = generate_token();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, generate_token());
    }

    #[tokio::test]
    async fn token_is_single_use_and_agent_named_by_hash() {
        let store = Arc::new(Tokens::default());
        let token = generate_token();
        store.0.lock().unwrap().insert(token.clone());
        let a = JoinTokenAttestor::new(TrustDomain::new("example.org").unwrap(), store);
        let got = a.attest(token.as_bytes(), &mut NoChallenges).await.unwrap();
        assert!(
            !got.agent_id.as_str().contains(&token),
            "the token never appears in the agent id"
        );
        assert_eq!(
            got.agent_id.path(),
            format!("/sigil/agent/join_token/{}", token_id(&token))
        );
        assert!(got.selectors.contains(&selector_for(&token)));
        assert!(!got.can_reattest);
        assert!(
            a.attest(token.as_bytes(), &mut NoChallenges).await.is_err(),
            "second use refused"
        );
    }

    #[tokio::test]
    async fn malformed_tokens_are_refused_before_lookup() {
        let a = JoinTokenAttestor::new(
            TrustDomain::new("example.org").unwrap(),
            Arc::new(Tokens::default()),
        );
        for bad in [
            &b""[..],
            &[b'a'; MAX_TOKEN_LEN + 1],
            b"has space",
            &[0xff, 0xfe],
        ] {
            assert!(matches!(
                a.attest(bad, &mut NoChallenges).await,
                Err(AttestError::Malformed(_))
            ));
        }
    }

    #[test]
    fn agent_half_debug_hides_token() {
        let agent = JoinTokenAgent::new("secret-token");
        assert!(!format!("{agent:?}").contains("secret"));
        assert_eq!(agent.evidence().unwrap(), b"secret-token");
    }
}
