//! TLS for the node API: the server's own SVID (renewed at half-life), the
//! agent verifier, and the accept loop that hands finished TLS connections
//! to tonic together with the peer's certificate chain.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair};
use sigil_identity::clock::Clock;
use sigil_identity::tls::{SharedBundle, SpiffeClientVerifier, SvidResolver, certified_key};
use sigil_identity::{SpiffeId, rotation};
use sigil_proto::telemetry::in_span;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, info, info_span, warn};

use crate::ca::{CaError, CaManager};

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a handler learns about the connection a request came on.
#[derive(Debug, Clone)]
pub struct NodeConnInfo {
    /// The peer's address.
    pub remote: SocketAddr,
    /// The peer's client certificate, read once per connection rather than
    /// parsed again on every call.
    pub peer: Arc<PeerSvid>,
}

/// The client certificate of a node API connection (already verified
/// against the bundle by the TLS handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSvid {
    /// No client certificate: only attestation is open to it.
    Absent,
    /// A certificate that is not a valid X509-SVID leaf.
    Invalid,
    /// An X509-SVID: its SPIFFE ID, serial (hex), SHA-256 of its DER
    /// (hex, what agents are pinned to) and expiry.
    Svid {
        id: SpiffeId,
        serial: String,
        cert_sha256: String,
        not_after: SystemTime,
    },
}

impl PeerSvid {
    fn read(chain: Option<&[rustls_pki_types::CertificateDer<'_>]>) -> Self {
        let Some(leaf) = chain.and_then(|c| c.first()) else {
            return Self::Absent;
        };
        let Ok(cert) = sigil_identity::x509::parse(leaf) else {
            return Self::Invalid;
        };
        match sigil_identity::x509::check_leaf(&cert) {
            Ok(id) => Self::Svid {
                id,
                serial: sigil_identity::x509::serial_hex(&cert),
                cert_sha256: crate::datastore::cert_sha256(leaf),
                not_after: sigil_identity::x509::validity(&cert).1,
            },
            Err(_) => Self::Invalid,
        }
    }
}

/// A TLS connection plus its [`NodeConnInfo`].
#[derive(Debug)]
pub struct NodeConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: NodeConnInfo,
    /// Held for as long as the connection is open.
    _slot: ConnSlot,
}

/// Caps on node API connections (see the `server` configuration section).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections open at once.
    pub total: usize,
    /// Connections per IP address without an agent SVID.
    pub unauthenticated_per_address: usize,
}

#[derive(Debug, Default)]
struct SlotCounts {
    total: usize,
    unauthenticated: HashMap<IpAddr, usize>,
}

/// One connection's share of the caps; released on drop.
#[derive(Debug)]
struct ConnSlot {
    counts: Arc<Mutex<SlotCounts>>,
    /// The address whose unauthenticated count this connection holds.
    unauthenticated: Option<IpAddr>,
}

impl ConnSlot {
    /// Takes a slot for a new connection from `ip`, if both caps allow.
    fn take(counts: &Arc<Mutex<SlotCounts>>, limits: ConnLimits, ip: IpAddr) -> Option<Self> {
        let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
        let from_ip = c.unauthenticated.get(&ip).copied().unwrap_or(0);
        if c.total >= limits.total || from_ip >= limits.unauthenticated_per_address {
            return None;
        }
        c.total += 1;
        c.unauthenticated.insert(ip, from_ip + 1);
        Some(Self {
            counts: counts.clone(),
            unauthenticated: Some(ip),
        })
    }

    /// The connection presented an agent SVID: it no longer counts
    /// against its address.
    fn authenticated(&mut self) {
        if let Some(ip) = self.unauthenticated.take() {
            let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            release(&mut c.unauthenticated, ip);
        }
    }
}

fn release(per_ip: &mut HashMap<IpAddr, usize>, ip: IpAddr) {
    if let Some(n) = per_ip.get_mut(&ip) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            per_ip.remove(&ip);
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(ip) = self.unauthenticated {
            release(&mut c.unauthenticated, ip);
        }
    }
}

impl Connected for NodeConn {
    type ConnectInfo = NodeConnInfo;
    fn connect_info(&self) -> NodeConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for NodeConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for NodeConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Whether a client certificate is an agent's current, pinned SVID (not
/// banned, evicted, superseded or expired).
pub type IsPinned = Arc<dyn Fn(&PeerSvid) -> bool + Send + Sync>;

/// Accepts TCP connections within `limits` (others are closed at once),
/// completes TLS handshakes concurrently (each bounded by a timeout), and
/// yields finished connections with their [`NodeConnInfo`]. A connection
/// counts against its address's unauthenticated cap unless `is_pinned`
/// accepts its certificate, so a banned or leaked-but-superseded agent
/// key cannot open connections without limit.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: ConnLimits,
    is_pinned: IsPinned,
) -> ReceiverStream<std::io::Result<NodeConn>> {
    let (tx, rx) = mpsc::channel(256);
    let counts = Arc::new(Mutex::new(SlotCounts::default()));
    tokio::spawn(in_span(info_span!("node_api_accept"), async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "node API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(mut slot) = ConnSlot::take(&counts, limits, remote.ip()) else {
                debug!(%remote, "node API connection refused: connection cap reached");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, is_pinned) = (acceptor.clone(), is_pinned.clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        debug!(%remote, "node API connection accepted");
                        let peer = Arc::new(PeerSvid::read(stream.get_ref().1.peer_certificates()));
                        if is_pinned(&peer) {
                            slot.authenticated();
                        }
                        let _ = tx
                            .send(Ok(NodeConn {
                                stream,
                                info: NodeConnInfo { remote, peer },
                                _slot: slot,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    }));
    ReceiverStream::new(rx)
}

/// The server's SVID (`spiffe://<td>/sigil/server`), renewed at half-life.
#[derive(Debug)]
pub struct ServerSvid {
    resolver: Arc<SvidResolver>,
}

fn issue(
    ca: &CaManager,
) -> Result<
    (
        Arc<rustls::sign::CertifiedKey>,
        std::time::SystemTime,
        std::time::SystemTime,
    ),
    CaError,
> {
    let key = KeyPair::generate().map_err(|e| CaError::Build(e.to_string()))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| CaError::Build(e.to_string()))?;
    let id = SpiffeId::server(ca.trust_domain());
    let issued = ca.issue_x509_svid(&id, &[], None, csr.der())?;
    let leaf = sigil_identity::x509::parse(&issued.chain[0]).map_err(CaError::SelfCheck)?;
    let (nb, na) = sigil_identity::x509::validity(&leaf);
    let ck = certified_key(&issued.chain, &key.serialize_der())
        .map_err(|e| CaError::Build(e.to_string()))?;
    Ok((ck, nb, na))
}

/// The DER chain of a certified key.
fn chain_of(ck: &rustls::sign::CertifiedKey) -> Vec<Vec<u8>> {
    ck.cert.iter().map(|c| c.to_vec()).collect()
}

impl ServerSvid {
    /// Issues the first server SVID and starts renewing it until `shutdown`.
    pub fn start(
        ca: Arc<CaManager>,
        clock: Arc<dyn Clock>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Self, CaError> {
        let (ck, mut nb, mut na) = issue(&ca)?;
        let mut chain = chain_of(&ck);
        let resolver = Arc::new(SvidResolver::new(ck));
        let r = resolver.clone();
        let mut shutdown = shutdown;
        let mut bundles = ca.subscribe_bundle();
        tokio::spawn(in_span(info_span!("server_svid_renewal"), async move {
            loop {
                let at = rotation::renewal_time(nb, na, sigil_identity::random::jitter_unit());
                let wait = at
                    .duration_since(clock.now())
                    .unwrap_or(Duration::ZERO)
                    .max(Duration::from_millis(200));
                tokio::select! {
                    _ = shutdown.changed() => return,
                    () = tokio::time::sleep(wait) => {}
                    changed = bundles.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        // Renewed at once when its authority is tainted.
                        let tainted = bundles.borrow_and_update().chain_uses_tainted(&chain);
                        if !tainted {
                            continue;
                        }
                        info!("server SVID signed by a tainted authority; renewing it now");
                    }
                }
                match issue(&ca) {
                    Ok((ck, new_nb, new_na)) => {
                        chain = chain_of(&ck);
                        r.set(ck);
                        (nb, na) = (new_nb, new_na);
                        info!(spiffe_id = %SpiffeId::server(ca.trust_domain()), "server SVID renewed");
                    }
                    Err(e) => warn!(error = %e, "server SVID renewal failed; retrying"),
                }
            }
        }));
        Ok(Self { resolver })
    }

    /// The resolver serving the current SVID.
    pub fn resolver(&self) -> Arc<SvidResolver> {
        self.resolver.clone()
    }
}

/// Keeps a [`SharedBundle`] in step with the CA's published bundle.
pub fn follow_bundle(
    ca: &CaManager,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Arc<SharedBundle> {
    let shared = Arc::new(SharedBundle::new((*ca.bundle()).clone()));
    let mut rx = ca.subscribe_bundle();
    let s = shared.clone();
    tokio::spawn(in_span(info_span!("bundle_follower"), async move {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                r = rx.changed() => {
                    if r.is_err() { return; }
                    let b = rx.borrow_and_update().clone();
                    s.set(b);
                }
            }
        }
    }));
    shared
}

/// The TLS acceptor: TLS 1.3, server SVID, optional agent client certs.
pub fn acceptor(
    server_svid: &ServerSvid,
    bundle: Arc<SharedBundle>,
) -> Result<TlsAcceptor, rustls::Error> {
    let verifier = Arc::new(SpiffeClientVerifier::new(
        bundle,
        Arc::new(SpiffeId::is_agent),
        false,
    ));
    let cfg = sigil_identity::tls::server_config(server_svid.resolver(), verifier)?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}
