//! The catalog: what a server is built from, each part from its
//! configuration section — the replica's server id, the datastore, the CA
//! key manager (and the upstream CA, if any) and the node attestors.
//!
//! [`crate::server`] builds the catalog first and wires everything else
//! from it; one function per kind of part chooses the implementation.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use sigil_attestors::https::{HttpsClient, Trust};
use sigil_attestors::join_token::{JoinTokenAttestor, TokenStore};
use sigil_attestors::k8s_psat::{ApiServerPods, ClusterConfig, K8sPsatAttestor, KeySource};
use sigil_attestors::x509pop::X509PopAttestor;
use sigil_identity::TrustDomain;
use sigil_identity::attestation::{AttestError, ServerNodeAttestor};
use sigil_identity::clock::Clock;
use tracing::{info, warn};

use crate::ca::keys::{DiskKeyManager, KeyManager, KeyManagerError, MemoryKeyManager};
use crate::ca::x509::UpstreamCa;
use crate::config::DatastoreKind;
use crate::config::{K8sPsatSection, KeyManagerKind, ServerConfig};
use crate::datastore::{Datastore, DatastoreError, SledDatastore, TokenHash, postgres};
use crate::server_id::{ServerId, ServerIdError};

/// Why a part of the catalog could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    #[error("data directory {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error("datastore: {0}")]
    Datastore(#[from] DatastoreError),
    #[error("CA keys: {0}")]
    Keys(#[from] KeyManagerError),
    #[error("upstream CA: {0}")]
    Upstream(#[from] crate::ca::CaError),
    #[error("node attestor: {0}")]
    Attestor(#[from] AttestError),
    #[error("server id: {0}")]
    ServerId(#[from] ServerIdError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
}

/// Node attestors by name (`join_token`, `x509pop`, `k8s_psat`).
pub type Attestors = HashMap<&'static str, Arc<dyn ServerNodeAttestor>>;

/// The parts a server is built from.
pub struct Catalog {
    /// This replica's stable id (its CA journal's key).
    pub server_id: ServerId,
    pub store: Arc<dyn Datastore>,
    pub keys: Arc<dyn KeyManager>,
    /// The CA above this one, when the server's CA is an intermediate.
    pub upstream: Option<UpstreamCa>,
    pub attestors: Attestors,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.attestors.keys().collect();
        names.sort();
        f.debug_struct("Catalog")
            .field("server_id", &self.server_id)
            .field("attestors", &names)
            .field("upstream", &self.upstream.is_some())
            .finish_non_exhaustive()
    }
}

impl Catalog {
    /// Builds every part from `config`: makes the data directory private,
    /// settles the server id, opens the datastore and the key manager,
    /// loads the upstream CA and the enabled node attestors.
    pub async fn open(config: &ServerConfig, clock: Arc<dyn Clock>) -> Result<Self, CatalogError> {
        private_data_dir(config)?;
        let server_id =
            ServerId::load_or_create(config.server.server_id.as_ref(), &config.data_dir)?;
        info!(server_id = %server_id, "server replica id");
        let store = open_datastore(config).await?;
        let keys = open_key_manager(config)?;
        let upstream = match (&config.ca.upstream_cert, &config.ca.upstream_key) {
            (Some(cert), Some(key)) => Some(UpstreamCa::load(cert, key, &config.trust_domain)?),
            _ => None,
        };
        let attestors = node_attestors(config, &store, clock)?;
        Ok(Self {
            server_id,
            store,
            keys,
            upstream,
            attestors,
        })
    }
}

/// The data directory holds the datastore (sled) and the CA keys: this
/// user's alone.
fn private_data_dir(config: &ServerConfig) -> Result<(), CatalogError> {
    let data_dir = &config.data_dir;
    if let sigil_identity::secret_file::DirState::Tightened { was } =
        sigil_identity::secret_file::private_dir(data_dir)
            .map_err(|e| CatalogError::DataDir(data_dir.clone(), e))?
    {
        warn!(
            dir = %data_dir.display(),
            mode = format_args!("{was:o}"),
            "the data directory was open to group or others; now 0700"
        );
    }
    Ok(())
}

/// Opens the datastore `[datastore]` names: sled under
/// `<data_dir>/datastore`, or the PostgreSQL database (migrated to this
/// binary's schema). The one place that chooses the implementation.
pub async fn open_datastore(config: &ServerConfig) -> Result<Arc<dyn Datastore>, CatalogError> {
    let section = &config.datastore;
    Ok(match (section.kind, &section.connection) {
        (DatastoreKind::Postgres, Some(connection)) => {
            let settings =
                postgres::PgSettings::parse(connection.expose(), section.password_file.as_deref())
                    .map_err(|e| DatastoreError::Backend(e.to_string()))?;
            let options = postgres::PgOptions {
                pool_size: section.pool_size,
                poll_interval: section.poll_interval,
            };
            Arc::new(postgres::PostgresDatastore::open(settings, options).await?)
        }
        (DatastoreKind::Postgres, None) => {
            return Err(DatastoreError::Backend(
                "datastore.type = \"postgres\" needs datastore.connection".into(),
            )
            .into());
        }
        (DatastoreKind::Sled, _) => {
            Arc::new(SledDatastore::open(config.data_dir.join("datastore"))?)
        }
    })
}

/// Opens the CA key manager the configuration names.
fn open_key_manager(config: &ServerConfig) -> Result<Arc<dyn KeyManager>, CatalogError> {
    Ok(match config.ca.key_manager {
        KeyManagerKind::Disk => Arc::new(DiskKeyManager::open(config.data_dir.join("keys"))?),
        KeyManagerKind::Memory => Arc::new(MemoryKeyManager::default()),
        KeyManagerKind::Pkcs11 => {
            // `validate` guarantees the section for this kind.
            let p = config.ca.pkcs11.as_ref().ok_or_else(|| {
                KeyManagerError::Pkcs11("ca.key_manager = \"pkcs11\" needs [ca.pkcs11]".into())
            })?;
            let pin = p.read_pin()?;
            Arc::new(crate::ca::pkcs11::Pkcs11KeyManager::open(
                crate::ca::pkcs11::Pkcs11Settings {
                    module: p.module.clone(),
                    token_label: p.token_label.clone(),
                    pin,
                },
            )?)
        }
    })
}

/// The node attestors the configuration enables.
fn node_attestors(
    config: &ServerConfig,
    store: &Arc<dyn Datastore>,
    clock: Arc<dyn Clock>,
) -> Result<Attestors, CatalogError> {
    let td = &config.trust_domain;
    let mut attestors: Attestors = HashMap::new();
    if config.node_attestors.join_token.enabled {
        let tokens = Arc::new(DatastoreTokens {
            store: store.clone(),
            clock: clock.clone(),
        });
        attestors.insert(
            sigil_attestors::join_token::NAME,
            Arc::new(JoinTokenAttestor::new(td.clone(), tokens)),
        );
    }
    if let Some(x) = &config.node_attestors.x509pop {
        let a = X509PopAttestor::from_pem_file(td.clone(), &x.ca_bundle, clock.clone())?;
        attestors.insert(sigil_attestors::x509pop::NAME, Arc::new(a));
    }
    if let Some(k) = &config.node_attestors.k8s_psat {
        let a = k8s_psat_attestor(k, td, clock)?;
        attestors.insert(sigil_attestors::k8s_psat::NAME, Arc::new(a));
    }
    Ok(attestors)
}

/// Builds the `k8s_psat` attestor from its configuration section.
fn k8s_psat_attestor(
    section: &K8sPsatSection,
    td: &TrustDomain,
    clock: Arc<dyn Clock>,
) -> Result<K8sPsatAttestor, AttestError> {
    let internal = |cluster: &str, e: sigil_attestors::https::HttpsError| {
        AttestError::Internal(format!("k8s_psat cluster {cluster:?}: {e}"))
    };
    let mut clusters = Vec::new();
    for (name, c) in &section.clusters {
        let keys = match &c.jwks_file {
            Some(path) => KeySource::File(path.clone()),
            None => {
                let ca = c
                    .oidc_ca_file
                    .clone()
                    .unwrap_or_else(|| crate::config::DEFAULT_SYSTEM_CA_FILE.into());
                let trust = Trust::from_pem_file(&ca).map_err(|e| internal(name, e))?;
                KeySource::Discovery {
                    issuer_url: c.issuer.clone(),
                    client: HttpsClient::new(trust).map_err(|e| internal(name, e))?,
                    token_file: c.oidc_token_file.clone(),
                }
            }
        };
        let api_trust = Trust::from_pem_file(&c.api_ca_file).map_err(|e| internal(name, e))?;
        let pods = ApiServerPods::new(
            c.api_server.clone(),
            HttpsClient::new(api_trust).map_err(|e| internal(name, e))?,
            Some(c.api_token_file.clone()),
        );
        let mut cluster = ClusterConfig::new(name.clone(), c.issuer.clone(), keys, Arc::new(pods));
        cluster.audience = c.audience.clone();
        cluster.jwks_refresh = c.jwks_refresh;
        cluster.allowed_service_accounts = c.allowed_service_accounts.clone();
        clusters.push(cluster);
    }
    K8sPsatAttestor::new(td.clone(), clusters, clock)
}

/// Join tokens are consumed from the datastore.
#[derive(Debug)]
struct DatastoreTokens {
    store: Arc<dyn Datastore>,
    clock: Arc<dyn Clock>,
}

#[async_trait]
impl TokenStore for DatastoreTokens {
    async fn consume(&self, token: &str) -> Result<(), AttestError> {
        match self
            .store
            .consume_join_token(&TokenHash::of(token), self.clock.now())
            .await
        {
            Ok(_) => Ok(()),
            Err(DatastoreError::NotFound(_)) => {
                Err(AttestError::Rejected("unknown or already used join token"))
            }
            Err(DatastoreError::TokenExpired) => {
                Err(AttestError::Rejected("join token has expired"))
            }
            Err(e) => Err(AttestError::Internal(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use sigil_identity::clock::SystemClock;

    use super::*;
    use crate::config::Overrides;

    fn config(dir: &std::path::Path) -> ServerConfig {
        ServerConfig::load(
            None,
            Overrides {
                trust_domain: Some(TrustDomain::new("example.org").unwrap()),
                data_dir: Some(dir.to_path_buf()),
                ..Default::default()
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn the_default_catalog_is_sled_with_join_tokens_and_a_lasting_server_id() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let cfg = config(&data);
        let first = Catalog::open(&cfg, Arc::new(SystemClock)).await.unwrap();
        assert!(first.upstream.is_none());
        let names: Vec<_> = first.attestors.keys().copied().collect();
        assert_eq!(names, [sigil_attestors::join_token::NAME]);
        assert!(data.join("datastore").is_dir(), "sled lives in data_dir");
        assert_eq!(first.store.count_entries().await.unwrap(), 0);
        let id = first.server_id.clone();
        drop(first);

        // The generated id is kept with the data directory; a configured
        // one wins.
        let again = Catalog::open(&cfg, Arc::new(SystemClock)).await.unwrap();
        assert_eq!(again.server_id, id);
        drop(again);
        let mut named = cfg.clone();
        named.server.server_id = Some("sigil-server-1".parse().unwrap());
        let named = Catalog::open(&named, Arc::new(SystemClock)).await.unwrap();
        assert_eq!(named.server_id.to_string(), "sigil-server-1");
    }

    #[tokio::test]
    async fn a_missing_x509pop_bundle_fails_the_catalog_naming_the_attestor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(
            &path,
            format!(
                "trust_domain = \"example.org\"\ndata_dir = {:?}\n[node_attestors.x509pop]\nca_bundle = \"/nonexistent/ca.pem\"\n",
                dir.path().join("data")
            ),
        )
        .unwrap();
        let cfg = ServerConfig::load(Some(&path), Overrides::default()).unwrap();
        let err = Catalog::open(&cfg, Arc::new(SystemClock))
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(err, CatalogError::Attestor(_)), "{err:?}");
        assert!(err.to_string().contains("node attestor"), "{err}");
    }
}
