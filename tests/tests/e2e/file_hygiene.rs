//! Key, SVID and data files on disk: created 0600, never written through a
//! symlink, in directories private to the user the process runs as (an
//! open one of ours is set to 0700, one of someone else's refused).

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::time::Duration;

use sigil_tests::process::{AgentProcess, NodeAttestation, ServerOptions, ServerProcess};

use crate::common::{Deployment, retry};

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Creates `dir` with `mode` (whatever the umask).
fn open_dir(dir: &Path, mode: u32) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn server_and_agent_make_their_own_open_directories_private() {
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    open_dir(&server_dir.join("data"), 0o777);
    open_dir(&server_dir.join("data/keys"), 0o755);
    let server = ServerProcess::start(&server_dir, &ServerOptions::default()).unwrap();
    assert_eq!(
        mode(&server_dir.join("data")),
        0o700,
        "server data directory"
    );
    assert_eq!(
        mode(&server_dir.join("data/keys")),
        0o700,
        "CA key directory"
    );
    for key in std::fs::read_dir(server_dir.join("data/keys")).unwrap() {
        assert_eq!(mode(&key.unwrap().path()), 0o600, "CA key file");
    }
    assert!(
        server.log().contains("open to group or others; now 0700"),
        "the server warned:\n{}",
        server.log()
    );

    let agent_dir = dir.path().join("agent");
    open_dir(&agent_dir.join("data"), 0o777);
    let agent = AgentProcess::start(
        &agent_dir,
        &server,
        &NodeAttestation::JoinToken(server.join_token().unwrap()),
    )
    .unwrap();
    let data = agent_dir.join("data");
    assert_eq!(mode(&data), 0o700, "agent data directory");
    assert_eq!(mode(&data.join("agent.key")), 0o600, "agent key");
    assert_eq!(mode(&data.join("agent.pem")), 0o600, "agent SVID");
    assert!(
        agent.log().contains("open to group or others; now 0700"),
        "the agent warned:\n{}",
        agent.log()
    );
}

/// Needs root (as CI runs) to give the directories to another user.
#[test]
fn an_open_data_directory_of_another_user_is_refused() {
    let nobody = 65534;
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    open_dir(&server_dir.join("data"), 0o777);
    std::os::unix::fs::chown(server_dir.join("data"), Some(nobody), Some(nobody))
        .expect("chown needs root");
    let err = ServerProcess::start(&server_dir, &ServerOptions::default())
        .expect_err("the server starts on another user's open data directory")
        .to_string();
    assert!(err.contains("belongs to uid 65534"), "{err}");

    // Private to that user is no better: it can read what is written there.
    std::fs::set_permissions(
        server_dir.join("data"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let err = ServerProcess::start(&server_dir, &ServerOptions::default())
        .expect_err("the server starts on another user's private data directory")
        .to_string();
    assert!(err.contains("belongs to uid 65534"), "{err}");

    // A server on a directory of its own, for the agent to attest to.
    let server =
        ServerProcess::start(&dir.path().join("server2"), &ServerOptions::default()).unwrap();
    let agent_dir = dir.path().join("agent");
    open_dir(&agent_dir.join("data"), 0o777);
    std::os::unix::fs::chown(agent_dir.join("data"), Some(nobody), Some(nobody)).unwrap();
    let err = AgentProcess::start(
        &agent_dir,
        &server,
        &NodeAttestation::JoinToken(server.join_token().unwrap()),
    )
    .expect_err("the agent starts on another user's open data directory")
    .to_string();
    assert!(err.contains("belongs to uid 65534"), "{err}");
    assert!(
        !agent_dir.join("data/agent.key").exists(),
        "no key was written there"
    );
}

/// `--write` of both CLIs replaces a symlink at a file's path instead of
/// writing through it, and creates the key and SVID 0600.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_write_replaces_symlinks_and_creates_0600_files() {
    let d = Deployment::start(&ServerOptions::default());
    d.register_me("files", &[]);
    let client = d.client().await;
    retry(Duration::from_secs(10), || client.fetch_x509_svid())
        .await
        .expect("the entry reaches the agent");

    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "not a key").unwrap();
    for (name, out) in [
        ("agent", dir.path().join("a")),
        ("server", dir.path().join("s")),
    ] {
        std::fs::create_dir(&out).unwrap();
        symlink(&victim, out.join("svid.key")).unwrap();
        symlink(&victim, out.join("svid.pem")).unwrap();
        let out_arg = out.display().to_string();
        let result = if name == "agent" {
            d.agent
                .cli(&["api", "fetch", "x509", "--write", &out_arg])
                .unwrap()
        } else {
            d.server
                .cli(&[
                    "x509",
                    "mint",
                    "--spiffe-id",
                    "spiffe://example.org/minted",
                    "--write",
                    &out_arg,
                ])
                .unwrap()
        };
        assert!(
            result.status.success(),
            "{name} --write: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        assert_eq!(
            std::fs::read_to_string(&victim).unwrap(),
            "not a key",
            "{name} --write wrote through the symlink"
        );
        for file in ["svid.key", "svid.pem"] {
            let path = out.join(file);
            assert!(
                std::fs::symlink_metadata(&path).unwrap().is_file(),
                "{name}: {file} is a regular file"
            );
            assert_eq!(mode(&path), 0o600, "{name}: {file}");
        }
        assert!(
            std::fs::read_to_string(out.join("svid.key"))
                .unwrap()
                .contains("PRIVATE KEY")
        );
    }
}
