//! The `unix` workload attestor: selectors from the kernel's view of the
//! calling process.
//!
//! Everything comes from `/proc/<pid>`: effective uid and gid and the
//! supplementary groups (`status`), the executable (`exe`, and its SHA-256,
//! cached by device, inode and modification time). The process's start time
//! and executable are read before and after, so a pid that was reused, or a
//! process that `exec`ed, while selectors were gathered yields an error
//! instead of someone else's identity. `cmdline` is never used.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sigil_identity::{Selector, SelectorSet};

/// The selector type.
pub const NAME: &str = "unix";
/// Default largest executable hashed for `unix:sha256`.
pub const DEFAULT_MAX_HASH_BYTES: u64 = 256 * 1024 * 1024;
/// Executables whose hash is remembered.
const HASH_CACHE_ENTRIES: usize = 10_000;

/// Why a process could not be attested.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnixError {
    #[error("process {0} is gone")]
    Gone(i32),
    #[error("process {0} changed while it was attested (exited, pid reused, or exec)")]
    Changed(i32),
    #[error("cannot read /proc for process {pid}: {reason}")]
    Proc { pid: i32, reason: String },
}

/// Identity of an executable file for the hash cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
    /// ctime cannot be set by the file's owner, unlike mtime.
    ctime: i64,
    ctime_nsec: i64,
    size: u64,
}

impl FileKey {
    fn of(m: &std::fs::Metadata) -> Self {
        FileKey {
            dev: m.dev(),
            ino: m.ino(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
            size: m.size(),
        }
    }
}

/// Hashes of executables by [`FileKey`]; when full, the least recently
/// used is dropped (not all of them: a node running more distinct
/// executables than fit would otherwise hash every one again and again).
#[derive(Debug)]
struct HashCache {
    capacity: usize,
    /// Counts uses; each entry remembers its last.
    tick: u64,
    entries: HashMap<FileKey, (String, u64)>,
    /// Last use → key, oldest first.
    by_use: BTreeMap<u64, FileKey>,
}

impl HashCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            tick: 0,
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
        }
    }

    fn touch(&mut self, key: FileKey, last: u64) -> u64 {
        self.tick += 1;
        self.by_use.remove(&last);
        self.by_use.insert(self.tick, key);
        self.tick
    }

    fn get(&mut self, key: &FileKey) -> Option<String> {
        let (hash, last) = self.entries.get(key).cloned()?;
        let now = self.touch(*key, last);
        if let Some(e) = self.entries.get_mut(key) {
            e.1 = now;
        }
        Some(hash)
    }

    fn insert(&mut self, key: FileKey, hash: String) {
        let last = match self.entries.get(&key) {
            Some(&(_, last)) => last,
            None => {
                if self.entries.len() >= self.capacity
                    && let Some((_, oldest)) = self.by_use.pop_first()
                {
                    self.entries.remove(&oldest);
                }
                // Not in `by_use`: removing tick 0 removes nothing.
                0
            }
        };
        let now = self.touch(key, last);
        self.entries.insert(key, (hash, now));
    }
}

/// id → name, from a `name:x:id:...` database.
type Names = Arc<HashMap<u32, String>>;

/// A parsed `/etc/passwd` or `/etc/group`, read again only when the file's
/// [`FileKey`] changes (a `stat` per attestation instead of a parse).
#[derive(Debug, Default)]
struct NamesCache(Mutex<Option<(FileKey, Names)>>);

impl NamesCache {
    fn get(&self, path: &Path) -> Names {
        let Ok(key) = std::fs::metadata(path).map(|m| FileKey::of(&m)) else {
            return Names::default();
        };
        let mut cached = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, names)) = cached.as_ref()
            && *k == key
        {
            return names.clone();
        }
        let names = Arc::new(names(path));
        *cached = Some((key, names.clone()));
        names
    }
}

/// What must not change between a process connecting and being answered:
/// its start time (no pid reuse) and its executable (no `exec`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessIdentity {
    start_time: u64,
    exe: Option<PathBuf>,
    exe_key: Option<FileKey>,
}

/// The `unix` workload attestor.
#[derive(Debug)]
pub struct UnixAttestor {
    proc_root: PathBuf,
    etc_root: PathBuf,
    max_hash_bytes: u64,
    hashes: Mutex<HashCache>,
    users: NamesCache,
    groups: NamesCache,
}

impl Default for UnixAttestor {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_HASH_BYTES)
    }
}

fn field<'a>(status: &'a str, name: &str) -> Option<Vec<&'a str>> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(':')))
        .map(|v| v.split_whitespace().collect())
}

/// Reads a `name:x:id:...` database (`/etc/passwd`, `/etc/group`) into id → name.
fn names(path: &Path) -> HashMap<u32, String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return HashMap::new();
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut parts = l.split(':');
            let name = parts.next()?;
            let id = parts.nth(1)?.parse().ok()?;
            Some((id, name.to_owned()))
        })
        .collect()
}

impl UnixAttestor {
    /// An attestor hashing executables up to `max_hash_bytes`.
    pub fn new(max_hash_bytes: u64) -> Self {
        Self::with_roots("/proc", "/etc", max_hash_bytes)
    }

    /// An attestor reading process and user data under other roots (tests).
    pub fn with_roots(
        proc_root: impl Into<PathBuf>,
        etc_root: impl Into<PathBuf>,
        max_hash_bytes: u64,
    ) -> Self {
        Self {
            proc_root: proc_root.into(),
            etc_root: etc_root.into(),
            max_hash_bytes,
            hashes: Mutex::new(HashCache::new(HASH_CACHE_ENTRIES)),
            users: NamesCache::default(),
            groups: NamesCache::default(),
        }
    }

    fn proc_err(pid: i32, e: &std::io::Error) -> UnixError {
        if e.kind() == std::io::ErrorKind::NotFound {
            UnixError::Gone(pid)
        } else {
            UnixError::Proc {
                pid,
                reason: e.to_string(),
            }
        }
    }

    /// The identity of process `pid` now; take it when a connection is
    /// accepted and pass it to [`UnixAttestor::attest_as`].
    pub fn identity(&self, pid: i32) -> Result<ProcessIdentity, UnixError> {
        self.snapshot(pid)
    }

    fn snapshot(&self, pid: i32) -> Result<ProcessIdentity, UnixError> {
        let dir = self.proc_root.join(pid.to_string());
        let stat =
            std::fs::read_to_string(dir.join("stat")).map_err(|e| Self::proc_err(pid, &e))?;
        // Field 22 (starttime) counts from after the parenthesised command,
        // which may itself contain spaces and parentheses.
        let after = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or(UnixError::Proc {
                pid,
                reason: "bad stat".into(),
            })?;
        // A zombie (or dead) process is gone even though /proc still shows
        // it: whoever holds its socket now is some other process.
        let state = after.split_whitespace().next().unwrap_or("");
        if matches!(state, "Z" | "X" | "x") {
            return Err(UnixError::Gone(pid));
        }
        let start_time = after
            .split_whitespace()
            .nth(19)
            .and_then(|v| v.parse().ok())
            .ok_or(UnixError::Proc {
                pid,
                reason: "bad stat".into(),
            })?;
        // Kernel threads and zombies have no exe; that is not an error.
        let exe = std::fs::read_link(dir.join("exe")).ok();
        let exe_key = std::fs::metadata(dir.join("exe"))
            .ok()
            .map(|m| FileKey::of(&m));
        Ok(ProcessIdentity {
            start_time,
            exe,
            exe_key,
        })
    }

    fn sha256(&self, pid: i32, key: FileKey) -> Option<String> {
        if let Some(h) = self
            .hashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Some(h);
        }
        if key.size > self.max_hash_bytes {
            return None;
        }
        // Through /proc/<pid>/exe: the file the process runs, even if its
        // path was replaced or deleted since.
        let mut f = File::open(self.proc_root.join(pid.to_string()).join("exe")).ok()?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > self.max_hash_bytes {
                return None;
            }
            ctx.update(&buf[..n]);
        }
        let hex = sigil_identity::random::hex(ctx.finish().as_ref());
        self.hashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, hex.clone());
        Some(hex)
    }

    /// Selectors for process `pid`; fails if the process changes meanwhile.
    pub fn attest(&self, pid: i32) -> Result<SelectorSet, UnixError> {
        self.attest_as(pid, None)
    }

    /// Like [`UnixAttestor::attest`], and also fails unless the process is
    /// still the one seen as `expected` (e.g. when it connected): a pid
    /// reused, or an `exec` since, yields no selectors.
    pub fn attest_as(
        &self,
        pid: i32,
        expected: Option<&ProcessIdentity>,
    ) -> Result<SelectorSet, UnixError> {
        // With `expected`, that is the identity everything read must belong
        // to, and the check after reading compares with it; without, the
        // process as it is now.
        let before = match expected {
            Some(e) => e.clone(),
            None => self.snapshot(pid)?,
        };
        let status = std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("status"))
            .map_err(|e| Self::proc_err(pid, &e))?;
        let bad = || UnixError::Proc {
            pid,
            reason: "bad status".into(),
        };
        let id_at = |name: &str, i: usize| -> Result<u32, UnixError> {
            field(&status, name)
                .and_then(|v| v.get(i).and_then(|x| x.parse().ok()))
                .ok_or_else(bad)
        };
        // Effective ids: the second column of Uid/Gid.
        let uid = id_at("Uid", 1)?;
        let gid = id_at("Gid", 1)?;
        let groups: Vec<u32> = field(&status, "Groups")
            .unwrap_or_default()
            .iter()
            .filter_map(|g| g.parse().ok())
            .collect();
        let users = self.users.get(&self.etc_root.join("passwd"));
        let group_names = self.groups.get(&self.etc_root.join("group"));

        let mut out = SelectorSet::new();
        let mut add = |value: String| {
            if let Ok(s) = Selector::new(NAME, &value) {
                out.insert(s);
            }
        };
        add(format!("uid:{uid}"));
        add(format!("gid:{gid}"));
        if let Some(u) = users.get(&uid) {
            add(format!("user:{u}"));
        }
        if let Some(g) = group_names.get(&gid) {
            add(format!("group:{g}"));
        }
        for g in &groups {
            add(format!("supplementary_gid:{g}"));
            if let Some(name) = group_names.get(g) {
                add(format!("supplementary_group:{name}"));
            }
        }
        if let Some(exe) = &before.exe {
            add(format!("path:{}", exe.display()));
        }
        if let Some(h) = before.exe_key.and_then(|key| self.sha256(pid, key)) {
            add(format!("sha256:{h}"));
        }
        // The same process, running the same file, as when we started (or
        // as `expected`): a pid reused or an exec since shows here.
        if self.snapshot(pid).map_err(|_| UnixError::Changed(pid))? != before {
            return Err(UnixError::Changed(pid));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn has(set: &SelectorSet, s: &str) -> bool {
        set.contains(&Selector::parse(s).unwrap())
    }

    #[test]
    fn attests_this_process() {
        let a = UnixAttestor::default();
        let pid = std::process::id() as i32;
        let got = a.attest(pid).unwrap();
        let uid = std::fs::metadata("/proc/self").unwrap().uid();
        assert!(has(&got, &format!("unix:uid:{uid}")));
        let exe = std::env::current_exe().unwrap();
        assert!(has(&got, &format!("unix:path:{}", exe.display())));
        let bytes = std::fs::read(&exe).unwrap();
        let want = sigil_identity::random::hex(
            ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref(),
        );
        assert!(
            has(&got, &format!("unix:sha256:{want}")),
            "the hash is of the running executable"
        );
        if uid == 0 {
            assert!(has(&got, "unix:user:root"));
        }
        assert!(!got.iter().any(|s| s.value().starts_with("cmdline")));
    }

    #[test]
    fn large_executables_are_not_hashed() {
        let a = UnixAttestor::new(1024);
        let got = a.attest(std::process::id() as i32).unwrap();
        assert!(!got.iter().any(|s| s.value().starts_with("sha256:")));
        assert!(got.iter().any(|s| s.value().starts_with("path:")));
    }

    #[test]
    fn a_process_that_exited_is_gone() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert_eq!(
            UnixAttestor::default().attest(pid),
            Err(UnixError::Gone(pid))
        );
    }

    #[test]
    fn a_zombie_is_gone() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Not reaped yet: /proc still lists it, as a zombie.
        for _ in 0..100 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(
            UnixAttestor::default().attest(pid),
            Err(UnixError::Gone(pid))
        );
        child.wait().unwrap();
    }

    /// An `exec` between connect and attestation: the executable behind
    /// `/proc/<pid>/exe` changed, so the process is no longer the one that
    /// connected.
    #[test]
    fn an_exec_since_the_connection_yields_nothing() {
        let dir = tempfile_dir();
        let p = dir.join("proc/4343");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(
            p.join("stat"),
            "4343 (app) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 555 0 0",
        )
        .unwrap();
        std::fs::write(
            p.join("status"),
            "Uid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\nGroups:\n",
        )
        .unwrap();
        let (first, second) = (dir.join("first-binary"), dir.join("second-binary"));
        std::fs::write(&first, b"one").unwrap();
        std::fs::write(&second, b"two").unwrap();
        std::os::unix::fs::symlink(&first, p.join("exe")).unwrap();
        let a = UnixAttestor::with_roots(dir.join("proc"), dir.join("etc"), DEFAULT_MAX_HASH_BYTES);
        let at_connect = a.identity(4343).unwrap();
        assert!(
            a.attest_as(4343, Some(&at_connect)).is_ok(),
            "unchanged: attested"
        );
        std::fs::remove_file(p.join("exe")).unwrap();
        std::os::unix::fs::symlink(&second, p.join("exe")).unwrap();
        assert_eq!(
            a.attest_as(4343, Some(&at_connect)),
            Err(UnixError::Changed(4343)),
            "exec'd: refused"
        );
        // A reused pid (new start time) is refused the same way.
        std::fs::remove_file(p.join("exe")).unwrap();
        std::os::unix::fs::symlink(&first, p.join("exe")).unwrap();
        std::fs::write(
            p.join("stat"),
            "4343 (app) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 999 0 0",
        )
        .unwrap();
        assert_eq!(
            a.attest_as(4343, Some(&at_connect)),
            Err(UnixError::Changed(4343))
        );
    }

    #[test]
    fn effective_ids_and_supplementary_groups_come_from_status() {
        let dir = tempfile_dir();
        let p = dir.join("proc/4242");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(
            p.join("stat"),
            "4242 (my (odd) cmd) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 987654 0 0",
        )
        .unwrap();
        std::fs::write(
            p.join("status"),
            "Name:\tx\nUid:\t1000\t2000\t2000\t2000\nGid:\t100\t300\t300\t300\nGroups:\t4 27\n",
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(
            dir.join("etc/passwd"),
            "alice:x:1000:100::/:/bin/sh\nbob:x:2000:300::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("etc/group"),
            "users:x:100:\nadm:x:4:\nsudo:x:27:bob\nstaff:x:300:\n",
        )
        .unwrap();
        let a = UnixAttestor::with_roots(dir.join("proc"), dir.join("etc"), DEFAULT_MAX_HASH_BYTES);
        let got = a.attest(4242).unwrap();
        for want in [
            "unix:uid:2000",
            "unix:user:bob",
            "unix:gid:300",
            "unix:group:staff",
            "unix:supplementary_gid:4",
            "unix:supplementary_gid:27",
            "unix:supplementary_group:adm",
            "unix:supplementary_group:sudo",
        ] {
            assert!(has(&got, want), "missing {want} in {got:?}");
        }
        assert!(!has(&got, "unix:uid:1000"), "the real uid is not used");

        // The parsed databases are cached, but a changed file is read again:
        // rewritten in place, and replaced by a rename (as useradd does).
        std::fs::write(dir.join("etc/passwd"), "robert:x:2000:300::/:/bin/sh\n").unwrap();
        let got = a.attest(4242).unwrap();
        assert!(
            has(&got, "unix:user:robert") && !has(&got, "unix:user:bob"),
            "{got:?}"
        );
        std::fs::write(dir.join("etc/group.new"), "team:x:300:\n").unwrap();
        std::fs::rename(dir.join("etc/group.new"), dir.join("etc/group")).unwrap();
        let got = a.attest(4242).unwrap();
        assert!(
            has(&got, "unix:group:team") && !has(&got, "unix:group:staff"),
            "{got:?}"
        );
    }

    /// Issue 13 item 7: a full hash cache drops its least recently used
    /// entry, not everything (it used to be cleared).
    #[test]
    fn a_full_hash_cache_drops_the_least_recently_used() {
        let key = |ino| FileKey {
            dev: 1,
            ino,
            mtime: 0,
            mtime_nsec: 0,
            ctime: 0,
            ctime_nsec: 0,
            size: 1,
        };
        let mut c = HashCache::new(3);
        for ino in 1..=3 {
            c.insert(key(ino), format!("h{ino}"));
        }
        assert_eq!(c.get(&key(1)).as_deref(), Some("h1"));
        c.insert(key(4), "h4".into());
        assert_eq!(c.get(&key(2)), None, "the least recently used went");
        for ino in [1, 3, 4] {
            assert_eq!(c.get(&key(ino)), Some(format!("h{ino}")), "{ino} kept");
        }
        // Inserting a key again refreshes it without evicting anything.
        c.insert(key(1), "h1".into());
        c.insert(key(5), "h5".into());
        assert_eq!(c.get(&key(3)), None);
        assert_eq!(c.entries.len(), 3);
        assert_eq!(c.by_use.len(), 3);
    }

    fn tempfile_dir() -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("sigil-unix-{}", sigil_identity::random::hex_id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
