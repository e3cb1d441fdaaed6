//! The `sigil-server` command line: `run` starts the server; every other
//! subcommand talks to a running server over the admin socket.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use sigil_identity::clock::{from_unix_seconds, rfc3339, unix_seconds};
use sigil_identity::secret_file;
use sigil_identity::{Bundle, DnsName, Selector, SpiffeId, TrustDomain};
use sigil_proto::admin::{self as pb, admin_client::AdminClient};
use sigil_proto::channel::RpcError;
use sigil_proto::node as node_pb;
use sigil_proto::output::{Output, print_json};
use sigil_server::admin_client;
use tonic::transport::Channel;

use sigil_server::config::{DEFAULT_ADMIN_SOCKET, LogFormat};

mod authority;

/// Top-level flags and the subcommand.
#[derive(Debug, Parser)]
#[command(
    name = "sigil-server",
    version,
    about = "Sigil CA server: issues SPIFFE identities to attested agents",
    long_about = "Sigil CA server. `sigil-server run` starts the server; the other \
                  subcommands manage a running server through its admin socket \
                  (mode 0770: run them as root, as the server's user, or as a \
                  configured admin uid)."
)]
pub struct Cli {
    /// Admin socket of the server to manage [default: /run/sigil/server/admin.sock].
    #[arg(long, env = "SIGIL_ADMIN_SOCKET", global = true, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// Output format for data.
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,
    /// Reach the admin API over mTLS at HOST:PORT (the server's
    /// `admin_bind_address`) instead of the admin socket; the caller's
    /// X509-SVID comes from --svid-dir or --workload-api.
    #[arg(
        long,
        env = "SIGIL_ADMIN_ADDRESS",
        global = true,
        value_name = "HOST:PORT"
    )]
    pub admin_address: Option<String>,
    /// With --admin-address: directory with svid.pem, svid.key and bundle.pem
    /// (as `sigil-agent api fetch x509 --write DIR` writes them).
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        conflicts_with = "workload_api"
    )]
    pub svid_dir: Option<PathBuf>,
    /// With --admin-address: take this process's X509-SVID from the local
    /// agent [default socket: $SPIFFE_ENDPOINT_SOCKET, then /run/sigil/agent/api.sock].
    #[arg(long, global = true, value_name = "SOCKET", num_args = 0..=1, default_missing_value = "")]
    pub workload_api: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the client subcommands reach the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminTarget {
    /// The local admin socket.
    Socket(PathBuf),
    /// The admin API over mTLS.
    Remote {
        address: String,
        svid: sigil_server::remote_admin::SvidSource,
    },
}

/// The admin API the flags point at: `--admin-address` with its SVID
/// source, else the admin socket.
pub fn admin_target(cli: &Cli) -> Result<AdminTarget> {
    use sigil_server::remote_admin::{SvidSource, workload_api_socket};
    let Some(address) = cli.admin_address.clone() else {
        if cli.svid_dir.is_some() || cli.workload_api.is_some() {
            bail!("--svid-dir and --workload-api only apply with --admin-address HOST:PORT");
        }
        return Ok(AdminTarget::Socket(admin_socket(cli)));
    };
    let svid = match (&cli.svid_dir, &cli.workload_api) {
        (Some(dir), _) => SvidSource::Dir(dir.clone()),
        (None, Some(socket)) => SvidSource::WorkloadApi(workload_api_socket(Some(socket))),
        (None, None) => bail!(
            "--admin-address needs the caller's X509-SVID: --svid-dir DIR or --workload-api [SOCKET]"
        ),
    };
    Ok(AdminTarget::Remote { address, svid })
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Run(RunArgs),
    /// Manage registration entries.
    #[command(subcommand)]
    Entry(EntryCmd),
    /// Manage attested agents.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Manage join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Show the trust bundle.
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// Mint X.509-SVIDs directly (for bootstrapping and tests), and revoke them.
    #[command(subcommand)]
    X509(X509Cmd),
    /// Mint JWT-SVIDs directly.
    #[command(subcommand)]
    Jwt(JwtCmd),
    /// Exit 0 when the server answers on its admin socket.
    Healthcheck,
    /// Read and verify the audit log (offline, from the data directory).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Datastore tools (offline: they open the datastore themselves).
    #[command(subcommand)]
    Datastore(DatastoreCmd),
    /// CA authorities: show, prepare, activate, taint, revoke (incident response).
    #[command(subcommand)]
    Authority(authority::AuthorityCmd),
}

#[derive(Debug, Subcommand)]
pub enum DatastoreCmd {
    /// Copy a sled datastore (entries, agents, join tokens, bundles, CA
    /// journal, audit log) into the PostgreSQL database of a config; stop
    /// the server first. The CA keys stay in the data directory.
    Migrate {
        /// The sled server's data directory (or its `datastore` directory).
        #[arg(long, value_name = "DIR")]
        from_sled: PathBuf,
        /// Config with `[datastore] type = "postgres"`: the target.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Replace what the target database holds.
        #[arg(long)]
        force: bool,
    },
}

/// `run` flags; each overrides the config file.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML configuration file (see deploy/examples/server.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Trust domain, e.g. example.org.
    #[arg(long)]
    pub trust_domain: Option<TrustDomain>,
    /// Data directory (datastore, CA keys).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Node API address, e.g. 0.0.0.0:8081.
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<std::net::SocketAddr>,
    /// Log level or filter, e.g. info or debug.
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// This replica's stable id ([a-z0-9][a-z0-9-]{0,62}), e.g. the pod
    /// name of a StatefulSet; overrides `[server] server_id`.
    #[arg(long, value_name = "ID")]
    pub server_id: Option<sigil_server::server_id::ServerId>,
}

#[derive(Debug, Args)]
pub struct EntryFields {
    /// SPIFFE ID to issue, e.g. spiffe://example.org/web.
    #[arg(long)]
    pub spiffe_id: Option<SpiffeId>,
    /// Parent: an agent ID, or a node alias ID.
    #[arg(long)]
    pub parent_id: Option<SpiffeId>,
    /// Selector TYPE:VALUE (repeat for several; all must match).
    #[arg(long = "selector", value_name = "TYPE:VALUE")]
    pub selectors: Vec<Selector>,
    /// X.509-SVID lifetime, e.g. 1h.
    #[arg(long, value_parser = parse_duration)]
    pub x509_ttl: Option<Duration>,
    /// JWT-SVID lifetime, e.g. 5m.
    #[arg(long, value_parser = parse_duration)]
    pub jwt_ttl: Option<Duration>,
    /// DNS SAN (repeat for several).
    #[arg(long = "dns", value_name = "NAME")]
    pub dns_names: Vec<DnsName>,
    /// Trust domain whose bundle the workload also receives (repeat).
    #[arg(long = "federates-with", value_name = "TD")]
    pub federates_with: Vec<TrustDomain>,
    /// The identity may call the admin API.
    #[arg(long)]
    pub admin: bool,
    /// What the identity may do on the admin API over mTLS: read, revoke
    /// or admin (the default with --admin); implies --admin.
    #[arg(long, value_name = "ROLE")]
    pub admin_role: Option<sigil_identity::AdminRole>,
    /// Hint passed to workloads to tell SVIDs apart.
    #[arg(long)]
    pub hint: Option<String>,
    /// Entry expiry, RFC 3339 (e.g. 2027-01-01T00:00:00Z).
    #[arg(long, value_parser = parse_rfc3339)]
    pub expires_at: Option<SystemTime>,
}

#[derive(Debug, Subcommand)]
pub enum EntryCmd {
    /// Create an entry (prints its id) or, with --data, a batch.
    Create {
        #[command(flatten)]
        fields: EntryFields,
        /// Make a node alias entry: parented to the server, selecting agents
        /// by node selectors.
        #[arg(long)]
        node: bool,
        /// JSON file with {"entries": [...]} to create in one batch.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["spiffe_id", "parent_id", "selectors"])]
        data: Option<PathBuf>,
    },
    /// Show entries matching the filters (all when none given).
    Show {
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        spiffe_id: Option<SpiffeId>,
        #[arg(long)]
        parent_id: Option<SpiffeId>,
        #[arg(long = "selector", value_name = "TYPE:VALUE")]
        selectors: Vec<Selector>,
    },
    /// Change an entry; fields not given keep their value.
    Update {
        #[arg(long)]
        id: String,
        #[command(flatten)]
        fields: EntryFields,
    },
    /// Delete entries by id.
    Delete {
        #[arg(long, required = true)]
        id: Vec<String>,
    },
    /// Count entries.
    Count,
    /// Show what `entry apply` would change: exits 0 when nothing, 2 when
    /// something would change (a CI check).
    Plan {
        #[command(flatten)]
        file: RegistrationArgs,
    },
    /// Make the owner's entries match a registration file, all or nothing.
    Apply {
        #[command(flatten)]
        file: RegistrationArgs,
        /// Only print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print entries as a registration file (all, or one owner's).
    Export {
        /// Only the entries of this owner.
        #[arg(long)]
        owner: Option<String>,
    },
}

/// The registration file flags of `entry plan` and `entry apply`.
#[derive(Debug, Args)]
pub struct RegistrationArgs {
    /// Registration file (TOML; see README "Registration files").
    #[arg(long, value_name = "FILE")]
    pub file: PathBuf,
    /// Who manages these entries; apply only ever changes this owner's
    /// entries (and adopts matching entries made by hand).
    #[arg(long, value_name = "NAME", default_value = "default")]
    pub owner: String,
    /// Also delete the owner's entries that the file no longer lists.
    #[arg(long)]
    pub prune: bool,
}

/// `entry plan` found changes: the process exits with status 2.
#[derive(Debug, thiserror::Error)]
#[error("the registration file differs from the server's entries")]
pub struct PlanHasChanges;

#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// List attested agents.
    List,
    /// Show one agent.
    Show {
        #[arg(long)]
        id: String,
    },
    /// Remove an agent; it must attest again (and may, unless banned before).
    Evict {
        #[arg(long)]
        id: String,
    },
    /// Ban an agent: its calls and re-attestation are refused until evicted.
    Ban {
        #[arg(long)]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Generate a single-use join token (printed on stdout).
    Generate {
        /// Token lifetime [default: the server's join_token.default_ttl].
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Node alias ID given to the agent that uses the token.
        #[arg(long)]
        spiffe_id: Option<SpiffeId>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BundleFormat {
    Pem,
    Jwks,
}

#[derive(Debug, Subcommand)]
pub enum BundleCmd {
    /// Print the trust bundle.
    Show {
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
}

#[derive(Debug, Subcommand)]
pub enum X509Cmd {
    /// Mint an X.509-SVID for a new local key.
    Mint {
        #[arg(long)]
        spiffe_id: SpiffeId,
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        #[arg(long = "dns", value_name = "NAME")]
        dns_names: Vec<DnsName>,
        /// Write svid.pem, svid.key (both 0600) and bundle.pem into DIR instead of stdout.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
    /// Revoke X.509-SVIDs: they go on their CA's CRL, which agents get
    /// within a second and serve to workloads (Workload API, SDS). A
    /// serial stays on the CRL until its certificate expires.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["serial", "entry"])))]
    Revoke {
        /// The SVID's serial, hex (as `openssl x509 -noout -serial` prints it).
        #[arg(long)]
        serial: Option<String>,
        /// Revoke every unexpired SVID issued for this entry's SPIFFE ID.
        #[arg(long, value_name = "ID")]
        entry: Option<String>,
        /// unspecified, key-compromise, affiliation-changed, superseded or
        /// cessation-of-operation.
        #[arg(long, default_value = "unspecified")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum JwtCmd {
    /// Mint a JWT-SVID.
    Mint {
        #[arg(long)]
        spiffe_id: SpiffeId,
        /// Audience (repeat for several).
        #[arg(long = "audience", required = true)]
        audience: Vec<String>,
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    sigil_identity::duration::parse(s).map_err(|e| e.to_string())
}

fn parse_rfc3339(s: &str) -> Result<SystemTime, String> {
    sigil_identity::clock::parse_rfc3339(s).map_err(|e| e.to_string())
}

/// An admin API time: Unix seconds, 0 for none.
fn expiry(unix: i64) -> String {
    match u64::try_from(unix) {
        Ok(secs) if secs > 0 => rfc3339(from_unix_seconds(secs)),
        _ => "never".into(),
    }
}

fn secs(d: Option<Duration>) -> i64 {
    d.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Connects to the admin API the flags chose; on failure also names the
/// flags that choose it.
async fn connect(target: &AdminTarget) -> Result<AdminClient<Channel>> {
    match target {
        AdminTarget::Socket(socket) => admin_client::connect(socket).await.map_err(|e| {
            anyhow!(
                "{:#} (set --admin-socket or SIGIL_ADMIN_SOCKET)",
                anyhow::Error::from(e)
            )
        }),
        AdminTarget::Remote { address, svid } => sigil_server::remote_admin::connect(address, svid)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the server's admin API over mTLS at {address} \
                     (set --admin-address, and --svid-dir or --workload-api)"
                )
            }),
    }
}

fn entry_json(e: &node_pb::Entry) -> Value {
    json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors,
        "x509_svid_ttl": e.x509_svid_ttl,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "dns_names": e.dns_names,
        "federates_with": e.federates_with,
        "admin": e.admin,
        "admin_role": e.admin_role,
        "hint": e.hint,
        "expires_at": e.expires_at,
        "revision": e.revision,
        "owner": e.owner,
        "name": e.name,
    })
}

fn entry_text(e: &node_pb::Entry) -> String {
    let ttl = |s: i64| {
        if s == 0 {
            "default".to_owned()
        } else {
            sigil_identity::duration::format(Duration::from_secs(s as u64))
        }
    };
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(", ")
        }
    };
    format!(
        "Entry ID       : {}\nSPIFFE ID      : {}\nParent ID      : {}\nSelectors      : {}\nX509-SVID TTL  : {}\nJWT-SVID TTL   : {}\nDNS names      : {}\nFederates with : {}\nAdmin          : {}{}\nHint           : {}\nExpires at     : {}\nRevision       : {}\n",
        e.id,
        e.spiffe_id,
        e.parent_id,
        list(&e.selectors),
        ttl(e.x509_svid_ttl),
        ttl(e.jwt_svid_ttl),
        list(&e.dns_names),
        list(&e.federates_with),
        e.admin,
        if e.admin_role.is_empty() {
            String::new()
        } else {
            format!(" (role {})", e.admin_role)
        },
        if e.hint.is_empty() { "-" } else { &e.hint },
        expiry(e.expires_at),
        e.revision
    )
}

fn agent_json(a: &pb::Agent) -> Value {
    json!({
        "id": a.id, "attestor": a.attestor, "serial": a.serial, "expires_at": a.expires_at,
        "selectors": a.selectors, "banned": a.banned, "can_reattest": a.can_reattest, "created_at": a.created_at,
    })
}

fn agent_text(a: &pb::Agent) -> String {
    format!(
        "Agent ID     : {}\nAttestor     : {}\nSerial       : {}\nSVID expires : {}\nSelectors    : {}\nBanned       : {}\nCan reattest : {}\n",
        a.id,
        a.attestor,
        a.serial,
        expiry(a.expires_at),
        a.selectors.join(", "),
        a.banned,
        a.can_reattest
    )
}

fn fields_to_entry(f: &EntryFields, base: node_pb::Entry) -> node_pb::Entry {
    let mut e = base;
    if let Some(v) = &f.spiffe_id {
        e.spiffe_id = v.to_string();
    }
    if let Some(v) = &f.parent_id {
        e.parent_id = v.to_string();
    }
    if !f.selectors.is_empty() {
        e.selectors = f.selectors.iter().map(ToString::to_string).collect();
    }
    if f.x509_ttl.is_some() {
        e.x509_svid_ttl = secs(f.x509_ttl);
    }
    if f.jwt_ttl.is_some() {
        e.jwt_svid_ttl = secs(f.jwt_ttl);
    }
    if !f.dns_names.is_empty() {
        e.dns_names = f.dns_names.iter().map(ToString::to_string).collect();
    }
    if !f.federates_with.is_empty() {
        e.federates_with = f.federates_with.iter().map(ToString::to_string).collect();
    }
    if f.admin {
        e.admin = true;
    }
    if let Some(role) = f.admin_role {
        e.admin = true;
        e.admin_role = role.to_string();
    }
    if let Some(h) = &f.hint {
        e.hint = h.clone();
    }
    if let Some(t) = f.expires_at {
        e.expires_at = i64::try_from(unix_seconds(t)).unwrap_or(i64::MAX);
    }
    e
}

/// Runs a client subcommand against the server at `socket`.
pub async fn run_client(command: Command, socket: &AdminTarget, output: Output) -> Result<()> {
    let json = output.is_json();
    match command {
        Command::Run(_) => unreachable!("run is handled by main"),
        Command::Audit(cmd) => run_audit(cmd, json).await?,
        Command::Datastore(cmd) => run_datastore(cmd, json).await?,
        Command::Healthcheck => {
            let mut c = connect(socket).await?;
            let h = c
                .health(pb::HealthRequest {})
                .await
                .map_err(RpcError)?
                .into_inner();
            if json {
                print_json(
                    &json!({"status": "serving", "trust_domain": h.trust_domain, "server_id": h.server_id,
                    "version": h.version, "bundle_sequence": h.bundle_sequence, "entries": h.entries,
                    "agents": h.agents}),
                );
            } else {
                println!(
                    "serving: trust domain {}, server id {}, version {}, bundle sequence {}, {} entries, {} agents",
                    h.trust_domain, h.server_id, h.version, h.bundle_sequence, h.entries, h.agents
                );
            }
        }
        Command::Entry(cmd) => entry(cmd, socket, output).await?,
        Command::Authority(cmd) => authority::run(cmd, socket, output).await?,
        Command::Agent(cmd) => {
            let mut c = connect(socket).await?;
            match cmd {
                AgentCmd::List => {
                    let agents = c
                        .list_agents(pb::ListAgentsRequest {})
                        .await
                        .map_err(RpcError)?
                        .into_inner()
                        .agents;
                    if json {
                        print_json(&Value::Array(agents.iter().map(agent_json).collect()));
                    } else if agents.is_empty() {
                        println!("no agents");
                    } else {
                        for a in &agents {
                            println!("{}", agent_text(a));
                        }
                    }
                }
                AgentCmd::Show { id } => {
                    let a = c
                        .get_agent(pb::AgentRequest { id })
                        .await
                        .map_err(RpcError)?
                        .into_inner();
                    output.print(&agent_json(&a), agent_text(&a));
                }
                AgentCmd::Evict { id } => {
                    let a = c
                        .evict_agent(pb::AgentRequest { id })
                        .await
                        .map_err(RpcError)?
                        .into_inner();
                    output.print(&agent_json(&a), format!("evicted {}\n", a.id));
                }
                AgentCmd::Ban { id } => {
                    let a = c
                        .ban_agent(pb::AgentRequest { id })
                        .await
                        .map_err(RpcError)?
                        .into_inner();
                    output.print(&agent_json(&a), format!("banned {}\n", a.id));
                }
            }
        }
        Command::Token(TokenCmd::Generate { ttl, spiffe_id }) => {
            let mut c = connect(socket).await?;
            let req = pb::CreateJoinTokenRequest {
                ttl: secs(ttl),
                alias: spiffe_id.map(|s| s.to_string()).unwrap_or_default(),
            };
            let t = c
                .create_join_token(req)
                .await
                .map_err(RpcError)?
                .into_inner();
            if json {
                print_json(&json!({"token": t.token, "expires_at": t.expires_at}));
            } else {
                println!("{}", t.token);
            }
        }
        Command::Bundle(BundleCmd::Show { format }) => {
            let mut c = connect(socket).await?;
            let b = c
                .get_bundle(pb::GetBundleRequest {})
                .await
                .map_err(RpcError)?
                .into_inner();
            let bundle =
                Bundle::try_from(&b).map_err(|e| anyhow!("server sent an invalid bundle: {e}"))?;
            match format {
                BundleFormat::Pem => print!("{}", bundle.x509_pem()),
                BundleFormat::Jwks => {
                    println!("{}", serde_json::to_string_pretty(&bundle.to_jwks())?)
                }
            }
        }
        Command::X509(X509Cmd::Revoke {
            serial,
            entry,
            reason,
        }) => {
            let mut c = connect(socket).await?;
            let req = pb::RevokeX509SvidRequest {
                serial: serial.unwrap_or_default(),
                entry_id: entry.unwrap_or_default(),
                reason,
            };
            let r = c
                .revoke_x509_svid(req)
                .await
                .map_err(RpcError)?
                .into_inner();
            let json = json!({
                "revoked": r.revoked.iter().map(|v| json!({
                    "serial": v.serial, "spiffe_id": v.spiffe_id, "issuer": v.issuer, "expires_at": v.expires_at,
                })).collect::<Vec<_>>(),
            });
            let text = if r.revoked.is_empty() {
                "no unexpired SVIDs to revoke\n".to_owned()
            } else {
                r.revoked
                    .iter()
                    .map(|v| {
                        format!(
                            "revoked {} ({}, CA {}, on the CRL until {})\n",
                            v.serial, v.spiffe_id, v.issuer, v.expires_at
                        )
                    })
                    .collect()
            };
            output.print(&json, text);
        }
        Command::X509(X509Cmd::Mint {
            spiffe_id,
            ttl,
            dns_names,
            write,
        }) => {
            let mut c = connect(socket).await?;
            let key = rcgen::KeyPair::generate().context("generating a key")?;
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&key)
                .context("making a CSR")?;
            let req = pb::MintX509SvidRequest {
                spiffe_id: spiffe_id.to_string(),
                csr: csr.der().to_vec(),
                ttl: secs(ttl),
                dns_names: dns_names.iter().map(ToString::to_string).collect(),
            };
            let svid = c.mint_x509_svid(req).await.map_err(RpcError)?.into_inner();
            let b = c
                .get_bundle(pb::GetBundleRequest {})
                .await
                .map_err(RpcError)?
                .into_inner();
            let bundle =
                Bundle::try_from(&b).map_err(|e| anyhow!("server sent an invalid bundle: {e}"))?;
            let chain_pem: String = svid
                .cert_chain
                .iter()
                .map(|d| sigil_identity::pem::encode("CERTIFICATE", d))
                .collect();
            let key_der = zeroize::Zeroizing::new(key.serialize_der());
            let key_pem =
                zeroize::Zeroizing::new(sigil_identity::pem::encode("PRIVATE KEY", &key_der));
            match write {
                Some(dir) => {
                    secret_file::write_svid_files(
                        &dir,
                        &svid.cert_chain,
                        &key_der,
                        &bundle.x509_authorities,
                    )?;
                    if json {
                        print_json(
                            &json!({"spiffe_id": svid.spiffe_id, "serial": svid.serial, "expires_at": svid.expires_at, "dir": dir}),
                        );
                    } else {
                        println!(
                            "wrote {0}/svid.pem, {0}/svid.key, {0}/bundle.pem for {1} (serial {2}, expires {3})",
                            dir.display(),
                            svid.spiffe_id,
                            svid.serial,
                            expiry(svid.expires_at)
                        );
                    }
                }
                None if json => {
                    print_json(&json!({"spiffe_id": svid.spiffe_id, "serial": svid.serial,
                    "expires_at": svid.expires_at, "svid_pem": chain_pem, "key_pem": key_pem.as_str(), "bundle_pem": bundle.x509_pem()}))
                }
                None => print!("{chain_pem}{}", key_pem.as_str()),
            }
        }
        Command::Jwt(JwtCmd::Mint {
            spiffe_id,
            audience,
            ttl,
        }) => {
            let mut c = connect(socket).await?;
            let req = pb::MintJwtSvidRequest {
                spiffe_id: spiffe_id.to_string(),
                audience,
                ttl: secs(ttl),
            };
            let t = c.mint_jwt_svid(req).await.map_err(RpcError)?.into_inner();
            if json {
                print_json(
                    &json!({"spiffe_id": t.spiffe_id, "token": t.token, "expires_at": t.expires_at}),
                );
            } else {
                println!("{}", t.token);
            }
        }
    }
    Ok(())
}

async fn entry(cmd: EntryCmd, socket: &AdminTarget, output: Output) -> Result<()> {
    let json = output.is_json();
    match cmd {
        EntryCmd::Create { fields, node, data } => {
            let entries: Vec<node_pb::Entry> = match data {
                Some(path) => read_batch(&path)?,
                None => {
                    let spiffe_id = fields
                        .spiffe_id
                        .as_ref()
                        .ok_or_else(|| anyhow!("--spiffe-id is required"))?;
                    let parent = match (node, &fields.parent_id) {
                        (true, None) => SpiffeId::server(&spiffe_id.trust_domain()),
                        (true, Some(_)) => {
                            bail!("--node entries are parented to the server; drop --parent-id")
                        }
                        (false, Some(p)) => p.clone(),
                        (false, None) => {
                            bail!("--parent-id is required (or --node for a node alias entry)")
                        }
                    };
                    if fields.selectors.is_empty() {
                        bail!("at least one --selector TYPE:VALUE is required");
                    }
                    let base = node_pb::Entry {
                        parent_id: parent.to_string(),
                        ..Default::default()
                    };
                    vec![fields_to_entry(&fields, base)]
                }
            };
            let mut c = connect(socket).await?;
            let results = c
                .create_entries(pb::CreateEntriesRequest { entries })
                .await
                .map_err(RpcError)?
                .into_inner()
                .results;
            let mut failed = 0;
            let mut out = Vec::new();
            for (i, r) in results.iter().enumerate() {
                let status = r.status.clone().unwrap_or_default();
                if status.code != 0 {
                    failed += 1;
                    if !json {
                        eprintln!("entry {i}: {}", status.message);
                    }
                }
                if json {
                    out.push(
                        json!({"status": {"code": status.code, "message": status.message},
                        "entry": r.entry.as_ref().map(entry_json)}),
                    );
                } else if let Some(e) = &r.entry {
                    println!("{}", e.id);
                }
            }
            if json {
                print_json(&Value::Array(out));
            }
            if failed > 0 {
                bail!("{failed} of {} entries were not created", results.len());
            }
        }
        EntryCmd::Show {
            id,
            spiffe_id,
            parent_id,
            selectors,
        } => {
            let mut c = connect(socket).await?;
            let req = pb::ListEntriesRequest {
                id: id.unwrap_or_default(),
                spiffe_id: spiffe_id.map(|s| s.to_string()).unwrap_or_default(),
                parent_id: parent_id.map(|s| s.to_string()).unwrap_or_default(),
                selectors: selectors.iter().map(ToString::to_string).collect(),
                owner: String::new(),
            };
            let entries = c
                .list_entries(req)
                .await
                .map_err(RpcError)?
                .into_inner()
                .entries;
            if json {
                print_json(&Value::Array(entries.iter().map(entry_json).collect()));
            } else if entries.is_empty() {
                println!("no matching entries");
            } else {
                for e in &entries {
                    println!("{}", entry_text(e));
                }
            }
        }
        EntryCmd::Update { id, fields } => {
            let mut c = connect(socket).await?;
            let found = c
                .list_entries(pb::ListEntriesRequest {
                    id: id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(RpcError)?
                .into_inner()
                .entries;
            let base = found
                .into_iter()
                .next()
                .ok_or_else(|| anyhow!("entry {id} not found"))?;
            let updated = fields_to_entry(&fields, base);
            let e = c
                .update_entry(pb::UpdateEntryRequest {
                    entry: Some(updated),
                })
                .await
                .map_err(RpcError)?
                .into_inner();
            output.print(&entry_json(&e), entry_text(&e));
        }
        EntryCmd::Delete { id } => {
            let mut c = connect(socket).await?;
            let results = c
                .delete_entries(pb::DeleteEntriesRequest { ids: id.clone() })
                .await
                .map_err(RpcError)?
                .into_inner()
                .results;
            let mut failed = 0;
            let mut out = Vec::new();
            for (id, r) in id.iter().zip(&results) {
                if json {
                    out.push(json!({"id": id, "code": r.code, "message": r.message}));
                } else if r.code == 0 {
                    println!("deleted {id}");
                } else {
                    eprintln!("{id}: {}", r.message);
                }
                failed += usize::from(r.code != 0);
            }
            if json {
                print_json(&Value::Array(out));
            }
            if failed > 0 {
                bail!("{failed} of {} entries were not deleted", results.len());
            }
        }
        EntryCmd::Plan { file } => apply_file(socket, output, &file, true).await?,
        EntryCmd::Apply { file, dry_run } => apply_file(socket, output, &file, dry_run).await?,
        EntryCmd::Export { owner } => {
            let mut c = connect(socket).await?;
            let req = pb::ListEntriesRequest {
                owner: owner.unwrap_or_default(),
                ..Default::default()
            };
            let wire = c
                .list_entries(req)
                .await
                .map_err(RpcError)?
                .into_inner()
                .entries;
            let entries = wire
                .into_iter()
                .map(sigil_identity::RegistrationEntry::try_from)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow!("server sent an invalid entry: {e}"))?;
            print!("{}", sigil_server::registration_file::render(&entries));
        }
        EntryCmd::Count => {
            let mut c = connect(socket).await?;
            let n = c
                .count_entries(pb::CountEntriesRequest {})
                .await
                .map_err(RpcError)?
                .into_inner()
                .count;
            output.print(&json!({"count": n}), format!("{n}\n"));
        }
    }
    Ok(())
}

/// `entry plan` (`dry_run`) and `entry apply`: checks the file, then sends
/// it as one `ApplyEntries` call and prints the plan.
async fn apply_file(
    socket: &AdminTarget,
    output: Output,
    args: &RegistrationArgs,
    dry_run: bool,
) -> Result<()> {
    let shown = args.file.display().to_string();
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("reading {shown}"))?;
    // Everything that needs no server first, so a broken file fails even
    // when the server is down.
    sigil_server::registration_file::parse(&shown, &text, None)?;
    let mut c = connect(socket).await?;
    let td = c
        .health(pb::HealthRequest {})
        .await
        .map_err(RpcError)?
        .into_inner()
        .trust_domain;
    let td = TrustDomain::new(&td).map_err(|e| anyhow!("server sent trust domain {td:?}: {e}"))?;
    let declared = sigil_server::registration_file::parse(&shown, &text, Some(&td))?;
    let req = pb::ApplyEntriesRequest {
        owner: args.owner.clone(),
        entries: declared
            .iter()
            .map(|d| node_pb::Entry::from(&d.entry))
            .collect(),
        prune: args.prune,
        dry_run,
    };
    let r = c.apply_entries(req).await.map_err(RpcError)?.into_inner();
    let json = output.is_json();
    let pending = r.changes.iter().filter(|c| c.kind != "orphan").count();
    if json {
        let changes: Vec<Value> = r
            .changes
            .iter()
            .map(|c| {
                let fields: Vec<Value> = c
                    .fields
                    .iter()
                    .map(|f| json!({"field": f.field, "old": f.old, "new": f.new}))
                    .collect();
                json!({"kind": c.kind, "name": c.name, "id": c.id, "spiffe_id": c.spiffe_id, "fields": fields})
            })
            .collect();
        print_json(&json!({"changes": changes, "applied": r.applied}));
    } else {
        print!("{}", plan_text(&r.changes, r.applied));
    }
    if dry_run && pending > 0 && !r.applied {
        return Err(PlanHasChanges.into());
    }
    Ok(())
}

/// A plan (or what was applied) for people.
fn plan_text(changes: &[pb::PlannedChange], applied: bool) -> String {
    let mut out = String::new();
    let mut counts = [0usize; 3];
    for c in changes {
        let (mark, verb, note, slot) = match c.kind.as_str() {
            "create" => ('+', "create", "", Some(0)),
            "update" => ('~', "update", "", Some(1)),
            "adopt" => ('~', "adopt", " made by hand", Some(1)),
            "delete" => ('-', "delete", "", Some(2)),
            _ => ('?', "keep", "; not in the file, --prune deletes it", None),
        };
        if let Some(i) = slot {
            counts[i] += 1;
        }
        let id = if c.id.is_empty() {
            String::new()
        } else {
            format!(", entry {}", c.id)
        };
        out.push_str(&format!(
            "{mark} {verb} {:?} ({}{id}{note})\n",
            c.name, c.spiffe_id
        ));
        for f in &c.fields {
            out.push_str(&format!("    {}: {:?} -> {:?}\n", f.field, f.old, f.new));
        }
    }
    let [create, update, delete] = counts;
    if create + update + delete == 0 {
        out.push_str("No changes: the server matches the file.\n");
    } else {
        let done = if applied { "Applied" } else { "Plan" };
        out.push_str(&format!(
            "{done}: {create} to create, {update} to update, {delete} to delete.\n"
        ));
    }
    out
}

/// Reads a batch file: `{"entries": [{"spiffe_id": ..., "parent_id": ...,
/// "selectors": [...], ...}]}` with the same field names as `--output json`.
fn read_batch(path: &Path) -> Result<Vec<node_pb::Entry>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let list = doc
        .get("entries")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("{}: expected {{\"entries\": [...]}}", path.display()))?;
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            let s = |k: &str| {
                v.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            let strings = |k: &str| -> Vec<String> {
                v.get(k)
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let int = |k: &str| v.get(k).and_then(Value::as_i64).unwrap_or(0);
            if !v.is_object() {
                bail!("{}: entry {i} is not an object", path.display());
            }
            Ok(node_pb::Entry {
                id: s("id"),
                spiffe_id: s("spiffe_id"),
                parent_id: s("parent_id"),
                selectors: strings("selectors"),
                x509_svid_ttl: int("x509_svid_ttl"),
                jwt_svid_ttl: int("jwt_svid_ttl"),
                dns_names: strings("dns_names"),
                federates_with: strings("federates_with"),
                admin: v.get("admin").and_then(Value::as_bool).unwrap_or(false),
                admin_role: s("admin_role"),
                hint: s("hint"),
                expires_at: int("expires_at"),
                revision: 0,
                ..Default::default()
            })
        })
        .collect()
}

/// The admin socket to use: the flag/env value or the default.
pub fn admin_socket(cli: &Cli) -> PathBuf {
    cli.admin_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET))
}

// ---- `audit`: the logic is in sigil_server::audit::review. ----

/// Where an offline audit command finds the server's data.
#[derive(Debug, Args)]
pub struct AuditDataDir {
    /// The server's data directory [default: /var/lib/sigil/server].
    #[arg(long, value_name = "DIR", default_value = sigil_server::config::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The server's config file instead: its data_dir and datastore (a
    /// PostgreSQL datastore is read from the database).
    #[arg(long, value_name = "FILE", conflicts_with = "data_dir")]
    pub config: Option<PathBuf>,
}

impl AuditDataDir {
    /// The data directory, and the PostgreSQL datastore if the config
    /// names one.
    async fn resolve(
        &self,
    ) -> Result<(
        PathBuf,
        Option<std::sync::Arc<dyn sigil_server::datastore::Datastore>>,
    )> {
        let Some(file) = &self.config else {
            return Ok((self.data_dir.clone(), None));
        };
        let cfg = sigil_server::config::ServerConfig::load(Some(file), Default::default())?;
        if cfg.datastore.kind != sigil_server::config::DatastoreKind::Postgres {
            return Ok((cfg.data_dir, None));
        }
        let store = sigil_server::catalog::open_datastore(&cfg).await?;
        Ok((cfg.data_dir, Some(store)))
    }

    /// The datastore holding the audit log.
    async fn open(
        &self,
    ) -> Result<(
        PathBuf,
        std::sync::Arc<dyn sigil_server::datastore::Datastore>,
    )> {
        let (dir, store) = self.resolve().await?;
        let store = match store {
            Some(s) => s,
            None => std::sync::Arc::new(sigil_server::audit::review::open_datastore(&dir)?),
        };
        Ok((dir, store))
    }
}

async fn run_datastore(cmd: DatastoreCmd, json: bool) -> Result<()> {
    use sigil_server::datastore::{SledDatastore, postgres};
    let DatastoreCmd::Migrate {
        from_sled,
        config,
        force,
    } = cmd;
    let cfg = sigil_server::config::ServerConfig::load(Some(&config), Default::default())?;
    let Some(connection) = cfg
        .datastore
        .connection
        .as_ref()
        .filter(|_| cfg.datastore.kind == sigil_server::config::DatastoreKind::Postgres)
    else {
        bail!(
            "{}: the target must be a PostgreSQL datastore ([datastore] type = \"postgres\" with a connection)",
            config.display()
        );
    };
    // The data directory or the datastore directory in it.
    let dir = if from_sled.join("datastore").join("db").is_file() {
        from_sled.join("datastore")
    } else if from_sled.join("db").is_file() {
        from_sled.clone()
    } else {
        bail!(
            "no sled datastore in {} (pass the server's data directory)",
            from_sled.display()
        );
    };
    let source = SledDatastore::open(&dir)
        .with_context(|| format!("cannot open the sled datastore in {}", dir.display()))?;
    let settings =
        postgres::PgSettings::parse(connection.expose(), cfg.datastore.password_file.as_deref())?;
    let shown = settings.to_string();
    let options = postgres::PgOptions {
        pool_size: 2,
        poll_interval: cfg.datastore.poll_interval,
    };
    let target = postgres::PostgresDatastore::open(settings, options)
        .await
        .with_context(|| format!("cannot open the PostgreSQL datastore ({shown})"))?;
    if !json {
        println!("migrating {} into PostgreSQL ({shown})", dir.display());
    }
    let mut progress = |what: &str, done: usize| {
        if !json {
            println!("  {what}: {done}");
        }
    };
    // The replica whose data directory (CA keys) this is.
    let server_id = sigil_server::server_id::ServerId::load_or_create(
        cfg.server.server_id.as_ref(),
        &cfg.data_dir,
    )?;
    let summary = target
        .import(&source, &server_id, force, &mut progress)
        .await
        .context("migration failed; nothing was written to the target")?;
    if json {
        print_json(&json!({
            "entries": summary.entries, "agents": summary.agents,
            "join_tokens": summary.join_tokens, "bundles": summary.bundles,
            "ca_journals": summary.ca_journals, "audit_records": summary.audit_records,
            "audit_checkpoints": summary.audit_checkpoints, "revision": summary.revision,
        }));
    } else {
        println!(
            "done: {} entries, {} agents, {} join tokens, {} bundles, {} CA journals, {} audit records, {} audit checkpoints (revision {}). Keep the data directory's keys/ and audit key with the servers that use this database.",
            summary.entries,
            summary.agents,
            summary.join_tokens,
            summary.bundles,
            summary.ca_journals,
            summary.audit_records,
            summary.audit_checkpoints,
            summary.revision
        );
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// List audit records, oldest first (stop the server first).
    Show {
        #[command(flatten)]
        dir: AuditDataDir,
        /// Only records at or after this time, RFC 3339.
        #[arg(long, value_parser = parse_rfc3339)]
        since: Option<SystemTime>,
        /// Only this action, e.g. entry.create.
        #[arg(long)]
        action: Option<String>,
        /// Only this caller, e.g. uid:0 or a SPIFFE ID.
        #[arg(long)]
        actor: Option<String>,
    },
    /// Check the hash chain and the signed checkpoints; exit non-zero at
    /// the first record that breaks them (stop the server first).
    Verify {
        #[command(flatten)]
        dir: AuditDataDir,
        /// A checkpoint kept elsewhere (from `audit checkpoint --write`).
        #[arg(long, value_name = "FILE")]
        checkpoint: Option<PathBuf>,
        /// The audit public key kept elsewhere [default: audit-key.pub in the data directory].
        #[arg(long, value_name = "FILE")]
        public_key: Option<PathBuf>,
        /// Accept a --checkpoint at or behind the oldest kept record (its
        /// records were removed by retention) instead of failing.
        #[arg(long)]
        allow_pruned: bool,
    },
    /// Export the latest signed checkpoint, to keep off this machine.
    Checkpoint {
        #[command(flatten)]
        dir: AuditDataDir,
        /// Where to write it.
        #[arg(long, value_name = "FILE")]
        write: PathBuf,
    },
}

async fn run_audit(cmd: AuditCmd, json: bool) -> Result<()> {
    use sigil_server::audit::{checkpoint, review};
    match cmd {
        AuditCmd::Show {
            dir,
            since,
            action,
            actor,
        } => {
            let (_, store) = dir.open().await?;
            let filter = review::ShowFilter {
                since,
                action,
                actor,
            };
            let mut rows = Vec::new();
            review::show(&*store, &filter, |r| {
                if json {
                    rows.push(json!(r));
                } else {
                    let e = &r.event;
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        r.seq,
                        rfc3339(e.time),
                        e.caller,
                        e.action,
                        e.target,
                        e.outcome
                    );
                }
            })
            .await?;
            if json {
                print_json(&Value::Array(rows));
            }
        }
        AuditCmd::Verify {
            dir,
            checkpoint: cp_file,
            public_key,
            allow_pruned,
        } => {
            let (data_dir, store) = dir.open().await?;
            let key_file = public_key
                .clone()
                .unwrap_or_else(|| data_dir.join(checkpoint::PUBLIC_KEY_FILE));
            let key = if public_key.is_some() || key_file.exists() {
                Some(review::read_public_key(&key_file)?)
            } else {
                None
            };
            let note = cp_file
                .as_ref()
                .map(|f| {
                    std::fs::read_to_string(f)
                        .with_context(|| format!("cannot read checkpoint {}", f.display()))
                })
                .transpose()?;
            let opts = review::VerifyOptions {
                key,
                checkpoint: note,
                allow_pruned,
            };
            // Where the key came from: one in the data directory is not
            // independent of the data it checks.
            let key_source = match (&opts.key, &public_key) {
                (None, _) => "none",
                (Some(_), None) => "data_dir",
                (Some(_), Some(_)) => "given",
            };
            match review::verify(&*store, &opts).await {
                Ok(r) if json => print_json(&json!({
                    "verified": true, "records": r.records, "legacy_records": r.legacy,
                    "from": r.anchor.map_or(0, |a| a.seq), "to": r.head.seq,
                    "checkpoints": r.checkpoints, "pruned_checkpoints": r.pruned_checkpoints,
                    "anchor": r.anchor.map(|a| a.seq), "public_key": key_source,
                })),
                Ok(r) => println!(
                    "audit log verified: {} chained records after record {} up to record {}, {} checkpoints matched{}{}{}\npublic key: {key_source}",
                    r.records,
                    r.anchor.map_or(0, |a| a.seq),
                    r.head.seq,
                    r.checkpoints,
                    match r.anchor {
                        Some(a) => format!(
                            "; records up to the anchor (record {}) were pruned, {} checkpoints of them not checked",
                            a.seq, r.pruned_checkpoints
                        ),
                        None => String::new(),
                    },
                    if r.legacy > 0 {
                        format!(
                            ", {} records written before the chain not covered",
                            r.legacy
                        )
                    } else {
                        String::new()
                    },
                    match (&opts.key, &public_key) {
                        (None, _) => "; no public key, so checkpoints were not checked",
                        (Some(_), None) => {
                            "; the public key came from the data directory: pass --public-key with a copy kept elsewhere"
                        }
                        (Some(_), Some(_)) => "",
                    }
                ),
                Err(e) => {
                    if json {
                        print_json(
                            &json!({"verified": false, "record": e.seq(), "error": e.to_string()}),
                        );
                    }
                    return Err(e.into());
                }
            }
        }
        AuditCmd::Checkpoint { dir, write } => {
            let note = match dir.resolve().await? {
                (_, Some(store)) => store
                    .latest_audit_checkpoint()
                    .await?
                    .map(|(_, note)| note)
                    .ok_or_else(|| anyhow!("no audit checkpoint in the database yet"))?,
                (data_dir, None) => review::latest_checkpoint(&data_dir).await?,
            };
            std::fs::write(&write, &note)
                .with_context(|| format!("cannot write {}", write.display()))?;
            if json {
                print_json(&json!({"written": write}));
            } else {
                println!("checkpoint written to {}", write.display());
            }
        }
    }
    Ok(())
}
