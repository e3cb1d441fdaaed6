//! `openssl(1)` as a second, independent X.509 verifier in tests.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

/// Runs openssl with `args`: (success, stdout and stderr together).
pub fn openssl(args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .context("cannot run openssl; is it installed?")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// `openssl verify -x509_strict` of `leaf` against `roots`, with
/// `untrusted` intermediates, in files under `dir`: openssl's verdict
/// and output.
pub fn openssl_verify(
    dir: &Path,
    leaf: &[u8],
    untrusted: &[Vec<u8>],
    roots: &[Vec<u8>],
) -> Result<(bool, String)> {
    let pem = |ders: &[Vec<u8>]| {
        ders.iter()
            .map(|d| sigil_identity::pem::encode("CERTIFICATE", d))
            .collect::<String>()
    };
    let n = sigil_identity::random::hex_id();
    let leaf_path = dir.join(format!("leaf-{n}.pem"));
    let roots_path = dir.join(format!("roots-{n}.pem"));
    std::fs::write(&leaf_path, pem(&[leaf.to_vec()]))?;
    std::fs::write(&roots_path, pem(roots))?;
    let mut args = vec![
        "verify".to_owned(),
        "-x509_strict".to_owned(),
        "-CAfile".to_owned(),
    ];
    args.push(roots_path.display().to_string());
    if !untrusted.is_empty() {
        let untrusted_path = dir.join(format!("untrusted-{n}.pem"));
        std::fs::write(&untrusted_path, pem(untrusted))?;
        args.push("-untrusted".to_owned());
        args.push(untrusted_path.display().to_string());
    }
    args.push(leaf_path.display().to_string());
    openssl(&args.iter().map(String::as_str).collect::<Vec<_>>())
}
