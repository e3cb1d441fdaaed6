//! The `sigil-agent` command line: `run` starts the agent; `api …` and
//! `healthcheck` talk to a running agent's Workload API as a workload would.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_proto::workload::*;
use tonic::transport::Channel;

use crate::config::DEFAULT_SOCKET;

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

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
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
    pub log_format: Option<crate::config::LogFormat>,
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

fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

async fn connect(socket: &Path) -> Result<SpiffeWorkloadApiClient<Channel>> {
    let channel = sigil_proto::channel::unix_channel(socket).await.with_context(|| {
        format!("cannot reach the Workload API at {}; is the agent running? (set --socket or SPIFFE_ENDPOINT_SOCKET)", socket.display())
    })?;
    Ok(SpiffeWorkloadApiClient::new(channel))
}

fn rpc(s: tonic::Status) -> anyhow::Error {
    anyhow!("{} ({:?})", s.message(), s.code())
}

/// Splits concatenated DER certificates.
fn split_der(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (tlv, rest) = sigil_identity::der::read(bytes)
            .map_err(|_| anyhow!("the agent sent malformed DER"))?;
        out.push(tlv.whole.to_vec());
        bytes = rest;
    }
    Ok(out)
}

fn describe(svid: &X509svid) -> Result<Value> {
    let chain = split_der(&svid.x509_svid)?;
    let leaf = sigil_identity::x509::parse(chain.first().ok_or_else(|| anyhow!("empty SVID"))?)?;
    let (_, na) = sigil_identity::x509::validity(&leaf);
    Ok(json!({
        "spiffe_id": svid.spiffe_id,
        "serial": sigil_identity::x509::serial_hex(&leaf),
        "expires_at": sigil_identity::clock::unix_seconds(na),
        "hint": svid.hint,
    }))
}

fn print(json_out: bool, value: &Value, text: String) -> Result<()> {
    if json_out {
        println!("{}", serde_json::to_string(value)?);
    } else {
        println!("{text}");
    }
    Ok(())
}

fn rfc3339(unix: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix).unwrap_or(0))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

fn write_files(dir: &Path, svid: &X509svid) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let pem = |ders: Vec<Vec<u8>>| {
        ders.iter()
            .map(|d| sigil_identity::pem::encode("CERTIFICATE", d))
            .collect::<String>()
    };
    // Created with their final mode, never through a symlink, replaced
    // atomically.
    let put = |name: &str, text: &str, mode: u32| -> Result<()> {
        let path = dir.join(name);
        sigil_identity::secret_file::write(&path, text.as_bytes(), mode)
            .with_context(|| format!("writing {}", path.display()))
    };
    put(
        "svid.key",
        &sigil_identity::pem::encode("PRIVATE KEY", &svid.x509_svid_key),
        0o600,
    )?;
    put("svid.pem", &pem(split_der(&svid.x509_svid)?), 0o600)?;
    put("bundle.pem", &pem(split_der(&svid.bundle)?), 0o644)
}

/// Runs a client subcommand against the agent at `socket`.
pub async fn run_client(command: Command, socket: &Path, output: Output) -> Result<()> {
    let json_out = output == Output::Json;
    let mut c = connect(socket).await?;
    match command {
        Command::Run(_) => unreachable!("run is handled by main"),
        Command::Healthcheck => {
            use sigil_proto::grpc::health::v1::{HealthCheckRequest, health_client::HealthClient};
            let channel = sigil_proto::channel::unix_channel(socket).await?;
            let r = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(rpc)?
                .into_inner();
            if r.status != 1 {
                bail!(
                    "the agent is not serving: it has no trust bundle from the server yet, or \
                     the server revoked it (see the agent's log)"
                );
            }
            print(json_out, &json!({"status": "serving"}), "serving".into())?;
        }
        Command::Api(ApiCmd::Fetch(FetchCmd::X509 { write })) => {
            let mut stream = c
                .fetch_x509svid(request(X509svidRequest {}))
                .await
                .map_err(rpc)?
                .into_inner();
            let msg = stream
                .message()
                .await
                .map_err(rpc)?
                .ok_or_else(|| anyhow!("the agent sent nothing"))?;
            for svid in &msg.svids {
                let d = describe(svid)?;
                let text = format!(
                    "SPIFFE ID : {}\nSerial    : {}\nExpires   : {}",
                    svid.spiffe_id,
                    d["serial"].as_str().unwrap_or_default(),
                    rfc3339(d["expires_at"].as_u64().unwrap_or(0))
                );
                print(json_out, &d, text)?;
            }
            if let (Some(dir), Some(first)) = (write, msg.svids.first()) {
                write_files(&dir, first)?;
                if !json_out {
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
            let r = c
                .fetch_jwtsvid(request(req))
                .await
                .map_err(rpc)?
                .into_inner();
            for s in r.svids {
                print(
                    json_out,
                    &json!({"spiffe_id": s.spiffe_id, "token": s.svid}),
                    s.svid.clone(),
                )?;
            }
        }
        Command::Api(ApiCmd::Validate(ValidateCmd::Jwt { audience, svid })) => {
            let r = c
                .validate_jwtsvid(request(ValidateJwtsvidRequest { audience, svid }))
                .await
                .map_err(rpc)?
                .into_inner();
            print(
                json_out,
                &json!({"valid": true, "spiffe_id": r.spiffe_id}),
                format!("valid: {}", r.spiffe_id),
            )?;
        }
        Command::Api(ApiCmd::Watch) => {
            let mut stream = c
                .fetch_x509svid(request(X509svidRequest {}))
                .await
                .map_err(rpc)?
                .into_inner();
            while let Some(msg) = stream.message().await.map_err(rpc)? {
                for svid in &msg.svids {
                    let d = describe(svid)?;
                    let text = format!(
                        "{} serial={} expires={}",
                        svid.spiffe_id,
                        d["serial"].as_str().unwrap_or_default(),
                        rfc3339(d["expires_at"].as_u64().unwrap_or(0))
                    );
                    print(json_out, &d, text)?;
                }
                std::io::stdout().flush()?;
            }
        }
    }
    Ok(())
}
