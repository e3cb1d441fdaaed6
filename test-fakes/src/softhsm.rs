//! SoftHSM2 for tests of the PKCS#11 key manager: a private token
//! directory with one initialised token.
//!
//! SoftHSM2 reads its configuration from `SOFTHSM2_CONF` when the module is
//! initialised, once per process, and Sigil's code may not set environment
//! variables (no unsafe code): so a test runs its PKCS#11 part in a child
//! process — the test binary itself, started by [`run_in_child`] with the
//! variable set — and the parent only checks that the child passed.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The module to test against, from `SIGIL_SOFTHSM2_MODULE`; `None` (with
/// "skipped: ..." printed) when unset, unless `SIGIL_REQUIRE_SOFTHSM2=1`,
/// which panics.
pub fn module() -> Option<PathBuf> {
    match std::env::var_os("SIGIL_SOFTHSM2_MODULE") {
        Some(m) if !m.is_empty() => Some(PathBuf::from(m)),
        _ => {
            assert!(
                std::env::var("SIGIL_REQUIRE_SOFTHSM2").as_deref() != Ok("1"),
                "SIGIL_REQUIRE_SOFTHSM2=1 but SIGIL_SOFTHSM2_MODULE is not set"
            );
            println!("skipped: SIGIL_SOFTHSM2_MODULE not set");
            None
        }
    }
}

/// A token in a private SoftHSM2 token directory.
#[derive(Debug)]
pub struct SoftHsm {
    /// The PKCS#11 module.
    pub module: PathBuf,
    /// The SoftHSM2 configuration file (for `SOFTHSM2_CONF`).
    pub conf: PathBuf,
    /// The token's label.
    pub label: String,
    /// The user PIN.
    pub pin: String,
}

/// The user PIN of test tokens.
pub const PIN: &str = "4711-sigil";

impl SoftHsm {
    /// Writes a configuration under `dir` and initialises a token labelled
    /// `label` with `softhsm2-util`.
    pub fn init(module: &Path, dir: &Path, label: &str) -> Self {
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                PIN,
                "--so-pin",
                "so-4711-sigil",
            ])
            .output()
            .expect("softhsm2-util runs (apt-get install softhsm2)");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            module: module.to_path_buf(),
            conf,
            label: label.to_owned(),
            pin: PIN.to_owned(),
        }
    }

    /// The token a parent made for this child process (see
    /// [`run_in_child`]), if this is such a child.
    pub fn in_child() -> Option<Self> {
        let label = std::env::var("SIGIL_SOFTHSM2_CHILD_TOKEN").ok()?;
        Some(Self {
            module: PathBuf::from(std::env::var_os("SIGIL_SOFTHSM2_MODULE")?),
            conf: PathBuf::from(std::env::var_os("SOFTHSM2_CONF")?),
            label,
            pin: PIN.to_owned(),
        })
    }
}

/// Runs the test `name` of this test binary again in a child process with
/// `SOFTHSM2_CONF` pointing at `hsm`'s configuration, and panics with its
/// output unless it passes. The test finds its token with
/// [`SoftHsm::in_child`].
pub fn run_in_child(name: &str, hsm: &SoftHsm) {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &hsm.conf)
        .env("SIGIL_SOFTHSM2_MODULE", &hsm.module)
        .env("SIGIL_SOFTHSM2_CHILD_TOKEN", &hsm.label)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{name} in SoftHSM2 failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("1 passed"),
        "{name} did not run in the child:\n{stdout}"
    );
}
