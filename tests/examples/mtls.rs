//! Mutual TLS between two workloads whose identities come from the SPIFFE
//! Workload API.
//!
//! Each side takes its X.509-SVID and trust bundle from the agent with the
//! `spiffe` crate's `X509Source`, serves them to rustls through Sigil's
//! SPIFFE verifiers, and authorizes the peer by its SPIFFE ID. When the
//! agent rotates an SVID or the bundle changes, the source's update is
//! copied into the live TLS configuration: the next handshake uses it, with
//! no restart.
//!
//! The `spiffe` crate's source does not carry the CRLs the Workload API
//! sends beside the bundles, so a second stream (`FetchX509Bundles`, with
//! Sigil's own Workload API client) follows them: each set of CRLs that an
//! authority of the bundle signed is swapped into both verifiers, and a
//! revoked peer certificate is refused at the next handshake.
//!
//! ```sh
//! export SPIFFE_ENDPOINT_SOCKET=unix:///path/to/agent/api.sock
//! cargo run -p sigil-tests --example mtls -- server --listen 127.0.0.1:8443 \
//!     --id spiffe://example.org/mtls/server --allow spiffe://example.org/mtls/client
//! cargo run -p sigil-tests --example mtls -- client --connect 127.0.0.1:8443 \
//!     --id spiffe://example.org/mtls/client --allow spiffe://example.org/mtls/server
//! ```
//!
//! Both processes run as the same user here, so both SVIDs reach both; each
//! picks its own by `--id`, as a workload holding several identities would.
//!
//! Peers of federated trust domains: the bundles the Workload API gives
//! besides the workload's own (its entry's `--federates-with`) verify peers
//! of those trust domains, so `--allow spiffe://td2/...` works across a
//! federation; each peer is checked against its own trust domain's bundle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use sigil_identity::crl::{Revoked, SharedCrls};
use sigil_identity::tls::{
    Authorizer, FederatedBundles, SharedBundle, SpiffeClientVerifier, SpiffeServerVerifier,
    SvidResolver, certified_key, client_config, server_config,
};
use sigil_identity::{Bundle, SpiffeId};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Application protocol name negotiated by both sides.
const ALPN: &[u8] = b"sigil-mtls-example";

#[derive(Debug, Parser)]
#[command(about = "mTLS between two workloads with SVIDs from the SPIFFE Workload API")]
struct Cli {
    /// Workload API endpoint [default: $SPIFFE_ENDPOINT_SOCKET].
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    socket: String,
    /// The SPIFFE ID this process presents (one of its SVIDs).
    #[arg(long)]
    id: SpiffeId,
    /// A SPIFFE ID accepted from the peer (repeat to accept several; no
    /// other is accepted).
    #[arg(long, required = true)]
    allow: Vec<SpiffeId>,
    #[command(subcommand)]
    role: Role,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Accept connections and answer each line with a greeting.
    Server {
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
    },
    /// Connect repeatedly, one new TLS session per request.
    Client {
        #[arg(long, default_value = "127.0.0.1:8443")]
        connect: SocketAddr,
        /// Requests to make (0: forever).
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Pause between requests, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
}

/// This process's live TLS identity: the SVID rustls presents and the
/// bundle it verifies peers against, both swapped in place on rotation.
struct Identity {
    resolver: Arc<SvidResolver>,
    bundle: Arc<SharedBundle>,
    /// The bundles of the other trust domains the Workload API gives.
    federated: Arc<FederatedBundles>,
    /// The revoked serials both verifiers check.
    revoked: Arc<SharedCrls>,
    /// The DER CRLs last received, re-verified when the bundle changes.
    crls: std::sync::Mutex<Vec<Vec<u8>>>,
}

/// The X.509 bundles of trust domains other than `own` in `context`.
fn federated(context: &spiffe::X509Context, own: &SpiffeId) -> Vec<Bundle> {
    context
        .bundle_set()
        .iter()
        .filter_map(|(td, b)| {
            let td = sigil_identity::TrustDomain::new(td.as_ref()).ok()?;
            if td == own.trust_domain() {
                return None;
            }
            let mut bundle = Bundle::new(td);
            bundle.x509_authorities = b
                .authorities()
                .iter()
                .map(|c| c.as_ref().to_vec())
                .collect();
            Some(bundle)
        })
        .collect()
}

/// The SVID for `id` and the bundle of its trust domain from `source`.
fn current(
    source: &spiffe::X509Source,
    id: &SpiffeId,
) -> Result<(Arc<rustls::sign::CertifiedKey>, Bundle, Vec<Bundle>, String)> {
    let context = source
        .x509_context()
        .map_err(|e| anyhow!("no X.509 context from the Workload API: {e}"))?;
    let svid = context
        .svids()
        .iter()
        .find(|s| s.spiffe_id().to_string() == id.to_string())
        .ok_or_else(|| anyhow!("the Workload API gives this process no SVID for {id}"))?;
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let key = certified_key(&chain, svid.private_key().as_ref())?;
    let td = spiffe::TrustDomain::new(id.trust_domain().as_str())?;
    let authorities = context
        .bundle_set()
        .get(&td)
        .ok_or_else(|| anyhow!("no trust bundle for {}", id.trust_domain()))?;
    let mut bundle = Bundle::new(id.trust_domain().clone());
    bundle.x509_authorities = authorities
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    Ok((key, bundle, federated(&context, id), serial(&chain[0])))
}

fn serial(der: &[u8]) -> String {
    sigil_identity::x509::parse(der)
        .map(|c| sigil_identity::x509::serial_hex(&c))
        .unwrap_or_else(|_| "?".into())
}

impl Identity {
    /// Loads the current SVID and keeps it fresh from the source's updates.
    fn follow(source: Arc<spiffe::X509Source>, id: SpiffeId) -> Result<Arc<Self>> {
        let (key, bundle, others, serial) = current(&source, &id)?;
        eprintln!("identity {id}: serial {serial}");
        let federated = Arc::new(FederatedBundles::new());
        federated.set(others);
        let identity = Arc::new(Self {
            resolver: Arc::new(SvidResolver::new(key)),
            bundle: Arc::new(SharedBundle::new(bundle)),
            federated,
            revoked: Arc::new(SharedCrls::default()),
            crls: std::sync::Mutex::new(Vec::new()),
        });
        let live = identity.clone();
        tokio::spawn(async move {
            let mut updates = source.updated();
            while updates.changed().await.is_ok() {
                match current(&source, &id) {
                    Ok((key, bundle, others, serial)) => {
                        live.resolver.set(key);
                        live.bundle.set(Arc::new(bundle));
                        live.federated.set(others);
                        live.check_crls();
                        eprintln!("identity {id}: rotated to serial {serial}");
                    }
                    Err(e) => eprintln!("identity {id}: update not usable: {e:#}"),
                }
            }
        });
        Ok(identity)
    }

    /// Takes the CRLs last received that an authority of the current
    /// bundle signed.
    fn check_crls(&self) {
        let crls = self.crls.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let bundle = self.bundle.get();
        let (revoked, errors) = Revoked::verified(&crls, &bundle);
        for e in errors {
            eprintln!("a CRL was not taken: {e}");
        }
        eprintln!("CRLs: {} of {} verified", revoked.issuers(), crls.len());
        self.revoked.set(revoked);
    }

    /// Follows the CRLs of the Workload API's `FetchX509Bundles` stream
    /// (reconnecting after a pause if it ends).
    fn follow_crls(self: &Arc<Self>, socket: &str) {
        let path = std::path::PathBuf::from(socket.strip_prefix("unix://").unwrap_or(socket));
        let live = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = live.read_crls(&path).await {
                    eprintln!("CRL stream: {e:#}");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    async fn read_crls(&self, socket: &std::path::Path) -> Result<()> {
        use sigil_agent::workload_client::{connect, request};
        let mut client = connect(socket).await?;
        let mut stream = client
            .fetch_x509_bundles(request(sigil_proto::workload::X509BundlesRequest {}))
            .await?
            .into_inner();
        while let Some(reply) = stream.message().await? {
            *self.crls.lock().unwrap_or_else(|p| p.into_inner()) = reply.crl;
            self.check_crls();
        }
        bail!("the agent ended the X.509 bundle stream")
    }
}

/// Accepts exactly the SPIFFE IDs of `allow`.
fn authorize_any(allow: Vec<SpiffeId>) -> Authorizer {
    Arc::new(move |id: &SpiffeId| allow.contains(id))
}

/// The peer's SPIFFE ID and certificate serial after a handshake.
fn peer(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Result<(SpiffeId, String)> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow!("the peer sent no certificate"))?;
    let cert = sigil_identity::x509::parse(leaf.as_ref())?;
    Ok((
        sigil_identity::x509::check_leaf(&cert)?,
        sigil_identity::x509::serial_hex(&cert),
    ))
}

async fn serve(
    identity: Arc<Identity>,
    me: SpiffeId,
    allow: Vec<SpiffeId>,
    listen: SocketAddr,
) -> Result<()> {
    let verifier = Arc::new(
        SpiffeClientVerifier::new(identity.bundle.clone(), authorize_any(allow), true)
            .with_federated(identity.federated.clone())
            .with_crls(identity.revoked.clone()),
    );
    let mut config = server_config(identity.resolver.clone(), verifier)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!("listening on {} as {me}", listener.local_addr()?);
    loop {
        let (tcp, from) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let me = me.clone();
        tokio::spawn(async move {
            let result = async {
                let tls = acceptor.accept(tcp).await?;
                let (peer_id, peer_serial) = peer(tls.get_ref().1.peer_certificates())?;
                let (read, mut write) = tokio::io::split(tls);
                let mut line = String::new();
                BufReader::new(read).read_line(&mut line).await?;
                let reply = format!("hello {peer_id}, this is {me}\n");
                write.write_all(reply.as_bytes()).await?;
                write.shutdown().await?;
                println!("accepted peer={peer_id} peer_serial={peer_serial}");
                Ok::<_, anyhow::Error>(())
            };
            if let Err(e) = result.await {
                println!("refused {from}: {e:#}");
            }
        });
    }
}

async fn request(
    connector: &tokio_rustls::TlsConnector,
    identity: &Identity,
    to: SocketAddr,
) -> Result<String> {
    let tcp = TcpStream::connect(to)
        .await
        .with_context(|| format!("cannot connect to {to}"))?;
    // The server is authenticated by its SPIFFE ID, not by this name.
    let name = rustls::pki_types::ServerName::try_from("sigil-mtls-example")?;
    let tls = connector.connect(name, tcp).await?;
    let (server_id, server_serial) = peer(tls.get_ref().1.peer_certificates())?;
    let (read, mut write) = tokio::io::split(tls);
    write.write_all(b"ping\n").await?;
    let mut reply = String::new();
    BufReader::new(read).read_line(&mut reply).await?;
    if reply.is_empty() {
        bail!("the server closed the connection (did it refuse this client's SPIFFE ID?)");
    }
    let my_serial = identity
        .resolver
        .current()
        .cert
        .first()
        .map(|c| serial(c.as_ref()))
        .unwrap_or_default();
    Ok(format!(
        "ok server={server_id} server_serial={server_serial} my_serial={my_serial} reply={:?}",
        reply.trim_end()
    ))
}

async fn client(
    identity: Arc<Identity>,
    allow: Vec<SpiffeId>,
    to: SocketAddr,
    count: u64,
    interval: Duration,
) -> Result<()> {
    let verifier = Arc::new(
        SpiffeServerVerifier::new(identity.bundle.clone(), authorize_any(allow))
            .with_federated(identity.federated.clone())
            .with_crls(identity.revoked.clone()),
    );
    let mut config = client_config(verifier, Some(identity.resolver.clone()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut failures = 0u64;
    let mut made = 0u64;
    while count == 0 || made < count {
        made += 1;
        match request(&connector, &identity, to).await {
            Ok(line) => println!("{line}"),
            Err(e) => {
                failures += 1;
                println!("error: {e:#}");
            }
        }
        if count == 0 || made < count {
            tokio::time::sleep(interval).await;
        }
    }
    if failures > 0 {
        bail!("{failures} of {made} requests failed");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let source = spiffe::X509Source::builder()
        .endpoint(&cli.socket)
        .build()
        .await
        .map_err(|e| anyhow!("cannot reach the Workload API at {}: {e}", cli.socket))?;
    let identity = Identity::follow(Arc::new(source), cli.id.clone())?;
    identity.follow_crls(&cli.socket);
    match cli.role {
        Role::Server { listen } => serve(identity, cli.id, cli.allow, listen).await,
        Role::Client {
            connect,
            count,
            interval_ms,
        } => {
            client(
                identity,
                cli.allow,
                connect,
                count,
                Duration::from_millis(interval_ms),
            )
            .await
        }
    }
}
