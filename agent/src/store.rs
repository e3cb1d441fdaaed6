//! The agent's own state on disk: its key and SVID (0600) and the trust
//! bundle, in a 0700 directory, so a restart needs no re-attestation.

use std::path::{Path, PathBuf};

use sigil_identity::{Bundle, TrustDomain, pem, secret_file};
use tracing::warn;
use zeroize::Zeroizing;

/// Why agent state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("agent state {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("agent state {0} is unreadable: {1}")]
    Corrupt(PathBuf, String),
}

/// What the agent keeps between runs.
#[derive(Clone)]
pub struct AgentState {
    /// PKCS#8 of the agent key.
    pub key: Zeroizing<Vec<u8>>,
    /// The agent SVID chain, DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The trust bundle as last received.
    pub bundle: Bundle,
}

impl std::fmt::Debug for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentState")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Files under the data directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Uses `dir`, creating it (0700) if needed. An existing one open to
    /// group or others is set to 0700 (with a warning) if this user owns
    /// it, and refused otherwise.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        match secret_file::private_dir(dir).map_err(|e| StoreError::Io(dir.to_path_buf(), e))? {
            secret_file::DirState::Private => {}
            secret_file::DirState::Tightened { was } => warn!(
                dir = %dir.display(),
                mode = format_args!("{was:o}"),
                "the agent data directory was open to group or others; now 0700 (what it \
                 held may have been read: consider evicting this agent so it attests afresh)"
            ),
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Saves the state; each file is replaced atomically.
    pub fn save(&self, state: &AgentState) -> Result<(), StoreError> {
        let write = |name: &str, bytes: &[u8], mode: u32| {
            let p = self.path(name);
            secret_file::write(&p, bytes, mode).map_err(|e| StoreError::Io(p, e))
        };
        write("bundle.jwks", &state.bundle.to_jwks_bytes(), 0o644)?;
        let chain: String = state
            .chain
            .iter()
            .map(|c| pem::encode("CERTIFICATE", c))
            .collect();
        // Key before certificate: a certificate on disk always has its key.
        write(
            "agent.key",
            pem::encode("PRIVATE KEY", &state.key).as_bytes(),
            0o600,
        )?;
        write("agent.pem", chain.as_bytes(), 0o600)
    }

    /// Deletes the agent's key and SVID (after the server revoked it), so
    /// that a restart must attest again. The bundle stays.
    pub fn forget_svid(&self) -> Result<(), StoreError> {
        for name in ["agent.pem", "agent.key"] {
            let p = self.path(name);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::Io(p, e)),
            }
        }
        Ok(())
    }

    /// Loads the state, or `None` on first run.
    pub fn load(&self, td: &TrustDomain) -> Result<Option<AgentState>, StoreError> {
        let read = |name: &str| -> Result<Option<Vec<u8>>, StoreError> {
            let p = self.path(name);
            match std::fs::read(&p) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StoreError::Io(p, e)),
            }
        };
        let (Some(key), Some(chain), Some(bundle)) =
            (read("agent.key")?, read("agent.pem")?, read("bundle.jwks")?)
        else {
            return Ok(None);
        };
        let corrupt = |name: &str, e: String| StoreError::Corrupt(self.path(name), e);
        let key = Zeroizing::new(
            String::from_utf8(key).map_err(|e| corrupt("agent.key", e.to_string()))?,
        );
        let key = pem::decode_all("PRIVATE KEY", &key)
            .map_err(|e| corrupt("agent.key", e.to_string()))?
            .remove(0);
        let chain = String::from_utf8(chain).map_err(|e| corrupt("agent.pem", e.to_string()))?;
        let chain = pem::decode_all("CERTIFICATE", &chain)
            .map_err(|e| corrupt("agent.pem", e.to_string()))?;
        let bundle = Bundle::from_jwks(td.clone(), &bundle)
            .map_err(|e| corrupt("bundle.jwks", e.to_string()))?;
        Ok(Some(AgentState {
            key: Zeroizing::new(key),
            chain,
            bundle,
        }))
    }
}
