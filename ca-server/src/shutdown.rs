//! Stopping: the signals that stop the server, and the wait every task and
//! stream uses to end with it.

use std::future::Future;

use tracing::warn;

/// A future that resolves on the first SIGINT (Ctrl-C) or SIGTERM: the
/// usual `shutdown` for [`run`]. The handlers are installed by this call,
/// not on the first poll, so a signal arriving in between is not lost.
/// Must be called inside the Tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        match (interrupt, terminate) {
            (Ok(mut i), Ok(mut t)) => {
                tokio::select! {
                    _ = i.recv() => {}
                    _ = t.recv() => {}
                }
            }
            (Ok(mut one), Err(e)) | (Err(e), Ok(mut one)) => {
                warn!(error = %e, "cannot handle one of SIGINT/SIGTERM");
                one.recv().await;
            }
            (Err(e), Err(_)) => {
                warn!(error = %e, "cannot handle SIGINT or SIGTERM; stop the process with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Resolves once `rx` says the server is stopping.
pub(crate) async fn wait_for_stop(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
