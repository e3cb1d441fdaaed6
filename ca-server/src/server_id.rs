//! The stable identifier of one server replica.
//!
//! Every replica sharing a datastore has its own CA keys and CA journal,
//! stored under its [`ServerId`]. The id comes from `[server] server_id`
//! in the config, or else from `<data_dir>/server_id`, which the first
//! start writes with a random `s-<12 hex>`.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest server id accepted.
const MAX_LEN: usize = 63;

/// The file under the data directory holding a generated id.
pub const SERVER_ID_FILE: &str = "server_id";

/// A replica's id: `[a-z0-9][a-z0-9-]{0,62}`, e.g. `sigil-server-0`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerId(String);

/// Why a string is not a server id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
#[error(
    "invalid server id {0:?}: use 1 to 63 lowercase letters, digits and '-', starting with a letter or digit"
)]
pub struct InvalidServerId(pub String);

/// Why the server id could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerIdError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}; fix the file or remove it to generate a new id")]
    Invalid {
        path: std::path::PathBuf,
        #[source]
        source: InvalidServerId,
    },
}

impl ServerId {
    /// A new random id, `s-<12 hex>`.
    pub fn generate() -> Self {
        Self(format!(
            "s-{}",
            sigil_identity::random::hex(&sigil_identity::random::bytes::<6>())
        ))
    }

    /// `sigil-server`: the id of a CA set up without one (tests,
    /// benchmarks); a server always has its own.
    pub fn local() -> Self {
        Self("sigil-server".to_owned())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The configured id, or the one in `<data_dir>/server_id`, or a new
    /// one written there (mode 0600, synced) for the next start.
    pub fn load_or_create(
        configured: Option<&ServerId>,
        data_dir: &Path,
    ) -> Result<Self, ServerIdError> {
        if let Some(id) = configured {
            return Ok(id.clone());
        }
        let path = data_dir.join(SERVER_ID_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|source| ServerIdError::Invalid { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Self::generate();
                sigil_identity::secret_file::write(&path, format!("{id}\n").as_bytes(), 0o600)
                    .map_err(|source| ServerIdError::Io { path, source })?;
                Ok(id)
            }
            Err(source) => Err(ServerIdError::Io { path, source }),
        }
    }
}

impl FromStr for ServerId {
    type Err = InvalidServerId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut chars = s.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if first_ok && rest_ok && s.len() <= MAX_LEN {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidServerId(s.to_owned()))
        }
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerId({})", self.0)
    }
}

impl Serialize for ServerId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ServerId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        for good in ["a", "sigil-server-0", "0", &"a".repeat(63)] {
            assert_eq!(good.parse::<ServerId>().unwrap().as_str(), good);
        }
        for bad in ["", "-a", "A", "a_b", "a.b", "a b", &"a".repeat(64)] {
            assert!(bad.parse::<ServerId>().is_err(), "{bad:?}");
        }
        let json = serde_json::to_string(&"x-1".parse::<ServerId>().unwrap()).unwrap();
        assert_eq!(json, "\"x-1\"");
        assert!(serde_json::from_str::<ServerId>("\"X\"").is_err());
    }

    #[test]
    fn generated_id_is_written_once_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = ServerId::load_or_create(None, dir.path()).unwrap();
        assert!(first.as_str().starts_with("s-") && first.as_str().len() == 14);
        first.as_str().parse::<ServerId>().unwrap();
        let path = dir.path().join(SERVER_ID_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(ServerId::load_or_create(None, dir.path()).unwrap(), first);
        // The configured id wins and is not written.
        let configured: ServerId = "sigil-server-1".parse().unwrap();
        assert_eq!(
            ServerId::load_or_create(Some(&configured), dir.path()).unwrap(),
            configured
        );
        assert_eq!(ServerId::load_or_create(None, dir.path()).unwrap(), first);
        // A broken file is reported, not replaced.
        std::fs::write(&path, "Not An Id").unwrap();
        let err = ServerId::load_or_create(None, dir.path()).unwrap_err();
        assert!(err.to_string().contains("remove it"), "{err}");
    }
}
