//! Reading the audit log back for a review: listing records, verifying the
//! chain and the signed checkpoints, exporting the latest checkpoint.
//! Works on any [`Datastore`]; the CLI only parses flags and prints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::chain::{AuditRecord, ChainBreak, ChainHead, Hash, Verifier};
use super::checkpoint::{CHECKPOINT_FILE, CheckpointError, VerifierKey};
use crate::datastore::{Datastore, DatastoreError, SledDatastore};

/// Records read per datastore call.
const PAGE: usize = 10_000;

/// Which records `show` lists; every given field must match.
#[derive(Debug, Clone, Default)]
pub struct ShowFilter {
    /// At or after this time.
    pub since: Option<SystemTime>,
    /// Exactly this action, e.g. `entry.create`.
    pub action: Option<String>,
    /// Exactly this caller (actor).
    pub actor: Option<String>,
}

impl ShowFilter {
    fn matches(&self, r: &AuditRecord) -> bool {
        self.since.is_none_or(|t| r.event.time >= t)
            && self.action.as_ref().is_none_or(|a| *a == r.event.action)
            && self.actor.as_ref().is_none_or(|a| *a == r.event.caller)
    }
}

/// Calls `each` with every record passing `filter`, oldest first; returns
/// how many passed.
pub async fn show(
    store: &dyn Datastore,
    filter: &ShowFilter,
    mut each: impl FnMut(&AuditRecord),
) -> Result<u64, DatastoreError> {
    let mut after = 0;
    let mut shown = 0;
    loop {
        let page = store.audit_records(after, PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(shown);
        };
        // A tampered log may hold records out of order: never go back.
        let next = last.seq.max(after + 1);
        for r in page.iter().filter(|r| filter.matches(r)) {
            each(r);
            shown += 1;
        }
        after = next;
    }
}

/// What `verify` checks against.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// The audit public key; without one, stored checkpoints are not
    /// checked and `checkpoint` cannot be.
    pub key: Option<VerifierKey>,
    /// A checkpoint kept elsewhere (a signed note).
    pub checkpoint: Option<String>,
    /// Accept a given `checkpoint` at or behind the anchor, whose records
    /// retention removed. Off by default: an intruder can wipe the log and
    /// fake pruning (the anchor is not signed), and such a checkpoint can
    /// no longer be checked against records.
    pub allow_pruned: bool,
}

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Chained records checked.
    pub records: u64,
    /// Records written before the chain existed, not covered by it.
    pub legacy: u64,
    /// The anchor verification started from (the last pruned record).
    pub anchor: Option<ChainHead>,
    /// The last record.
    pub head: ChainHead,
    /// Checkpoints whose signature and root matched.
    pub checkpoints: u64,
    /// Stored checkpoints of records since removed by retention.
    pub pruned_checkpoints: u64,
}

/// Why verification failed: the first problem found.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("the audit chain is broken: {0}")]
    Chain(#[from] ChainBreak),
    #[error("record {seq} does not match {source_name}: the records up to it were changed")]
    Root { seq: u64, source_name: String },
    #[error(
        "the log was truncated: {source_name} covers records up to {size}, but the log ends at record {last}"
    )]
    Truncated {
        size: u64,
        last: u64,
        source_name: String,
    },
    #[error(
        "the log ends at record {last} but the datastore's chain head is record {head}: the last records were removed or the last record was changed"
    )]
    Head { last: u64, head: u64 },
    #[error("{source_name}: {error}")]
    Checkpoint {
        source_name: String,
        error: CheckpointError,
    },
    #[error(
        "the given checkpoint covers records up to {size}, but the log starts after record {anchor}: those records were pruned (or wiped), so it cannot be checked; pass --allow-pruned if retention removed them, or give a newer checkpoint"
    )]
    Pruned { size: u64, anchor: u64 },
    #[error("a checkpoint to check against needs the audit public key (--public-key)")]
    NoKey,
    #[error("reading the audit log: {0}")]
    Store(#[from] DatastoreError),
}

impl VerifyError {
    /// The first record named by the failure, if any.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Self::Chain(b) => Some(b.seq()),
            Self::Root { seq, .. } => Some(*seq),
            Self::Truncated { last, .. } | Self::Head { last, .. } => Some(*last + 1),
            _ => None,
        }
    }
}

/// Walks the whole log from its anchor, checking the chain, every stored
/// checkpoint (with `opts.key`) and `opts.checkpoint`; stops at the first
/// problem.
pub async fn verify(
    store: &dyn Datastore,
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let state = store.audit_chain().await?;
    // Size → (root, where it comes from).
    let mut checks: BTreeMap<u64, (Hash, String)> = BTreeMap::new();
    if let Some(key) = &opts.key {
        for (size, note) in store.audit_checkpoints().await? {
            let source_name = format!("the stored checkpoint of size {size}");
            let cp = key.open(&note).map_err(|error| VerifyError::Checkpoint {
                source_name: source_name.clone(),
                error,
            })?;
            checks.insert(cp.size, (cp.root, source_name));
        }
    }
    if let Some(note) = &opts.checkpoint {
        let key = opts.key.as_ref().ok_or(VerifyError::NoKey)?;
        let source_name = "the given checkpoint".to_owned();
        let cp = key.open(note).map_err(|error| VerifyError::Checkpoint {
            source_name: source_name.clone(),
            error,
        })?;
        if let Some(a) = state.anchor
            && cp.size <= a.seq
            && cp.size > 0
            && !opts.allow_pruned
        {
            return Err(VerifyError::Pruned {
                size: cp.size,
                anchor: a.seq,
            });
        }
        checks.insert(cp.size, (cp.root, source_name));
    }

    let start = state.anchor.map_or(0, |a| a.seq);
    let mut report = VerifyReport {
        records: 0,
        legacy: 0,
        anchor: state.anchor,
        head: state.head,
        checkpoints: 0,
        pruned_checkpoints: 0,
    };
    // Checkpoints of pruned records: only the one at the anchor can be
    // checked.
    for (&size, (root, source_name)) in checks.range(..=start) {
        match state.anchor {
            Some(a) if a.seq == size => {
                if a.hash != *root {
                    return Err(VerifyError::Root {
                        seq: size,
                        source_name: source_name.clone(),
                    });
                }
                report.checkpoints += 1;
            }
            _ if size == 0 => report.checkpoints += 1,
            _ => report.pruned_checkpoints += 1,
        }
    }

    let mut v = Verifier::new(state.anchor);
    let mut after = start;
    loop {
        let page = store.audit_records(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for r in &page {
            v.push(r)?;
            if let Some((root, source_name)) = checks.get(&r.seq) {
                if r.prev.is_none() || v.head().hash != *root {
                    return Err(VerifyError::Root {
                        seq: r.seq,
                        source_name: source_name.clone(),
                    });
                }
                report.checkpoints += 1;
            }
        }
    }
    let head = v.head();
    if let Some((&size, (_, source_name))) = checks.last_key_value()
        && size > head.seq
    {
        return Err(VerifyError::Truncated {
            size,
            last: head.seq,
            source_name: source_name.clone(),
        });
    }
    if head != state.head {
        return Err(VerifyError::Head {
            last: head.seq,
            head: state.head.seq,
        });
    }
    report.records = v.chained();
    report.legacy = v.legacy();
    report.head = head;
    Ok(report)
}

/// Why the offline review could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no datastore in {0}: pass the server's data directory with --data-dir")]
    Missing(PathBuf),
    #[error(
        "cannot open the datastore in {dir} ({error}); if the server is running, stop it first: only one process can open it (`audit checkpoint` reads the server's latest checkpoint file while it runs)"
    )]
    Busy { dir: PathBuf, error: DatastoreError },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("no audit checkpoint yet in {0}: the server signs one after its first audit records")]
    NoCheckpoint(PathBuf),
    #[error(transparent)]
    Store(#[from] DatastoreError),
}

/// Opens the datastore of a stopped server's data directory.
pub fn open_datastore(data_dir: &Path) -> Result<SledDatastore, OpenError> {
    let dir = data_dir.join("datastore");
    if !dir.is_dir() {
        return Err(OpenError::Missing(data_dir.to_owned()));
    }
    SledDatastore::open(&dir).map_err(|error| OpenError::Busy { dir, error })
}

/// Reads a verifier key file (`audit-key.pub` of the data directory, or a
/// copy kept elsewhere).
pub fn read_public_key(path: &Path) -> Result<VerifierKey, OpenError> {
    let file = |reason: String| OpenError::File {
        path: path.to_owned(),
        reason,
    };
    std::fs::read_to_string(path)
        .map_err(|e| file(format!("cannot read the audit public key: {e}")))?
        .parse()
        .map_err(|e: CheckpointError| file(e.to_string()))
}

/// The latest signed checkpoint: from the datastore of a stopped server,
/// or from the file a running server keeps up to date.
pub async fn latest_checkpoint(data_dir: &Path) -> Result<String, OpenError> {
    match open_datastore(data_dir) {
        Ok(store) => store
            .latest_audit_checkpoint()
            .await?
            .map(|(_, note)| note)
            .ok_or_else(|| OpenError::NoCheckpoint(data_dir.to_owned())),
        Err(OpenError::Busy { .. }) => {
            let path = data_dir.join(CHECKPOINT_FILE);
            std::fs::read_to_string(&path).map_err(|e| OpenError::File {
                path,
                reason: format!("cannot read the server's latest checkpoint: {e}"),
            })
        }
        Err(e) => Err(e),
    }
}
