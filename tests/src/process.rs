//! Real server and agent processes.
//!
//! Every process gets its own directory (config, data, sockets, log file),
//! listens on 127.0.0.1 or a Unix socket only, and is killed when its handle
//! is dropped, so a failing test leaves nothing running.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use sigil_identity::tls::{SharedBundle, SpiffeServerVerifier, SvidResolver, authorize_id};
use sigil_identity::{Bundle, SpiffeId, TrustDomain};
use sigil_proto::admin::admin_client::AdminClient;
use sigil_proto::node::node_client::NodeClient;
use tonic::transport::Channel;

/// The directory set by [`set_bin_dir`], if any.
static BIN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes [`bin_dir`] return `dir` from now on (e.g. from a `--bin-dir`
/// flag); only the first call has an effect, later ones are an error.
pub fn set_bin_dir(dir: PathBuf) -> Result<()> {
    BIN_DIR
        .set(dir)
        .map_err(|dir| anyhow!("the binary directory is already set (to {})", dir.display()))
}

/// Where the workspace's binaries are: the directory given to
/// [`set_bin_dir`], else `$SIGIL_BIN_DIR`, else the directory cargo put
/// this executable's parent in (`target/<profile>`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = BIN_DIR.get() {
        return Ok(dir.clone());
    }
    if let Some(dir) = std::env::var_os("SIGIL_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("cannot locate the running executable")?;
    let mut dir = exe
        .parent()
        .context("the running executable has no directory")?
        .to_path_buf();
    // Test binaries live in target/<profile>/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// The path of the built binary `name`, or an error saying how to build it.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "{} is not built; run `cargo build --bins` first (or set SIGIL_BIN_DIR)",
            path.display()
        );
    }
    Ok(path)
}

/// The path of the built example `name` (`target/<profile>/examples`).
pub fn example(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join("examples").join(name);
    if !path.is_file() {
        bail!(
            "{} is not built; run `cargo build -p sigil-tests --examples` first",
            path.display()
        );
    }
    Ok(path)
}

/// A free TCP port on 127.0.0.1 (free when asked; taken by the caller soon after).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot bind 127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The uid this process runs as (from /proc, without libc).
pub fn current_uid() -> Result<u32> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/self")
        .context("cannot read /proc/self")?
        .uid())
}

/// Sends `signal` (e.g. `TERM`, `KILL`) to `pid` with kill(1).
fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .context("cannot run kill(1)")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed");
    }
    Ok(())
}

/// Largest gRPC message the harness's clients accept (a Workload API
/// response with 10,000 SVIDs is ≈ 15 MiB; benchmarks go further).
pub const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// How long a process may take to become healthy.
const LAUNCH_LIMIT: Duration = Duration::from_secs(30);

/// How long a process may take to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How often the harness polls a process (health, exit).
const POLL: Duration = Duration::from_millis(20);

/// Polls `step` every [`POLL`] until it returns `Some`, at most `limit`;
/// `None` when the time is up. Blocks the thread: for `#[test]`s.
fn poll_until<T>(
    limit: Duration,
    mut step: impl FnMut() -> Result<Option<T>>,
) -> Result<Option<T>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = step()? {
            return Ok(Some(v));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

/// As [`poll_until`], sleeping on the tokio timer so that other tasks of
/// the caller's runtime (clients, an in-process agent) keep running: for
/// `#[tokio::test]`s.
async fn poll_until_async<T>(
    limit: Duration,
    mut step: impl FnMut() -> Result<Option<T>>,
) -> Result<Option<T>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = step()? {
            return Ok(Some(v));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Runs `cmd` and returns its stdout, or an error with its stderr.
fn output_ok(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One child process with its log file, and how its CLI reaches it.
#[derive(Debug)]
struct Proc {
    binary: PathBuf,
    /// A program (with its arguments) that execs the binary, if any.
    launcher: Vec<String>,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// The CLI flag naming the socket (`--admin-socket`, `--socket`).
    socket_flag: &'static str,
    socket: PathBuf,
}

impl Proc {
    /// A CLI command of this binary aimed at this process's socket.
    fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg(self.socket_flag).arg(&self.socket).args(args);
        cmd
    }

    /// Starts the process and waits (at most 30 s) until its
    /// `healthcheck` command succeeds.
    fn launch(&mut self) -> Result<()> {
        self.spawn()?;
        let healthy = poll_until(LAUNCH_LIMIT, || self.launch_step())?;
        self.launched(healthy)
    }

    /// [`Proc::launch`] for async callers.
    async fn launch_async(&mut self) -> Result<()> {
        self.launch_within_async(LAUNCH_LIMIT).await
    }

    /// [`Proc::launch_async`] waiting up to `limit` for health.
    async fn launch_within_async(&mut self, limit: Duration) -> Result<()> {
        self.spawn()?;
        let healthy = poll_until_async(limit, || self.launch_step()).await?;
        self.launched(healthy)
    }

    /// One look at a starting process: `Some` once healthy, an error if
    /// it exited.
    fn launch_step(&mut self) -> Result<Option<()>> {
        if let Some(status) = self.exited() {
            bail!(
                "{} exited early ({status}):\n{}",
                self.name(),
                self.log_text()
            );
        }
        let healthy = self
            .cli_command(&["healthcheck"])
            .output()?
            .status
            .success();
        Ok(healthy.then_some(()))
    }

    fn launched(&self, healthy: Option<()>) -> Result<()> {
        match healthy {
            Some(()) => Ok(()),
            None => bail!(
                "{} did not become healthy:\n{}",
                self.name(),
                self.log_text()
            ),
        }
    }

    fn name(&self) -> String {
        self.binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut cmd = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&self.binary);
                cmd
            }
            None => Command::new(&self.binary),
        };
        let child = cmd
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status, if the process has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait up to `grace`; SIGKILL after that (an error).
    fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        let mut child = self.terminate()?;
        let status = poll_until(grace, || Ok(child.try_wait()?))?;
        self.stopped(child, status, grace)
    }

    /// [`Proc::stop`] for async callers.
    async fn stop_async(&mut self, grace: Duration) -> Result<ExitStatus> {
        let mut child = self.terminate()?;
        let status = poll_until_async(grace, || Ok(child.try_wait()?)).await?;
        self.stopped(child, status, grace)
    }

    /// Sends SIGTERM to the running process and hands over its child.
    fn terminate(&mut self) -> Result<Child> {
        let Some(mut child) = self.child.take() else {
            bail!("process is not running");
        };
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} had already exited ({status}):\n{}",
                self.binary.display(),
                self.log_text()
            );
        }
        signal(child.id(), "TERM")?;
        Ok(child)
    }

    /// The exit status, or SIGKILL and an error if there is none.
    fn stopped(
        &self,
        mut child: Child,
        status: Option<ExitStatus>,
        grace: Duration,
    ) -> Result<ExitStatus> {
        if let Some(status) = status {
            return Ok(status);
        }
        child.kill().ok();
        child.wait().ok();
        bail!(
            "{} did not stop within {grace:?} of SIGTERM",
            self.binary.display()
        )
    }

    /// Whether a process was started and has not exited.
    fn running(&mut self) -> bool {
        self.child.is_some() && self.exited().is_none()
    }

    fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("SIGKILL failed")?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// How to configure a server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub trust_domain: String,
    /// CA certificate lifetime (`ca.ttl`); the server default when `None`.
    /// Setting it also caps the default SVID lifetimes
    /// (`ca.x509_svid_ttl`, `ca.jwt_svid_ttl`) at a sixth of it.
    pub ca_ttl: Option<Duration>,
    /// Agent SVID lifetime (`agents.svid_ttl`); workload SVID lifetimes
    /// are set per entry.
    pub agent_svid_ttl: Option<Duration>,
    /// Extra TOML appended to the config file.
    pub extra: String,
    /// Log filter.
    pub log_level: String,
    /// Also serve the admin API over mTLS on a free port
    /// (`server.admin_bind_address`, see [`ServerProcess::admin_address`]).
    pub admin_mtls: bool,
    /// A program (with arguments) that execs the server binary, e.g.
    /// `env VAR=value` to give it environment variables.
    pub launcher: Vec<String>,
    /// Extra lines for the `[server]` section (e.g.
    /// `max_connections = 100000`), which `extra` cannot add to.
    pub server_section: String,
}

impl ServerOptions {
    /// The defaults with `extra` TOML appended to the config file.
    pub fn with_extra(extra: &str) -> Self {
        Self {
            extra: extra.to_owned(),
            ..Self::default()
        }
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            trust_domain: "example.org".into(),
            ca_ttl: None,
            agent_svid_ttl: None,
            extra: String::new(),
            log_level: "info".into(),
            admin_mtls: false,
            launcher: Vec::new(),
            server_section: String::new(),
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs().max(1))
}

/// A `sigil-server` process.
#[derive(Debug)]
pub struct ServerProcess {
    dir: PathBuf,
    config: PathBuf,
    proc_: Proc,
    /// Node API address (`127.0.0.1:<port>`).
    pub addr: String,
    /// Admin socket.
    pub admin_socket: PathBuf,
    /// The trust domain.
    pub trust_domain: String,
    /// The temporary directory of [`ServerProcess::start_temp`], removed
    /// on drop (after the process is killed: fields drop in order).
    _temp: Option<tempfile::TempDir>,
    /// The admin API over mTLS (`127.0.0.1:<port>`), when
    /// [`ServerOptions::admin_mtls`] asked for it.
    pub admin_address: Option<String>,
}

impl ServerProcess {
    /// Starts a server in a new temporary directory (removed when the
    /// handle is dropped) with the default options and `extra` TOML.
    pub fn start_temp(extra: &str) -> Result<Self> {
        let temp = tempfile::tempdir().context("cannot create a temporary directory")?;
        let mut server = Self::start(temp.path(), &ServerOptions::with_extra(extra))?;
        server._temp = Some(temp);
        Ok(server)
    }

    /// Writes a config under `dir` (created if missing) and starts the
    /// server, waiting until its admin socket answers.
    pub fn start(dir: &Path, options: &ServerOptions) -> Result<Self> {
        // The free port may be taken by another test before the server
        // binds it; then try another.
        let mut attempt = 0;
        loop {
            match Self::start_on(dir, options, free_port()?) {
                Err(e) if attempt < 3 && e.to_string().contains("cannot listen") => {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn start_on(dir: &Path, options: &ServerOptions, port: u16) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let addr = format!("127.0.0.1:{port}");
        let admin_socket = dir.join("admin.sock");
        let mut toml = format!(
            "trust_domain = \"{}\"\ndata_dir = \"{}\"\n\n[server]\nbind_address = \"{addr}\"\nadmin_socket = \"{}\"\n\n[log]\nlevel = \"{}\"\n",
            options.trust_domain,
            dir.join("data").display(),
            admin_socket.display(),
            options.log_level,
        );
        if !options.server_section.is_empty() {
            toml = toml.replace(
                "[server]\n",
                &format!("[server]\n{}\n", options.server_section.trim_end()),
            );
        }
        let admin_address = if options.admin_mtls {
            let a = format!("127.0.0.1:{}", free_port()?);
            toml = toml.replace(
                "[server]\n",
                &format!("[server]\nadmin_bind_address = \"{a}\"\n"),
            );
            Some(a)
        } else {
            None
        };
        if let Some(ttl) = options.ca_ttl {
            let svid = secs(ttl / 6);
            let _ = write!(
                toml,
                "\n[ca]\nttl = \"{}\"\nx509_svid_ttl = \"{svid}\"\njwt_svid_ttl = \"{svid}\"\n",
                secs(ttl)
            );
        }
        if let Some(ttl) = options.agent_svid_ttl {
            let _ = write!(toml, "\n[agents]\nsvid_ttl = \"{}\"\n", secs(ttl));
        }
        toml.push('\n');
        toml.push_str(&options.extra);
        let config = dir.join("server.toml");
        std::fs::write(&config, toml)?;
        let mut server = Self {
            proc_: Proc {
                binary: binary("sigil-server")?,
                launcher: options.launcher.clone(),
                args: vec![
                    "run".into(),
                    "--config".into(),
                    config.display().to_string(),
                ],
                log: dir.join("server.log"),
                child: None,
                socket_flag: "--admin-socket",
                socket: admin_socket.clone(),
            },
            dir: dir.to_path_buf(),
            config,
            addr,
            admin_socket,
            trust_domain: options.trust_domain.clone(),
            _temp: None,
            admin_address,
        };
        server.proc_.launch()?;
        Ok(server)
    }

    /// The directory holding config, data, socket and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's config file.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.proc_.log_text()
    }

    /// The server's trust domain.
    pub fn td(&self) -> Result<TrustDomain> {
        TrustDomain::new(&self.trust_domain)
            .with_context(|| format!("bad trust domain {}", self.trust_domain))
    }

    /// An admin API client on the admin socket.
    pub async fn admin(&self) -> Result<AdminClient<Channel>> {
        let channel = sigil_proto::channel::unix_channel(&self.admin_socket)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the admin socket {}",
                    self.admin_socket.display()
                )
            })?;
        Ok(AdminClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    /// The trust bundle, from the admin API.
    pub async fn bundle(&self) -> Result<Bundle> {
        let b = self
            .admin()
            .await?
            .get_bundle(sigil_proto::admin::GetBundleRequest {})
            .await
            .map_err(|s| anyhow!("GetBundle failed: {s}"))?
            .into_inner();
        Bundle::try_from(&b).map_err(|e| anyhow!("GetBundle returned a bad bundle: {e}"))
    }

    /// A fresh join token, from the admin API.
    pub async fn token(&self) -> Result<String> {
        Ok(self
            .admin()
            .await?
            .create_join_token(sigil_proto::admin::CreateJoinTokenRequest::default())
            .await
            .map_err(|s| anyhow!("CreateJoinToken failed: {s}"))?
            .into_inner()
            .token)
    }

    /// A node API TLS config that verifies this server against its
    /// current bundle and presents `client` (chain, PKCS#8 key) if given.
    pub async fn node_tls(
        &self,
        client: Option<(&[Vec<u8>], &[u8])>,
    ) -> Result<Arc<rustls::ClientConfig>> {
        let bundle = Arc::new(SharedBundle::new(self.bundle().await?));
        let verifier = Arc::new(SpiffeServerVerifier::new(
            bundle,
            authorize_id(SpiffeId::server(&self.td()?)),
        ));
        let resolver = match client {
            Some((chain, key)) => Some(Arc::new(SvidResolver::new(
                sigil_identity::tls::certified_key(chain, key)
                    .map_err(|e| anyhow!("bad client SVID: {e}"))?,
            ))),
            None => None,
        };
        Ok(Arc::new(
            sigil_identity::tls::client_config(verifier, resolver)
                .map_err(|e| anyhow!("TLS config: {e}"))?,
        ))
    }

    /// A node API client without a client certificate (as for Attest).
    pub async fn anonymous(&self) -> Result<NodeClient<Channel>> {
        let channel = sigil_proto::channel::node_channel(&self.addr, self.node_tls(None).await?)
            .await
            .context("cannot connect to the node API")?;
        Ok(NodeClient::new(channel))
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc_.pid()
    }

    /// Runs `sigil-server <args>` against this server's admin socket.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        self.proc_
            .cli_command(args)
            .output()
            .context("cannot run sigil-server")
    }

    /// Runs the CLI and returns stdout, failing on a non-zero exit.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        output_ok(
            &mut self.proc_.cli_command(args),
            &format!("sigil-server {}", args.join(" ")),
        )
    }

    /// Runs the CLI with `--output json` and parses stdout.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let text = self.cli_ok(&all)?;
        serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))
    }

    /// Runs `sigil-server --admin-address <admin_address> <args>`: the CLI
    /// over mTLS (`args` start with the SVID flags, e.g. `--svid-dir DIR`).
    pub fn cli_remote(&self, args: &[&str]) -> Result<Output> {
        let address = self
            .admin_address
            .as_deref()
            .context("the server was started without ServerOptions::admin_mtls")?;
        Command::new(&self.proc_.binary)
            .arg("--admin-address")
            .arg(address)
            .args(args)
            .output()
            .context("cannot run sigil-server")
    }

    /// A fresh join token.
    pub fn join_token(&self) -> Result<String> {
        Ok(self.cli_ok(&["token", "generate"])?.trim().to_owned())
    }

    /// Writes the trust bundle as PEM to `path`.
    pub fn write_bundle(&self, path: &Path) -> Result<()> {
        let pem = self.cli_ok(&["bundle", "show", "--format", "pem"])?;
        std::fs::write(path, pem)?;
        Ok(())
    }

    /// Creates an entry and returns its id.
    pub fn create_entry(&self, spiffe_id: &str, parent_id: &str, args: &[&str]) -> Result<String> {
        let mut all = vec![
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            parent_id,
        ];
        all.extend_from_slice(args);
        let id = self.cli_ok(&all)?.trim().to_owned();
        if id.is_empty() {
            bail!("entry create printed no id");
        }
        Ok(id)
    }

    /// The IDs of the attested agents.
    pub fn agent_ids(&self) -> Result<Vec<String>> {
        let v = self.cli_json(&["agent", "list"])?;
        let list = v
            .as_array()
            .or_else(|| v["agents"].as_array())
            .ok_or_else(|| anyhow!("agent list printed no list: {v}"))?;
        Ok(list
            .iter()
            .filter_map(|a| a["id"].as_str().map(str::to_owned))
            .collect())
    }

    /// SIGTERM and wait (at most 10 s); the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.proc_.stop(STOP_GRACE)
    }

    /// [`ServerProcess::stop`] for async tests: the caller's runtime keeps
    /// running (its clients see the server go away) while it waits.
    pub async fn stop_async(&mut self) -> Result<ExitStatus> {
        self.proc_.stop_async(STOP_GRACE).await
    }

    /// [`ServerProcess::stop_async`] waiting up to `grace` (a server with
    /// much state may take longer than the default to stop).
    pub async fn stop_within_async(&mut self, grace: Duration) -> Result<ExitStatus> {
        self.proc_.stop_async(grace).await
    }

    /// Starts the stopped server again on the same config and data,
    /// waiting up to `limit` for it to become healthy (a server loading
    /// much state may take longer than the default).
    pub async fn start_again_within_async(&mut self, limit: Duration) -> Result<()> {
        if self.proc_.running() {
            bail!("the server is still running");
        }
        self.proc_.launch_within_async(limit).await
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<()> {
        self.proc_.kill()
    }

    /// Starts the server again on the same config and data (stopping it
    /// first if it runs).
    pub fn restart(&mut self) -> Result<()> {
        if self.proc_.running() {
            self.stop()?;
        }
        self.proc_.launch()
    }

    /// [`ServerProcess::restart`] for async tests.
    pub async fn restart_async(&mut self) -> Result<()> {
        if self.proc_.running() {
            self.stop_async().await?;
        }
        self.proc_.launch_async().await
    }

    /// Starts the server again on the same config and data, but serving
    /// the node API on `port` (127.0.0.1): as another server of the same
    /// deployment would, for agents that fail over. Kills it first if it
    /// runs.
    pub async fn restart_on_port_async(&mut self, port: u16) -> Result<()> {
        self.kill()?;
        let addr = format!("127.0.0.1:{port}");
        let text = std::fs::read_to_string(&self.config)?;
        let old = format!("bind_address = \"{}\"", self.addr);
        if !text.contains(&old) {
            bail!("{} does not set {old}", self.config.display());
        }
        std::fs::write(
            &self.config,
            text.replace(&old, &format!("bind_address = \"{addr}\"")),
        )?;
        self.addr = addr;
        self.proc_.launch_async().await
    }
}

/// How an agent proves its node.
#[derive(Debug, Clone)]
pub enum NodeAttestation {
    /// A join token from the server.
    JoinToken(String),
    /// x509pop: certificate chain and key files (PEM).
    X509Pop { certificate: PathBuf, key: PathBuf },
}

/// Writes a CA (`ca.pem`) and a node certificate and key signed by it
/// (`node.pem`, `node.key`) into `dir`, for an agent that attests with
/// x509pop; the server trusts `ca.pem` as its x509pop root.
pub fn x509pop_node_pki(dir: &Path) -> Result<NodeAttestation> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    ca.distinguished_name
        .push(DnType::CommonName, "test node CA");
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key)?.pem())?;
    let node_key = KeyPair::generate()?;
    let mut node = CertificateParams::default();
    node.distinguished_name.push(DnType::CommonName, "node-1");
    let cert = node.signed_by(&node_key, &Issuer::from_params(&ca, &ca_key))?;
    std::fs::write(dir.join("node.pem"), cert.pem())?;
    std::fs::write(dir.join("node.key"), node_key.serialize_pem())?;
    Ok(NodeAttestation::X509Pop {
        certificate: dir.join("node.pem"),
        key: dir.join("node.key"),
    })
}

/// How to configure and start an agent beyond its node attestation.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Extra top-level TOML settings (e.g. `max_streams_per_uid = 20000`).
    pub extra: String,
    /// A program and its arguments that exec the agent, e.g.
    /// `["prlimit", "--nofile=1024:4096"]`; the agent keeps the pid.
    pub launcher: Vec<String>,
    /// The agent's `server_address` list (several server replicas); the
    /// server's own address when empty.
    pub servers: Vec<String>,
}

/// A `sigil-agent` process.
#[derive(Debug)]
pub struct AgentProcess {
    dir: PathBuf,
    proc_: Proc,
    config: PathBuf,
    /// The Workload API socket.
    pub socket: PathBuf,
}

impl AgentProcess {
    /// Writes a config under `dir` for `server` (trusting its current
    /// bundle) and starts the agent, waiting until its Workload API answers.
    pub fn start(dir: &Path, server: &ServerProcess, node: &NodeAttestation) -> Result<Self> {
        Self::start_with(dir, server, node, "")
    }

    /// As [`AgentProcess::start`], with `extra` top-level TOML settings
    /// (e.g. `max_streams_per_uid = 20000`) added to the config file.
    pub fn start_with(
        dir: &Path,
        server: &ServerProcess,
        node: &NodeAttestation,
        extra: &str,
    ) -> Result<Self> {
        let options = AgentOptions {
            extra: extra.to_owned(),
            ..AgentOptions::default()
        };
        Self::start_with_options(dir, server, node, &options)
    }

    /// As [`AgentProcess::start`], with `options`.
    pub fn start_with_options(
        dir: &Path,
        server: &ServerProcess,
        node: &NodeAttestation,
        options: &AgentOptions,
    ) -> Result<Self> {
        let extra = &options.extra;
        std::fs::create_dir_all(dir)?;
        let bundle = dir.join("bootstrap-bundle.pem");
        server.write_bundle(&bundle)?;
        let socket = dir.join("api.sock");
        let attestor = match node {
            NodeAttestation::JoinToken(t) => format!("join_token = \"{t}\"\n"),
            NodeAttestation::X509Pop { certificate, key } => format!(
                "[node_attestor.x509pop]\ncertificate = \"{}\"\nkey = \"{}\"\n",
                certificate.display(),
                key.display()
            ),
        };
        let servers = if options.servers.is_empty() {
            format!("\"{}\"", server.addr)
        } else {
            let quoted: Vec<String> = options.servers.iter().map(|a| format!("\"{a}\"")).collect();
            format!("[{}]", quoted.join(", "))
        };
        let toml = format!(
            "trust_domain = \"{}\"\nserver_address = {servers}\ndata_dir = \"{}\"\ntrust_bundle = \"{}\"\nsocket_path = \"{}\"\nlog_level = \"info\"\n{extra}\n\n[node_attestor]\n{attestor}",
            server.trust_domain,
            dir.join("data").display(),
            bundle.display(),
            socket.display(),
        );
        let config = dir.join("agent.toml");
        std::fs::write(&config, toml)?;
        let mut agent = Self {
            proc_: Proc {
                binary: binary("sigil-agent")?,
                launcher: options.launcher.clone(),
                args: vec![
                    "run".into(),
                    "--config".into(),
                    config.display().to_string(),
                ],
                log: dir.join("agent.log"),
                child: None,
                socket_flag: "--socket",
                socket: socket.clone(),
            },
            dir: dir.to_path_buf(),
            config,
            socket,
        };
        agent.proc_.launch()?;
        Ok(agent)
    }

    /// The agent's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The agent's config file.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The Workload API endpoint as SPIFFE clients spell it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        self.proc_.log_text()
    }

    /// The agent's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc_.pid()
    }

    /// Whether the process has exited, and how.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.proc_.exited()
    }

    /// Runs `sigil-agent <args>` against this agent's socket.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        self.proc_
            .cli_command(args)
            .output()
            .context("cannot run sigil-agent")
    }

    /// SIGTERM and wait (at most 10 s).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.proc_.stop(STOP_GRACE)
    }

    /// [`AgentProcess::stop`] for async tests.
    pub async fn stop_async(&mut self) -> Result<ExitStatus> {
        self.proc_.stop_async(STOP_GRACE).await
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<()> {
        self.proc_.kill()
    }

    /// Starts the agent again on the same config and data (stopping it
    /// first if it runs).
    pub fn restart(&mut self) -> Result<()> {
        if self.proc_.running() {
            self.stop()?;
        }
        self.proc_.launch()
    }
}
