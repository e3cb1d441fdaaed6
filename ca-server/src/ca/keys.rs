//! CA private keys behind the [`KeyManager`] trait, and [`CaSigner`], the
//! one way every CA signature is made, wherever the key lives.
//!
//! [`DiskKeyManager`] keeps one PKCS#8 file per key, mode 0600, written to
//! a temporary file, fsynced, renamed into place and the directory fsynced,
//! so a crash never leaves a zero-length or partial key. [`MemoryKeyManager`]
//! keeps keys in the process only (tests, and deployments that accept a new
//! CA key on every restart). Both sign in process with ring; the PKCS#11
//! manager (`super::pkcs11`) signs inside a token.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
    EcdsaSigningAlgorithm, KeyPair as _,
};
use serde::{Deserialize, Serialize};
use sigil_identity::keys::Curve;
use zeroize::Zeroizing;

/// Key algorithms the CA uses for its own keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 (the default).
    EcP256,
    /// ECDSA on P-384.
    EcP384,
}

impl KeyAlgorithm {
    /// The curve.
    pub fn curve(self) -> Curve {
        match self {
            KeyAlgorithm::EcP256 => Curve::P256,
            KeyAlgorithm::EcP384 => Curve::P384,
        }
    }

    /// The ring algorithm (fixed-width `r || s` signatures).
    fn ring_fixed(self) -> &'static EcdsaSigningAlgorithm {
        match self {
            KeyAlgorithm::EcP256 => &ECDSA_P256_SHA256_FIXED_SIGNING,
            KeyAlgorithm::EcP384 => &ECDSA_P384_SHA384_FIXED_SIGNING,
        }
    }

    /// The matching rcgen signature algorithm.
    pub fn rcgen(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyAlgorithm::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }
}

/// What went wrong with a CA key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyManagerError {
    #[error("key id {0:?} may only hold a-z, 0-9 and '-'")]
    BadKeyId(String),
    #[error("key generation failed")]
    Generate,
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {0} has mode {1:o}; CA keys must be 0600 (fix with chmod 600)")]
    InsecureMode(PathBuf, u32),
    #[error("key {0} is not a valid PKCS#8 key of its algorithm")]
    Invalid(String),
    #[error("signing with CA key {0} failed")]
    Sign(String),
    #[error("{0}")]
    Pkcs11(String),
}

/// Identifies a key within a key manager.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(String);

impl KeyId {
    /// A fresh id with `prefix` (e.g. `x509`, `jwt`).
    pub fn generate(prefix: &str) -> Self {
        Self(format!("{prefix}-{}", sigil_identity::random::hex_id()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for KeyId {
    type Error = KeyManagerError;
    fn try_from(s: String) -> Result<Self, KeyManagerError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'));
        if ok {
            Ok(Self(s))
        } else {
            Err(KeyManagerError::BadKeyId(s))
        }
    }
}

impl From<KeyId> for String {
    fn from(k: KeyId) -> String {
        k.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

/// A private key: algorithm and PKCS#8 bytes, zeroed on drop, never shown.
#[derive(Clone)]
pub struct PrivateKey {
    algorithm: KeyAlgorithm,
    pkcs8: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({:?}, <redacted>)", self.algorithm)
    }
}

impl PrivateKey {
    /// Generates a fresh key.
    pub fn generate(algorithm: KeyAlgorithm) -> Result<Self, KeyManagerError> {
        let doc = EcdsaKeyPair::generate_pkcs8(algorithm.ring_fixed(), &SystemRandom::new())
            .map_err(|_| KeyManagerError::Generate)?;
        Ok(Self {
            algorithm,
            pkcs8: Zeroizing::new(doc.as_ref().to_vec()),
        })
    }

    /// Wraps PKCS#8 bytes, checking they hold a key of `algorithm`.
    pub fn from_pkcs8(
        algorithm: KeyAlgorithm,
        pkcs8: Vec<u8>,
        name: &str,
    ) -> Result<Self, KeyManagerError> {
        let key = Self {
            algorithm,
            pkcs8: Zeroizing::new(pkcs8),
        };
        key.rcgen()
            .map_err(|_| KeyManagerError::Invalid(name.to_owned()))?;
        Ok(key)
    }

    /// The key as a [`CaSigner`] (ring, in this process).
    pub fn signer(&self) -> Result<CaKey, KeyManagerError> {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(self.algorithm.ring_fixed(), &self.pkcs8, &rng)
            .map_err(|_| KeyManagerError::Invalid("in-memory CA key".into()))?;
        Ok(Arc::new(SoftwareSigner {
            algorithm: self.algorithm,
            pair,
            rng,
        }))
    }

    /// The algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The PKCS#8 bytes.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The key as an rcgen signer for certificates.
    pub fn rcgen(&self) -> Result<rcgen::KeyPair, rcgen::Error> {
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from(self.pkcs8.as_slice());
        rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, self.algorithm.rcgen())
    }
}

/// A CA private key, wherever it lives, as the CA uses it: every CA
/// signature (CA certificates, X509-SVIDs, JWT-SVIDs) goes through
/// [`CaSigner::sign`].
pub trait CaSigner: Send + Sync + fmt::Debug {
    /// The key's algorithm.
    fn algorithm(&self) -> KeyAlgorithm;
    /// The public key: the uncompressed EC point (`04 || x || y`).
    fn public_key(&self) -> &[u8];
    /// ECDSA over the algorithm's SHA-2 digest of `msg` (SHA-256 for
    /// P-256, SHA-384 for P-384), as fixed-width `r || s`.
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyManagerError>;
}

/// A shared handle on a CA key.
pub type CaKey = Arc<dyn CaSigner>;

/// A key in this process's memory, signing with ring.
struct SoftwareSigner {
    algorithm: KeyAlgorithm,
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl fmt::Debug for SoftwareSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SoftwareSigner({:?}, <redacted>)", self.algorithm)
    }
}

impl CaSigner for SoftwareSigner {
    fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyManagerError> {
        self.pair
            .sign(&self.rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| KeyManagerError::Sign("in memory".into()))
    }
}

/// Where the CA's private keys live.
pub trait KeyManager: Send + Sync + fmt::Debug {
    /// Generates and stores a new key under `id`.
    fn generate(&self, id: &KeyId, algorithm: KeyAlgorithm) -> Result<CaKey, KeyManagerError>;
    /// Loads the key stored under `id`, if any.
    fn load(&self, id: &KeyId, algorithm: KeyAlgorithm) -> Result<Option<CaKey>, KeyManagerError>;
    /// Deletes the key under `id`; deleting a missing key is not an error.
    fn delete(&self, id: &KeyId) -> Result<(), KeyManagerError>;
}

/// Keys held in memory only.
#[derive(Debug, Default)]
pub struct MemoryKeyManager {
    keys: Mutex<HashMap<KeyId, PrivateKey>>,
}

impl KeyManager for MemoryKeyManager {
    fn generate(&self, id: &KeyId, algorithm: KeyAlgorithm) -> Result<CaKey, KeyManagerError> {
        let key = PrivateKey::generate(algorithm)?;
        let signer = key.signer()?;
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), key);
        Ok(signer)
    }

    fn load(&self, id: &KeyId, _algorithm: KeyAlgorithm) -> Result<Option<CaKey>, KeyManagerError> {
        let key = self
            .keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        key.map(|k| k.signer()).transpose()
    }

    fn delete(&self, id: &KeyId) -> Result<(), KeyManagerError> {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }
}

/// Keys as PKCS#8 files in a directory (mode 0700, files 0600).
#[derive(Debug)]
pub struct DiskKeyManager {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyManagerError + '_ {
    move |source| KeyManagerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl DiskKeyManager {
    /// Uses `dir`, creating it with mode 0700 if needed. An existing one
    /// open to group or others is set to 0700 (with a warning) if this user
    /// owns it, and refused otherwise.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, KeyManagerError> {
        use sigil_identity::secret_file::{DirState, private_dir};
        let dir = dir.into();
        if let DirState::Tightened { was } = private_dir(&dir).map_err(io(&dir))? {
            tracing::warn!(
                dir = %dir.display(),
                mode = format_args!("{was:o}"),
                "the CA key directory was open to group or others; now 0700 (the keys it held \
                 may have been read: consider rotating the CA)"
            );
        }
        Ok(Self { dir })
    }

    fn path(&self, id: &KeyId) -> PathBuf {
        self.dir.join(format!("{id}.pk8"))
    }
}

/// Writes `bytes` to `path` atomically with mode 0600: temp file, fsync,
/// rename, fsync of the directory.
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> Result<(), KeyManagerError> {
    sigil_identity::secret_file::write(path, bytes, 0o600).map_err(io(path))
}

impl KeyManager for DiskKeyManager {
    fn generate(&self, id: &KeyId, algorithm: KeyAlgorithm) -> Result<CaKey, KeyManagerError> {
        let key = PrivateKey::generate(algorithm)?;
        write_secret_file(&self.path(id), key.pkcs8())?;
        key.signer()
    }

    fn load(&self, id: &KeyId, algorithm: KeyAlgorithm) -> Result<Option<CaKey>, KeyManagerError> {
        let path = self.path(id);
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyManagerError::InsecureMode(path, mode));
        }
        let bytes = fs::read(&path).map_err(io(&path))?;
        PrivateKey::from_pkcs8(algorithm, bytes, &path.display().to_string())?
            .signer()
            .map(Some)
    }

    fn delete(&self, id: &KeyId) -> Result<(), KeyManagerError> {
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io(&self.dir)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(km: &dyn KeyManager) {
        let id = KeyId::generate("x509");
        let key = km.generate(&id, KeyAlgorithm::EcP256).unwrap();
        let loaded = km.load(&id, KeyAlgorithm::EcP256).unwrap().unwrap();
        assert_eq!(loaded.public_key(), key.public_key());
        let sig = loaded.sign(b"message").unwrap();
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            key.public_key(),
        )
        .verify(b"message", &sig)
        .unwrap();
        km.delete(&id).unwrap();
        assert!(km.load(&id, KeyAlgorithm::EcP256).unwrap().is_none());
        km.delete(&id).unwrap();
    }

    #[test]
    fn memory_manager_round_trip() {
        round_trip(&MemoryKeyManager::default());
    }

    #[test]
    fn disk_manager_round_trip_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let km = DiskKeyManager::open(dir.path().join("keys")).unwrap();
        round_trip(&km);
        let id = KeyId::generate("jwt");
        km.generate(&id, KeyAlgorithm::EcP384).unwrap();
        let meta = fs::metadata(km.path(&id)).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "key files are 0600"
        );
        let dmeta = fs::metadata(dir.path().join("keys")).unwrap();
        assert_eq!(dmeta.permissions().mode() & 0o777, 0o700);
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("keys"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "no temp files stay behind");
    }

    #[test]
    fn disk_manager_refuses_group_readable_keys() {
        let dir = tempfile::tempdir().unwrap();
        let km = DiskKeyManager::open(dir.path()).unwrap();
        let id = KeyId::generate("x509");
        km.generate(&id, KeyAlgorithm::EcP256).unwrap();
        fs::set_permissions(km.path(&id), fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            km.load(&id, KeyAlgorithm::EcP256),
            Err(KeyManagerError::InsecureMode(..))
        ));
    }

    #[test]
    fn disk_manager_refuses_garbage_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let km = DiskKeyManager::open(dir.path()).unwrap();
        let id = KeyId::generate("x509");
        write_secret_file(&km.path(&id), b"not a key").unwrap();
        assert!(matches!(
            km.load(&id, KeyAlgorithm::EcP256),
            Err(KeyManagerError::Invalid(_))
        ));
    }

    #[test]
    fn key_ids_are_checked() {
        assert!(KeyId::try_from("x509-abc".to_string()).is_ok());
        assert!(KeyId::try_from("../etc".to_string()).is_err());
        assert!(KeyId::try_from(String::new()).is_err());
    }

    #[test]
    fn debug_hides_key_bytes() {
        let k = PrivateKey::generate(KeyAlgorithm::EcP256).unwrap();
        assert_eq!(format!("{k:?}"), "PrivateKey(EcP256, <redacted>)");
    }
}
