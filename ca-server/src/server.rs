//! Wiring: [`run`] builds the [`Catalog`] from a [`ServerConfig`], the
//! core services on it (CA, registry, audit, agent lifecycle), starts the
//! background work, and serves the node and admin APIs until shutdown.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sigil_identity::clock::{Clock, SystemClock};
use sigil_identity::rate_limit::RateLimiter;
use sigil_proto::admin::admin_server::AdminServer;
use sigil_proto::node::node_server::NodeServer;
use sigil_proto::telemetry::in_span;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{Instrument, info, info_span, warn};

use crate::admin_api::{AdminApi, AdminService, mtls, own_uid};
use crate::agents::AgentService;
use crate::audit::Audit;
use crate::audit::checkpoint::{AuditKey, Checkpointer};
use crate::ca::{CaConfig, CaManager};
use crate::catalog::{Attestors, Catalog, CatalogError};
use crate::config::ServerConfig;
use crate::datastore::{Datastore, DatastoreError};
use crate::node_api::{NodeApi, NodeService, limits, tls};
use crate::registry::Registry;
pub use crate::shutdown::shutdown_signal;
use crate::shutdown::{stop_when, wait_for_stop, within_grace};
use crate::telemetry::ServerMetrics;

/// How long shutdown waits for open connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Largest gRPC message sent, and accepted on the admin API (a full batch
/// of SVIDs fits). The node API accepts less: see [`limits`].
const MAX_MESSAGE: usize = 32 * 1024 * 1024;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("{0}")]
    Catalog(#[from] CatalogError),
    #[error("datastore: {0}")]
    Datastore(#[from] DatastoreError),
    #[error("CA: {0}")]
    Ca(#[from] crate::ca::CaError),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("serving: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("cannot listen on {0} for the admin API over mTLS (server.admin_bind_address): {1}")]
    AdminBind(std::net::SocketAddr, std::io::Error),
    #[error("audit checkpoints: {0}")]
    AuditKey(#[from] crate::audit::checkpoint::CheckpointError),
    #[error("{0}")]
    Telemetry(std::io::Error),
    #[error("{0}")]
    OidcDiscovery(#[from] crate::oidc_discovery::OidcError),
    #[error("{0}")]
    BundleEndpoint(#[from] crate::federation::endpoint::EndpointError),
}

/// Where in the data directory the registry's change history is saved
/// when the server stops (see `registry::history`).
const SYNC_HISTORY_FILE: &str = "sync-history.json";

/// The sockets the server serves on, bound by the caller so tests can use
/// ephemeral ports and temporary paths.
#[derive(Debug)]
pub struct Listeners {
    pub node: TcpListener,
    pub admin: UnixListener,
}

/// Runs the server until `shutdown` resolves, then stops serving
/// gracefully (open streams are closed, in-flight calls finish).
pub async fn run(
    config: ServerConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let mut catalog = Catalog::open(&config, clock.clone()).await?;
    let core = Core::start(&config, &mut catalog, clock).await?;
    let stop = stop_when(shutdown);
    // Telemetry is up before "serving" is logged.
    let background = Background::start(&config, &core, stop.clone()).await?;
    let apis = apis(&config, &core, catalog.attestors, listeners, stop.clone()).await?;
    let served = within_grace(apis, stop, SHUTDOWN_GRACE).await;
    background.finish(&core).await;
    // For the next start: agents then resume their Sync streams.
    let history = config.data_dir.join(SYNC_HISTORY_FILE);
    if let Err(e) = core.registry.save_history(&history) {
        warn!(path = %history.display(), error = %e, "could not save the Sync history; agents will take a full snapshot after the next start");
    }
    served.unwrap_or(Ok(()))?;
    info!("sigil-server stopped");
    Ok(())
}

/// The services every API and background task shares.
struct Core {
    clock: Arc<dyn Clock>,
    store: Arc<dyn Datastore>,
    ca: Arc<CaManager>,
    registry: Arc<Registry>,
    audit: Audit,
    agents: Arc<AgentService>,
    metrics: Arc<ServerMetrics>,
    /// `x509 revoke`, issuance records, and the CRLs.
    revocations: Arc<crate::revocation::Revocations>,
    /// Federated trust domains' bundles, as agents are given them.
    federated: Arc<crate::federation::FederatedSet>,
}

impl Core {
    /// Starts the CA (keys, rotation state, bundle) and loads the registry.
    /// The CA takes the catalog's upstream CA.
    async fn start(
        config: &ServerConfig,
        catalog: &mut Catalog,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ServerError> {
        let store = catalog.store.clone();
        let ca_config = CaConfig {
            trust_domain: config.trust_domain.clone(),
            ca_ttl: config.ca.ttl,
            x509_svid_ttl: config.ca.x509_svid_ttl,
            jwt_svid_ttl: config.ca.jwt_svid_ttl,
            key_algorithm: config.ca.key_type,
            refresh_hint: config.ca.bundle_refresh_hint,
            server_id: catalog.server_id.clone(),
            jwt_issuer: config.ca.jwt_issuer.clone(),
        };
        let ca = CaManager::start(
            ca_config,
            store.clone(),
            catalog.keys.clone(),
            clock.clone(),
            catalog.upstream.take(),
        )
        .await?;
        let registry = Registry::load_resumable(
            store.clone(),
            &config.trust_domain,
            Some(&config.data_dir.join(SYNC_HISTORY_FILE)),
        )
        .await?;
        // The CA follows the bundle (other replicas' publications) through
        // the registry's reading of the feed; a change between the CA's
        // start and the registry's load is read once here.
        registry.add_listener(ca.clone());
        crate::registry::ChangeListener::reload(ca.as_ref()).await;
        let federated = Arc::new(crate::federation::FederatedSet::new(
            config
                .federation
                .federates_with
                .iter()
                .map(|r| r.trust_domain.clone()),
        ));
        registry.add_listener(Arc::new(crate::federation::SetListener {
            set: federated.clone(),
            store: store.clone(),
        }));
        federated.load(store.as_ref()).await;
        let audit = Audit::new(store.clone(), clock.clone());
        let agents = Arc::new(AgentService::new(
            store.clone(),
            registry.clone(),
            audit.clone(),
            clock.clone(),
        ));
        let revocations = crate::revocation::Revocations::start(
            store.clone(),
            ca.clone(),
            audit.clone(),
            crate::revocation::CrlPolicy::default(),
        )
        .await;
        registry.add_listener(revocations.clone());
        Ok(Self {
            clock,
            store,
            ca,
            registry,
            audit,
            agents,
            metrics: Arc::new(ServerMetrics::default()),
            revocations,
            federated,
        })
    }
}

/// Work beside the APIs: CA rotation, following the change feed (for
/// changes made by other replicas), pruning, audit checkpoints, telemetry.
struct Background {
    tasks: Vec<JoinHandle<()>>,
    checkpointer: Arc<Checkpointer>,
}

impl Background {
    async fn start(
        config: &ServerConfig,
        core: &Core,
        stop: watch::Receiver<bool>,
    ) -> Result<Self, ServerError> {
        let mut tasks = vec![tokio::spawn(
            core.ca
                .clone()
                .run(wait_for_stop(stop.clone()))
                .instrument(info_span!("ca_rotation")),
        )];
        let pruner = crate::retention::Pruner {
            store: core.store.clone(),
            registry: core.registry.clone(),
            audit: core.audit.clone(),
            clock: core.clock.clone(),
            retention: config.retention.clone(),
        };
        tasks.push(tokio::spawn(
            pruner.run(stop.clone()).instrument(info_span!("pruning")),
        ));
        let origin = crate::audit::checkpoint::origin(&config.trust_domain);
        let checkpointer = Arc::new(Checkpointer {
            store: core.store.clone(),
            key: AuditKey::load_or_create(&config.data_dir, origin.clone())?,
            origin,
            data_dir: config.data_dir.clone(),
            every_records: config.audit.checkpoint_records,
            every: config.audit.checkpoint_interval,
        });
        tasks.push(tokio::spawn(
            checkpointer
                .clone()
                .run(stop.clone())
                .instrument(info_span!("audit_checkpoints")),
        ));
        tasks.push(follow_changes(config, core, stop.clone()));
        tasks.push(tokio::spawn(
            core.revocations
                .clone()
                .run(stop.clone())
                .instrument(info_span!("revocations")),
        ));
        tasks.push(prune_join_tokens(core, stop.clone()));
        tasks.extend(poll_federated_bundles(config, core, &stop));
        if let Some(addr) = config.telemetry.bind {
            tasks.push(serve_telemetry(addr, core, stop.clone()).await?);
        }
        if let Some(oidc) = &config.oidc_discovery {
            if config.ca.jwt_issuer.is_none() {
                warn!(
                    issuer = %oidc.issuer,
                    "oidc_discovery is on but ca.jwt_issuer is unset: JWT-SVIDs carry no iss, \
                     and most relying parties refuse them; set ca.jwt_issuer to the issuer"
                );
            }
            tasks.push(
                crate::oidc_discovery::start(
                    oidc,
                    &core.ca,
                    core.metrics.clone(),
                    stop,
                    SHUTDOWN_GRACE,
                )
                .await?,
            );
        }
        Ok(Self {
            tasks,
            checkpointer,
        })
    }

    /// Waits for every task to end (they end with the stop), then makes
    /// the audit trail whole: issuance events still queued reach the
    /// datastore before it closes, and the last checkpoint covers them.
    async fn finish(self, core: &Core) {
        for task in self.tasks {
            let _ = task.await;
        }
        core.audit.flush().await;
        if let Err(e) = self.checkpointer.checkpoint().await {
            warn!(error = %e, "could not store the final audit checkpoint");
        }
    }
}

/// The one reader of the change feed in this process: the registry
/// applies it (woken by the change hint, and every `[datastore]
/// poll_interval` at least) and passes it on to its listeners.
fn follow_changes(
    config: &ServerConfig,
    core: &Core,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(in_span(
        info_span!("change_feed_follower"),
        core.registry
            .clone()
            .follow(config.datastore.poll_interval, stop),
    ))
}

/// One task per federation relationship polling its bundle endpoint.
fn poll_federated_bundles(
    config: &ServerConfig,
    core: &Core,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let poller = Arc::new(crate::federation::poller::Poller {
        store: core.store.clone(),
        registry: core.registry.clone(),
        ca: core.ca.clone(),
        config: config.federation.clone(),
    });
    config
        .federation
        .federates_with
        .iter()
        .map(|r| {
            let span = info_span!("federation_poll", trust_domain = %r.trust_domain);
            tokio::spawn(poller.clone().run(r.clone(), stop.clone()).instrument(span))
        })
        .collect()
}

/// Removes expired join tokens every hour.
fn prune_join_tokens(core: &Core, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    let store = core.store.clone();
    let clock = core.clock.clone();
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
}

/// Metrics and health on their own plain-HTTP listener.
async fn serve_telemetry(
    addr: std::net::SocketAddr,
    core: &Core,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, ServerError> {
    let listener = sigil_proto::telemetry::bind(addr)
        .await
        .map_err(ServerError::Telemetry)?;
    let health = crate::telemetry::ServerHealth {
        metrics: core.metrics.clone(),
        store: core.store.clone(),
        registry: core.registry.clone(),
        ca: core.ca.clone(),
    };
    info!(address = %addr, "telemetry serving /metrics, /live, /ready");
    Ok(tokio::spawn(
        sigil_proto::telemetry::serve(
            listener,
            Arc::new(core.metrics.registry()),
            Arc::new(health),
            wait_for_stop(stop),
        )
        .instrument(info_span!("telemetry")),
    ))
}

/// Sets up the node API, the admin API on its socket and, when
/// configured, over mTLS (everything that can fail at startup fails
/// here), and returns them serving until the stop.
async fn apis(
    config: &ServerConfig,
    core: &Core,
    attestors: Attestors,
    listeners: Listeners,
    stop: watch::Receiver<bool>,
) -> Result<impl Future<Output = Result<(), ServerError>> + use<>, ServerError> {
    let td = &config.trust_domain;
    let rates = &config.rate_limits;
    // Bound before anything is served, so a taken port fails the start.
    let admin_tcp = match config.server.admin_bind_address {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| ServerError::AdminBind(addr, e))?,
        ),
        None => None,
    };
    let server_svid = tls::ServerSvid::start(core.ca.clone(), core.clock.clone(), stop.clone())?;
    let bundle = tls::follow_bundle(&core.ca, stop.clone());
    let node = Arc::new(NodeService {
        ca: core.ca.clone(),
        registry: core.registry.clone(),
        agents: core.agents.clone(),
        attestors,
        audit: core.audit.clone(),
        clock: core.clock.clone(),
        agent_svid_ttl: config.agents.svid_ttl,
        attest_limit: RateLimiter::new(rates.attest_per_second, rates.attest_burst),
        sign_limit: RateLimiter::new(rates.signing_per_second, rates.signing_burst),
        shutdown: stop.clone(),
        wire_bundle: std::sync::Mutex::default(),
        metrics: core.metrics.clone(),
        revocations: core.revocations.clone(),
        federated: core.federated.clone(),
    });
    if let Some(endpoint) = &config.bundle_endpoint {
        use crate::federation::endpoint;
        let listener = endpoint::bind(endpoint).await?;
        let acceptor = endpoint::acceptor(endpoint, server_svid.resolver())?;
        tokio::spawn(
            endpoint::serve(
                listener,
                acceptor,
                core.ca.clone(),
                endpoint.clone(),
                stop.clone(),
            )
            .instrument(info_span!("bundle_endpoint")),
        );
    }
    let mut allowed_uids: BTreeSet<u32> = config.server.admin_uids.iter().copied().collect();
    allowed_uids.insert(0);
    allowed_uids.insert(own_uid());
    let admin = Arc::new(AdminService {
        trust_domain: td.clone(),
        ca: core.ca.clone(),
        registry: core.registry.clone(),
        store: core.store.clone(),
        agents: core.agents.clone(),
        audit: core.audit.clone(),
        clock: core.clock.clone(),
        allowed_uids,
        token_ttl: config.node_attestors.join_token.default_ttl,
        revocations: core.revocations.clone(),
    });
    // Every call gets a request id and a span; durations only when
    // `/metrics` is served.
    let rpc_layer = sigil_proto::telemetry::RpcLayer::new(
        config
            .telemetry
            .bind
            .is_some()
            .then(|| core.metrics.rpc.clone()),
    );
    let conn_limits = tls::ConnLimits {
        total: config.server.max_connections,
        unauthenticated_per_address: config.server.max_unauthenticated_connections_per_address,
    };

    let node_addr = listeners.node.local_addr().ok();
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
            tls::incoming(
                listeners.node,
                tls::acceptor(&server_svid, bundle.clone())?,
                conn_limits,
                is_pinned,
            ),
            wait_for_stop(stop.clone()),
        );
    let admin_server = tonic::transport::Server::builder()
        .layer(rpc_layer)
        .add_service(
            AdminServer::new(AdminApi(admin.clone()))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listeners.admin),
            wait_for_stop(stop.clone()),
        );
    let admin_tcp_addr = admin_tcp.as_ref().and_then(|l| l.local_addr().ok());
    let remote_admin_server = {
        let auth = Arc::new(mtls::RemoteAuth::new(
            core.registry.clone(),
            config
                .server
                .admin_ids
                .iter()
                .map(|a| (a.id.clone(), a.role)),
            core.clock.clone(),
            core.audit.clone(),
            RateLimiter::new(rates.admin_per_second, rates.admin_burst),
        ));
        let acceptor = mtls::acceptor(&server_svid, bundle, td.clone())?;
        let stop = stop.clone();
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
                    AdminServer::new(AdminApi(admin))
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
    info!(trust_domain = %td, node_api = ?node_addr, admin_api_mtls = ?admin_tcp_addr, bundle_sequence = core.ca.bundle().sequence, "sigil-server serving");

    Ok(async move {
        let (node, admin, remote) = tokio::join!(node_server, admin_server, remote_admin_server);
        Ok(node.and(admin).and(remote)?)
    })
}
