//! Token-bucket rate limits keyed by caller (source address or agent); the
//! limiter itself is shared with the agent and lives in `sigil-identity`.

pub use sigil_identity::rate_limit::RateLimiter;
