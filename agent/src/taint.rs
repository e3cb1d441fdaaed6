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
//!   within a few seconds (each batch wakes the issue loop, which sends
//!   what is due in its usual CSR batches);
//! - renews its own SVID at once if a tainted authority signed it;
//! - drops cached JWT-SVIDs whose `kid` is tainted, so the next fetch
//!   mints one with the active key.
//!
//! This module holds the decisions; the session applies them.

use std::time::Duration;

use sigil_identity::{Bundle, EntryId};

use crate::cache::CachedSvid;

/// SVIDs made due together.
pub const BATCH: usize = 1000;
/// Time between two batches.
pub const INTERVAL: Duration = Duration::from_millis(250);

/// The re-issue plan for `tainted`: batches of at most [`BATCH`] entries,
/// each with its delay from the taint, the first after `start` (a fraction
/// of [`INTERVAL`] in 0..1, random per agent), each next [`INTERVAL`] later.
pub fn batches(tainted: Vec<EntryId>, start: f64) -> Vec<(Duration, Vec<EntryId>)> {
    let offset = INTERVAL.mul_f64(start.clamp(0.0, 1.0));
    tainted
        .chunks(BATCH)
        .enumerate()
        .map(|(i, chunk)| {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            (offset + INTERVAL.saturating_mul(i), chunk.to_vec())
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
        let b = batches(ids(2500), 0.0);
        let sizes: Vec<_> = b.iter().map(|(_, ids)| ids.len()).collect();
        assert_eq!(sizes, vec![BATCH, BATCH, 500]);
        let delays: Vec<_> = b.iter().map(|(d, _)| *d).collect();
        assert_eq!(delays, vec![Duration::ZERO, INTERVAL, INTERVAL * 2]);
    }

    #[test]
    fn the_start_offset_stays_within_one_interval() {
        assert_eq!(batches(ids(1), 7.0)[0].0, INTERVAL);
        assert_eq!(batches(ids(1), 0.5)[0].0, INTERVAL / 2);
        assert!(batches(Vec::new(), 0.5).is_empty());
    }

    #[test]
    fn ten_thousand_svids_are_all_due_within_three_seconds() {
        let b = batches(ids(10_000), 1.0);
        assert!(b.last().unwrap().0 <= Duration::from_secs(3));
        assert_eq!(b.iter().map(|(_, ids)| ids.len()).sum::<usize>(), 10_000);
    }
}
