//! Agent configuration: TOML file, flags over it, defaults under both;
//! unknown keys are an error.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sigil_identity::TrustDomain;
use sigil_identity::clock::{Clock, SystemClock};

use crate::servers::{Resolve, SystemResolver};

/// Default data directory (agent key, SVID, bundle).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sigil/agent";
/// Default Workload API socket.
pub const DEFAULT_SOCKET: &str = "/run/sigil/agent/api.sock";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// The server's node API: one `host:port`, or a list of them for
    /// several server replicas (`["10.0.0.1:8081", "10.0.0.2:8081"]`); a
    /// name that resolves to several addresses counts as a list. See
    /// [`crate::servers`].
    pub server_address: ServerAddresses,
    /// Agent key, SVID and bundle live here (0700 directory, 0600 key).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// PEM file with the server's CA certificates, used to trust the
    /// server on first contact. Read through [`AgentConfig::bootstrap_trust`].
    #[serde(default)]
    trust_bundle: Option<PathBuf>,
    /// Trust whatever server answers on first contact. Only for trying
    /// Sigil out: anyone who can intercept that connection can impersonate
    /// the server. Read through [`AgentConfig::bootstrap_trust`].
    #[serde(default)]
    insecure_bootstrap: bool,
    /// How the agent proves its node.
    pub node_attestor: NodeAttestor,
    /// The Workload API socket.
    #[serde(default = "default_socket")]
    pub socket_path: PathBuf,
    /// Largest executable hashed for `unix:sha256`, in bytes.
    #[serde(default = "default_max_hash")]
    pub max_hash_bytes: u64,
    /// Logging: `[log]` `level` and `format`, as on the server.
    #[serde(default)]
    pub log: LogSection,
    /// The older spelling of `[log] level`, still accepted; moved into
    /// [`AgentConfig::log`] when the file is read.
    #[serde(default)]
    log_level: Option<String>,
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
    /// The clock rotation and expiry decisions read: the system's, unless
    /// a test drives time with a [`sigil_identity::clock::FakeClock`].
    #[serde(skip, default = "system_clock")]
    pub clock: Arc<dyn Clock>,
    /// How server names are resolved: the system's resolver, unless a
    /// test maps names itself.
    #[serde(skip, default = "system_resolver")]
    pub resolver: Arc<dyn Resolve>,
    /// The metrics and health listener (`[telemetry] bind`); off if unset.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Envoy SDS on the Workload API socket: the default resource names.
    #[serde(default)]
    pub sds: SdsConfig,
}

fn system_clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

fn system_resolver() -> Arc<dyn Resolve> {
    Arc::new(SystemResolver)
}

/// How the agent trusts the server on first contact (and when it attests
/// again): `trust_bundle = "<file>"` or `insecure_bootstrap = true` in the
/// file. With both set, the bundle is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootstrapTrust {
    /// PEM file with the server's CA certificates.
    Bundle(PathBuf),
    /// Trust whatever server answers. Only for trying Sigil out.
    Insecure,
}

/// The metrics and health listener (`/metrics`, `/live`, `/ready`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Plain HTTP, e.g. `127.0.0.1:9988`; off when unset.
    pub bind: Option<std::net::SocketAddr>,
}

pub use crate::servers::ServerAddresses;
/// `[sds]`: the resource names Envoy asks for that are not SPIFFE IDs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SdsConfig {
    /// The workload's first identity: a TLS certificate and key.
    pub default_svid_name: String,
    /// The workload's own trust domain's bundle: a validation context.
    pub default_bundle_name: String,
    /// Every trust domain the workload may trust, as one SPIFFE
    /// certificate validator config.
    pub default_all_bundles_name: String,
}

impl Default for SdsConfig {
    /// The names SPIRE uses, so Envoy bootstraps written for it work.
    fn default() -> Self {
        Self {
            default_svid_name: "default".into(),
            default_bundle_name: "ROOTCA".into(),
            default_all_bundles_name: "ALL".into(),
        }
    }
}

impl SdsConfig {
    /// The three names must be set, differ, and not look like SPIFFE IDs
    /// (those name an entry's SVID or a trust domain's bundle).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let names = [
            ("sds.default_svid_name", &self.default_svid_name),
            ("sds.default_bundle_name", &self.default_bundle_name),
            (
                "sds.default_all_bundles_name",
                &self.default_all_bundles_name,
            ),
        ];
        for (key, name) in names {
            if name.is_empty() || name.starts_with("spiffe://") {
                return Err(ConfigError::Invalid(format!(
                    "{key} must be a non-empty name that is not a SPIFFE ID (got {name:?})"
                )));
            }
        }
        if names[0].1 == names[1].1 || names[0].1 == names[2].1 || names[1].1 == names[2].1 {
            return Err(ConfigError::Invalid(
                "sds.default_svid_name, default_bundle_name and default_all_bundles_name must \
                 differ"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// `[log]` and its format, shared with the server (and kept at this path).
pub use sigil_proto::process::{LogFormat, LogSection};

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

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}

/// How the agent proves its node: `[node_attestor]` in the file, with
/// exactly one of `join_token = "…"`, `[node_attestor.x509pop]` and
/// `[node_attestor.k8s_psat]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "NodeAttestorToml")]
pub enum NodeAttestor {
    /// A join token from `sigil-server token generate`.
    JoinToken(String),
    /// Node certificate and key for x509pop.
    X509Pop(X509PopConfig),
    /// Kubernetes projected service-account token.
    K8sPsat(K8sPsatConfig),
}

/// The `[node_attestor]` table as written: one key per attestor.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeAttestorToml {
    join_token: Option<String>,
    x509pop: Option<X509PopConfig>,
    k8s_psat: Option<K8sPsatConfig>,
}

const ONE_NODE_ATTESTOR: &str = "configure exactly one of node_attestor.join_token, node_attestor.x509pop and node_attestor.k8s_psat";

impl TryFrom<NodeAttestorToml> for NodeAttestor {
    type Error = &'static str;

    fn try_from(t: NodeAttestorToml) -> Result<Self, Self::Error> {
        match (t.join_token, t.x509pop, t.k8s_psat) {
            (Some(token), None, None) => Ok(Self::JoinToken(token)),
            (None, Some(x), None) => Ok(Self::X509Pop(x)),
            (None, None, Some(k)) => Ok(Self::K8sPsat(k)),
            _ => Err(ONE_NODE_ATTESTOR),
        }
    }
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
        let parse_error =
            |e: toml::de::Error| ConfigError::Parse(PathBuf::from("<text>"), e.to_string());
        let table: toml::Table = text.parse().map_err(parse_error)?;
        if !table.contains_key("node_attestor") {
            return Err(ConfigError::Invalid(ONE_NODE_ATTESTOR.into()));
        }
        let in_log_section = table.get("log").and_then(|log| log.get("level")).is_some();
        let mut cfg: AgentConfig = table.try_into().map_err(parse_error)?;
        if let Some(level) = cfg.log_level.take() {
            if in_log_section {
                return Err(ConfigError::Invalid(
                    "log_level and [log] level are both set; keep only [log] level".into(),
                ));
            }
            cfg.log.level = level;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// How to trust the server on first contact.
    pub fn bootstrap_trust(&self) -> BootstrapTrust {
        match &self.trust_bundle {
            Some(path) => BootstrapTrust::Bundle(path.clone()),
            None => BootstrapTrust::Insecure,
        }
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
        self.sds.validate()?;
        let rate = self.jwt_fetches_per_uid_per_second;
        if !rate.is_finite() || rate <= 0.0 {
            return Err(ConfigError::Invalid(
                "jwt_fetches_per_uid_per_second must be a number more than 0".into(),
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
mod shape_tests {
    use super::*;

    const BASE: &str = "trust_domain = \"example.org\"\nserver_address = \"x:1\"\n";

    #[test]
    fn sds_names_default_to_spires_and_are_checked() {
        let base =
            format!("{BASE}insecure_bootstrap = true\n[node_attestor]\njoin_token = \"abc\"\n");
        let cfg = AgentConfig::parse(&base).unwrap();
        assert_eq!(cfg.sds, SdsConfig::default());
        assert_eq!(
            (
                cfg.sds.default_svid_name.as_str(),
                cfg.sds.default_bundle_name.as_str(),
                cfg.sds.default_all_bundles_name.as_str()
            ),
            ("default", "ROOTCA", "ALL")
        );
        let cfg =
            AgentConfig::parse(&format!("{base}[sds]\ndefault_svid_name = \"mine\"\n")).unwrap();
        assert_eq!(cfg.sds.default_svid_name, "mine");
        assert_eq!(
            cfg.sds.default_bundle_name, "ROOTCA",
            "the others keep their defaults"
        );
        for bad in [
            "default_svid_name = \"\"",
            "default_bundle_name = \"spiffe://example.org\"",
            "default_all_bundles_name = \"default\"",
            "other = 1",
        ] {
            assert!(
                AgentConfig::parse(&format!("{base}[sds]\n{bad}\n")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_node_attestor_table_becomes_one_variant() {
        let token =
            format!("{BASE}insecure_bootstrap = true\n[node_attestor]\njoin_token = \"abc\"\n");
        let cfg = AgentConfig::parse(&token).unwrap();
        assert!(matches!(&cfg.node_attestor, NodeAttestor::JoinToken(t) if t == "abc"));
        let x509 = format!(
            "{BASE}insecure_bootstrap = true\n[node_attestor.x509pop]\ncertificate = \"c\"\nkey = \"k\"\n"
        );
        let cfg = AgentConfig::parse(&x509).unwrap();
        assert!(matches!(&cfg.node_attestor, NodeAttestor::X509Pop(x) if x.key == Path::new("k")));
        for none in [
            format!("{BASE}insecure_bootstrap = true\n"),
            format!("{BASE}insecure_bootstrap = true\n[node_attestor]\n"),
        ] {
            let err = AgentConfig::parse(&none).unwrap_err().to_string();
            assert!(
                err.contains("exactly one of node_attestor.join_token"),
                "{err}"
            );
        }
    }

    #[test]
    fn bootstrap_trust_is_the_bundle_or_explicitly_insecure() {
        let attestor = "[node_attestor]\njoin_token = \"abc\"\n";
        let bundle = format!("{BASE}trust_bundle = \"/b.pem\"\n{attestor}");
        assert_eq!(
            AgentConfig::parse(&bundle).unwrap().bootstrap_trust(),
            BootstrapTrust::Bundle("/b.pem".into())
        );
        let insecure = format!("{BASE}insecure_bootstrap = true\n{attestor}");
        assert_eq!(
            AgentConfig::parse(&insecure).unwrap().bootstrap_trust(),
            BootstrapTrust::Insecure
        );
        // Both: the bundle wins, as before the enum.
        let both =
            format!("{BASE}insecure_bootstrap = true\ntrust_bundle = \"/b.pem\"\n{attestor}");
        assert_eq!(
            AgentConfig::parse(&both).unwrap().bootstrap_trust(),
            BootstrapTrust::Bundle("/b.pem".into())
        );
    }

    #[test]
    fn log_section_like_the_servers_and_the_old_key_still_read() {
        let ok = format!("{BASE}insecure_bootstrap = true\n");
        let attestor = "[node_attestor]\njoin_token = \"abc\"\n";
        let cfg = AgentConfig::parse(&format!("{ok}{attestor}")).unwrap();
        assert_eq!(
            (cfg.log.level.as_str(), cfg.log.format),
            ("info", LogFormat::Text)
        );
        let section = format!("{ok}{attestor}[log]\nlevel = \"debug\"\nformat = \"json\"\n");
        let cfg = AgentConfig::parse(&section).unwrap();
        assert_eq!(
            (cfg.log.level.as_str(), cfg.log.format),
            ("debug", LogFormat::Json)
        );
        let old = format!("log_level = \"warn\"\n{ok}{attestor}");
        assert_eq!(AgentConfig::parse(&old).unwrap().log.level, "warn");
        let both = format!("log_level = \"warn\"\n{ok}{attestor}[log]\nlevel = \"info\"\n");
        let err = AgentConfig::parse(&both).unwrap_err().to_string();
        assert!(err.contains("keep only [log] level"), "{err}");
        let bad = format!("{ok}{attestor}[log]\nformat = \"xml\"\n");
        assert!(AgentConfig::parse(&bad).is_err());
    }
}

#[cfg(test)]
mod server_address_tests {
    use super::*;

    const REST: &str = "trust_domain = \"example.org\"\ninsecure_bootstrap = true\n[node_attestor]\njoin_token = \"abc\"\n";

    fn parse(value: &str) -> Result<Vec<String>, String> {
        AgentConfig::parse(&format!("server_address = {value}\n{REST}"))
            .map(|c| c.server_address.iter().map(str::to_owned).collect())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn one_address_or_a_list() {
        assert_eq!(parse("\"10.0.0.1:8081\"").unwrap(), ["10.0.0.1:8081"]);
        assert_eq!(
            parse("[\"10.0.0.1:8081\", \"sigil-server-1.example:8081\", \"[::1]:8081\"]").unwrap(),
            ["10.0.0.1:8081", "sigil-server-1.example:8081", "[::1]:8081"]
        );
        let shown = AgentConfig::parse(&format!("server_address = [\"a:1\", \"b:2\"]\n{REST}"))
            .unwrap()
            .server_address
            .to_string();
        assert_eq!(shown, "a:1, b:2");
    }

    #[test]
    fn every_address_must_be_host_and_port() {
        for bad in [
            "[]",
            "\"10.0.0.1\"",
            "\":8081\"",
            "\"host:0\"",
            "\"host:99999\"",
            "[\"a:1\", \"b\"]",
            "\"[::1:8081\"",
            "\"two words:1\"",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains("server_address"), "{bad}: {err}");
        }
        let err = parse("1").unwrap_err();
        assert!(err.contains("host:port"), "{err}");
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
        let NodeAttestor::K8sPsat(psat) = cfg.node_attestor else {
            panic!("k8s_psat expected: {:?}", cfg.node_attestor)
        };
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
