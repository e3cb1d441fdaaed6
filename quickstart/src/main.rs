//! `sigil-quickstart`: Sigil on one machine in one command.
//!
//! Starts a server (embedded datastore, self-signed CA) and an agent in
//! this process, on real sockets under one data directory; joins the agent
//! with a fresh join token; registers the invoking user (`unix:uid:<uid>`);
//! fetches and prints that user's X.509-SVID through the Workload API, as
//! any workload would; then serves until Ctrl-C or SIGTERM and stops both
//! cleanly. Run again on the same directory, it resumes: same CA, same
//! agent (no new attestation while its SVID is valid), same entry.
//!
//! The server and agent are the same library code the `sigil-server` and
//! `sigil-agent` binaries run; only the process is shared.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use sigil_agent::config::AgentConfig;
use sigil_agent::session::AgentError;
use sigil_agent::workload_api;
use sigil_agent::workload_client;
use sigil_identity::{Bundle, SpiffeId, TrustDomain};
use sigil_proto::admin::{self as pb, admin_client::AdminClient};
use sigil_proto::node as node_pb;
use sigil_server::config::{Overrides, ServerConfig};
use sigil_server::server::{Listeners, ServerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Longest Unix socket path the kernel accepts (sun_path, less the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How long to wait for the first SVID before giving up.
const FIRST_SVID_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Parser)]
#[command(
    name = "sigil-quickstart",
    version,
    about = "Run a Sigil server and agent on this machine and get an SVID for yourself",
    long_about = "Starts a Sigil server (embedded datastore, self-signed CA) and an agent in \
                  one process, registers the invoking user (selector unix:uid:<your uid>), \
                  fetches and prints your X.509-SVID through the SPIFFE Workload API, then \
                  keeps both running until Ctrl-C or SIGTERM. It prints the two `export` \
                  lines that let `sigil-agent api ...` and `sigil-server entry ...` work from \
                  another terminal. Running it again resumes the same data."
)]
struct Args {
    /// Directory for the data, sockets and log of both server and agent.
    #[arg(long, value_name = "DIR", default_value = ".sigil")]
    dir: PathBuf,
    /// Trust domain of the server.
    #[arg(long, default_value = "example.org")]
    trust_domain: TrustDomain,
    /// Node API address (TLS); port 0 picks a free port on each run.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    bind: SocketAddr,
}

/// Where everything lives, all absolute.
#[derive(Debug)]
struct Paths {
    root: PathBuf,
    server_data: PathBuf,
    admin_socket: PathBuf,
    agent_dir: PathBuf,
    agent_data: PathBuf,
    agent_socket: PathBuf,
    bootstrap_bundle: PathBuf,
    log: PathBuf,
}

impl Paths {
    fn new(dir: &Path) -> Result<Self> {
        let root = if dir.is_absolute() {
            dir.to_path_buf()
        } else {
            std::env::current_dir()
                .context("cannot read the current directory")?
                .join(dir)
        };
        let p = Self {
            server_data: root.join("server/data"),
            admin_socket: root.join("server/admin.sock"),
            agent_dir: root.join("agent"),
            agent_data: root.join("agent/data"),
            agent_socket: root.join("agent/api.sock"),
            bootstrap_bundle: root.join("agent/bootstrap-bundle.pem"),
            log: root.join("sigil.log"),
            root,
        };
        // The paths are printed in `export` lines meant to be pasted into a
        // shell, and the socket in a URI: keep to characters that need no
        // quoting or escaping in either.
        let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+,@=~:".contains(c);
        if let Some(bad) = p.root.to_string_lossy().chars().find(|c| !plain(*c)) {
            bail!(
                "the data directory {} contains {bad:?}, which the printed export lines would \
                 need quoted; pass --dir with a plainer path (e.g. --dir /tmp/sigil)",
                p.root.display()
            );
        }
        for socket in [&p.admin_socket, &p.agent_socket] {
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                bail!(
                    "the socket path {} is longer than the {MAX_SOCKET_PATH} bytes Unix sockets \
                     allow; pass a shorter --dir (e.g. --dir /tmp/sigil)",
                    socket.display()
                );
            }
        }
        for d in [&p.root, &p.root.join("server"), &p.agent_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        Ok(p)
    }
}

/// Logs (server and agent) go to a file so the terminal shows only the
/// quickstart's own output.
fn install_logging(path: &Path) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open the log file {}", path.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(Mutex::new(file))
        .init();
    Ok(())
}

/// A future that resolves once `stop` turns true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The uid of this process (the owner of `/proc/self`).
fn current_uid() -> Result<u32> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/self")
        .context("cannot read /proc/self to learn this process's uid")?
        .uid())
}

/// A TOML basic string.
fn toml_str(s: &str) -> Result<String> {
    if s.chars().any(char::is_control) {
        bail!("{s:?} contains control characters");
    }
    Ok(format!(
        "\"{}\"",
        s.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

fn path_str(p: &Path) -> Result<String> {
    toml_str(
        p.to_str()
            .ok_or_else(|| anyhow!("{} is not valid UTF-8", p.display()))?,
    )
}

/// Everything started, for a clean stop.
struct Running {
    stop: watch::Sender<bool>,
    server: JoinHandle<Result<(), ServerError>>,
    agent: Option<JoinHandle<Result<(), AgentError>>>,
}

impl Running {
    /// Stops the agent (whose Workload API drains for up to 5 s), then the
    /// server (which drains for up to 5 s).
    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        if let Some(agent) = self.agent {
            match agent.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("agent: {e}"),
                Err(e) => eprintln!("agent task: {e}"),
            }
        }
        match self.server.await {
            Ok(r) => r.context("server"),
            Err(e) => Err(anyhow!("server task: {e}")),
        }
    }
}

async fn admin_client(socket: &Path) -> Result<AdminClient<Channel>> {
    Ok(sigil_server::admin_client::connect(socket).await?)
}

/// Locks `<dir>/lock` for as long as the returned file is open, so two
/// quickstarts never share a directory.
fn lock(paths: &Paths) -> Result<std::fs::File> {
    let path = paths.root.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "Sigil is already running with its data in {}; stop that one first (Ctrl-C in its \
             terminal) or pass another --dir",
            paths.root.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Waits until the server answers on its admin socket.
async fn wait_for_server(
    socket: &Path,
    server: &JoinHandle<Result<(), ServerError>>,
) -> Result<AdminClient<Channel>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if server.is_finished() {
            bail!("the server stopped while starting; see the log");
        }
        if let Ok(mut c) = admin_client(socket).await
            && c.health(pb::HealthRequest {}).await.is_ok()
        {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "the server did not answer on {} within 30 s",
        socket.display()
    )
}

async fn join_token(admin: &mut AdminClient<Channel>) -> Result<String> {
    Ok(admin
        .create_join_token(pb::CreateJoinTokenRequest::default())
        .await
        .context("cannot create a join token")?
        .into_inner()
        .token)
}

fn agent_config(
    paths: &Paths,
    td: &TrustDomain,
    server: SocketAddr,
    token: &str,
) -> Result<AgentConfig> {
    let text = format!(
        "trust_domain = {}\nserver_address = {}\ndata_dir = {}\ntrust_bundle = {}\n\
         socket_path = {}\n[node_attestor]\njoin_token = {}\n",
        toml_str(td.as_str())?,
        toml_str(&server.to_string())?,
        path_str(&paths.agent_data)?,
        path_str(&paths.bootstrap_bundle)?,
        path_str(&paths.agent_socket)?,
        toml_str(token)?,
    );
    AgentConfig::parse(&text).context("building the agent configuration")
}

/// The agent running in its task.
type AgentTask = JoinHandle<Result<(), AgentError>>;

/// Starts the agent with `sigil_agent::run`: on its stored SVID if it has a
/// valid one, else attesting with a fresh join token. Returns it once its
/// Workload API reports SERVING, with its ID and whether it attested.
async fn start_agent(
    admin: &mut AdminClient<Channel>,
    paths: &Paths,
    td: &TrustDomain,
    server: SocketAddr,
    stop_rx: &watch::Receiver<bool>,
) -> Result<(AgentTask, SpiffeId, bool)> {
    let bundle = admin
        .get_bundle(pb::GetBundleRequest {})
        .await
        .context("cannot read the trust bundle")?
        .into_inner();
    let bundle = Bundle::try_from(&bundle).map_err(|e| anyhow!("trust bundle: {e}"))?;
    std::fs::write(&paths.bootstrap_bundle, bundle.x509_pem())
        .with_context(|| format!("cannot write {}", paths.bootstrap_bundle.display()))?;

    let store = sigil_agent::store::Store::open(&paths.agent_data)?;
    if paths.agent_data.join("agent.pem").exists() {
        // Never sent: a valid stored SVID needs no attestation, and an
        // expired one is refused before any token would be used.
        let unused = "none-the-agent-has-a-stored-svid";
        let config = agent_config(paths, td, server, unused)?;
        match launch_agent(config, paths, stop_rx).await? {
            Ok(task) => return attested_or_resumed(task, &store, td, false),
            Err(AgentError::CannotReattest(_)) => {
                // Its SVID expired while the quickstart was stopped: the
                // old agent is removed and a new one joins.
                if let Some(old) = stored_agent_id(&store, td) {
                    let _ = admin
                        .evict_agent(pb::AgentRequest {
                            id: old.to_string(),
                        })
                        .await;
                }
                store.forget_svid()?;
            }
            Err(e) => {
                return Err(e).context(format!(
                    "starting the agent (if the server's data was deleted, delete {} too)",
                    paths.agent_data.display()
                ));
            }
        }
    }
    let token = join_token(admin).await?;
    let task = launch_agent(agent_config(paths, td, server, &token)?, paths, stop_rx)
        .await?
        .context("starting the agent")?;
    attested_or_resumed(task, &store, td, true)
}

/// The started agent with the ID in its stored SVID.
fn attested_or_resumed(
    task: AgentTask,
    store: &sigil_agent::store::Store,
    td: &TrustDomain,
    attested: bool,
) -> Result<(AgentTask, SpiffeId, bool)> {
    match stored_agent_id(store, td) {
        Some(id) => Ok((task, id, attested)),
        None => {
            task.abort();
            bail!("the agent started without an SVID")
        }
    }
}

/// Binds the Workload API socket and runs the agent in a task until the
/// quickstart stops. `Ok(Err(e))`: the agent stopped while starting.
async fn launch_agent(
    config: AgentConfig,
    paths: &Paths,
    stop_rx: &watch::Receiver<bool>,
) -> Result<Result<AgentTask, AgentError>> {
    let listener = workload_api::bind(&paths.agent_socket)?;
    let mut task = tokio::spawn(sigil_agent::run(config, listener, stopped(stop_rx.clone())));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if task.is_finished() {
            return match (&mut task).await {
                Ok(Err(e)) => Ok(Err(e)),
                Ok(Ok(())) => bail!("the agent stopped while starting"),
                Err(e) => bail!("agent task: {e}"),
            };
        }
        if agent_serving(&paths.agent_socket).await {
            return Ok(Ok(task));
        }
        if Instant::now() >= deadline {
            task.abort();
            bail!(
                "the agent did not report serving on {} within 30 s; see the log",
                paths.agent_socket.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the agent's health service answers SERVING (it holds the
/// server's trust bundle).
async fn agent_serving(socket: &Path) -> bool {
    use sigil_proto::grpc::health::v1::{HealthCheckRequest, health_client::HealthClient};
    let wait = Duration::from_secs(1);
    let Ok(Ok(channel)) =
        tokio::time::timeout(wait, sigil_proto::channel::unix_channel(socket)).await
    else {
        return false;
    };
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest {
        service: String::new(),
    });
    matches!(
        tokio::time::timeout(wait, check).await,
        Ok(Ok(r)) if r.get_ref().status == 1
    )
}

/// The agent ID in a stored agent SVID.
fn stored_agent_id(store: &sigil_agent::store::Store, td: &TrustDomain) -> Option<SpiffeId> {
    let state = store.load(td).ok()??;
    let leaf = sigil_identity::x509::parse(state.chain.first()?).ok()?;
    sigil_identity::x509::check_leaf(&leaf).ok()
}

/// What registering the user did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registered {
    Created,
    AlreadyThere,
    /// The entry existed under a previous agent and now names this one.
    MovedHere,
}

/// Registers `spiffe://<td>/local/uid/<uid>` for `unix:uid:<uid>` under
/// `agent`: the quickstart's one entry for this user, created once and
/// moved to the current agent when the agent had to join again.
async fn register_user(
    admin: &mut AdminClient<Channel>,
    td: &TrustDomain,
    agent: &SpiffeId,
    uid: u32,
) -> Result<(String, Registered)> {
    let spiffe_id = format!("spiffe://{}/local/uid/{uid}", td.as_str());
    let selector = format!("unix:uid:{uid}");
    let existing = admin
        .list_entries(pb::ListEntriesRequest {
            spiffe_id: spiffe_id.clone(),
            ..Default::default()
        })
        .await
        .context("cannot list entries")?
        .into_inner()
        .entries
        .into_iter()
        .find(|e| e.selectors.len() == 1 && e.selectors[0] == selector);
    if let Some(mut entry) = existing {
        if entry.parent_id == agent.to_string() {
            return Ok((spiffe_id, Registered::AlreadyThere));
        }
        entry.parent_id = agent.to_string();
        admin
            .update_entry(pb::UpdateEntryRequest { entry: Some(entry) })
            .await
            .context("cannot move the entry to the new agent")?;
        return Ok((spiffe_id, Registered::MovedHere));
    }
    let results = admin
        .create_entries(pb::CreateEntriesRequest {
            entries: vec![node_pb::Entry {
                spiffe_id: spiffe_id.clone(),
                parent_id: agent.to_string(),
                selectors: vec![selector],
                ..Default::default()
            }],
        })
        .await
        .context("cannot create the entry")?
        .into_inner()
        .results;
    match results.first().and_then(|r| r.status.as_ref()) {
        Some(s) if s.code != 0 => bail!("the server refused the entry: {}", s.message),
        _ => Ok((spiffe_id, Registered::Created)),
    }
}

/// Fetches and prints this process's X.509-SVID through the Workload API,
/// waiting while it is still being issued.
async fn print_my_svid(socket: &Path) -> Result<()> {
    let deadline = Instant::now() + FIRST_SVID_WAIT;
    loop {
        match workload_client::fetch_x509(socket).await {
            Ok(reply) => {
                for svid in &reply.svids {
                    println!("{}", workload_client::X509SvidInfo::read(svid)?);
                }
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(e).context("no SVID arrived through the Workload API");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn run(args: Args) -> Result<()> {
    // Signals first: a Ctrl-C during startup stops what has started,
    // cleanly.
    let shutdown = sigil_server::server::shutdown_signal();
    tokio::pin!(shutdown);
    let paths = Paths::new(&args.dir)?;
    let _lock = lock(&paths)?;
    install_logging(&paths.log)?;
    let td = args.trust_domain;
    println!(
        "Starting Sigil (trust domain {td}, data in {}, logs in {})",
        paths.root.display(),
        paths.log.display()
    );

    let config = ServerConfig::load(
        None,
        Overrides {
            trust_domain: Some(td.clone()),
            data_dir: Some(paths.server_data.clone()),
            bind_address: Some(args.bind),
            admin_socket: Some(paths.admin_socket.clone()),
            log_level: None,
            log_format: None,
            server_id: None,
        },
    )?;
    let node = tokio::net::TcpListener::bind(args.bind)
        .await
        .with_context(|| format!("cannot listen on {} for the node API", args.bind))?;
    let node_addr = node.local_addr()?;
    let admin = sigil_server::admin_api::bind_socket(&paths.admin_socket)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(sigil_server::server::run(
        config,
        Listeners { node, admin },
        stopped(stop_rx.clone()),
    ));
    let mut running = Running {
        stop: stop_tx,
        server,
        agent: None,
    };
    let started = tokio::select! {
        r = start_all(&paths, &td, node_addr, &stop_rx, &mut running) => r,
        () = &mut shutdown => Err(anyhow!("interrupted while starting")),
    };
    if let Err(e) = started {
        println!("Stopping…");
        let _ = running.stop().await;
        return Err(e);
    }
    let died = tokio::select! {
        () = &mut shutdown => None,
        () = finished(&running.server) => Some("the server"),
        () = finished_opt(&running.agent) => Some("the agent"),
    };
    println!("Stopping…");
    let stopped = running.stop().await;
    if let Some(what) = died {
        bail!(
            "{what} stopped unexpectedly ({}); see {}",
            stopped
                .err()
                .map_or_else(|| "no error".into(), |e| format!("{e:#}")),
            paths.log.display()
        );
    }
    stopped?;
    println!(
        "Stopped. Run the same command again to resume with the data in {}.",
        paths.root.display()
    );
    Ok(())
}

/// Resolves once `task` has finished (without consuming its result).
async fn finished<T>(task: &JoinHandle<T>) {
    while !task.is_finished() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn finished_opt<T>(task: &Option<JoinHandle<T>>) {
    match task {
        Some(t) => finished(t).await,
        None => std::future::pending().await,
    }
}

/// Everything after the server task is spawned; on error the caller stops
/// what was started.
async fn start_all(
    paths: &Paths,
    td: &TrustDomain,
    node_addr: SocketAddr,
    stop_rx: &watch::Receiver<bool>,
    running: &mut Running,
) -> Result<()> {
    let mut admin = wait_for_server(&paths.admin_socket, &running.server).await?;
    println!("  server   node API on {node_addr} (TLS), admin socket ready");

    let (agent, agent_id, attested) =
        start_agent(&mut admin, paths, td, node_addr, stop_rx).await?;
    running.agent = Some(agent);
    println!(
        "  agent    {agent_id} ({})",
        if attested {
            "joined with a fresh join token"
        } else {
            "resumed its stored identity"
        }
    );

    let uid = current_uid()?;
    let (spiffe_id, registered) = register_user(&mut admin, td, &agent_id, uid).await?;
    println!(
        "  entry    {spiffe_id} for unix:uid:{uid} ({})",
        match registered {
            Registered::Created => "registered",
            Registered::AlreadyThere => "already registered",
            Registered::MovedHere => "moved to this agent",
        }
    );
    println!("\nYour X.509-SVID, fetched through the Workload API:");
    print_my_svid(&paths.agent_socket).await?;
    println!(
        "\nSigil is running. In another terminal:\n\n\
         export SPIFFE_ENDPOINT_SOCKET=unix://{}\n\
         export SIGIL_ADMIN_SOCKET={}\n\n\
         cargo run -q -p sigil-agent -- api fetch x509      # your SVID, as a workload\n\
         cargo run -q -p sigil-server -- entry show         # the registered entries\n\n\
         Press Ctrl-C to stop.",
        paths.agent_socket.display(),
        paths.admin_socket.display()
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
