//! Wiring: builds every part of the agent from an [`AgentConfig`] and runs
//! it until shutdown, as `sigil_server::server::run` does for the server.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sigil_attestors::unix::UnixAttestor;
use tokio::net::UnixListener;
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::session::{AgentError, Session};
use crate::workload_api::{self, WorkloadApi};

/// How long shutdown waits for Workload API connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs the agent until `shutdown` resolves: attests (or resumes on its
/// stored SVID), serves the Workload API on `listener` (bound by the
/// caller, e.g. with [`workload_api::bind`]) and keeps its session with the
/// server; then stops serving, waiting at most five seconds for open
/// Workload API connections.
pub async fn run(
    config: AgentConfig,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    raise_open_files_limit();
    let attestor = Arc::new(UnixAttestor::new(config.max_hash_bytes));
    let workload_attestors = crate::workload_attestors::from_config(&config)?;
    let max_streams_per_uid = config.max_streams_per_uid;
    let jwt_fetches_per_uid = config.jwt_fetches_per_uid_per_second;
    let (max_connections, max_connections_per_uid) =
        (config.max_connections, config.max_connections_per_uid);
    let unary_rate = config.unary_calls_per_uid_per_second;
    let telemetry_bind = config.telemetry.bind;
    let sds_names = config.sds.clone();
    let session = Session::start(config).await?;
    let api = WorkloadApi::new(session.clone(), attestor)
        .with_workload_attestors(workload_attestors)
        .with_max_streams_per_uid(max_streams_per_uid)
        .with_jwt_fetches_per_uid(jwt_fetches_per_uid)
        .with_max_connections(max_connections, max_connections_per_uid)
        .with_unary_calls_per_uid_per_second(unary_rate)
        .with_sds_names(sds_names);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let rpc_metrics = match telemetry_bind {
        Some(addr) => Some(
            crate::telemetry::spawn(addr, &session, &api, stopped(stop_rx.clone()))
                .await
                .map_err(|e| AgentError::Telemetry(addr, e))?,
        ),
        None => None,
    };
    let socket = listener.local_addr().ok();
    let serving = tokio::spawn(workload_api::serve_with_metrics(
        api,
        listener,
        stopped(stop_rx),
        rpc_metrics,
    ));
    info!(socket = ?socket.as_ref().and_then(|s| s.as_pathname()), "Workload API serving");
    let result = session
        .run(async {
            shutdown.await;
            info!("shutting down");
        })
        .await;
    let _ = stop_tx.send(true);
    match tokio::time::timeout(SHUTDOWN_GRACE, serving).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "the Workload API stopped with an error"),
        Err(_) => {
            warn!(grace = ?SHUTDOWN_GRACE, "Workload API connections still open after the shutdown grace period")
        }
        _ => {}
    }
    info!("sigil-agent stopped");
    result
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

/// The shared SIGINT/SIGTERM future, kept at its old path.
pub use sigil_proto::process::shutdown_signal;
