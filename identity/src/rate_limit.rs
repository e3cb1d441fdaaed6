//! Token-bucket rate limits keyed by caller (source address or agent).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

/// Most keys remembered before idle ones are dropped.
const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// A token bucket per key: `rate` tokens a second, at most `burst` saved.
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter refilling `rate` per second up to `burst`.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `cost` tokens for `key` at `now`; false if not enough are left.
    pub fn try_take(&self, key: &K, cost: f64, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            // Drop buckets that have refilled completely: they carry no state.
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.updated).as_secs_f64() * rate < burst
            });
        }
        let b = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        b.tokens =
            (b.tokens + now.duration_since(b.updated).as_secs_f64() * self.rate).min(self.burst);
        b.updated = now;
        if b.tokens >= cost {
            b.tokens -= cost;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let l = RateLimiter::new(2.0, 3.0);
        let t = Instant::now();
        assert!(l.try_take(&"a", 1.0, t));
        assert!(l.try_take(&"a", 2.0, t));
        assert!(!l.try_take(&"a", 1.0, t), "burst used up");
        assert!(l.try_take(&"b", 1.0, t), "keys are independent");
        assert!(
            l.try_take(&"a", 1.0, t + Duration::from_millis(500)),
            "refilled at 2/s"
        );
        assert!(!l.try_take(&"a", 1.0, t + Duration::from_millis(500)));
    }
}
