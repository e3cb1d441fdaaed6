//! HPACK Huffman decoding with a table built once per process.
//!
//! `loona-hpack` builds a fresh decoding table (nested hash maps of all 257
//! codes) for every Huffman-coded string it decodes, about 30 µs each: most
//! of the [`AuthorityFix`](super::AuthorityFix)'s cost per request. This
//! module decodes with a canonical-code table instead (first code, count
//! and symbols per code length), so a string costs a few nanoseconds a bit.
//!
//! The code itself (RFC 7541, Appendix B) is not restated here: it is read
//! once out of `loona-hpack`'s own decoder, used as an oracle. The HPACK code
//! is canonical (codes of one length are consecutive, and shorter codes sort
//! first), so it is fixed by which symbol each code of each length stands
//! for. A candidate code `c` of length `L` is a code for symbol `x` exactly
//! when eight copies of `c` (a byte-aligned, unpadded stream) decode to
//! eight `x`: eight symbols of one length `L'` filling `8·L` bits leave no
//! padding only if `L' = L`, and then the first `L` bits, `c`, are `x`'s
//! code. If the derivation ever failed (a dependency that changed its code),
//! every string would be decoded by the oracle instead: slow, never wrong.

use std::sync::OnceLock;

use loona_hpack::huffman::HuffmanDecoder;

/// The longest HPACK code (EOS), in bits.
const MAX_LEN: usize = 30;
/// The EOS code: thirty 1 bits.
const EOS: u32 = (1 << MAX_LEN) - 1;

/// A Huffman-coded string that is not valid HPACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct InvalidHuffman;

/// The canonical code, indexed by code length.
#[derive(Debug)]
struct Canonical {
    /// The numerically first code of each length.
    first: [u32; MAX_LEN + 1],
    /// How many symbols have a code of each length.
    count: [u32; MAX_LEN + 1],
    /// Where each length's symbols start in `symbols`.
    offset: [usize; MAX_LEN + 1],
    /// All 256 symbols, by code length, then by code.
    symbols: Vec<u8>,
}

impl Canonical {
    fn derive(oracle: &mut HuffmanDecoder) -> Option<Self> {
        let mut table = Canonical {
            first: [0; MAX_LEN + 1],
            count: [0; MAX_LEN + 1],
            offset: [0; MAX_LEN + 1],
            symbols: Vec::with_capacity(256),
        };
        let mut seen = [false; 256];
        let mut next: u32 = 0;
        for len in 1..=MAX_LEN {
            table.first[len] = next;
            table.offset[len] = table.symbols.len();
            while next >> len == 0 {
                let Some(symbol) = probe(oracle, next, len) else {
                    break;
                };
                if std::mem::replace(&mut seen[usize::from(symbol)], true) {
                    return None;
                }
                table.symbols.push(symbol);
                next += 1;
            }
            table.count[len] = u32::try_from(table.symbols.len() - table.offset[len]).ok()?;
            if len < MAX_LEN {
                next <<= 1;
            }
        }
        // All 256 octets found, and the one code left is EOS.
        (table.symbols.len() == 256 && next == EOS).then_some(table)
    }

    fn decode(&self, buf: &[u8], out: &mut Vec<u8>) -> Result<(), InvalidHuffman> {
        let mut code: u32 = 0;
        let mut len = 0usize;
        for &byte in buf {
            for shift in (0..8).rev() {
                code = code << 1 | u32::from(byte >> shift & 1);
                len += 1;
                let index = code.wrapping_sub(self.first[len]);
                if index < self.count[len] {
                    // `index < count[len]`, and `offset[len] + count[len]`
                    // is at most 256 = `symbols.len()` by construction.
                    out.push(self.symbols[self.offset[len] + index as usize]);
                    code = 0;
                    len = 0;
                } else if len == MAX_LEN {
                    // EOS inside the string, or no code at all.
                    return Err(InvalidHuffman);
                }
            }
        }
        // Padding: fewer than 8 bits, all of them the start of EOS (1s).
        if len < 8 && code == (1 << len) - 1 {
            Ok(())
        } else {
            Err(InvalidHuffman)
        }
    }
}

/// The symbol `code` (of `len` bits) stands for, if it is a whole code.
fn probe(oracle: &mut HuffmanDecoder, code: u32, len: usize) -> Option<u8> {
    let bits = encode_repeated(code, len, 8);
    match oracle.decode(&bits) {
        Ok(symbols) if symbols.len() == 8 && symbols.iter().all(|&s| s == symbols[0]) => {
            Some(symbols[0])
        }
        _ => None,
    }
}

/// `copies` copies of a `len`-bit code as a Huffman-coded string.
fn encode_repeated(code: u32, len: usize, copies: usize) -> Vec<u8> {
    pack(std::iter::repeat_n((code, len), copies))
}

/// Codes (value, bit length) packed most significant bit first, padded
/// with 1s to a whole byte.
fn pack(codes: impl IntoIterator<Item = (u32, usize)>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut acc: u64 = 0;
    let mut bits = 0usize;
    for (code, len) in codes {
        acc = acc << len | u64::from(code);
        bits += len;
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        let pad = 8 - bits;
        out.push((acc << pad | ((1 << pad) - 1)) as u8);
    }
    out
}

fn canonical() -> Option<&'static Canonical> {
    static TABLE: OnceLock<Option<Canonical>> = OnceLock::new();
    TABLE
        .get_or_init(|| {
            let table = Canonical::derive(&mut HuffmanDecoder::new());
            if table.is_none() {
                tracing::warn!(
                    "could not derive the HPACK Huffman table from loona-hpack; \
                     decoding header strings with its slower decoder"
                );
            }
            table
        })
        .as_ref()
}

/// Appends the decoding of the Huffman-coded string `buf` to `out`.
pub(super) fn decode(buf: &[u8], out: &mut Vec<u8>) -> Result<(), InvalidHuffman> {
    match canonical() {
        Some(table) => table.decode(buf, out),
        None => {
            let decoded = HuffmanDecoder::new()
                .decode(buf)
                .map_err(|_| InvalidHuffman)?;
            out.extend_from_slice(&decoded);
            Ok(())
        }
    }
}

/// Huffman-codes `input` with the derived table (the inverse of [`decode`]).
#[cfg(test)]
pub(super) fn encode(input: &[u8]) -> Vec<u8> {
    let table = canonical().expect("the table derives from loona-hpack's decoder");
    let mut code_of = [(0u32, 0usize); 256];
    for len in 1..=MAX_LEN {
        for i in 0..table.count[len] {
            let symbol = table.symbols[table.offset[len] + i as usize];
            code_of[usize::from(symbol)] = (table.first[len] + i, len);
        }
    }
    pack(input.iter().map(|&b| code_of[usize::from(b)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derived() -> &'static Canonical {
        canonical().expect("the table derives from loona-hpack's decoder")
    }

    #[test]
    fn the_table_is_derived_and_shaped_like_rfc_7541() {
        let table = derived();
        // Appendix B: the shortest codes are 5 bits (10 symbols), the
        // longest octet codes 30 bits (3 symbols, plus EOS).
        assert_eq!(table.count[..5], [0; 5]);
        assert_eq!(table.count[5], 10);
        assert_eq!(table.count[30], 3);
        assert_eq!(table.count.iter().sum::<u32>(), 256);
        // RFC 7541 C.4.1: "www.example.com".
        let mut out = Vec::new();
        decode(
            &[
                0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
            ],
            &mut out,
        )
        .unwrap();
        assert_eq!(out, b"www.example.com");
    }

    #[test]
    fn every_octet_decodes_as_loona_hpack_decodes_it() {
        let all: Vec<u8> = (0..=255).collect();
        for chunk in all.chunks(7).chain([&all[..], b"/tmp/agent.sock", b""]) {
            let encoded = encode(chunk);
            assert_eq!(HuffmanDecoder::new().decode(&encoded).unwrap(), chunk);
            let mut out = Vec::new();
            decode(&encoded, &mut out).unwrap();
            assert_eq!(out, chunk);
        }
    }

    #[test]
    fn arbitrary_bytes_are_accepted_or_refused_as_loona_hpack_does() {
        // Random (xorshift) strings: mostly invalid padding or EOS, some
        // valid; both decoders must agree on every one.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut oracle = HuffmanDecoder::new();
        let (mut valid, mut invalid) = (0, 0);
        for round in 0..20_000 {
            let len = round % 12;
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    // Bias towards 1 bits so long codes and EOS show up.
                    (state as u8) | (state >> 8) as u8
                })
                .collect();
            let mut out = Vec::new();
            let ours = decode(&input, &mut out).map(|()| out);
            match oracle.decode(&input) {
                Ok(expected) => {
                    valid += 1;
                    assert_eq!(ours, Ok(expected), "input {input:02x?}");
                }
                Err(_) => {
                    invalid += 1;
                    assert_eq!(ours, Err(InvalidHuffman), "input {input:02x?}");
                }
            }
        }
        assert!(
            valid > 1_000 && invalid > 1_000,
            "{valid} valid, {invalid} invalid"
        );
    }

    #[test]
    fn eos_and_bad_padding_are_refused() {
        let mut out = Vec::new();
        // EOS (30 ones) inside a string.
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xfc], &mut out),
            Err(InvalidHuffman)
        );
        // '0' is 00000; padding with 0s instead of 1s.
        assert_eq!(decode(&[0x00], &mut out), Err(InvalidHuffman));
        // A whole byte of 1s as padding (longer than 7 bits).
        assert_eq!(decode(&[0x07, 0xff], &mut out), Err(InvalidHuffman));
    }
}
