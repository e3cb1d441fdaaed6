//! `sigil-agent`: parse flags, load config, install logging, run.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use sigil_agent::cli::{self, Cli, Command};
use sigil_agent::config::AgentConfig;
use sigil_agent::manager::Agent;
use sigil_agent::workload_api::{self, WorkloadApi};
use sigil_attestors::unix::UnixAttestor;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

/// Raises the soft limit on open files to the hard limit: every Workload
/// API connection takes a descriptor, and the usual soft limit (1024) is
/// below what a busy node needs.
fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (Some(soft), Some(hard)) = (limit.current, limit.maximum) else {
        return;
    };
    if soft >= hard {
        return;
    }
    let raised = Rlimit {
        current: Some(hard),
        maximum: Some(hard),
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => info!(from = soft, to = hard, "raised the open files limit"),
        Err(e) => warn!(limit = soft, error = %e, "cannot raise the open files limit"),
    }
}

async fn run(args: cli::RunArgs) -> anyhow::Result<()> {
    let mut config = AgentConfig::load(&args.config)?;
    if let Some(level) = args.log_level {
        config.log_level = level;
    }
    let filter = EnvFilter::try_new(&config.log_level)
        .with_context(|| format!("invalid log level {:?}", config.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    raise_open_files_limit();
    let socket = config.socket_path.clone();
    let max_streams_per_uid = config.max_streams_per_uid;
    let jwt_fetches_per_uid = config.jwt_fetches_per_uid_per_second;
    let (max_connections, max_connections_per_uid) =
        (config.max_connections, config.max_connections_per_uid);
    let unary_rate = config.unary_calls_per_uid_per_second;
    let telemetry_bind = config.telemetry.bind;
    let attestor = Arc::new(UnixAttestor::new(config.max_hash_bytes));
    let workload_attestors = sigil_agent::workload_attestors::from_config(&config)?;
    let agent = Agent::start(config).await?;
    let listener = workload_api::bind(&socket)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let workload_api = WorkloadApi::new(agent.clone(), attestor)
        .with_workload_attestors(workload_attestors)
        .with_max_streams_per_uid(max_streams_per_uid)
        .with_jwt_fetches_per_uid(jwt_fetches_per_uid)
        .with_max_connections(max_connections, max_connections_per_uid)
        .with_unary_calls_per_uid_per_second(unary_rate);
    let rpc_metrics = match telemetry_bind {
        Some(addr) => Some(
            sigil_agent::telemetry::spawn(addr, &agent, &workload_api, wait(stop_rx.clone()))
                .await?,
        ),
        None => None,
    };
    let api = tokio::spawn(workload_api::serve_with_metrics(
        workload_api,
        listener,
        wait(stop_rx.clone()),
        rpc_metrics,
    ));
    info!(socket = %socket.display(), "Workload API serving");
    let result = agent
        .run(async {
            shutdown_signal().await;
            info!("shutting down");
        })
        .await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), api).await;
    info!("sigil-agent stopped");
    result.map_err(Into::into)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let socket = cli::socket_path(cli.socket.as_deref());
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            command => cli::run_client(command, &socket, cli.output).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
