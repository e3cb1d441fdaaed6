//! The `sigil-agent` command line: `run` starts the agent; `api …` and
//! `healthcheck` talk to a running agent's Workload API as a workload would.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use sigil_agent::config::DEFAULT_SOCKET;
use sigil_agent::workload_client::{self, FetchError, X509SvidInfo, request};
use sigil_identity::clock::{rfc3339, unix_seconds};
use sigil_identity::secret_file;
use sigil_proto::channel::RpcError;
use sigil_proto::output::Output;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_proto::workload::*;
use tonic::transport::Channel;

/// Top-level flags and the subcommand.
#[derive(Debug, Parser)]
#[command(
    name = "sigil-agent",
    version,
    about = "Sigil node agent: serves SPIFFE identities to local workloads",
    long_about = "Sigil node agent. `sigil-agent run` starts the agent; `api` and \
                  `healthcheck` call a running agent's SPIFFE Workload API as the \
                  calling process, and receive that process's identities."
)]
pub struct Cli {
    /// Workload API socket [default: $SPIFFE_ENDPOINT_SOCKET, then /run/sigil/agent/api.sock].
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<String>,
    /// Output format for data.
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent.
    Run(RunArgs),
    /// Call the Workload API.
    #[command(subcommand)]
    Api(ApiCmd),
    /// Exit 0 when the agent answers on its Workload API socket.
    Healthcheck,
}

/// `run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML configuration file (see deploy/examples/agent.toml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Log level or filter, overriding the file.
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log format, overriding the file.
    #[arg(long, value_enum)]
    pub log_format: Option<sigil_agent::config::LogFormat>,
}

#[derive(Debug, Subcommand)]
pub enum ApiCmd {
    /// Fetch this process's SVIDs.
    #[command(subcommand)]
    Fetch(FetchCmd),
    /// Validate a JWT-SVID.
    #[command(subcommand)]
    Validate(ValidateCmd),
    /// Print every X.509-SVID update until interrupted.
    Watch,
}

#[derive(Debug, Subcommand)]
pub enum FetchCmd {
    /// X.509-SVIDs; with --write, svid.pem, svid.key (both 0600) and bundle.pem.
    X509 {
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
    /// A JWT-SVID for the audience.
    Jwt {
        #[arg(long = "audience", required = true)]
        audience: Vec<String>,
        #[arg(long)]
        spiffe_id: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ValidateCmd {
    /// Validate a JWT-SVID for an audience.
    Jwt {
        #[arg(long)]
        audience: String,
        #[arg(long)]
        svid: String,
    },
}

/// The socket to use: the flag, then `SPIFFE_ENDPOINT_SOCKET`, then the
/// default. `unix:` / `unix://` prefixes are accepted.
pub fn socket_path(flag: Option<&str>) -> PathBuf {
    let raw = flag
        .map(str::to_owned)
        .or_else(|| std::env::var("SPIFFE_ENDPOINT_SOCKET").ok())
        .unwrap_or_else(|| DEFAULT_SOCKET.into());
    let path = raw
        .strip_prefix("unix://")
        .or_else(|| raw.strip_prefix("unix:"))
        .unwrap_or(&raw);
    PathBuf::from(path)
}

/// Connects to the Workload API; on failure also names the flag and the
/// variable that choose the socket.
async fn connect(socket: &Path) -> Result<SpiffeWorkloadApiClient<Channel>> {
    workload_client::connect(socket)
        .await
        .map_err(with_socket_hint)
}

fn with_socket_hint(e: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow!("{:#} (set --socket or SPIFFE_ENDPOINT_SOCKET)", e.into())
}

/// An X.509-SVID as JSON.
fn svid_json(svid: &X509SvidInfo) -> Value {
    json!({
        "spiffe_id": svid.spiffe_id,
        "serial": svid.serial,
        "expires_at": unix_seconds(svid.expires_at),
        "hint": svid.hint,
    })
}

/// Runs a client subcommand against the agent at `socket`.
pub async fn run_client(command: Command, socket: &Path, output: Output) -> Result<()> {
    match command {
        Command::Run(_) => unreachable!("run is handled by main"),
        Command::Healthcheck => {
            use sigil_proto::grpc::health::v1::{HealthCheckRequest, health_client::HealthClient};
            let channel = workload_client::channel(socket)
                .await
                .map_err(with_socket_hint)?;
            let r = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(RpcError)?
                .into_inner();
            if r.status != 1 {
                bail!(
                    "the agent is not serving: it has no trust bundle from the server yet, or \
                     the server revoked it (see the agent's log)"
                );
            }
            output.print(&json!({"status": "serving"}), "serving\n");
        }
        Command::Api(ApiCmd::Fetch(FetchCmd::X509 { write })) => {
            let msg = match workload_client::fetch_x509(socket).await {
                Err(FetchError::Connect(e)) => return Err(with_socket_hint(e)),
                r => r?,
            };
            let svids = msg
                .svids
                .iter()
                .map(X509SvidInfo::read)
                .collect::<Result<Vec<_>, _>>()?;
            for svid in &svids {
                output.print(&svid_json(svid), format!("{svid}\n"));
            }
            if let (Some(dir), Some(first), Some(info)) = (write, msg.svids.first(), svids.first())
            {
                secret_file::write_svid_files(
                    &dir,
                    &info.chain,
                    &first.x509_svid_key,
                    &info.bundle,
                )?;
                if !output.is_json() {
                    println!(
                        "wrote {0}/svid.pem, {0}/svid.key, {0}/bundle.pem",
                        dir.display()
                    );
                }
            }
        }
        Command::Api(ApiCmd::Fetch(FetchCmd::Jwt {
            audience,
            spiffe_id,
        })) => {
            let req = JwtsvidRequest {
                audience,
                spiffe_id: spiffe_id.unwrap_or_default(),
            };
            let r = connect(socket)
                .await?
                .fetch_jwtsvid(request(req))
                .await
                .map_err(RpcError)?
                .into_inner();
            for s in r.svids {
                output.print(
                    &json!({"spiffe_id": s.spiffe_id, "token": s.svid}),
                    format!("{}\n", s.svid),
                );
            }
        }
        Command::Api(ApiCmd::Validate(ValidateCmd::Jwt { audience, svid })) => {
            let r = connect(socket)
                .await?
                .validate_jwtsvid(request(ValidateJwtsvidRequest { audience, svid }))
                .await
                .map_err(RpcError)?
                .into_inner();
            output.print(
                &json!({"valid": true, "spiffe_id": r.spiffe_id}),
                format!("valid: {}\n", r.spiffe_id),
            );
        }
        Command::Api(ApiCmd::Watch) => {
            let mut stream = connect(socket)
                .await?
                .fetch_x509svid(request(X509svidRequest {}))
                .await
                .map_err(RpcError)?
                .into_inner();
            while let Some(msg) = stream.message().await.map_err(RpcError)? {
                for svid in &msg.svids {
                    let svid = X509SvidInfo::read(svid)?;
                    let text = format!(
                        "{} serial={} expires={}\n",
                        svid.spiffe_id,
                        svid.serial,
                        rfc3339(svid.expires_at)
                    );
                    output.print(&svid_json(&svid), text);
                }
                std::io::stdout().flush()?;
            }
        }
    }
    Ok(())
}
