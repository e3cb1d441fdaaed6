//! Randomness from the operating system, through ring.

use ring::rand::{SecureRandom, SystemRandom};

/// Fills `buf` from the OS random source.
///
/// # Panics
/// Only if the kernel's random source fails, which ring treats as
/// unrecoverable; no identity can safely be issued without it.
pub fn fill(buf: &mut [u8]) {
    #[allow(clippy::expect_used)]
    SystemRandom::new()
        .fill(buf)
        .expect("invariant: the OS random source (getrandom) does not fail");
}

/// `N` random bytes.
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    fill(&mut b);
    b
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// A random 128-bit identifier as 32 hex characters.
pub fn hex_id() -> String {
    hex(&bytes::<16>())
}

/// A uniformly distributed value in `[-1.0, 1.0]`, for timer jitter.
pub fn jitter_unit() -> f64 {
    let r = u64::from_le_bytes(bytes::<8>());
    (r >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_encodes() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
    }

    #[test]
    fn jitter_in_range() {
        for _ in 0..1000 {
            let j = jitter_unit();
            assert!((-1.0..=1.0).contains(&j));
        }
    }
}
