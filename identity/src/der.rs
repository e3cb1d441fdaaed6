//! Just enough DER for the issuance hot path: reading the fields of a
//! PKCS#10 request and a SubjectPublicKeyInfo, and writing the fixed shape
//! of an X509-SVID.
//!
//! Only single-byte tags and definite, minimally encoded lengths up to
//! 2^24 − 1 are accepted; anything else is malformed. Everything written
//! here is parsed again by x509-parser in the CA's self-check before it
//! leaves the server.

/// A DER input that does not follow the rules above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// One element: its tag, its content, and the whole encoding.
#[derive(Debug, Clone, Copy)]
pub struct Tlv<'a> {
    pub tag: u8,
    pub content: &'a [u8],
    pub whole: &'a [u8],
}

/// Reads one element from the front of `input`, returning it and the rest.
pub fn read(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), Malformed> {
    let (&tag, rest) = input.split_first().ok_or(Malformed)?;
    if tag & 0x1f == 0x1f {
        return Err(Malformed); // multi-byte tag
    }
    let (&first, rest) = rest.split_first().ok_or(Malformed)?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81..=0x83 => {
            let n = usize::from(first & 0x7f);
            if rest.len() < n {
                return Err(Malformed);
            }
            let (bytes, rest) = rest.split_at(n);
            let len = bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            // Minimal encoding: no leading zero byte, long form only for >= 128.
            if bytes[0] == 0 || len < 0x80 {
                return Err(Malformed);
            }
            (len, rest)
        }
        _ => return Err(Malformed), // indefinite (0x80) or too long
    };
    if rest.len() < len {
        return Err(Malformed);
    }
    let header = input.len() - rest.len();
    let (content, rest) = rest.split_at(len);
    Ok((
        Tlv {
            tag,
            content,
            whole: &input[..header + len],
        },
        rest,
    ))
}

/// Reads one element that must have `tag`.
pub fn expect(input: &[u8], tag: u8) -> Result<(Tlv<'_>, &[u8]), Malformed> {
    let (tlv, rest) = read(input)?;
    if tlv.tag == tag {
        Ok((tlv, rest))
    } else {
        Err(Malformed)
    }
}

/// Appends a DER length.
pub fn push_len(out: &mut Vec<u8>, len: usize) {
    match len {
        0..=0x7f => out.push(len as u8),
        0x80..=0xff => out.extend_from_slice(&[0x81, len as u8]),
        0x100..=0xffff => out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]),
        _ => out.extend_from_slice(&[0x83, (len >> 16) as u8, (len >> 8) as u8, len as u8]),
    }
}

/// Appends `tag`, the length of `content`, and `content`.
pub fn push(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    push_len(out, content.len());
    out.extend_from_slice(content);
}

/// Wraps `content` in `tag`, returning a new buffer.
pub fn wrap(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 5);
    push(&mut out, tag, content);
    out
}

/// Appends a non-negative INTEGER from big-endian magnitude bytes,
/// minimally encoded.
pub fn push_unsigned(out: &mut Vec<u8>, magnitude: &[u8]) {
    let start = magnitude
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(magnitude.len().saturating_sub(1));
    let digits = if magnitude.is_empty() {
        &[0u8][..]
    } else {
        &magnitude[start..]
    };
    let pad = digits[0] & 0x80 != 0;
    out.push(0x02);
    push_len(out, digits.len() + usize::from(pad));
    if pad {
        out.push(0);
    }
    out.extend_from_slice(digits);
}

/// Appends a UTCTime (years 1950–2049) or GeneralizedTime, as RFC 5280
/// requires, from Unix seconds.
pub fn push_time(out: &mut Vec<u8>, unix: i64) {
    let t =
        time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let year = t.year();
    let rest = format!(
        "{:02}{:02}{:02}{:02}{:02}Z",
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if (1950..2050).contains(&year) {
        push(out, 0x17, format!("{:02}{rest}", year % 100).as_bytes());
    } else {
        push(out, 0x18, format!("{year:04}{rest}").as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_trip() {
        for len in [0usize, 1, 127, 128, 255, 256, 65535, 65536, 70000] {
            let content = vec![7u8; len];
            let enc = wrap(0x04, &content);
            let (tlv, rest) = read(&enc).unwrap();
            assert_eq!((tlv.tag, tlv.content.len(), rest.len()), (0x04, len, 0));
            assert_eq!(tlv.whole, &enc[..]);
        }
    }

    #[test]
    fn rejects_non_der_lengths_and_truncation() {
        for bad in [
            &[][..],
            &[0x30],
            &[0x30, 0x80, 0x00, 0x00],          // indefinite
            &[0x30, 0x81, 0x05, 1, 2, 3, 4, 5], // long form for a short length
            &[0x30, 0x82, 0x00, 0x81],          // leading zero in the length
            &[0x30, 0x84, 0, 0, 0, 1, 0],       // length of 4 bytes
            &[0x30, 0x05, 1, 2],                // content shorter than the length
            &[0x1f, 0x01, 0x00],                // multi-byte tag
        ] {
            assert_eq!(read(bad).err(), Some(Malformed), "{bad:02x?}");
        }
    }

    #[test]
    fn unsigned_integers_are_minimal_and_positive() {
        let enc = |m: &[u8]| {
            let mut v = Vec::new();
            push_unsigned(&mut v, m);
            v
        };
        assert_eq!(enc(&[0x00, 0x00, 0x7f]), [0x02, 0x01, 0x7f]);
        assert_eq!(enc(&[0x80]), [0x02, 0x02, 0x00, 0x80]);
        assert_eq!(enc(&[0x00, 0x80]), [0x02, 0x02, 0x00, 0x80]);
        assert_eq!(enc(&[0x00]), [0x02, 0x01, 0x00]);
        assert_eq!(enc(&[]), [0x02, 0x01, 0x00]);
    }

    #[test]
    fn times_switch_to_generalized_in_2050() {
        let enc = |t: i64| {
            let mut v = Vec::new();
            push_time(&mut v, t);
            v
        };
        assert_eq!(
            enc(1_800_000_000),
            [&[0x17, 13][..], b"270115080000Z"].concat()
        );
        assert_eq!(
            enc(2_524_608_000),
            [&[0x18, 15][..], b"20500101000000Z"].concat()
        );
    }
}
