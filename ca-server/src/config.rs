//! Server configuration: a TOML file, command-line flags over it, defaults
//! under both, merged in one place into a typed [`ServerConfig`]. Unknown
//! keys are an error, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sigil_identity::duration::serde_human;
use sigil_identity::{AdminRole, SpiffeId, TrustDomain};

use crate::ca::keys::KeyAlgorithm;

/// Default TCP address of the node API.
pub const DEFAULT_BIND: &str = "127.0.0.1:8081";
/// Default admin socket path.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/sigil/server/admin.sock";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sigil/server";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config file {0}: {1}")]
    Parse(PathBuf, String),
    #[error("trust_domain is required (set it in the config file or pass --trust-domain)")]
    MissingTrustDomain,
    #[error("{0}")]
    Invalid(String),
}

/// The whole server configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The trust domain this server is the authority of.
    pub trust_domain: TrustDomain,
    /// Where the datastore, CA keys and journal live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub ca: CaSection,
    #[serde(default)]
    pub agents: AgentsSection,
    #[serde(default)]
    pub node_attestors: NodeAttestorsSection,
    #[serde(default)]
    pub rate_limits: RateLimitSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub retention: RetentionSection,
    #[serde(default)]
    pub audit: AuditSection,
    #[serde(default)]
    pub telemetry: TelemetrySection,
    #[serde(default)]
    pub datastore: DatastoreSection,
    /// `[oidc_discovery]`: the OIDC discovery listener; off when absent.
    #[serde(default)]
    pub oidc_discovery: Option<crate::oidc_discovery::OidcDiscoverySection>,
    /// `[federation]`: other trust domains whose bundles this server polls
    /// (see [`crate::federation`]).
    #[serde(default)]
    pub federation: crate::federation::FederationSection,
    /// `[bundle_endpoint]`: this trust domain's bundle served to others.
    #[serde(default)]
    pub bundle_endpoint: Option<crate::federation::BundleEndpointSection>,
}

/// Which datastore implementation holds the server's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatastoreKind {
    /// Embedded, under `<data_dir>/datastore`: one server, no setup.
    #[default]
    Sled,
    /// A PostgreSQL database shared by every server replica.
    Postgres,
}

/// `[datastore]`: where registration entries, agents, tokens, bundles, CA
/// journals and the audit log live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatastoreSection {
    #[serde(rename = "type")]
    pub kind: DatastoreKind,
    /// PostgreSQL: libpq `key=value` string or `postgresql://` URL; several
    /// hosts allowed. `sslmode` and `sslrootcert` as in libpq.
    pub connection: Option<ConnectionString>,
    /// PostgreSQL: a file holding the connection string (a mounted
    /// Secret), instead of `connection`; read once at startup.
    pub connection_file: Option<PathBuf>,
    /// PostgreSQL: a file whose first line is the password (instead of
    /// one in `connection`).
    pub password_file: Option<PathBuf>,
    /// PostgreSQL: connections in the pool.
    pub pool_size: usize,
    /// How often replicas look for changes without a notification.
    #[serde(with = "serde_human")]
    pub poll_interval: Duration,
}

impl Default for DatastoreSection {
    fn default() -> Self {
        Self {
            kind: DatastoreKind::Sled,
            connection: None,
            connection_file: None,
            password_file: None,
            pool_size: 16,
            poll_interval: Duration::from_secs(5),
        }
    }
}

/// A database connection string: it may hold a password, so its `Debug`
/// shows only what [`crate::datastore::postgres::PgSettings`] displays.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct ConnectionString(String);

impl ConnectionString {
    /// The string itself, password included: only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match crate::datastore::postgres::PgSettings::parse(&self.0, None) {
            Ok(s) => write!(f, "ConnectionString({s})"),
            Err(_) => f.write_str("ConnectionString(<unparsed>)"),
        }
    }
}

/// The metrics and health listener (`/metrics`, `/live`, `/ready`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySection {
    /// Plain HTTP, e.g. `127.0.0.1:9988`; off when unset.
    pub bind: Option<std::net::SocketAddr>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}

/// Listening addresses and admin access.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// TCP address of the node API (TLS 1.3).
    pub bind_address: SocketAddr,
    /// Unix socket of the admin API (mode 0770).
    pub admin_socket: PathBuf,
    /// Extra uids allowed on the admin socket besides root and the server's own.
    pub admin_uids: Vec<u32>,
    /// Node API connections open at once; more are closed on accept.
    pub max_connections: usize,
    /// Node API connections from one IP address that have not (yet)
    /// presented an agent SVID: in TLS handshake, or attesting. Agents
    /// behind one NAT that attest at once may need more.
    pub max_unauthenticated_connections_per_address: usize,
    /// TCP address of the admin API over mTLS (TLS 1.3, an X509-SVID of
    /// this trust domain required); off when unset.
    pub admin_bind_address: Option<SocketAddr>,
    /// SPIFFE IDs given an admin role by configuration, besides entries
    /// with `admin = true` (`[[server.admin_ids]]`).
    pub admin_ids: Vec<AdminIdSection>,
    /// This replica's stable id (`[a-z0-9][a-z0-9-]{0,62}`); when unset,
    /// the one in `<data_dir>/server_id`, generated on first start.
    pub server_id: Option<crate::server_id::ServerId>,
}

/// `[[server.admin_ids]]`: one SPIFFE ID and the admin role it holds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminIdSection {
    pub id: SpiffeId,
    pub role: AdminRole,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            bind_address: DEFAULT_BIND
                .parse()
                .unwrap_or_else(|_| unreachable!("constant address parses")),
            admin_socket: PathBuf::from(DEFAULT_ADMIN_SOCKET),
            admin_uids: Vec::new(),
            max_connections: 16_384,
            max_unauthenticated_connections_per_address: 64,
            admin_bind_address: None,
            admin_ids: Vec::new(),
            server_id: None,
        }
    }
}

/// Where CA keys are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyManagerKind {
    /// PKCS#8 files under `<data_dir>/keys`, mode 0600.
    Disk,
    /// In memory only: a restart makes new CA keys.
    Memory,
    /// In a PKCS#11 token (an HSM), set up in `[ca.pkcs11]`: keys are
    /// generated in the token, non-extractable, and sign there.
    Pkcs11,
}

/// `[ca.pkcs11]`: the token that holds the CA keys. The PIN comes from a
/// file or an environment variable, never from this file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Section {
    /// Path of the PKCS#11 module (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// Label of the token.
    pub token_label: String,
    /// File holding the user PIN (one line; a trailing newline is ignored).
    pub pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN.
    pub pin_env: Option<String>,
    /// Refused: present only to explain why (see [`ServerConfig::load`]).
    #[serde(default)]
    pin: Option<serde::de::IgnoredAny>,
}

impl Pkcs11Section {
    /// Reads the user PIN from `pin_file` or `pin_env`.
    pub fn read_pin(&self) -> Result<zeroize::Zeroizing<String>, ConfigError> {
        use zeroize::Zeroizing;
        let pin = match (&self.pin_file, &self.pin_env) {
            (Some(path), None) => {
                let text = Zeroizing::new(
                    std::fs::read_to_string(path)
                        .map_err(|e| ConfigError::Read(path.clone(), e))?,
                );
                Zeroizing::new(text.trim_end_matches(['\r', '\n']).to_owned())
            }
            (None, Some(var)) => Zeroizing::new(std::env::var(var).map_err(|_| {
                ConfigError::Invalid(format!(
                    "ca.pkcs11.pin_env: environment variable {var} is not set (or not UTF-8)"
                ))
            })?),
            _ => {
                return Err(ConfigError::Invalid(
                    "ca.pkcs11: set exactly one of pin_file and pin_env".into(),
                ));
            }
        };
        if pin.is_empty() {
            return Err(ConfigError::Invalid(
                "ca.pkcs11: the PIN is empty (check pin_file / pin_env)".into(),
            ));
        }
        Ok(pin)
    }
}

/// The certificate authority.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaSection {
    /// Lifetime of each CA key and certificate.
    #[serde(with = "serde_human")]
    pub ttl: Duration,
    /// Default X.509-SVID lifetime.
    #[serde(with = "serde_human")]
    pub x509_svid_ttl: Duration,
    /// Default JWT-SVID lifetime.
    #[serde(with = "serde_human")]
    pub jwt_svid_ttl: Duration,
    /// Algorithm of the CA's keys.
    pub key_type: KeyAlgorithm,
    /// Where CA keys are kept.
    pub key_manager: KeyManagerKind,
    /// The token, for `key_manager = "pkcs11"`.
    pub pkcs11: Option<Pkcs11Section>,
    /// Upstream CA certificate chain (PEM); with `upstream_key`, Sigil's CA
    /// becomes an intermediate of it.
    pub upstream_cert: Option<PathBuf>,
    /// Upstream CA key (PKCS#8 PEM).
    pub upstream_key: Option<PathBuf>,
    /// `spiffe_refresh_hint` published with the bundle.
    #[serde(with = "opt_human")]
    pub bundle_refresh_hint: Option<Duration>,
    /// `iss` of every JWT-SVID (e.g. `https://oidc.example.org`); no `iss`
    /// when unset. Must equal `oidc_discovery.issuer` when both are set.
    pub jwt_issuer: Option<String>,
}

impl Default for CaSection {
    fn default() -> Self {
        Self {
            ttl: crate::ca::DEFAULT_CA_TTL,
            x509_svid_ttl: crate::ca::DEFAULT_X509_SVID_TTL,
            jwt_svid_ttl: crate::ca::DEFAULT_JWT_SVID_TTL,
            key_type: KeyAlgorithm::EcP256,
            key_manager: KeyManagerKind::Disk,
            pkcs11: None,
            upstream_cert: None,
            upstream_key: None,
            bundle_refresh_hint: None,
            jwt_issuer: None,
        }
    }
}

/// Agents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsSection {
    /// Lifetime of agent SVIDs.
    #[serde(with = "serde_human")]
    pub svid_ttl: Duration,
}

impl Default for AgentsSection {
    fn default() -> Self {
        Self {
            svid_ttl: Duration::from_secs(3600),
        }
    }
}

/// Node attestors.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeAttestorsSection {
    pub join_token: JoinTokenSection,
    pub x509pop: Option<X509PopSection>,
    pub k8s_psat: Option<K8sPsatSection>,
}

/// `join_token` attestor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JoinTokenSection {
    pub enabled: bool,
    /// Lifetime of tokens made without `--ttl`.
    #[serde(with = "serde_human")]
    pub default_ttl: Duration,
}

impl Default for JoinTokenSection {
    fn default() -> Self {
        Self {
            enabled: true,
            default_ttl: Duration::from_secs(3600),
        }
    }
}

/// `x509pop` attestor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X509PopSection {
    /// CA certificates (PEM) that node certificates must chain to.
    pub ca_bundle: PathBuf,
}

/// `k8s_psat` attestor: one table per cluster,
/// `[node_attestors.k8s_psat.clusters.<name>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sPsatSection {
    pub clusters: std::collections::BTreeMap<String, K8sPsatClusterSection>,
}

/// Default API server address inside a cluster.
pub const DEFAULT_K8S_API_SERVER: &str = "https://kubernetes.default.svc";
/// The in-cluster service-account CA certificate.
pub const DEFAULT_K8S_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The in-cluster service-account token.
pub const DEFAULT_K8S_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Public CA certificates used for OIDC discovery unless `oidc_ca_file` is set.
pub const DEFAULT_SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// One cluster whose agents may attest with projected tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sPsatClusterSection {
    /// The cluster's service-account issuer (`--service-account-issuer`),
    /// compared with the token's `iss` exactly.
    pub issuer: String,
    /// The audience agent tokens must carry.
    #[serde(default = "default_psat_audience")]
    pub audience: String,
    /// JWKS file with the issuer's keys (`kubectl get --raw /openid/v1/jwks`).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Fetch the keys by OIDC discovery from `issuer` instead.
    #[serde(default)]
    pub oidc_discovery: bool,
    /// CA certificates (PEM) for OIDC discovery; default the system's.
    #[serde(default)]
    pub oidc_ca_file: Option<PathBuf>,
    /// Bearer token file sent with OIDC discovery requests (the API server's
    /// discovery endpoints need one unless anonymous access is allowed).
    #[serde(default)]
    pub oidc_token_file: Option<PathBuf>,
    /// How often the keys are re-read.
    #[serde(with = "serde_human", default = "default_jwks_refresh")]
    pub jwks_refresh: Duration,
    /// `namespace:name` of the service accounts agents may use; required:
    /// any pod may carry a token with the server's audience.
    pub allowed_service_accounts: Vec<String>,
    /// The cluster's API server, asked whether the token's pod still
    /// exists with the token's UID.
    #[serde(default = "default_api_server")]
    pub api_server: String,
    /// CA certificate (PEM) of the API server.
    #[serde(default = "default_api_ca_file")]
    pub api_ca_file: PathBuf,
    /// Bearer token for the API server (needs `get` on `pods`).
    #[serde(default = "default_api_token_file")]
    pub api_token_file: PathBuf,
}

fn default_psat_audience() -> String {
    sigil_attestors::k8s_psat::DEFAULT_AUDIENCE.into()
}

fn default_jwks_refresh() -> Duration {
    sigil_attestors::k8s_psat::DEFAULT_JWKS_REFRESH
}

fn default_api_server() -> String {
    DEFAULT_K8S_API_SERVER.into()
}

fn default_api_ca_file() -> PathBuf {
    PathBuf::from(DEFAULT_K8S_CA_FILE)
}

fn default_api_token_file() -> PathBuf {
    PathBuf::from(DEFAULT_K8S_TOKEN_FILE)
}

/// Rate limits (token buckets).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSection {
    /// Attestations per second from one source address.
    pub attest_per_second: f64,
    /// Burst of attestations from one source address.
    pub attest_burst: f64,
    /// SVIDs signed per second for one agent.
    pub signing_per_second: f64,
    /// Burst of SVIDs signed for one agent.
    pub signing_burst: f64,
    /// Admin API calls per second from one caller SPIFFE ID over mTLS.
    pub admin_per_second: f64,
    /// Burst of admin API calls from one caller SPIFFE ID over mTLS.
    pub admin_burst: f64,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        Self {
            attest_per_second: 5.0,
            attest_burst: 50.0,
            signing_per_second: 2000.0,
            signing_burst: 20000.0,
            admin_per_second: 20.0,
            admin_burst: 100.0,
        }
    }
}

/// How long the server keeps history; pruning runs every `interval`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSection {
    /// Changes kept in the change feed (the newest ones); a reader behind
    /// them reloads fully. `entry_changes`, its name when the feed held
    /// entry changes only, is still read.
    #[serde(alias = "entry_changes")]
    pub changes: u64,
    /// Age after which audit records are removed.
    #[serde(with = "serde_human")]
    pub audit: Duration,
    /// How long an agent whose SVID has expired is kept (banned agents are
    /// kept until evicted).
    #[serde(with = "serde_human")]
    pub expired_agents: Duration,
    /// How often pruning runs.
    #[serde(with = "serde_human")]
    pub interval: Duration,
}

impl Default for RetentionSection {
    fn default() -> Self {
        Self {
            changes: 100_000,
            audit: Duration::from_secs(90 * 86400),
            expired_agents: Duration::from_secs(7 * 86400),
            interval: Duration::from_secs(3600),
        }
    }
}

/// Signed checkpoints of the audit log: one after every
/// `checkpoint_records` records, or `checkpoint_interval` after the last
/// one when records were written since.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    pub checkpoint_records: u64,
    #[serde(with = "serde_human")]
    pub checkpoint_interval: Duration,
}

impl Default for AuditSection {
    fn default() -> Self {
        Self {
            checkpoint_records: 1000,
            checkpoint_interval: Duration::from_secs(60),
        }
    }
}

/// `[log]` and its format, shared with the agent (and kept at this path).
pub use sigil_proto::process::{LogFormat, LogSection};

mod opt_human {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| sigil_identity::duration::parse(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Values given on the command line; each overrides the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub trust_domain: Option<TrustDomain>,
    pub data_dir: Option<PathBuf>,
    pub bind_address: Option<SocketAddr>,
    pub admin_socket: Option<PathBuf>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
    pub server_id: Option<crate::server_id::ServerId>,
}

impl ServerConfig {
    /// Reads `file` (if any) and applies `overrides`: flags over file over
    /// defaults.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse(path.to_path_buf(), e.to_string()))?
            }
            None => toml::Table::new(),
        };
        if let Some(td) = &overrides.trust_domain {
            table.insert("trust_domain".into(), toml::Value::String(td.to_string()));
        }
        if !table.contains_key("trust_domain") {
            return Err(ConfigError::MissingTrustDomain);
        }
        let origin = file.map_or_else(|| PathBuf::from("<flags>"), Path::to_path_buf);
        let mut cfg: ServerConfig = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(origin.clone(), e.to_string()))?;
        if let Some(v) = overrides.data_dir {
            cfg.data_dir = v;
        }
        if let Some(v) = overrides.bind_address {
            cfg.server.bind_address = v;
        }
        if let Some(v) = overrides.admin_socket {
            cfg.server.admin_socket = v;
        }
        if let Some(v) = overrides.log_level {
            cfg.log.level = v;
        }
        if let Some(v) = overrides.log_format {
            cfg.log.format = v;
        }
        if let Some(v) = overrides.server_id {
            cfg.server.server_id = Some(v);
        }
        cfg.read_connection_file()?;
        cfg.validate()?;
        crate::federation::validate_config(
            &cfg.trust_domain,
            &cfg.federation,
            cfg.bundle_endpoint.as_ref(),
        )
        .map_err(ConfigError::Invalid)?;
        Ok(cfg)
    }

    /// Takes `datastore.connection` from `datastore.connection_file`. The
    /// file's content (it may hold a password) is never part of an error.
    fn read_connection_file(&mut self) -> Result<(), ConfigError> {
        let ds = &mut self.datastore;
        let Some(path) = &ds.connection_file else {
            return Ok(());
        };
        if ds.connection.is_some() {
            return Err(ConfigError::Invalid(
                "datastore.connection and datastore.connection_file are both set: keep one".into(),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::Invalid(format!(
                "cannot read datastore.connection_file {}: {e}",
                path.display()
            ))
        })?;
        let connection = text.trim();
        if connection.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "datastore.connection_file {} is empty: it must hold the connection string",
                path.display()
            )));
        }
        ds.connection = Some(ConnectionString(connection.to_owned()));
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let ds = &self.datastore;
        match (ds.kind, &ds.connection) {
            (DatastoreKind::Postgres, None) => {
                return Err(ConfigError::Invalid(
                    "datastore.type = \"postgres\" needs datastore.connection (e.g. \"host=/run/postgresql user=sigil dbname=sigil\")".into(),
                ));
            }
            (DatastoreKind::Postgres, Some(c)) => {
                crate::datastore::postgres::PgSettings::parse(c.expose(), None)
                    .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            }
            (DatastoreKind::Sled, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "datastore.connection is only used with datastore.type = \"postgres\"".into(),
                ));
            }
            (DatastoreKind::Sled, None) => {}
        }
        if ds.pool_size == 0 || ds.poll_interval < Duration::from_millis(100) {
            return Err(ConfigError::Invalid(
                "datastore.pool_size must be at least 1 and datastore.poll_interval at least 100ms"
                    .into(),
            ));
        }
        match (&self.ca.key_manager, &self.ca.pkcs11) {
            (KeyManagerKind::Pkcs11, None) => {
                return Err(ConfigError::Invalid(
                    "ca.key_manager = \"pkcs11\" needs a [ca.pkcs11] section with module, \
                     token_label and pin_file or pin_env"
                        .into(),
                ));
            }
            (KeyManagerKind::Pkcs11, Some(p)) => {
                if p.pin.is_some() {
                    return Err(ConfigError::Invalid(
                        "ca.pkcs11.pin is refused: a PIN in the config file leaks through \
                         backups, config management and `ps`-visible tooling; put it in a file \
                         readable only by the server (pin_file) or an environment variable \
                         (pin_env)"
                            .into(),
                    ));
                }
                if p.pin_file.is_some() == p.pin_env.is_some() {
                    return Err(ConfigError::Invalid(
                        "ca.pkcs11: set exactly one of pin_file and pin_env".into(),
                    ));
                }
            }
            (_, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "[ca.pkcs11] is set but ca.key_manager is not \"pkcs11\"; set \
                     ca.key_manager = \"pkcs11\" or remove the section"
                        .into(),
                ));
            }
            _ => {}
        }
        if self.ca.upstream_cert.is_some() != self.ca.upstream_key.is_some() {
            return Err(ConfigError::Invalid(
                "ca.upstream_cert and ca.upstream_key must be set together".into(),
            ));
        }
        if self.ca.x509_svid_ttl >= self.ca.ttl || self.ca.jwt_svid_ttl >= self.ca.ttl {
            return Err(ConfigError::Invalid(
                "ca.x509_svid_ttl and ca.jwt_svid_ttl must be shorter than ca.ttl".into(),
            ));
        }
        if self.ca.ttl < Duration::from_secs(60)
            || self.ca.ttl > Duration::from_secs(10 * 366 * 86400)
        {
            return Err(ConfigError::Invalid(
                "ca.ttl must be between 1m and 10 years".into(),
            ));
        }
        if self.agents.svid_ttl > self.ca.ttl {
            return Err(ConfigError::Invalid(
                "agents.svid_ttl must not exceed ca.ttl".into(),
            ));
        }
        if let Some(k) = &self.node_attestors.k8s_psat {
            if k.clusters.is_empty() {
                return Err(ConfigError::Invalid(
                    "node_attestors.k8s_psat needs at least one [node_attestors.k8s_psat.clusters.<name>]".into(),
                ));
            }
            for (name, c) in &k.clusters {
                if c.jwks_file.is_some() == c.oidc_discovery {
                    return Err(ConfigError::Invalid(format!(
                        "node_attestors.k8s_psat.clusters.{name}: set exactly one of jwks_file and oidc_discovery = true"
                    )));
                }
            }
        }
        if self.audit.checkpoint_records == 0
            || self.audit.checkpoint_interval < Duration::from_secs(1)
        {
            return Err(ConfigError::Invalid(
                "audit.checkpoint_records must be at least 1 and audit.checkpoint_interval at least 1s".into(),
            ));
        }
        if self.retention.interval < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "retention.interval must be at least 1s".into(),
            ));
        }
        if !(self.rate_limits.attest_per_second > 0.0
            && self.rate_limits.signing_per_second > 0.0
            && self.rate_limits.admin_per_second > 0.0)
        {
            return Err(ConfigError::Invalid("rate limits must be positive".into()));
        }
        if self.server.max_connections == 0
            || self.server.max_unauthenticated_connections_per_address == 0
        {
            return Err(ConfigError::Invalid(
                "server.max_connections and server.max_unauthenticated_connections_per_address must be at least 1 (0 would refuse every agent)".into(),
            ));
        }
        if let Some(a) = self
            .server
            .admin_ids
            .iter()
            .find(|a| !a.id.is_member_of(&self.trust_domain))
        {
            return Err(ConfigError::Invalid(format!(
                "server.admin_ids: {} is not in trust domain {}; only SVIDs of this trust domain are accepted",
                a.id, self.trust_domain
            )));
        }
        if let Some(iss) = &self.ca.jwt_issuer {
            crate::oidc_discovery::check_jwt_issuer(iss).map_err(ConfigError::Invalid)?;
        }
        if let Some(o) = &self.oidc_discovery {
            crate::oidc_discovery::check_config(o, self.ca.jwt_issuer.as_deref(), self.ca.ttl)
                .map_err(ConfigError::Invalid)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn defaults_and_file_values() {
        let (_d, path) =
            write("trust_domain = \"example.org\"\n[ca]\nttl = \"12h\"\nx509_svid_ttl = \"30m\"\n");
        let cfg = ServerConfig::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(cfg.trust_domain.as_str(), "example.org");
        assert_eq!(cfg.ca.ttl, Duration::from_secs(12 * 3600));
        assert_eq!(cfg.ca.x509_svid_ttl, Duration::from_secs(1800));
        assert_eq!(cfg.ca.jwt_svid_ttl, Duration::from_secs(300));
        assert_eq!(cfg.server.bind_address.to_string(), DEFAULT_BIND);
        assert_eq!(cfg.ca.key_manager, KeyManagerKind::Disk);
    }

    #[test]
    fn replica_id_feed_poll_and_change_retention() {
        let (_d, path) = write("trust_domain = \"example.org\"\n");
        let cfg = ServerConfig::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(cfg.server.server_id, None);
        assert_eq!(cfg.datastore.poll_interval, Duration::from_secs(5));
        assert_eq!(cfg.retention.changes, 100_000);
        let (_d, path) = write(
            "trust_domain = \"example.org\"\n[server]\nserver_id = \"sigil-server-1\"\n[datastore]\npoll_interval = \"250ms\"\n[retention]\nentry_changes = 7\n",
        );
        let cfg = ServerConfig::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(
            cfg.server.server_id.as_ref().map(|s| s.as_str()),
            Some("sigil-server-1")
        );
        assert_eq!(cfg.datastore.poll_interval, Duration::from_millis(250));
        assert_eq!(cfg.retention.changes, 7, "the old name is still read");
        let (_d, path) =
            write("trust_domain = \"example.org\"\n[server]\nserver_id = \"Bad_Id\"\n");
        let err = ServerConfig::load(Some(&path), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("Bad_Id"), "{err}");
    }

    #[test]
    fn flags_override_file() {
        let (_d, path) = write("trust_domain = \"example.org\"\ndata_dir = \"/a\"\n");
        let o = Overrides {
            trust_domain: Some(TrustDomain::new("other.org").unwrap()),
            data_dir: Some("/b".into()),
            server_id: Some("sigil-server-1".parse().unwrap()),
            ..Default::default()
        };
        let cfg = ServerConfig::load(Some(&path), o).unwrap();
        assert_eq!(cfg.trust_domain.as_str(), "other.org");
        assert_eq!(cfg.data_dir, PathBuf::from("/b"));
        assert_eq!(
            cfg.server.server_id.map(|id| id.to_string()).as_deref(),
            Some("sigil-server-1")
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let (_d, path) = write("trust_domain = \"example.org\"\n[ca]\nttll = \"1h\"\n");
        let err = ServerConfig::load(Some(&path), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("ttll"), "{err}");
    }

    #[test]
    fn connection_caps_default_and_refuse_zero() {
        let (_d, path) = write("trust_domain = \"example.org\"\n");
        let cfg = ServerConfig::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(cfg.server.max_connections, 16_384);
        assert_eq!(cfg.server.max_unauthenticated_connections_per_address, 64);
        let (_d, path) = write(
            "trust_domain = \"example.org\"\n[server]\nmax_unauthenticated_connections_per_address = 0\n",
        );
        let err = ServerConfig::load(Some(&path), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
    }

    #[test]
    fn remote_admin_is_off_by_default_and_admin_ids_parse() {
        let (_d, path) = write("trust_domain = \"example.org\"\n");
        let cfg = ServerConfig::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(cfg.server.admin_bind_address, None);
        assert!(cfg.server.admin_ids.is_empty());
        let (_d, path) = write(
            "trust_domain = \"example.org\"\n[server]\nadmin_bind_address = \"127.0.0.1:8082\"\n[[server.admin_ids]]\nid = \"spiffe://example.org/soar\"\nrole = \"revoke\"\n",
        );
        let cfg = ServerConfig::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(
            cfg.server.admin_bind_address.unwrap().to_string(),
            "127.0.0.1:8082"
        );
        assert_eq!(cfg.server.admin_ids[0].role, AdminRole::Revoke);
        let (_d, path) = write(
            "trust_domain = \"example.org\"\n[[server.admin_ids]]\nid = \"spiffe://example.org/soar\"\nrole = \"root\"\n",
        );
        assert!(ServerConfig::load(Some(&path), Overrides::default()).is_err());
        let (_d, path) = write(
            "trust_domain = \"example.org\"\n[[server.admin_ids]]\nid = \"spiffe://other.org/soar\"\nrole = \"read\"\n",
        );
        let err = ServerConfig::load(Some(&path), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("not in trust domain"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let (_d, path) = write("trust_domain = \"Example.org\"\n");
        assert!(ServerConfig::load(Some(&path), Overrides::default()).is_err());
        let (_d, path) = write("trust_domain = \"example.org\"\n[ca]\nttl = \"10\"\n");
        let err = ServerConfig::load(Some(&path), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("missing unit"), "{err}");
        let (_d, path) =
            write("trust_domain = \"example.org\"\n[ca]\nttl = \"1h\"\nx509_svid_ttl = \"2h\"\n");
        assert!(matches!(
            ServerConfig::load(Some(&path), Overrides::default()),
            Err(ConfigError::Invalid(_))
        ));
        assert!(matches!(
            ServerConfig::load(None, Overrides::default()),
            Err(ConfigError::MissingTrustDomain)
        ));
    }

    #[test]
    fn k8s_psat_clusters_parse_with_defaults_and_need_one_key_source() {
        let base = "trust_domain = \"example.org\"\n[node_attestors.k8s_psat.clusters.prod]\nissuer = \"https://kubernetes.default.svc.cluster.local\"\nallowed_service_accounts = [\"sigil:sigil-agent\"]\n";
        let (_d, path) = write(&format!(
            "{base}jwks_file = \"/etc/sigil/prod-jwks.json\"\n"
        ));
        let cfg = ServerConfig::load(Some(&path), Overrides::default()).unwrap();
        let k = cfg.node_attestors.k8s_psat.unwrap();
        let prod = &k.clusters["prod"];
        assert_eq!(prod.audience, "sigil-server");
        assert_eq!(prod.api_server, DEFAULT_K8S_API_SERVER);
        assert_eq!(prod.api_token_file, PathBuf::from(DEFAULT_K8S_TOKEN_FILE));
        assert_eq!(prod.jwks_refresh, Duration::from_secs(300));
        assert_eq!(prod.allowed_service_accounts, vec!["sigil:sigil-agent"]);

        let (_d, path) = write(base);
        let err = ServerConfig::load(Some(&path), Overrides::default()).unwrap_err();
        assert!(
            err.to_string().contains("exactly one of jwks_file"),
            "{err}"
        );
        let (_d, path) = write(&format!("{base}jwks_file = \"a\"\noidc_discovery = true\n"));
        assert!(ServerConfig::load(Some(&path), Overrides::default()).is_err());
        let (_d, path) = write(&format!(
            "{base}oidc_discovery = true\naudiences = [\"x\"]\n"
        ));
        let err = ServerConfig::load(Some(&path), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("audiences"), "{err}");
    }

    #[test]
    fn the_connection_string_may_come_from_a_file_and_never_shows_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let conn = dir.path().join("connection");
        std::fs::write(&conn, "host=db user=sigil password=hunter2 dbname=sigil\n").unwrap();
        let (_d, path) = write(&format!(
            "trust_domain = \"example.org\"\n[datastore]\ntype = \"postgres\"\nconnection_file = \"{}\"\n",
            conn.display()
        ));
        let cfg = ServerConfig::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(
            cfg.datastore.connection.as_ref().map(|c| c.expose()),
            Some("host=db user=sigil password=hunter2 dbname=sigil")
        );
        assert!(!format!("{:?}", cfg.datastore).contains("hunter2"));
        // Both set: refused.
        let (_d, path) = write(&format!(
            "trust_domain = \"example.org\"\n[datastore]\ntype = \"postgres\"\nconnection = \"host=db\"\nconnection_file = \"{}\"\n",
            conn.display()
        ));
        let err = ServerConfig::load(Some(&path), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("both set"), "{err}");
        // A bad string in the file: the error does not repeat the password.
        std::fs::write(&conn, "host=db password=hunter2 sslmode=bogus\n").unwrap();
        let (_d, path) = write(&format!(
            "trust_domain = \"example.org\"\n[datastore]\ntype = \"postgres\"\nconnection_file = \"{}\"\n",
            conn.display()
        ));
        let err = ServerConfig::load(Some(&path), Overrides::default()).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        // Missing or empty file: named.
        std::fs::write(&conn, "\n").unwrap();
        let err = ServerConfig::load(Some(&path), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
        std::fs::remove_file(&conn).unwrap();
        let err = ServerConfig::load(Some(&path), Overrides::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot read datastore.connection_file"),
            "{err}"
        );
    }

    #[test]
    fn the_datastore_is_sled_by_default_and_postgres_needs_a_connection() {
        let (_d, path) = write("trust_domain = \"example.org\"\n");
        let cfg = ServerConfig::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(cfg.datastore.kind, DatastoreKind::Sled);
        assert_eq!(cfg.datastore.poll_interval, Duration::from_secs(5));
        let (_d, path) =
            write("trust_domain = \"example.org\"\n[datastore]\ntype = \"postgres\"\n");
        let err = ServerConfig::load(Some(&path), Overrides::default()).unwrap_err();
        assert!(
            err.to_string().contains("needs datastore.connection"),
            "{err}"
        );
        let (_d, path) = write(
            "trust_domain = \"example.org\"\n[datastore]\ntype = \"postgres\"\nconnection = \"host=db user=sigil password=secret dbname=sigil\"\npool_size = 4\npoll_interval = \"2s\"\n",
        );
        let cfg = ServerConfig::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(cfg.datastore.kind, DatastoreKind::Postgres);
        assert_eq!(cfg.datastore.pool_size, 4);
        // The whole config may be logged with `{:?}`: no password.
        assert!(!format!("{cfg:?}").contains("secret"));
        let (_d, path) = write(
            "trust_domain = \"example.org\"\n[datastore]\ntype = \"postgres\"\nconnection = \"host=db password=secret sslmode=verify-full\"\n",
        );
        let err = ServerConfig::load(Some(&path), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("sslrootcert"), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn the_example_config_in_deploy_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/server.toml");
        ServerConfig::load(Some(&path), Overrides::default()).unwrap();
    }

    #[test]
    fn pkcs11_section_is_checked_and_the_pin_stays_out_of_the_config() {
        let head = "trust_domain = \"example.org\"\n[ca]\nkey_manager = \"pkcs11\"\n";
        let section =
            "[ca.pkcs11]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"sigil\"\n";
        let load = |text: String| ServerConfig::load(Some(&write(&text).1), Overrides::default());

        let err = load(format!("{head}{section}pin = \"1234\"\n")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("ca.pkcs11.pin is refused") && msg.contains("pin_file"),
            "{msg}"
        );
        assert!(!msg.contains("1234"), "the PIN is never echoed: {msg}");

        let err = load(head.to_owned()).unwrap_err();
        assert!(err.to_string().contains("[ca.pkcs11]"), "{err}");
        let err = load(format!("{head}{section}")).unwrap_err();
        assert!(
            err.to_string()
                .contains("exactly one of pin_file and pin_env"),
            "{err}"
        );
        let err = load(format!(
            "trust_domain = \"example.org\"\n{section}pin_env = \"X\"\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("is not \"pkcs11\""), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("pin");
        std::fs::write(&pin, "4711\n").unwrap();
        let cfg = load(format!("{head}{section}pin_file = \"{}\"\n", pin.display())).unwrap();
        assert_eq!(cfg.ca.key_manager, KeyManagerKind::Pkcs11);
        let p = cfg.ca.pkcs11.unwrap();
        assert_eq!(
            p.read_pin().unwrap().as_str(),
            "4711",
            "trailing newline dropped"
        );
        std::fs::write(&pin, "\n").unwrap();
        assert!(p.read_pin().is_err(), "an empty PIN is refused");
        let cfg = load(format!(
            "{head}{section}pin_env = \"SIGIL_TEST_UNSET_PIN_VAR\"\n"
        ))
        .unwrap();
        let err = cfg.ca.pkcs11.unwrap().read_pin().unwrap_err();
        assert!(
            err.to_string().contains("SIGIL_TEST_UNSET_PIN_VAR"),
            "{err}"
        );
    }
}
