//! Disk full: the server's data directory on a small tmpfs fills up, entry
//! writes are refused with an error naming it, and once space is freed
//! they succeed again without a restart. Needs root (to mount the tmpfs),
//! as the e2e suites have here and in CI.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sigil_tests::process::{ServerOptions, ServerProcess};

const PARENT: &str = "spiffe://example.org/sigil/agent/join_token/none";

/// A tmpfs mounted for the test; unmounted on drop (also when the test
/// fails), after the server using it is gone.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(dir)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "cannot mount a tmpfs on {} ({status}); this test needs root",
            dir.display()
        );
        Self(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a process not yet reaped): detach it now.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Fills the file system holding `path` by writing to it until ENOSPC.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // Also take what a smaller write still finds.
    while f.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
}

fn create(server: &ServerProcess, name: &str) -> Result<String, String> {
    let out = server
        .cli(&[
            "entry",
            "create",
            "--spiffe-id",
            &format!("spiffe://example.org/disk-full/{name}"),
            "--parent-id",
            PARENT,
            "--selector",
            "unix:uid:4242",
        ])
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn entry_ids(server: &ServerProcess) -> Vec<String> {
    let v = server.cli_json(&["entry", "show"]).unwrap();
    let list = v
        .as_array()
        .or_else(|| v["entries"].as_array())
        .unwrap_or_else(|| panic!("unexpected entry list: {v}"));
    list.iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn entry_writes_resume_without_a_restart_once_a_full_disk_has_space_again() {
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    // Declared before the server, so it is unmounted after the server is
    // killed.
    let tmpfs = Tmpfs::mount(&server_dir.join("data"), "32m");
    let mut server = ServerProcess::start(&server_dir, &ServerOptions::default()).unwrap();
    let mut acknowledged = vec![create(&server, "before").unwrap()];

    let filler = tmpfs.0.join("filler");
    fill(&filler);
    // sled may still have room in space it already holds: write until a
    // create is refused.
    let mut refused = None;
    for i in 0..200 {
        match create(&server, &format!("full-{i}")) {
            Ok(id) => acknowledged.push(id),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("no create was refused on a full disk");
    assert!(
        refused.contains("no space left on device") && refused.contains("writes resume"),
        "the refusal should name the full disk and say writes resume: {refused}"
    );

    // Reads keep working while the disk is full.
    std::thread::sleep(Duration::from_millis(300));
    let listed = entry_ids(&server);
    assert!(listed.contains(&acknowledged[0]), "{listed:?}");
    assert!(create(&server, "still-full").is_err());
    let listed = entry_ids(&server);
    assert!(listed.contains(&acknowledged[0]), "{listed:?}");

    std::fs::remove_file(&filler).unwrap();
    // Bounded wait: the server retries its store with a back-off.
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        match create(&server, "after") {
            Ok(id) => break id,
            Err(e) if Instant::now() >= deadline => {
                panic!(
                    "creates still refused 30 s after space was freed: {e}\nserver log:\n{}",
                    server.log()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    acknowledged.push(after);
    // More writes work too, not just one.
    acknowledged.push(create(&server, "after-2").unwrap());

    let listed = entry_ids(&server);
    for id in &acknowledged {
        assert!(listed.contains(id), "acknowledged entry {id} missing");
    }
    // Every acknowledged entry is on disk: it survives a restart.
    server.restart().unwrap();
    let listed = entry_ids(&server);
    for id in &acknowledged {
        assert!(
            listed.contains(id),
            "acknowledged entry {id} lost across a restart"
        );
    }
    drop(server);
}
