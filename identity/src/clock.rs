//! Wall-clock access behind a trait, so rotation and expiry logic can be
//! driven by a fake clock in tests.
//!
//! Certificate fields and token claims use wall time (`SystemTime`); the
//! decisions built on them are pure functions of the `now` passed in.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current wall time.
    fn now(&self) -> SystemTime;
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to; for tests and simulations.
#[derive(Debug)]
pub struct FakeClock(Mutex<SystemTime>);

impl FakeClock {
    /// A fake clock showing `start`.
    pub fn new(start: SystemTime) -> Self {
        Self(Mutex::new(start))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *now += by;
    }

    /// Sets the clock to `to`.
    pub fn set(&self, to: SystemTime) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = to;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whole seconds since the Unix epoch; times before it count as 0.
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Latest time Sigil represents: 9999-12-31T23:59:59Z. Larger inputs are
/// clamped to it, so no time arithmetic on outside input can overflow.
pub const MAX_UNIX_SECONDS: u64 = 253_402_300_799;

/// The time `secs` seconds after the Unix epoch, clamped to
/// [`MAX_UNIX_SECONDS`].
pub fn from_unix_seconds(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.min(MAX_UNIX_SECONDS))
}

/// `t` as an RFC 3339 UTC time in whole seconds, e.g.
/// `2027-01-01T00:00:00Z`, the form the CLIs print; the Unix seconds when
/// the time cannot be formatted.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = unix_seconds(t);
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// A time that is not RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
#[error("invalid RFC 3339 time {input:?}: {reason}")]
pub struct InvalidTime {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Reads an RFC 3339 time, e.g. `2027-01-01T00:00:00Z` (the CLI's
/// `--expires-at`, registration files' `expires_at`).
pub fn parse_rfc3339(s: &str) -> Result<SystemTime, InvalidTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(SystemTime::from)
        .map_err(|e| InvalidTime {
            input: s.to_owned(),
            reason: e.to_string(),
        })
}

/// Serde adapter: `SystemTime` as whole Unix seconds.
pub mod serde_unix_seconds {
    use super::*;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes as Unix seconds.
    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(unix_seconds(*t))
    }

    /// Deserializes from Unix seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        u64::deserialize(d).map(from_unix_seconds)
    }
}

/// Serde adapter: `Option<SystemTime>` as Unix seconds or null.
pub mod serde_opt_unix_seconds {
    use super::*;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes as Unix seconds or null.
    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&unix_seconds(*t)),
            None => s.serialize_none(),
        }
    }

    /// Deserializes from Unix seconds or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(from_unix_seconds))
    }
}

/// Serde adapter: `Option<Duration>` as whole seconds or null.
pub mod serde_opt_seconds {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Serializes as seconds or null.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs()),
            None => s.serialize_none(),
        }
    }

    /// Deserializes from seconds or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_times_are_clamped_not_overflowed() {
        assert_eq!(unix_seconds(from_unix_seconds(u64::MAX)), MAX_UNIX_SECONDS);
    }

    #[test]
    fn rfc3339_prints_whole_utc_seconds() {
        assert_eq!(rfc3339(from_unix_seconds(0)), "1970-01-01T00:00:00Z");
        let t = from_unix_seconds(1_798_761_600) + Duration::from_millis(750);
        assert_eq!(rfc3339(t), "2027-01-01T00:00:00Z");
        assert_eq!(rfc3339(from_unix_seconds(u64::MAX)), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn rfc3339_reads_offsets_and_refuses_other_forms() {
        let t = parse_rfc3339("2027-01-01T02:00:00+02:00").unwrap();
        assert_eq!(unix_seconds(t), 1_798_761_600);
        let err = parse_rfc3339("2027-01-01").unwrap_err();
        assert_eq!(err.input, "2027-01-01");
        assert!(
            err.to_string()
                .starts_with("invalid RFC 3339 time \"2027-01-01\": ")
        );
    }

    #[test]
    fn fake_clock_moves_only_when_told() {
        let c = FakeClock::new(from_unix_seconds(1000));
        assert_eq!(unix_seconds(c.now()), 1000);
        c.advance(Duration::from_secs(5));
        assert_eq!(unix_seconds(c.now()), 1005);
        c.set(from_unix_seconds(7));
        assert_eq!(unix_seconds(c.now()), 7);
    }
}
