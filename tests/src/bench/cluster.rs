//! A benchmark deployment: one real server in a temporary directory, real
//! agents next to it, simulated agents that attest and call the node API
//! themselves, and the admin and Workload API clients the scenarios use.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rcgen::{CertificateParams, KeyPair};
use sigil_identity::Bundle;
use sigil_proto::admin::admin_client::AdminClient;
use sigil_proto::node::{self as pb, node_client::NodeClient};
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tonic::transport::Channel;

use crate::process::{AgentProcess, NodeAttestation, ServerOptions, ServerProcess};
use crate::sim_agent::SimAgent;

pub use crate::process::MAX_MESSAGE;

/// Server settings for benchmarks: rate limits out of the way (they protect
/// a production server from a misbehaving agent; here the "misbehaving"
/// load is the point), logs at `warn` so logging is not measured.
const SERVER_EXTRA: &str = "[rate_limits]\nattest_per_second = 1000000.0\nattest_burst = 1000000.0\nsigning_per_second = 100000000.0\nsigning_burst = 100000000.0\n";

/// Agent settings for benchmarks: the benchmark process is every workload,
/// so one uid holds all the streams.
pub const AGENT_EXTRA: &str = "max_streams_per_uid = 100000\n";

/// Whether servers and agents started by [`Cluster`] serve telemetry
/// (`sigil-bench --telemetry`), to compare hot paths with metrics on.
static TELEMETRY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes every later [`Cluster`] (and its agents) serve `/metrics` on a
/// free port, so its counters and histograms are recorded.
pub fn set_telemetry(on: bool) {
    TELEMETRY.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A `[telemetry]` section on a free port, if telemetry is on.
fn telemetry_section() -> Result<String> {
    if !TELEMETRY.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(String::new());
    }
    let port = crate::process::free_port()?;
    Ok(format!("\n[telemetry]\nbind = \"127.0.0.1:{port}\"\n"))
}

/// `SIGIL_BENCH_SERVER_LAUNCHER`, split at spaces: a program that execs
/// the server, e.g. `heaptrack` for a heap profile of a scenario's server
/// (its figures then include the profiler's cost).
fn launcher() -> Vec<String> {
    std::env::var("SIGIL_BENCH_SERVER_LAUNCHER")
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// A server in a temporary directory.
#[derive(Debug)]
pub struct Cluster {
    pub server: ServerProcess,
    /// Holds the processes' directories; removed on drop (after the
    /// processes, which are declared first and so dropped first).
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts a server for benchmarks.
    pub fn start() -> Result<Self> {
        Self::start_with("", "warn")
    }

    /// Starts a server for benchmarks with `extra` TOML (e.g. a
    /// `[datastore]` section) and logging at `log_level`.
    pub fn start_with(extra: &str, log_level: &str) -> Result<Self> {
        Self::start_with_server(extra, log_level, "")
    }

    /// [`Cluster::start_with`], with `server_section` lines added to the
    /// server's `[server]` section (e.g. a higher `max_connections`).
    pub fn start_with_server(extra: &str, log_level: &str, server_section: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("sigil-bench-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let options = ServerOptions {
            extra: format!("{SERVER_EXTRA}{}\n{extra}", telemetry_section()?),
            log_level: log_level.into(),
            server_section: server_section.to_owned(),
            launcher: launcher(),
            ..ServerOptions::default()
        };
        let server = ServerProcess::start(&dir.path().join("server"), &options)?;
        if let Some(pid) = server.pid() {
            eprintln!("sigil-server pid {pid} in {}", dir.path().display());
        }
        Ok(Self { server, dir })
    }

    /// The temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// An admin API client.
    pub async fn admin(&self) -> Result<AdminClient<Channel>> {
        self.server.admin().await
    }

    /// The current trust bundle.
    pub async fn bundle(&self) -> Result<Bundle> {
        self.server.bundle().await
    }

    /// A node API client presenting `agent`'s SVID, on its own connection.
    pub async fn node_client(&self, agent: &SimAgent) -> Result<NodeClient<Channel>> {
        Ok(agent
            .client_at(&self.server.addr)
            .await
            .map_err(|s| anyhow!("cannot connect to the node API: {s}"))?
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    /// A new join token.
    pub async fn token(&self, admin: &mut AdminClient<Channel>) -> Result<String> {
        Ok(admin
            .create_join_token(sigil_proto::admin::CreateJoinTokenRequest::default())
            .await
            .map_err(|s| anyhow!("CreateJoinToken failed: {s}"))?
            .into_inner()
            .token)
    }

    /// Starts a real agent (named `name`) with the benchmark settings;
    /// returns it with its SPIFFE ID.
    pub async fn start_agent(&self, name: &str) -> Result<(AgentProcess, String)> {
        let mut admin = self.admin().await?;
        let before = self.agent_ids(&mut admin).await?;
        let token = self.token(&mut admin).await?;
        let agent = AgentProcess::start_with(
            &self.dir().join(name),
            &self.server,
            &NodeAttestation::JoinToken(token),
            &format!("{AGENT_EXTRA}{}", telemetry_section()?),
        )?;
        if let Some(pid) = agent.pid() {
            eprintln!("sigil-agent pid {pid}");
        }
        let after = self.agent_ids(&mut admin).await?;
        let id = after
            .into_iter()
            .find(|id| !before.contains(id))
            .ok_or_else(|| anyhow!("the agent attested but the server lists no new agent"))?;
        Ok((agent, id))
    }

    async fn agent_ids(&self, admin: &mut AdminClient<Channel>) -> Result<Vec<String>> {
        Ok(admin
            .list_agents(sigil_proto::admin::ListAgentsRequest {})
            .await
            .map_err(|s| anyhow!("ListAgents failed: {s}"))?
            .into_inner()
            .agents
            .into_iter()
            .map(|a| a.id)
            .collect())
    }

    /// Attests `count` simulated agents, each with one entry
    /// `spiffe://example.org/bench/<scenario>/<i>`; each agent with that
    /// entry's id.
    pub async fn agents_with_one_entry(
        &self,
        scenario: &str,
        count: usize,
        bundle: &Bundle,
    ) -> Result<Vec<(SimAgent, String)>> {
        let mut admin = self.admin().await?;
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let token = self.token(&mut admin).await?;
            let agent = SimAgent::join_at(&self.server.addr, bundle, &token)
                .await
                .map_err(|s| anyhow!("Attest failed: {s}"))?;
            let created = self
                .create_entries(
                    &mut admin,
                    vec![entry(
                        format!("spiffe://example.org/bench/{scenario}/{i}"),
                        agent.id.as_str(),
                        vec!["unix:uid:1".into()],
                    )],
                )
                .await?;
            let entry_id = created
                .first()
                .map(|e| e.id.clone())
                .ok_or_else(|| anyhow!("no entry created"))?;
            out.push((agent, entry_id));
        }
        Ok(out)
    }

    /// Creates `entries` in batches the admin API accepts; the created
    /// entries in order.
    pub async fn create_entries(
        &self,
        admin: &mut AdminClient<Channel>,
        entries: Vec<pb::Entry>,
    ) -> Result<Vec<pb::Entry>> {
        let mut created = Vec::with_capacity(entries.len());
        let mut rest = entries;
        while !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(10_000));
            let results = admin
                .create_entries(sigil_proto::admin::CreateEntriesRequest { entries: rest })
                .await
                .map_err(|s| anyhow!("CreateEntries failed: {s}"))?
                .into_inner()
                .results;
            for r in results {
                match (r.status, r.entry) {
                    (Some(s), _) if s.code != 0 => {
                        bail!("an entry was refused: {} (code {})", s.message, s.code)
                    }
                    (_, Some(e)) => created.push(e),
                    _ => bail!("CreateEntries returned a result with no entry"),
                }
            }
            rest = tail;
        }
        Ok(created)
    }

    /// Deletes entries by id.
    pub async fn delete_entries(
        &self,
        admin: &mut AdminClient<Channel>,
        ids: Vec<String>,
    ) -> Result<()> {
        let results = admin
            .delete_entries(sigil_proto::admin::DeleteEntriesRequest { ids })
            .await
            .map_err(|s| anyhow!("DeleteEntries failed: {s}"))?
            .into_inner()
            .results;
        if let Some(bad) = results.iter().find(|s| s.code != 0) {
            bail!(
                "an entry was not deleted: {} (code {})",
                bad.message,
                bad.code
            );
        }
        Ok(())
    }
}

/// A DER PKCS#10 CSR for `key` (the server takes the SPIFFE ID from the entry).
pub fn csr(key: &KeyPair) -> Result<Vec<u8>> {
    Ok(CertificateParams::default()
        .serialize_request(key)
        .map_err(|e| anyhow!("cannot build a CSR: {e}"))?
        .der()
        .to_vec())
}

/// `n` distinct CSRs, made before any timing starts.
pub fn csr_pool(n: usize) -> Result<Vec<Vec<u8>>> {
    (0..n)
        .map(|_| {
            let key = KeyPair::generate().map_err(|e| anyhow!("key generation: {e}"))?;
            csr(&key)
        })
        .collect()
}

/// An entry for `spiffe_id` under `parent` with `selectors`.
pub fn entry(spiffe_id: String, parent: &str, selectors: Vec<String>) -> pb::Entry {
    pb::Entry {
        spiffe_id,
        parent_id: parent.to_owned(),
        selectors,
        ..Default::default()
    }
}

/// The selector matching every process of this benchmark's uid.
pub fn my_uid_selector() -> Result<String> {
    Ok(format!("unix:uid:{}", crate::process::current_uid()?))
}

/// A Workload API client on its own connection to `socket`.
pub async fn workload_client(socket: &Path) -> Result<SpiffeWorkloadApiClient<Channel>> {
    let channel = sigil_proto::channel::unix_channel(socket)
        .await
        .with_context(|| format!("cannot connect to the Workload API at {}", socket.display()))?;
    Ok(SpiffeWorkloadApiClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// A Workload API request with the security header.
pub fn workload_request<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

/// Opens FetchX509SVID on `client` and waits for the first response.
pub async fn first_x509(
    client: &mut SpiffeWorkloadApiClient<Channel>,
) -> Result<(
    tonic::Streaming<sigil_proto::workload::X509svidResponse>,
    sigil_proto::workload::X509svidResponse,
)> {
    let mut stream = client
        .fetch_x509svid(workload_request(sigil_proto::workload::X509svidRequest {}))
        .await
        .map_err(|s| anyhow!("FetchX509SVID failed: {s}"))?
        .into_inner();
    let first = stream
        .message()
        .await
        .map_err(|s| anyhow!("FetchX509SVID stream failed: {s}"))?
        .ok_or_else(|| anyhow!("FetchX509SVID stream ended before its first message"))?;
    Ok((stream, first))
}

/// Waits until a FetchX509SVID on `socket` returns at least `count` SVIDs.
pub async fn wait_for_svids(socket: &Path, count: usize, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    while Instant::now() < deadline {
        match workload_client(socket).await {
            Ok(mut c) => match first_x509(&mut c).await {
                Ok((_, first)) if first.svids.len() >= count => return Ok(()),
                Ok((_, first)) => last = format!("{} of {count} SVIDs", first.svids.len()),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the Workload API did not serve {count} SVIDs within {limit:?}; last: {last}")
}
