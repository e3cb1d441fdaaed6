//! The wake-up for readers of the change feed: a dedicated, unpooled
//! connection that `LISTEN`s on `sigil_changes` (pooled connections drop
//! notifications). NOTIFY has no replay, so after every (re)connect the
//! listener reads the current revision and bumps the hint: readers then
//! catch up from `sigil_changes` whatever was missed. The connection is
//! checked every `poll` with that same read, which also wakes readers when
//! a notification was lost; a failure reconnects with a back-off.

use std::future::poll_fn;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{debug, info, warn};

use super::CHANNEL;

/// Longest wait for the listener's check query.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Raises the hint to `rev`; always wakes its readers (a reconnect bumps
/// it with a revision they may have seen, so they check again).
pub fn bump(hint: &watch::Sender<u64>, rev: u64) {
    hint.send_modify(|v| *v = (*v).max(rev));
}

/// Runs until the task is aborted (the datastore is dropped).
pub async fn run(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    hint: watch::Sender<u64>,
    poll: Duration,
) {
    let mut backoff = MIN_BACKOFF;
    let mut was_down = false;
    loop {
        match session(&config, &tls, &hint, poll, &mut backoff, &mut was_down).await {
            Ok(()) => {}
            Err(e) => {
                if !was_down {
                    warn!(error = %e, "change listener lost its database connection; reconnecting");
                } else {
                    debug!(error = %e, "change listener still cannot reach the database");
                }
                was_down = true;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection: LISTEN, bump the hint, forward notifications and check
/// the connection every `poll`, until it fails.
async fn session(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    hint: &watch::Sender<u64>,
    poll: Duration,
    backoff: &mut Duration,
    was_down: &mut bool,
) -> Result<(), String> {
    let (client, mut connection) = config
        .connect(tls.clone())
        .await
        .map_err(|e| super::redact(&e))?;
    // The connection must be polled for the client's queries to run, and
    // its notifications come only from `poll_message`.
    let (tx, mut notes) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(Some(n.payload().to_owned())).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let _ = tx.send(None);
                    debug!(error = %super::redact(&e), "change listener connection failed");
                    return;
                }
                None => {
                    let _ = tx.send(None);
                    return;
                }
            }
        }
    });
    let result = async {
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(|e| super::redact(&e))?;
        // LISTEN is committed: whatever committed before it is in the table.
        let check = || async {
            let row = tokio::time::timeout(
                CHECK_TIMEOUT,
                client.query_one("SELECT rev FROM sigil_revision WHERE id = 1", &[]),
            )
            .await
            .map_err(|_| "the database did not answer the listener's check in time".to_owned())?
            .map_err(|e| super::redact(&e))?;
            Ok::<u64, String>(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
        };
        bump(hint, check().await?);
        if *was_down {
            info!("change listener reconnected; readers catch up");
            *was_down = false;
        }
        *backoff = MIN_BACKOFF;
        let mut tick = tokio::time::interval(poll);
        tick.tick().await;
        loop {
            tokio::select! {
                note = notes.recv() => match note {
                    Some(Some(payload)) => {
                        if let Ok(rev) = payload.parse::<u64>() {
                            bump(hint, rev);
                        }
                    }
                    _ => return Err("the listener's connection closed".to_owned()),
                },
                _ = tick.tick() => {
                    // Wakes readers only for a revision they were not told
                    // of (a lost notification).
                    let rev = check().await?;
                    hint.send_if_modified(|v| {
                        let newer = rev > *v;
                        *v = (*v).max(rev);
                        newer
                    });
                }
            }
        }
    }
    .await;
    driver.abort();
    result
}
