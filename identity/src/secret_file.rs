//! Writing secrets to disk so that a crash never leaves a partial or
//! zero-length file: a temporary file with the final mode, fsync, rename,
//! fsync of the directory. And the directories that hold them: private to
//! their owner. And the SVID files both CLIs write for workloads that read
//! their identity from disk.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// Writes `bytes` to `path` atomically, the file created with `mode`
/// (0600 for keys).
///
/// Never follows a symlink: the temporary file is created exclusively
/// (`O_EXCL` refuses an existing name, symlink or not) with its final mode,
/// and the rename replaces whatever is at `path`, a symlink included,
/// rather than writing through it.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("secret");
    let tmp = dir.join(format!(".{name}.tmp-{}", crate::random::hex_id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// An SVID file, or the directory for it, that could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[error("cannot write {}", path.display())]
pub struct SvidFileError {
    /// The file or directory.
    pub path: PathBuf,
    /// What the system said.
    #[source]
    pub source: io::Error,
}

/// Writes an X.509-SVID into `dir` (created if missing) as PEM files for a
/// workload that reads its identity from disk: `svid.key` (the PKCS#8
/// `key`, 0600), `svid.pem` (the `chain`, leaf first, 0600) and
/// `bundle.pem` (the `bundle`'s CA certificates, 0644). Each file goes
/// through [`write`]: created with its mode, fsynced, renamed into place,
/// never written through a symlink. All arguments are DER.
pub fn write_svid_files(
    dir: &Path,
    chain: &[Vec<u8>],
    key: &[u8],
    bundle: &[Vec<u8>],
) -> Result<(), SvidFileError> {
    fs::create_dir_all(dir).map_err(|source| SvidFileError {
        path: dir.to_path_buf(),
        source,
    })?;
    let certs = |ders: &[Vec<u8>]| -> String {
        ders.iter()
            .map(|der| crate::pem::encode("CERTIFICATE", der))
            .collect()
    };
    let key_pem = Zeroizing::new(crate::pem::encode("PRIVATE KEY", key));
    let put = |name: &str, text: &str, mode: u32| {
        let path = dir.join(name);
        write(&path, text.as_bytes(), mode).map_err(|source| SvidFileError { path, source })
    };
    put("svid.key", &key_pem, 0o600)?;
    put("svid.pem", &certs(chain), 0o600)?;
    put("bundle.pem", &certs(bundle), 0o644)
}

/// What [`private_dir`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirState {
    /// Created, or already accessible to its owner alone.
    Private,
    /// It was ours but open to group or others (`was`, the old mode); it is
    /// 0700 now. Worth a warning: what it held may have been read.
    Tightened { was: u32 },
}

/// The uid this process runs as (the owner of `/proc/self`), without libc.
fn current_uid() -> io::Result<u32> {
    Ok(fs::metadata("/proc/self")?.uid())
}

/// Makes sure `dir`, which will hold keys or other secrets, is accessible
/// to this process's user alone: created 0700 if missing; refused
/// (`PermissionDenied`) when someone else owns it, whatever its mode, since
/// that owner could read it or open it again at any time; set to 0700 with
/// [`DirState::Tightened`] when this user owns it with group or other
/// permissions. A symlink to a directory is followed:
/// it is the configured location, and the target is what gets checked.
pub fn private_dir(dir: &Path) -> io::Result<DirState> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("{} is not a directory", dir.display()),
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    // Another owner could read the secrets, or open the directory up
    // again at any time, whatever its mode is now.
    let me = current_uid()?;
    if meta.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} (mode {mode:o}) belongs to uid {}, not to uid {me} this process runs as; \
                 give it to uid {me} with mode 0700, or choose another directory",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    if mode & 0o077 == 0 {
        return Ok(DirState::Private);
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    Ok(DirState::Tightened { was: mode })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_atomically_with_the_mode() {
        let dir = std::env::temp_dir().join(format!("sigil-secret-{}", crate::random::hex_id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("k");
        write(&p, b"one", 0o600).unwrap();
        write(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary files left"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    fn temp_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sigil-secret-{}", crate::random::hex_id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_symlink_at_the_path_is_replaced_not_followed() {
        let dir = temp_dir();
        let victim = dir.join("victim");
        fs::write(&victim, b"untouched").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
        let p = dir.join("k");
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        write(&p, b"secret", 0o600).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"untouched");
        let meta = fs::symlink_metadata(&p).unwrap();
        assert!(meta.is_file(), "the symlink itself was replaced");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&p).unwrap(), b"secret");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn svid_files_are_pem_with_their_modes_and_replace_old_ones() {
        let base = temp_dir();
        let dir = base.join("new/svid");
        let (chain, key, bundle) = (vec![vec![1, 2, 3], vec![4, 5]], [9u8; 40], vec![vec![6]]);
        // Old files, open to everyone: the writer replaces them with its modes.
        fs::create_dir_all(&dir).unwrap();
        for name in ["svid.key", "svid.pem", "bundle.pem"] {
            fs::write(dir.join(name), b"old").unwrap();
            fs::set_permissions(dir.join(name), fs::Permissions::from_mode(0o666)).unwrap();
        }
        write_svid_files(&dir, &chain, &key, &bundle).unwrap();
        let read = |name: &str, label: &str| {
            let path = dir.join(name);
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            let ders = crate::pem::decode_all(label, &fs::read_to_string(&path).unwrap()).unwrap();
            (ders, mode)
        };
        assert_eq!(read("svid.key", "PRIVATE KEY"), (vec![key.to_vec()], 0o600));
        assert_eq!(read("svid.pem", "CERTIFICATE"), (chain, 0o600));
        assert_eq!(read("bundle.pem", "CERTIFICATE"), (bundle, 0o644));
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            3,
            "no temporary files left"
        );

        // A missing directory is created; a file where it should be is an
        // error that names the path.
        let blocked = base.join("file");
        fs::write(&blocked, b"").unwrap();
        let err = write_svid_files(&blocked, &[], &key, &[]).unwrap_err();
        assert_eq!(err.path, blocked);
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn private_dir_creates_0700_and_tightens_our_own_open_dirs() {
        let base = temp_dir();
        let new = base.join("a/b");
        assert_eq!(private_dir(&new).unwrap(), DirState::Private);
        assert_eq!(
            fs::metadata(&new).unwrap().permissions().mode() & 0o777,
            0o700
        );
        for open in [0o755, 0o777, 0o710] {
            fs::set_permissions(&new, fs::Permissions::from_mode(open)).unwrap();
            assert_eq!(
                private_dir(&new).unwrap(),
                DirState::Tightened { was: open }
            );
            assert_eq!(
                fs::metadata(&new).unwrap().permissions().mode() & 0o777,
                0o700
            );
        }
        let file = base.join("f");
        fs::write(&file, b"").unwrap();
        assert!(private_dir(&file).is_err(), "a file is not a directory");
        fs::remove_dir_all(&base).unwrap();
    }
}
