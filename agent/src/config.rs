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
    /// Workload attestors run besides `unix` (which always runs).
    #[serde(default)]
    pub workload_attestors: WorkloadAttestorsConfig,
    /// Most Workload API streams one uid may hold open at once; more are
    /// refused so that one user cannot starve the others.
    #[serde(default = "default_max_streams_per_uid")]
    pub max_streams_per_uid: usize,
    /// JWT-SVIDs one uid may have the agent fetch from the server per
    /// second, with bursts of ten seconds' worth; tokens served from the
    /// agent's cache are not counted. Past it, FetchJWTSVID is refused
    /// (ResourceExhausted).
    #[serde(default = "default_jwt_fetches_per_uid")]
    pub jwt_fetches_per_uid_per_second: f64,
    /// Most Workload API connections open at once; more are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most Workload API connections one uid may hold open at once.
    #[serde(default = "default_max_connections_per_uid")]
    pub max_connections_per_uid: usize,
    /// Unary Workload API calls (FetchJWTSVID, ValidateJWTSVID) one uid may
    /// make a second, and in a burst; more are refused (ResourceExhausted).
    #[serde(default = "default_unary_calls_per_uid_per_second")]
    pub unary_calls_per_uid_per_second: u32,
    /// The metrics and health listener (`[telemetry] bind`); off if unset.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// The metrics and health listener (`/metrics`, `/live`, `/ready`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Plain HTTP, e.g. `127.0.0.1:9988`; off when unset.
    pub bind: Option<std::net::SocketAddr>,
}

// Workload API limits, defaults (see the fields above).
/// Most streams one uid may hold open at once unless configured otherwise
/// (`max_streams_per_uid`); more are refused so that one user cannot starve
/// the others. High, because on a busy node many workloads share a uid.
pub const DEFAULT_MAX_STREAMS_PER_UID: usize = 8192;
/// Most connections one uid may hold open at once (`max_connections_per_uid`).
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 4096;
/// Most connections open at once (`max_connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// Unary calls (FetchJWTSVID, ValidateJWTSVID) one uid may make per second,
/// and in a burst (`unary_calls_per_uid_per_second`).
pub const DEFAULT_UNARY_CALLS_PER_UID_PER_SECOND: u32 = 1000;
/// JWT-SVIDs one uid may have the agent fetch from the server per second
/// unless configured otherwise (`jwt_fetches_per_uid_per_second`); tokens
/// served from the agent's cache are not counted.
pub const DEFAULT_JWT_FETCHES_PER_UID_PER_SECOND: f64 = 50.0;

fn default_jwt_fetches_per_uid() -> f64 {
    DEFAULT_JWT_FETCHES_PER_UID_PER_SECOND
}

fn default_max_streams_per_uid() -> usize {
    DEFAULT_MAX_STREAMS_PER_UID
}

fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}

fn default_max_connections_per_uid() -> usize {
    DEFAULT_MAX_CONNECTIONS_PER_UID
}

fn default_unary_calls_per_uid_per_second() -> u32 {
    DEFAULT_UNARY_CALLS_PER_UID_PER_SECOND
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
    /// Kubernetes projected service-account token.
    pub k8s_psat: Option<K8sPsatConfig>,
}

/// k8s_psat: the agent's cluster and projected token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sPsatConfig {
    /// The cluster's name in the server's `[node_attestors.k8s_psat.clusters]`.
    pub cluster: String,
    /// The projected token (audience: the server's), re-read at each
    /// attestation because the kubelet rotates it.
    #[serde(default = "default_psat_token_path")]
    pub token_path: PathBuf,
}

fn default_psat_token_path() -> PathBuf {
    PathBuf::from(sigil_attestors::k8s_psat::DEFAULT_TOKEN_PATH)
}

/// Workload attestors besides `unix`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadAttestorsConfig {
    /// `k8s`: pod and container of the caller, from the kubelet.
    pub k8s: Option<K8sWorkloadConfig>,
}

/// The service-account token the agent shows the kubelet by default.
pub const DEFAULT_KUBELET_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// `k8s` workload attestor settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sWorkloadConfig {
    /// The kubelet's API.
    #[serde(default = "default_kubelet_url")]
    pub kubelet_url: String,
    /// CA certificates (PEM) the kubelet's serving certificate must chain to.
    #[serde(default)]
    pub kubelet_ca_path: Option<PathBuf>,
    /// Accept any kubelet certificate. Insecure: anything that can
    /// intercept the connection can claim any pod for any process.
    #[serde(default)]
    pub insecure_skip_kubelet_verify: bool,
    /// Bearer token for the kubelet (needs `get` on `nodes/pods`, or on
    /// `nodes/proxy` for kubelets without fine-grained authorization).
    #[serde(default = "default_kubelet_token_path")]
    pub token_path: PathBuf,
    /// When set, only pods scheduled on this node get selectors.
    #[serde(default)]
    pub node_name: Option<String>,
    /// How many times the kubelet is asked for a container not listed yet.
    #[serde(default = "default_poll_attempts")]
    pub max_poll_attempts: u32,
}

fn default_kubelet_url() -> String {
    sigil_attestors::k8s::DEFAULT_KUBELET_URL.into()
}

fn default_kubelet_token_path() -> PathBuf {
    PathBuf::from(DEFAULT_KUBELET_TOKEN_PATH)
}

fn default_poll_attempts() -> u32 {
    sigil_attestors::k8s::DEFAULT_POLL_ATTEMPTS
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
        for (name, value) in [
            ("max_streams_per_uid", self.max_streams_per_uid),
            ("max_connections", self.max_connections),
            ("max_connections_per_uid", self.max_connections_per_uid),
            (
                "unary_calls_per_uid_per_second",
                self.unary_calls_per_uid_per_second as usize,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        let rate = self.jwt_fetches_per_uid_per_second;
        if !rate.is_finite() || rate <= 0.0 {
            return Err(ConfigError::Invalid(
                "jwt_fetches_per_uid_per_second must be a number more than 0".into(),
            ));
        }
        let a = &self.node_attestor;
        let configured = [
            a.join_token.is_some(),
            a.x509pop.is_some(),
            a.k8s_psat.is_some(),
        ];
        if configured.iter().filter(|c| **c).count() != 1 {
            return Err(ConfigError::Invalid(
                "configure exactly one of node_attestor.join_token, node_attestor.x509pop and node_attestor.k8s_psat"
                    .into(),
            ));
        }
        if let Some(k) = &self.workload_attestors.k8s {
            if k.kubelet_ca_path.is_some() == k.insecure_skip_kubelet_verify {
                return Err(ConfigError::Invalid(
                    "workload_attestors.k8s: set kubelet_ca_path (the CA of the kubelet's serving certificate), or insecure_skip_kubelet_verify = true (insecure), not both".into(),
                ));
            }
            if k.max_poll_attempts == 0 {
                return Err(ConfigError::Invalid(
                    "workload_attestors.k8s.max_poll_attempts must be at least 1".into(),
                ));
            }
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
        assert_eq!(cfg.max_streams_per_uid, 8192);
        assert_eq!(cfg.max_connections, 16_384);
        assert_eq!(cfg.max_connections_per_uid, 4096);
        assert_eq!(cfg.unary_calls_per_uid_per_second, 1000);
        for key in [
            "max_streams_per_uid",
            "max_connections",
            "max_connections_per_uid",
            "unary_calls_per_uid_per_second",
        ] {
            let zero = format!("{key} = 0\n{ok}");
            assert!(
                AgentConfig::parse(&zero)
                    .unwrap_err()
                    .to_string()
                    .contains(key)
            );
        }
        assert_eq!(cfg.jwt_fetches_per_uid_per_second, 50.0);
        let zero = format!("jwt_fetches_per_uid_per_second = 0.0\n{ok}");
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
        let psat_too = format!("{ok}[node_attestor.k8s_psat]\ncluster = \"prod\"\n");
        assert!(
            AgentConfig::parse(&psat_too)
                .unwrap_err()
                .to_string()
                .contains("exactly one")
        );
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
mod k8s_tests {
    use super::*;

    const BASE: &str = "trust_domain = \"example.org\"\nserver_address = \"sigil-server:8081\"\ninsecure_bootstrap = true\n[node_attestor.k8s_psat]\ncluster = \"prod\"\n";

    #[test]
    fn k8s_psat_and_the_k8s_workload_attestor_parse_with_defaults() {
        let text = format!("{BASE}[workload_attestors.k8s]\nkubelet_ca_path = \"/ca.crt\"\n");
        let cfg = AgentConfig::parse(&text).unwrap();
        let psat = cfg.node_attestor.k8s_psat.unwrap();
        assert_eq!(psat.cluster, "prod");
        assert_eq!(
            psat.token_path,
            PathBuf::from("/var/run/secrets/tokens/sigil-agent")
        );
        let k = cfg.workload_attestors.k8s.unwrap();
        assert_eq!(k.kubelet_url, "https://127.0.0.1:10250");
        assert!(!k.insecure_skip_kubelet_verify);
        assert_eq!(k.token_path, PathBuf::from(DEFAULT_KUBELET_TOKEN_PATH));
        // Without the section, only unix runs.
        assert!(
            AgentConfig::parse(BASE)
                .unwrap()
                .workload_attestors
                .k8s
                .is_none()
        );
    }

    #[test]
    fn the_kubelet_must_be_verified_or_explicitly_not() {
        for section in [
            "[workload_attestors.k8s]\n",
            "[workload_attestors.k8s]\nkubelet_ca_path = \"/ca\"\ninsecure_skip_kubelet_verify = true\n",
        ] {
            let err = AgentConfig::parse(&format!("{BASE}{section}")).unwrap_err();
            assert!(err.to_string().contains("insecure"), "{err}");
        }
        let skip = format!("{BASE}[workload_attestors.k8s]\ninsecure_skip_kubelet_verify = true\n");
        assert!(AgentConfig::parse(&skip).is_ok());
        let typo = format!("{BASE}[workload_attestors.k8s]\nkubelet_ca = \"/ca\"\n");
        assert!(AgentConfig::parse(&typo).is_err());
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
