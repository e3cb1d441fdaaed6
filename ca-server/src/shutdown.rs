//! Stopping: the signals that stop the server, and the wait every task and
//! stream uses to end with it.

/// The shared SIGINT/SIGTERM future, kept at its old path.
pub use sigil_proto::process::shutdown_signal;

/// Resolves once `rx` says the server is stopping.
pub(crate) async fn wait_for_stop(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
