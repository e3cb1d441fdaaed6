//! Stopping: the signals that stop the server, the stop watch every task
//! and stream ends with, and the grace period for open connections.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

/// The shared SIGINT/SIGTERM future, kept at its old path.
pub use sigil_proto::process::shutdown_signal;

/// A stop watch that turns true once `shutdown` resolves.
pub(crate) fn stop_when(
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> watch::Receiver<bool> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        info!("shutting down");
        let _ = stop_tx.send(true);
    });
    stop_rx
}

/// Resolves once `rx` says the server is stopping.
pub(crate) async fn wait_for_stop(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Runs `serve` to its end, but gives up `grace` after the stop: servers
/// stop accepting at once and let calls in flight finish, yet clients that
/// keep connections open must not hold the shutdown. `None` when the grace
/// period ran out.
pub(crate) async fn within_grace<T>(
    serve: impl Future<Output = T>,
    stop: watch::Receiver<bool>,
    grace: Duration,
) -> Option<T> {
    let deadline = async {
        wait_for_stop(stop).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = serve => Some(r),
        () = deadline => {
            warn!(?grace, "connections still open after the shutdown grace period; closing them");
            None
        }
    }
}
