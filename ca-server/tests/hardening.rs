//! Issue 13 hardening (storage, audit, credentials) against the real
//! `sigil-server` binary.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::server::TestServer;

/// SPEC: every minted credential passes Sigil's own validator before it
/// leaves the CA. 32 audiences of 600 bytes make a token longer than the
/// validator's 16 KiB limit; the server must refuse to hand it out.
#[tokio::test]
async fn jwt_svid_that_fails_the_validator_is_not_handed_out() {
    let s = TestServer::start("").await;
    let aud = "a".repeat(600);
    let mut args = vec!["jwt", "mint", "--spiffe-id", "spiffe://example.org/tool"];
    for _ in 0..32 {
        args.extend(["--audience", aud.as_str()]);
    }
    let out = s.cli(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "minted a token of {} bytes that Sigil's validator refuses",
        stdout.trim().len()
    );
    assert!(stderr.contains("validation"), "{stderr}");
}
