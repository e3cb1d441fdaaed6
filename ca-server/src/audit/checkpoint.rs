//! Signed checkpoints of the audit log, in the C2SP `tlog-checkpoint`
//! format: a signed note whose body is the origin line, the tree size and
//! the base64 root, signed with the server's dedicated Ed25519 audit key
//! (never a CA key).
//!
//! The root is the hash of the last record covered (the chain head): it
//! commits to every record before it through the chain, verification walks
//! the whole log anyway, and it survives retention (the anchor keeps the
//! hash of the last pruned record) where a Merkle root over all records
//! since the first would need the pruned leaves. What it does not give is
//! a Merkle inclusion proof for one record, which Sigil has no client for.
//! The tree size is the sequence number of that record.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use sigil_identity::TrustDomain;

use tracing::{info, warn};

use super::chain::{ChainHead, Hash};
use crate::datastore::{Datastore, DatastoreError};

/// The audit key's file in the data directory (PKCS#8, mode 0600).
pub const KEY_FILE: &str = "audit-key.p8";
/// Its public half as a note verifier key (`name+keyid+key`), mode 0644:
/// copy it off the machine to check checkpoints with.
pub const PUBLIC_KEY_FILE: &str = "audit-key.pub";
/// The latest checkpoint, rewritten with each new one, mode 0644: ship it
/// off the machine (or export it with `audit checkpoint --write`).
pub const CHECKPOINT_FILE: &str = "audit-checkpoint";

/// The Ed25519 signature type of signed notes.
const ALG_ED25519: u8 = 0x01;

/// What went wrong with a key or a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("audit key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("not a checkpoint: {0}")]
    Format(String),
    #[error(
        "the checkpoint has no valid signature by audit key {0}: it was changed, or signed by another key"
    )]
    Signature(String),
}

/// The origin line of a trust domain's audit log, also the key's name.
pub fn origin(td: &TrustDomain) -> String {
    format!("sigil/{td}/audit")
}

/// A checkpoint's content: the log, how many records, and the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl Checkpoint {
    /// The checkpoint of the chain ending at `head`.
    pub fn of(origin: String, head: ChainHead) -> Self {
        Self {
            origin,
            size: head.seq,
            root: head.hash,
        }
    }

    /// The note body that is signed.
    fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        )
    }
}

/// The signing key.
pub struct AuditKey {
    pair: Ed25519KeyPair,
    name: String,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey")
            .field("name", &self.name)
            .finish()
    }
}

impl AuditKey {
    /// Loads the key from `data_dir`, creating it (0600) at first start,
    /// and (re)writes its public half next to it. `name` is the origin.
    pub fn load_or_create(data_dir: &Path, name: String) -> Result<Self, CheckpointError> {
        let path = data_dir.join(KEY_FILE);
        let err = |reason: String| CheckpointError::Key {
            path: path.clone(),
            reason,
        };
        let pkcs8 = match std::fs::read(&path) {
            Ok(b) => {
                // A key others can read may have been copied: refuse it.
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&path)
                    .map_err(|e| err(format!("cannot read its mode: {e}")))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(err(format!(
                        "group or others can access it (mode {:o}); run `chmod 600 {}` \
                         and consider the key exposed",
                        mode & 0o777,
                        path.display()
                    )));
                }
                b
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let rng = ring::rand::SystemRandom::new();
                let doc = Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|_| err("cannot generate an Ed25519 key".into()))?;
                sigil_identity::secret_file::write(&path, doc.as_ref(), 0o600)
                    .map_err(|e| err(format!("cannot write it: {e}")))?;
                doc.as_ref().to_vec()
            }
            Err(e) => return Err(err(format!("cannot read it: {e}"))),
        };
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8).map_err(|e| {
            err(format!(
                "not an Ed25519 PKCS#8 key ({e}); restore it from a backup"
            ))
        })?;
        let key = Self { pair, name };
        let public = format!("{}\n", key.verifier_key());
        sigil_identity::secret_file::write(
            &data_dir.join(PUBLIC_KEY_FILE),
            public.as_bytes(),
            0o644,
        )
        .map_err(|e| err(format!("cannot write its public key: {e}")))?;
        Ok(key)
    }

    /// The public key as a note verifier key: `name+keyid+base64(alg‖key)`.
    pub fn verifier_key(&self) -> String {
        let public: [u8; 32] = self
            .pair
            .public_key()
            .as_ref()
            .try_into()
            .unwrap_or([0; 32]); // an Ed25519 public key is 32 bytes
        VerifierKey {
            name: self.name.clone(),
            public,
        }
        .to_string()
    }

    /// The signed note of `cp`.
    pub fn sign(&self, cp: &Checkpoint) -> String {
        let body = cp.body();
        let mut sig = key_id(&self.name, self.pair.public_key().as_ref()).to_vec();
        sig.extend_from_slice(self.pair.sign(body.as_bytes()).as_ref());
        format!("{body}\n\u{2014} {} {}\n", self.name, B64.encode(sig))
    }
}

/// `SHA-256(name ‖ 0x0A ‖ alg ‖ key)[:4]`, as signed notes define it.
fn key_id(name: &str, public: &[u8]) -> [u8; 4] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(name.as_bytes());
    ctx.update(&[b'\n', ALG_ED25519]);
    ctx.update(public);
    let mut id = [0; 4];
    id.copy_from_slice(&ctx.finish().as_ref()[..4]);
    id
}

/// A public key that checks checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierKey {
    pub name: String,
    pub public: [u8; 32],
}

impl std::fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut key = vec![ALG_ED25519];
        key.extend_from_slice(&self.public);
        let id = key_id(&self.name, &self.public);
        write!(
            f,
            "{}+{}+{}",
            self.name,
            sigil_identity::random::hex(&id),
            B64.encode(key)
        )
    }
}

impl std::str::FromStr for VerifierKey {
    type Err = CheckpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| CheckpointError::Format(format!("verifier key: {why}"));
        // Name and key id hold no '+'; the base64 key may.
        let mut parts = s.trim().splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("expected name+keyid+key"));
        };
        let key = B64.decode(key).map_err(|_| bad("the key is not base64"))?;
        let (Some(&ALG_ED25519), Ok(public)) = (key.first(), <[u8; 32]>::try_from(&key[1..]))
        else {
            return Err(bad("not an Ed25519 key"));
        };
        let vk = Self {
            name: name.to_owned(),
            public,
        };
        if sigil_identity::random::hex(&key_id(name, &public)) != id {
            return Err(bad("the key id does not match the key"));
        }
        Ok(vk)
    }
}

impl VerifierKey {
    /// Checks the note's signature by this key and returns its checkpoint.
    /// Signatures by other keys are ignored, as signed notes require.
    pub fn open(&self, note: &str) -> Result<Checkpoint, CheckpointError> {
        let bad = |why: &str| CheckpointError::Format(why.to_owned());
        let (body, sigs) = note
            .split_once("\n\n")
            .ok_or_else(|| bad("no blank line before the signatures"))?;
        let body = format!("{body}\n");
        let id = key_id(&self.name, &self.public);
        let public = UnparsedPublicKey::new(&ED25519, self.public);
        let signed = sigs.lines().any(|line| {
            let Some(rest) = line.strip_prefix("\u{2014} ") else {
                return false;
            };
            let Some((name, sig)) = rest.split_once(' ') else {
                return false;
            };
            let Ok(sig) = B64.decode(sig) else {
                return false;
            };
            name == self.name
                && sig.len() == 68
                && sig[..4] == id
                && public.verify(body.as_bytes(), &sig[4..]).is_ok()
        });
        if !signed {
            return Err(CheckpointError::Signature(self.name.clone()));
        }
        let mut lines = body.lines();
        let (Some(origin), Some(size), Some(root)) = (lines.next(), lines.next(), lines.next())
        else {
            return Err(bad("expected origin, size and root lines"));
        };
        // The key is named for its log's origin: a note of another log
        // (another trust domain) is not a checkpoint of this one.
        if origin != self.name {
            return Err(CheckpointError::Format(format!(
                "the checkpoint's origin {origin:?} is not {:?}",
                self.name
            )));
        }
        let size = size.parse().map_err(|_| bad("the size is not a number"))?;
        let root = B64
            .decode(root)
            .ok()
            .and_then(|r| Hash::try_from(r).ok())
            .ok_or_else(|| bad("the root is not a base64 SHA-256"))?;
        Ok(Checkpoint {
            origin: origin.to_owned(),
            size,
            root,
        })
    }
}

/// Signs and stores checkpoints as the log grows (see
/// [`crate::config::AuditSection`]), and keeps the latest in
/// [`CHECKPOINT_FILE`] of the data directory.
#[derive(Debug)]
pub struct Checkpointer {
    pub store: Arc<dyn Datastore>,
    pub key: AuditKey,
    pub origin: String,
    pub data_dir: PathBuf,
    pub every_records: u64,
    pub every: Duration,
}

impl Checkpointer {
    /// Checkpoints the head if it moved past the latest checkpoint;
    /// returns the new checkpoint's size.
    pub async fn checkpoint(&self) -> Result<Option<u64>, DatastoreError> {
        let head = self.store.audit_chain().await?.head;
        let latest = self.latest_size().await?;
        if head.seq <= latest {
            return Ok(None);
        }
        let note = self.key.sign(&Checkpoint::of(self.origin.clone(), head));
        self.store
            .put_audit_checkpoint(head.seq, note.clone())
            .await?;
        let file = self.data_dir.join(CHECKPOINT_FILE);
        if let Err(e) = sigil_identity::secret_file::write(&file, note.as_bytes(), 0o644) {
            warn!(file = %file.display(), error = %e, "could not write the latest audit checkpoint file");
        }
        Ok(Some(head.seq))
    }

    async fn latest_size(&self) -> Result<u64, DatastoreError> {
        Ok(self
            .store
            .latest_audit_checkpoint()
            .await?
            .map_or(0, |(size, _)| size))
    }

    /// Checkpoints every `every_records` records or `every` until `stop`
    /// turns true.
    pub async fn run(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        // The head is polled: cheap, and no write path waits on it.
        let mut tick = tokio::time::interval(self.every.min(Duration::from_secs(1)));
        let stopped = crate::shutdown::wait_for_stop(stop);
        tokio::pin!(stopped);
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = &mut stopped => return,
                _ = tick.tick() => {}
            }
            let due = async {
                let head = self.store.audit_chain().await?.head.seq;
                let latest = self.latest_size().await?;
                Ok::<_, DatastoreError>(
                    head > latest
                        && (head - latest >= self.every_records || last.elapsed() >= self.every),
                )
            };
            match due.await {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => {
                    warn!(error = %e, "audit checkpoint: cannot read the log");
                    continue;
                }
            }
            match self.checkpoint().await {
                Ok(size) => {
                    last = tokio::time::Instant::now();
                    if let Some(size) = size {
                        info!(size, "audit checkpoint signed");
                    }
                }
                Err(e) => warn!(error = %e, "could not store an audit checkpoint"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_signed_checkpoint_opens_with_its_key_and_not_when_changed() {
        let dir = tempfile::tempdir().unwrap();
        let key = AuditKey::load_or_create(dir.path(), "sigil/example.org/audit".into()).unwrap();
        let cp = Checkpoint {
            origin: "sigil/example.org/audit".into(),
            size: 42,
            root: [7; 32],
        };
        let note = key.sign(&cp);
        assert!(note.starts_with("sigil/example.org/audit\n42\n"));
        let vk: VerifierKey = std::fs::read_to_string(dir.path().join(PUBLIC_KEY_FILE))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(vk.open(&note).unwrap(), cp);
        let forged = note.replacen("\n42\n", "\n41\n", 1);
        assert!(matches!(
            vk.open(&forged),
            Err(CheckpointError::Signature(_))
        ));
        // The same key is loaded again, with mode 0600.
        let again = AuditKey::load_or_create(dir.path(), cp.origin.clone()).unwrap();
        assert_eq!(again.verifier_key(), vk.to_string());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Another key's signature is not accepted.
        let other = tempfile::tempdir().unwrap();
        let other = AuditKey::load_or_create(other.path(), cp.origin.clone()).unwrap();
        assert!(vk.open(&other.sign(&cp)).is_err());
    }

    #[test]
    fn a_key_file_readable_by_group_or_other_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        AuditKey::load_or_create(dir.path(), "sigil/example.org/audit".into()).unwrap();
        let path = dir.path().join(KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = AuditKey::load_or_create(dir.path(), "sigil/example.org/audit".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn a_note_whose_origin_is_not_the_key_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // A key named for one origin signs a checkpoint of another log.
        let key = AuditKey::load_or_create(dir.path(), "sigil/example.org/audit".into()).unwrap();
        let vk: VerifierKey = key.verifier_key().parse().unwrap();
        let note = key.sign(&Checkpoint {
            origin: "sigil/other.org/audit".into(),
            size: 1,
            root: [1; 32],
        });
        assert!(matches!(vk.open(&note), Err(CheckpointError::Format(_))));
    }

    #[test]
    fn verifier_keys_round_trip_whatever_base64_characters_they_hold() {
        // A base64 key often holds '+', the field separator.
        for _ in 0..64 {
            let dir = tempfile::tempdir().unwrap();
            let key =
                AuditKey::load_or_create(dir.path(), "sigil/example.org/audit".into()).unwrap();
            let text = key.verifier_key();
            let vk: VerifierKey = text.parse().unwrap();
            assert_eq!(vk.to_string(), text);
        }
    }
}
