//! Wiring: builds every part of the server from a [`ServerConfig`] and runs
//! the node and admin APIs until shutdown.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sigil_attestors::https::{HttpsClient, Trust};
use sigil_attestors::join_token::{JoinTokenAttestor, TokenStore};
use sigil_attestors::k8s_psat::{ApiServerPods, ClusterConfig, K8sPsatAttestor, KeySource};
use sigil_attestors::x509pop::X509PopAttestor;
use sigil_identity::attestation::{AttestError, ServerNodeAttestor};
use sigil_identity::clock::{Clock, SystemClock};
use sigil_proto::admin::admin_server::AdminServer;
use sigil_proto::node::node_server::NodeServer;
use sigil_proto::telemetry::in_span;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{Instrument, info, info_span, warn};

use crate::admin_api::{AdminApi, AdminService, mtls, own_uid};
use crate::audit::Audit;
use crate::ca::keys::{DiskKeyManager, KeyManager, MemoryKeyManager};
use crate::ca::x509::UpstreamCa;
use crate::ca::{CaConfig, CaManager};
use crate::config::{K8sPsatSection, KeyManagerKind, ServerConfig};
use crate::datastore::{Datastore, DatastoreError, TokenHash};
use crate::node_api::{NodeApi, NodeService, limits, tls};
use crate::registry::Registry;
pub use crate::shutdown::shutdown_signal;
use crate::shutdown::wait_for_stop;
use sigil_identity::rate_limit::RateLimiter;

/// How long shutdown waits for open connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Largest gRPC message sent, and accepted on the admin API (a full batch
/// of SVIDs fits). The node API accepts less: see [`limits`].
const MAX_MESSAGE: usize = 32 * 1024 * 1024;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("datastore: {0}")]
    Datastore(#[from] DatastoreError),
    #[error("CA: {0}")]
    Ca(#[from] crate::ca::CaError),
    #[error("CA keys: {0}")]
    Keys(#[from] crate::ca::keys::KeyManagerError),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("node attestor: {0}")]
    Attestor(#[from] AttestError),
    #[error("serving: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("data directory {0}: {1}")]
    DataDir(std::path::PathBuf, std::io::Error),
    #[error("cannot listen on {0} for the admin API over mTLS (server.admin_bind_address): {1}")]
    AdminBind(std::net::SocketAddr, std::io::Error),
    #[error("audit checkpoints: {0}")]
    AuditKey(#[from] crate::audit::checkpoint::CheckpointError),
    #[error("{0}")]
    Telemetry(std::io::Error),
    #[error("server id: {0}")]
    ServerId(#[from] crate::server_id::ServerIdError),
}

/// Builds the `k8s_psat` attestor from its configuration section.
fn k8s_psat_attestor(
    section: &K8sPsatSection,
    td: &sigil_identity::TrustDomain,
    clock: Arc<dyn Clock>,
) -> Result<K8sPsatAttestor, ServerError> {
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
    Ok(K8sPsatAttestor::new(td.clone(), clusters, clock)?)
}

/// The sockets the server serves on, bound by the caller so tests can use
/// ephemeral ports and temporary paths.
#[derive(Debug)]
pub struct Listeners {
    pub node: TcpListener,
    pub admin: UnixListener,
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

/// Runs the server until `shutdown` resolves, then stops serving
/// gracefully (open streams are closed, in-flight calls finish).
pub async fn run(
    config: ServerConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let td = config.trust_domain.clone();
    // It holds the datastore and the CA keys: this user's alone.
    let data_dir = &config.data_dir;
    if let sigil_identity::secret_file::DirState::Tightened { was } =
        sigil_identity::secret_file::private_dir(data_dir)
            .map_err(|e| ServerError::DataDir(data_dir.clone(), e))?
    {
        warn!(
            dir = %data_dir.display(),
            mode = format_args!("{was:o}"),
            "the data directory was open to group or others; now 0700"
        );
    }
    let server_id =
        crate::server_id::ServerId::load_or_create(config.server.server_id.as_ref(), data_dir)?;
    info!(server_id = %server_id, "server replica id");
    let store = crate::datastore::open(&config.datastore, &config.data_dir).await?;
    let keys: Arc<dyn KeyManager> = match config.ca.key_manager {
        KeyManagerKind::Disk => Arc::new(DiskKeyManager::open(config.data_dir.join("keys"))?),
        KeyManagerKind::Memory => Arc::new(MemoryKeyManager::default()),
    };
    let upstream = match (&config.ca.upstream_cert, &config.ca.upstream_key) {
        (Some(cert), Some(key)) => Some(UpstreamCa::load(cert, key, &td)?),
        _ => None,
    };
    let ca_config = CaConfig {
        trust_domain: td.clone(),
        ca_ttl: config.ca.ttl,
        x509_svid_ttl: config.ca.x509_svid_ttl,
        jwt_svid_ttl: config.ca.jwt_svid_ttl,
        key_algorithm: config.ca.key_type,
        refresh_hint: config.ca.bundle_refresh_hint,
        server_id,
    };
    let ca = CaManager::start(ca_config, store.clone(), keys, clock.clone(), upstream).await?;
    let registry = Registry::load(store.clone(), &td).await?;
    // The CA follows the bundle (other replicas' publications) through the
    // registry's reading of the feed; a change between the CA's start and
    // the registry's load is read once here.
    registry.add_listener(ca.clone());
    crate::registry::ChangeListener::reload(ca.as_ref()).await;
    let audit = Audit::new(store.clone(), clock.clone());
    let metrics = Arc::new(crate::telemetry::ServerMetrics::default());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let server_svid = tls::ServerSvid::start(ca.clone(), clock.clone(), stop_rx.clone())?;
    let bundle = tls::follow_bundle(&ca, stop_rx.clone());
    let acceptor = tls::acceptor(&server_svid, bundle.clone())?;

    let mut attestors: HashMap<&'static str, Arc<dyn ServerNodeAttestor>> = HashMap::new();
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
        let a = k8s_psat_attestor(k, &td, clock.clone())?;
        attestors.insert(sigil_attestors::k8s_psat::NAME, Arc::new(a));
    }

    let rates = &config.rate_limits;
    let node = Arc::new(NodeService {
        ca: ca.clone(),
        registry: registry.clone(),
        store: store.clone(),
        attestors,
        audit: audit.clone(),
        clock: clock.clone(),
        agent_svid_ttl: config.agents.svid_ttl,
        attest_limit: RateLimiter::new(rates.attest_per_second, rates.attest_burst),
        sign_limit: RateLimiter::new(rates.signing_per_second, rates.signing_burst),
        shutdown: stop_rx.clone(),
        wire_bundle: std::sync::Mutex::default(),
        metrics: metrics.clone(),
    });
    let mut allowed_uids: BTreeSet<u32> = config.server.admin_uids.iter().copied().collect();
    allowed_uids.insert(0);
    allowed_uids.insert(own_uid());
    // The admin API over mTLS, when configured; bound before anything
    // is served so a taken port fails the start.
    let admin_tcp = match config.server.admin_bind_address {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| ServerError::AdminBind(addr, e))?,
        ),
        None => None,
    };
    let admin = Arc::new(AdminService {
        trust_domain: td.clone(),
        ca: ca.clone(),
        registry: registry.clone(),
        store: store.clone(),
        audit: audit.clone(),
        clock: clock.clone(),
        allowed_uids,
        token_ttl: config.node_attestors.join_token.default_ttl,
    });

    // Background work: CA rotation, following the change feed (for changes
    // made by other replicas), pruning expired join tokens.
    let rotation = tokio::spawn(
        ca.clone()
            .run(wait_for_stop(stop_rx.clone()))
            .instrument(info_span!("ca_rotation")),
    );
    let pruner = crate::retention::Pruner {
        store: store.clone(),
        registry: registry.clone(),
        audit: audit.clone(),
        clock: clock.clone(),
        retention: config.retention.clone(),
    };
    let pruning = tokio::spawn(
        pruner
            .run(stop_rx.clone())
            .instrument(info_span!("pruning")),
    );
    let checkpointer = Arc::new(crate::audit::checkpoint::Checkpointer {
        store: store.clone(),
        key: crate::audit::checkpoint::AuditKey::load_or_create(
            &config.data_dir,
            crate::audit::checkpoint::origin(&td),
        )?,
        origin: crate::audit::checkpoint::origin(&td),
        data_dir: config.data_dir.clone(),
        every_records: config.audit.checkpoint_records,
        every: config.audit.checkpoint_interval,
    });
    let checkpointing = tokio::spawn(
        checkpointer
            .clone()
            .run(stop_rx.clone())
            .instrument(info_span!("audit_checkpoints")),
    );
    // The one reader of the change feed in this process: the registry
    // applies it and passes it on to its listeners.
    let follower = tokio::spawn(in_span(
        info_span!("change_feed_follower"),
        registry
            .clone()
            .follow(config.datastore.poll_interval, stop_rx.clone()),
    ));
    let token_pruning = {
        let store = store.clone();
        let clock = clock.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(in_span(info_span!("join_token_pruning"), async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tick.tick() => {}
                }
                match store.prune_join_tokens(clock.now()).await {
                    Ok(k) if k > 0 => info!(pruned = k, "expired join tokens removed"),
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "join token pruning failed"),
                }
            }
        }))
    };

    // Metrics and health, on their own plain-HTTP listener if configured.
    let telemetry = match config.telemetry.bind {
        Some(addr) => {
            let listener = sigil_proto::telemetry::bind(addr)
                .await
                .map_err(ServerError::Telemetry)?;
            let health = crate::telemetry::ServerHealth {
                metrics: metrics.clone(),
                store: store.clone(),
                registry: registry.clone(),
                ca: ca.clone(),
            };
            info!(address = %addr, "telemetry serving /metrics, /live, /ready");
            Some(tokio::spawn(
                sigil_proto::telemetry::serve(
                    listener,
                    Arc::new(metrics.registry()),
                    Arc::new(health),
                    wait_for_stop(stop_rx.clone()),
                )
                .instrument(info_span!("telemetry")),
            ))
        }
        None => None,
    };
    // Every call gets a request id and a span; durations only when served.
    let rpc_layer =
        sigil_proto::telemetry::RpcLayer::new(telemetry.is_some().then(|| metrics.rpc.clone()));

    let node_addr = listeners.node.local_addr().ok();
    let conn_limits = tls::ConnLimits {
        total: config.server.max_connections,
        unauthenticated_per_address: config.server.max_unauthenticated_connections_per_address,
    };
    let is_pinned: tls::IsPinned = {
        let node = node.clone();
        Arc::new(move |peer| node.check_peer(peer).is_ok())
    };
    let node_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(limits::MAX_STREAMS_PER_CONNECTION)
        .layer(rpc_layer.clone())
        .add_service(limits::Guarded::new(
            NodeServer::new(NodeApi(node.clone()))
                .max_decoding_message_size(limits::BATCH_BODY)
                .max_encoding_message_size(MAX_MESSAGE),
            node,
        ))
        .serve_with_incoming_shutdown(
            tls::incoming(listeners.node, acceptor, conn_limits, is_pinned),
            wait_for_stop(stop_rx.clone()),
        );
    let admin_for_tcp = admin.clone();
    let admin_server = tonic::transport::Server::builder()
        .layer(rpc_layer)
        .add_service(
            AdminServer::new(AdminApi(admin))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listeners.admin),
            wait_for_stop(stop_rx.clone()),
        );
    let admin_tcp_addr = admin_tcp.as_ref().and_then(|l| l.local_addr().ok());
    let remote_admin_server = {
        let auth = Arc::new(mtls::RemoteAuth::new(
            registry.clone(),
            config
                .server
                .admin_ids
                .iter()
                .map(|a| (a.id.clone(), a.role)),
            clock.clone(),
            audit.clone(),
            RateLimiter::new(rates.admin_per_second, rates.admin_burst),
        ));
        let acceptor = mtls::acceptor(&server_svid, bundle.clone(), td.clone())?;
        let stop = stop_rx.clone();
        // A connection counts as unauthenticated (per address) unless its
        // SVID holds an admin role.
        let is_admin: tls::IsPinned = {
            let auth = auth.clone();
            Arc::new(move |peer| match peer {
                tls::PeerSvid::Svid { id, .. } => auth.role(id).is_some(),
                _ => false,
            })
        };
        async move {
            let Some(listener) = admin_tcp else {
                return Ok(());
            };
            tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .max_concurrent_streams(limits::MAX_STREAMS_PER_CONNECTION)
                .add_service(mtls::Guarded::new(
                    AdminServer::new(AdminApi(admin_for_tcp))
                        .max_decoding_message_size(mtls::BATCH_BODY)
                        .max_encoding_message_size(MAX_MESSAGE),
                    auth,
                ))
                .serve_with_incoming_shutdown(
                    tls::incoming(listener, acceptor, conn_limits, is_admin),
                    wait_for_stop(stop),
                )
                .await
        }
    };
    info!(trust_domain = %td, node_api = ?node_addr, admin_api_mtls = ?admin_tcp_addr, bundle_sequence = ca.bundle().sequence, "sigil-server serving");

    // Graceful: stop accepting, let calls in flight finish, but do not wait
    // more than SHUTDOWN_GRACE for clients that keep connections open.
    let serve = async {
        let (node, admin, remote) = tokio::join!(node_server, admin_server, remote_admin_server);
        (node, admin.and(remote))
    };
    let deadline = async {
        wait_for_stop(stop_rx.clone()).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let (node_result, admin_result) = tokio::select! {
        r = serve => r,
        () = deadline => {
            warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the shutdown grace period; closing them");
            (Ok(()), Ok(()))
        }
    };
    let _ = tokio::join!(rotation, follower, token_pruning, pruning, checkpointing);
    if let Some(t) = telemetry {
        let _ = t.await;
    }
    // Issuance events still queued reach the datastore before it closes,
    // and the last checkpoint covers them.
    audit.flush().await;
    if let Err(e) = checkpointer.checkpoint().await {
        warn!(error = %e, "could not store the final audit checkpoint");
    }
    node_result?;
    admin_result?;
    info!("sigil-server stopped");
    Ok(())
}
