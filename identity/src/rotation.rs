//! Rotation timing as pure functions of `now`.
//!
//! SVIDs renew at half of their lifetime, shifted by up to ±10 % of that
//! half so a fleet does not renew in lockstep. CA keys follow a fixed
//! schedule: the next key is prepared (and published in the bundle) at ½ of
//! the active CA's lifetime and activated at ⅚, so every verifier has had a
//! third of a lifetime to learn the new key before anything it signed exists.

use std::time::{Duration, SystemTime};

/// Largest jitter, as a fraction of the half-life.
pub const JITTER_FRACTION: f64 = 0.10;

fn lifetime(not_before: SystemTime, not_after: SystemTime) -> Duration {
    not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO)
}

/// When an SVID valid from `not_before` to `not_after` should be renewed.
/// `jitter` in `[-1, 1]` moves the point by up to ±10 % of the half-life.
pub fn renewal_time(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let half = lifetime(not_before, not_after).as_secs_f64() / 2.0;
    let offset = half * (1.0 + JITTER_FRACTION * jitter.clamp(-1.0, 1.0));
    not_before + Duration::from_secs_f64(offset.max(0.0))
}

/// Whether the SVID should be renewed at `now`.
pub fn should_renew(
    now: SystemTime,
    not_before: SystemTime,
    not_after: SystemTime,
    jitter: f64,
) -> bool {
    now >= renewal_time(not_before, not_after, jitter)
}

/// The points in a CA's life at which its successor is prepared and
/// activated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaSchedule {
    /// Prepare the next key and publish it: ½ of the lifetime.
    pub prepare_at: SystemTime,
    /// Activate the next key: ⅚ of the lifetime.
    pub activate_at: SystemTime,
}

/// The rotation schedule for a CA valid from `not_before` to `not_after`.
pub fn ca_schedule(not_before: SystemTime, not_after: SystemTime) -> CaSchedule {
    let life = lifetime(not_before, not_after);
    CaSchedule {
        prepare_at: not_before + life / 2,
        activate_at: not_before + life * 5 / 6,
    }
}

/// What the CA should do about its successor at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaAction {
    /// Nothing yet.
    Wait,
    /// Prepare (and publish) the next key.
    Prepare,
    /// Activate the prepared key.
    Activate,
}

/// Decides the CA action at `now`, given the active CA's validity and
/// whether a successor is already prepared.
pub fn ca_action(
    now: SystemTime,
    not_before: SystemTime,
    not_after: SystemTime,
    prepared: bool,
) -> CaAction {
    let s = ca_schedule(not_before, not_after);
    match (prepared, now >= s.prepare_at, now >= s.activate_at) {
        (false, true, _) => CaAction::Prepare,
        (true, _, true) => CaAction::Activate,
        _ => CaAction::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::from_unix_seconds;

    const HOUR: u64 = 3600;

    #[test]
    fn renews_at_half_life_without_jitter() {
        let nb = from_unix_seconds(1000);
        let na = from_unix_seconds(1000 + HOUR);
        assert_eq!(
            renewal_time(nb, na, 0.0),
            from_unix_seconds(1000 + HOUR / 2)
        );
        assert!(!should_renew(
            from_unix_seconds(1000 + HOUR / 2 - 1),
            nb,
            na,
            0.0
        ));
        assert!(should_renew(
            from_unix_seconds(1000 + HOUR / 2),
            nb,
            na,
            0.0
        ));
    }

    #[test]
    fn jitter_is_bounded_to_ten_percent_of_half_life() {
        let nb = from_unix_seconds(0);
        let na = from_unix_seconds(2000);
        assert_eq!(renewal_time(nb, na, 1.0), from_unix_seconds(1100));
        assert_eq!(renewal_time(nb, na, -1.0), from_unix_seconds(900));
        assert_eq!(
            renewal_time(nb, na, 7.0),
            from_unix_seconds(1100),
            "clamped"
        );
    }

    #[test]
    fn ca_schedule_half_and_five_sixths() {
        let nb = from_unix_seconds(0);
        let na = from_unix_seconds(24 * HOUR);
        let s = ca_schedule(nb, na);
        assert_eq!(s.prepare_at, from_unix_seconds(12 * HOUR));
        assert_eq!(s.activate_at, from_unix_seconds(20 * HOUR));
        let at = |h: u64| from_unix_seconds(h * HOUR);
        assert_eq!(ca_action(at(11), nb, na, false), CaAction::Wait);
        assert_eq!(ca_action(at(12), nb, na, false), CaAction::Prepare);
        assert_eq!(ca_action(at(13), nb, na, true), CaAction::Wait);
        assert_eq!(ca_action(at(20), nb, na, true), CaAction::Activate);
        // A CA that slept past ⅚ without a successor prepares first.
        assert_eq!(ca_action(at(21), nb, na, false), CaAction::Prepare);
    }

    #[test]
    fn degenerate_lifetime_does_not_panic() {
        let t = from_unix_seconds(50);
        assert_eq!(renewal_time(t, from_unix_seconds(10), 0.5), t);
    }
}
