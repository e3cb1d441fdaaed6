//! Which server the agent dials: the configured addresses (one, a list, or
//! a name that resolves to several), resolved again at every connection and
//! tried in turn. A new connection after a lost one starts at the address
//! after the server last used, so an agent whose server went away moves to
//! another; a fresh connection (after the agent SVID was renewed) stays on
//! the server in use. The first server is picked at random, so agents
//! spread over the replicas.
//!
//! Every server presents the server SVID of the trust domain: the TLS
//! check is the same whichever address answers (see [`crate::node`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::metrics::AgentMetrics;

/// `server_address`: one `host:port` or a non-empty list of them (TOML
/// string or array), each checked to have the form `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddresses(Vec<String>);

impl ServerAddresses {
    /// The addresses in `list`, checked.
    pub fn new(list: Vec<String>) -> Result<Self, String> {
        if list.is_empty() {
            return Err("server_address: the list is empty; give at least one host:port".into());
        }
        for address in &list {
            let port = address.rsplit_once(':').and_then(|(host, port)| {
                let host_ok = !host.is_empty()
                    && (!host.starts_with('[') || host.ends_with(']'))
                    && !host.contains(char::is_whitespace);
                port.parse::<u16>().ok().filter(|p| host_ok && *p != 0)
            });
            if port.is_none() {
                return Err(format!(
                    "server_address: {address:?} is not host:port (e.g. \"10.0.0.1:8081\", \"sigil-server:8081\", \"[::1]:8081\")"
                ));
            }
        }
        Ok(Self(list))
    }

    /// The addresses as configured, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

impl std::fmt::Display for ServerAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl<'de> Deserialize<'de> for ServerAddresses {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct OneOrMany;
        impl<'de> serde::de::Visitor<'de> for OneOrMany {
            type Value = Vec<String>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"host:port\" or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(vec![v.to_owned()])
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut list = Vec::new();
                while let Some(a) = seq.next_element::<String>()? {
                    list.push(a);
                }
                Ok(list)
            }
        }
        let list = d.deserialize_any(OneOrMany)?;
        Self::new(list).map_err(serde::de::Error::custom)
    }
}

/// How long one address may take to accept a TCP connection before the
/// next is tried.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`Resolve::resolve`] returns.
pub type Resolving<'a> =
    Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// Turns a configured `host:port` into socket addresses.
pub trait Resolve: Send + Sync + std::fmt::Debug {
    /// Every address `address` stands for, in the resolver's order.
    fn resolve<'a>(&'a self, address: &'a str) -> Resolving<'a>;
}

/// The system's resolver (`getaddrinfo`, on tokio's blocking pool).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, address: &'a str) -> Resolving<'a> {
        Box::pin(async move { Ok(tokio::net::lookup_host(address).await?.collect()) })
    }
}

/// The servers of one agent and which of them it uses.
#[derive(Debug)]
pub struct Servers {
    addresses: ServerAddresses,
    resolver: Arc<dyn Resolve>,
    metrics: Arc<AgentMetrics>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The server of the last connection made.
    current: Option<SocketAddr>,
    /// Whether that connection was usable (TLS included); when not, the
    /// next connection moves on.
    healthy: bool,
    /// Where to start while no server was reached yet (random at first,
    /// then moving one on after each round that reached none).
    start: usize,
}

impl Servers {
    /// The servers at `addresses`, resolved by `resolver`; connections and
    /// failovers are counted in `metrics`.
    pub fn new(
        addresses: ServerAddresses,
        resolver: Arc<dyn Resolve>,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        // Any value will do: it is taken modulo the number of addresses.
        let start = (sigil_identity::random::jitter_unit() * 1_000_000.0) as usize;
        Self {
            addresses,
            resolver,
            metrics,
            state: Mutex::new(State {
                current: None,
                healthy: false,
                start,
            }),
        }
    }

    /// The configured addresses, for messages.
    pub fn describe(&self) -> String {
        self.addresses.to_string()
    }

    /// The server of the last connection made, if any.
    pub fn current(&self) -> Option<SocketAddr> {
        self.lock().current
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every address the configured ones stand for now, in order, each once.
    async fn resolve_all(&self) -> (Vec<SocketAddr>, Vec<String>) {
        let mut all = Vec::new();
        let mut errors = Vec::new();
        for address in self.addresses.iter() {
            match self.resolver.resolve(address).await {
                Ok(found) if found.is_empty() => {
                    errors.push(format!("{address}: resolves to no address"));
                }
                Ok(found) => {
                    for a in found {
                        if !all.contains(&a) {
                            all.push(a);
                        }
                    }
                }
                Err(e) => {
                    warn!(server_address = %address, error = %e, "cannot resolve a server address");
                    errors.push(format!("{address}: {e}"));
                }
            }
        }
        (all, errors)
    }

    /// Opens a TCP connection to a server. With `stay`, the server in use
    /// is tried first (if its last connection was usable); otherwise the
    /// one after it, so a lost server is left for the next. Each address
    /// gets [`DIAL_TIMEOUT`]; the error names every address tried.
    pub async fn dial(&self, stay: bool) -> std::io::Result<TcpStream> {
        let (addresses, mut errors) = self.resolve_all().await;
        if addresses.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "no address for the server ({}): {}",
                    self.describe(),
                    errors.join("; ")
                ),
            ));
        }
        let first = {
            let state = self.lock();
            match state
                .current
                .and_then(|c| addresses.iter().position(|a| *a == c))
            {
                Some(i) if stay && state.healthy => i,
                Some(i) => i + 1,
                None => state.start,
            }
        };
        let n = addresses.len();
        for k in 0..n {
            let address = addresses[(first + k) % n];
            match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(address)).await {
                Ok(Ok(tcp)) => {
                    self.connected(address);
                    return Ok(tcp);
                }
                Ok(Err(e)) => {
                    debug!(server = %address, error = %e, "server unreachable; trying the next");
                    errors.push(format!("{address}: {e}"));
                }
                Err(_) => {
                    debug!(server = %address, "server did not answer; trying the next");
                    errors.push(format!("{address}: no answer within {DIAL_TIMEOUT:?}"));
                }
            }
        }
        let mut state = self.lock();
        state.healthy = false;
        state.start = state.start.wrapping_add(1);
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("no server reachable: {}", errors.join("; ")),
        ))
    }

    fn connected(&self, address: SocketAddr) {
        let previous = {
            let mut state = self.lock();
            state.healthy = true;
            state.current.replace(address)
        };
        let failover = previous.is_some_and(|p| p != address);
        self.metrics.connected_to(&address.to_string(), failover);
        if failover {
            info!(server = %address, previous = ?previous.map(|p| p.to_string()), "moved to another server");
        } else if previous.is_none() {
            info!(server = %address, "connected to the server");
        }
    }

    /// The connection just made to the current server is unusable (its
    /// TLS handshake failed, say): the next one moves on.
    pub fn unusable(&self) {
        self.lock().healthy = false;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashMap;

    use super::*;

    /// Names mapped to fixed addresses.
    #[derive(Debug, Default)]
    struct FakeResolver(HashMap<String, Vec<SocketAddr>>);

    impl Resolve for FakeResolver {
        fn resolve<'a>(&'a self, address: &'a str) -> Resolving<'a> {
            let found = self.0.get(address).cloned();
            Box::pin(async move {
                found.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "unknown"))
            })
        }
    }

    async fn listener() -> (tokio::net::TcpListener, SocketAddr) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    /// An address where nothing listens (bound once, then released).
    async fn dead() -> SocketAddr {
        listener().await.1
    }

    fn servers(list: &[&str], resolver: FakeResolver) -> Servers {
        let toml = format!(
            "a = [{}]",
            list.iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        #[derive(serde::Deserialize)]
        struct T {
            a: ServerAddresses,
        }
        let t: T = toml::from_str(&toml).unwrap();
        Servers::new(t.a, Arc::new(resolver), Arc::default())
    }

    #[tokio::test]
    async fn a_dead_address_is_skipped_whichever_comes_first() {
        let (_live, live) = listener().await;
        let dead = dead().await;
        for _ in 0..8 {
            let s = servers(
                &[&dead.to_string(), &live.to_string()],
                FakeResolver(HashMap::from([
                    (dead.to_string(), vec![dead]),
                    (live.to_string(), vec![live]),
                ])),
            );
            let tcp = s.dial(true).await.unwrap();
            assert_eq!(tcp.peer_addr().unwrap(), live);
            assert_eq!(s.current(), Some(live));
        }
    }

    #[tokio::test]
    async fn a_name_resolving_to_two_addresses_is_a_list() {
        let (_live, live) = listener().await;
        let dead = dead().await;
        let s = servers(
            &["sigil.test:8081"],
            FakeResolver(HashMap::from([(
                "sigil.test:8081".into(),
                vec![dead, live],
            )])),
        );
        for _ in 0..4 {
            assert_eq!(s.dial(false).await.unwrap().peer_addr().unwrap(), live);
        }
    }

    #[tokio::test]
    async fn a_lost_server_is_left_for_the_next_and_a_fresh_connection_stays() {
        let (_a, a) = listener().await;
        let (_b, b) = listener().await;
        let (_c, c) = listener().await;
        let s = servers(
            &["three.test:1"],
            FakeResolver(HashMap::from([("three.test:1".into(), vec![a, b, c])])),
        );
        let first = s.dial(true).await.unwrap().peer_addr().unwrap();
        // Renewal: the same server again.
        assert_eq!(s.dial(true).await.unwrap().peer_addr().unwrap(), first);
        // Reconnection after a loss: round-robin from the next one.
        let order = [a, b, c];
        let i = order.iter().position(|x| *x == first).unwrap();
        assert_eq!(
            s.dial(false).await.unwrap().peer_addr().unwrap(),
            order[(i + 1) % 3]
        );
        assert_eq!(
            s.dial(false).await.unwrap().peer_addr().unwrap(),
            order[(i + 2) % 3]
        );
        let text = {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &s.metrics.registry()).unwrap();
            out
        };
        assert!(
            text.contains("sigil_agent_server_failovers_total 2"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "sigil_agent_server{{address=\"{}\"}} 1",
                order[(i + 2) % 3]
            )),
            "{text}"
        );
        // An unusable connection (failed TLS) is not stayed on.
        s.unusable();
        assert_eq!(s.dial(true).await.unwrap().peer_addr().unwrap(), first);
    }

    #[tokio::test]
    async fn no_server_reachable_names_every_address() {
        let (d1, d2) = (dead().await, dead().await);
        let s = servers(
            &["gone.test:1", "nowhere.test:1"],
            FakeResolver(HashMap::from([("gone.test:1".into(), vec![d1, d2])])),
        );
        let err = s.dial(false).await.unwrap_err().to_string();
        for part in [d1.to_string(), d2.to_string(), "nowhere.test:1".into()] {
            assert!(err.contains(&part), "{err}");
        }
        assert_eq!(s.current(), None);
    }
}
