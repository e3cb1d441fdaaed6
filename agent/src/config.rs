//! Agent configuration: TOML file, flags over it, defaults under both;
//! unknown keys are an error.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sigil_identity::TrustDomain;

/// Default data directory (agent key, SVID, bundle).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sigil/agent";
/// Default Workload API socket.
pub const DEFAULT_SOCKET: &str = "/run/sigil/agent/api.sock";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config file {0}: {1}")]
    Parse(PathBuf, String),
    #[error("{0}")]
    Invalid(String),
}

/// The agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The trust domain of the server.
    pub trust_domain: TrustDomain,
    /// The server's node API, `host:port`.
    pub server_address: String,
    /// Agent key, SVID and bundle live here (0700 directory, 0600 key).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// PEM file with the server's CA certificates, used to trust the
    /// server on first contact.
    #[serde(default)]
    pub trust_bundle: Option<PathBuf>,
    /// Trust whatever server answers on first contact. Only for trying
    /// Sigil out: anyone who can intercept that connection can impersonate
    /// the server.
    #[serde(default)]
    pub insecure_bootstrap: bool,
    /// How the agent proves its node.
    #[serde(default)]
    pub node_attestor: NodeAttestorConfig,
    /// The Workload API socket.
    #[serde(default = "default_socket")]
    pub socket_path: PathBuf,
    /// Largest executable hashed for `unix:sha256`, in bytes.
    #[serde(default = "default_max_hash")]
    pub max_hash_bytes: u64,
    /// Logging: `error` … `trace` or an env-filter string.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Most Workload API streams one uid may hold open at once; more are
    /// refused so that one user cannot starve the others.
    #[serde(default = "default_max_streams_per_uid")]
    pub max_streams_per_uid: usize,
}

fn default_max_streams_per_uid() -> usize {
    crate::workload_api::DEFAULT_MAX_STREAMS_PER_UID
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

fn default_max_hash() -> u64 {
    sigil_attestors::unix::DEFAULT_MAX_HASH_BYTES
}

fn default_log_level() -> String {
    "info".into()
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}

/// Node attestor settings; exactly one must be set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAttestorConfig {
    /// A join token from `sigil-server token generate`.
    pub join_token: Option<String>,
    /// Node certificate and key for x509pop.
    pub x509pop: Option<X509PopConfig>,
}

/// x509pop files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X509PopConfig {
    /// Certificate chain, PEM, leaf first.
    pub certificate: PathBuf,
    /// PKCS#8 PEM key of the leaf.
    pub key: PathBuf,
}

impl AgentConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse(_, m) => ConfigError::Parse(path.to_path_buf(), m),
            other => other,
        })
    }

    /// Parses TOML text and checks it.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: AgentConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse(PathBuf::from("<text>"), e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.trust_bundle.is_none() && !self.insecure_bootstrap {
            return Err(ConfigError::Invalid(
                "set trust_bundle (the server's CA, e.g. from `sigil-server bundle show`) or insecure_bootstrap = true".into(),
            ));
        }
        if self.max_streams_per_uid == 0 {
            return Err(ConfigError::Invalid(
                "max_streams_per_uid must be at least 1".into(),
            ));
        }
        let a = &self.node_attestor;
        if a.join_token.is_some() == a.x509pop.is_some() {
            return Err(ConfigError::Invalid(
                "configure exactly one of node_attestor.join_token and node_attestor.x509pop"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let ok = "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1:8081\"\ninsecure_bootstrap = true\n[node_attestor]\njoin_token = \"abc\"\n";
        let cfg = AgentConfig::parse(ok).unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(cfg.max_streams_per_uid, 256);
        let zero = format!("max_streams_per_uid = 0\n{ok}");
        assert!(AgentConfig::parse(&zero).is_err());
        let no_trust = "trust_domain = \"example.org\"\nserver_address = \"x:1\"\n[node_attestor]\njoin_token = \"abc\"\n";
        assert!(
            AgentConfig::parse(no_trust)
                .unwrap_err()
                .to_string()
                .contains("trust_bundle")
        );
        let two = format!("{ok}[node_attestor.x509pop]\ncertificate = \"a\"\nkey = \"b\"\n");
        assert!(AgentConfig::parse(&two).is_err());
        let unknown = format!("{ok}bogus = 1\n");
        assert!(
            AgentConfig::parse(&unknown)
                .unwrap_err()
                .to_string()
                .contains("bogus")
        );
    }
}

#[cfg(test)]
mod example_tests {
    #[test]
    fn the_example_config_in_deploy_is_valid() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/agent.toml");
        super::AgentConfig::load(&path).unwrap();
    }
}
