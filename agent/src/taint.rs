//! What the agent does when its bundle marks authorities tainted.
//!
//! An operator taints a CA authority it suspects is compromised (see the
//! README's "Incident response"). The server pushes the bundle with the
//! taint markers over Sync; the agent then
//!
//! - re-issues every cached X509-SVID whose chain uses a tainted X.509
//!   authority. The old SVID keeps being served until its replacement is
//!   stored (it is still valid, and the tainted root is still in the
//!   bundle), so workloads never go without one. Re-issuing is paced: the
//!   SVIDs are made due in batches of [`BATCH`] every [`INTERVAL`], after a
//!   random start within one interval, so a fleet of agents does not all
//!   ask at the same instant, while one agent still replaces 10,000 SVIDs
//!   within a few seconds;
//! - renews its own SVID at once if a tainted authority signed it;
//! - drops cached JWT-SVIDs whose `kid` is tainted, so the next fetch
//!   mints one with the active key.
//!
//! This module holds the decisions; the session applies them.

use std::time::{Duration, SystemTime};

use sigil_identity::{Bundle, EntryId};

use crate::cache::CachedSvid;

/// SVIDs made due together.
pub const BATCH: usize = 1000;
/// Time between two batches.
pub const INTERVAL: Duration = Duration::from_millis(250);

/// When each SVID of `tainted` (in order) is to be re-issued, from `now`
/// with a start offset of `start` (a fraction of [`INTERVAL`] in 0..1).
pub fn schedule(tainted: Vec<EntryId>, now: SystemTime, start: f64) -> Vec<(EntryId, SystemTime)> {
    let offset = INTERVAL.mul_f64(start.clamp(0.0, 1.0));
    tainted
        .into_iter()
        .enumerate()
        .map(|(i, id)| {
            let batch = u32::try_from(i / BATCH).unwrap_or(u32::MAX);
            (id, now + offset + INTERVAL.saturating_mul(batch))
        })
        .collect()
}

/// The entries whose SVID in `svids` was signed by an authority `bundle`
/// marks tainted.
pub fn tainted_svids<'a>(
    svids: impl IntoIterator<Item = &'a CachedSvid>,
    bundle: &Bundle,
) -> Vec<EntryId> {
    if bundle.tainted_x509_authorities.is_empty() {
        return Vec::new();
    }
    svids
        .into_iter()
        .filter(|s| bundle.chain_uses_tainted(&s.chain))
        .map(|s| s.entry.id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<EntryId> {
        (0..n)
            .map(|i| EntryId::new(&format!("e{i}")).unwrap())
            .collect()
    }

    #[test]
    fn reissue_is_paced_in_batches() {
        let now = sigil_identity::clock::from_unix_seconds(1000);
        let s = schedule(ids(2500), now, 0.0);
        assert_eq!(s.len(), 2500);
        assert_eq!(s[0].1, now);
        assert_eq!(s[BATCH - 1].1, now);
        assert_eq!(s[BATCH].1, now + INTERVAL);
        assert_eq!(s[2499].1, now + INTERVAL * 2);
    }

    #[test]
    fn the_start_offset_stays_within_one_interval() {
        let now = sigil_identity::clock::from_unix_seconds(1000);
        let s = schedule(ids(1), now, 7.0);
        assert_eq!(s[0].1, now + INTERVAL);
        let s = schedule(ids(1), now, 0.5);
        assert_eq!(s[0].1, now + INTERVAL / 2);
    }

    #[test]
    fn ten_thousand_svids_are_all_due_within_three_seconds() {
        let now = sigil_identity::clock::from_unix_seconds(1000);
        let s = schedule(ids(10_000), now, 1.0);
        let last = s.last().unwrap().1;
        assert!(last.duration_since(now).unwrap() <= Duration::from_secs(3));
    }
}
