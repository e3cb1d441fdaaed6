//! Minimal PEM encoding and decoding for certificates and keys.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

/// Encodes `der` as one PEM block with the given label.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Why a PEM document could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PemError {
    #[error("no PEM block labelled {0} found")]
    NoBlock(String),
    #[error("PEM block {0} has no END line")]
    Unterminated(String),
    #[error("PEM block {0} is not valid base64")]
    Base64(String),
}

/// Decodes every block labelled `label`, in order.
pub fn decode_all(label: &str, text: &str) -> Result<Vec<Vec<u8>>, PemError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line != begin {
            continue;
        }
        let mut body = String::new();
        let mut closed = false;
        for line in lines.by_ref() {
            if line == end {
                closed = true;
                break;
            }
            body.push_str(line);
        }
        if !closed {
            return Err(PemError::Unterminated(label.to_owned()));
        }
        out.push(
            B64.decode(body.as_bytes())
                .map_err(|_| PemError::Base64(label.to_owned()))?,
        );
    }
    if out.is_empty() {
        return Err(PemError::NoBlock(label.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let der: Vec<u8> = (0..200u8).collect();
        let pem = encode("CERTIFICATE", &der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        let two = format!("{pem}junk\n{pem}");
        assert_eq!(
            decode_all("CERTIFICATE", &two).unwrap(),
            vec![der.clone(), der]
        );
    }

    #[test]
    fn errors() {
        assert!(matches!(
            decode_all("CERTIFICATE", "nothing"),
            Err(PemError::NoBlock(_))
        ));
        let open = "-----BEGIN CERTIFICATE-----\nAAAA\n";
        assert!(matches!(
            decode_all("CERTIFICATE", open),
            Err(PemError::Unterminated(_))
        ));
        let bad = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            decode_all("CERTIFICATE", bad),
            Err(PemError::Base64(_))
        ));
    }
}
