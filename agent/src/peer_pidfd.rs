//! The process at the other end of a Unix socket, pinned by a pidfd.
//!
//! `SO_PEERCRED` gives the pid that called `connect`; by the time the agent
//! reads `/proc/<pid>` that process may have exited and its pid been given
//! to another (say a trusted binary), whose identity would then be served
//! to whoever holds the socket. `SO_PEERPIDFD` (Linux 6.5) gives a pidfd
//! for the connecting process itself: while `/proc/self/fdinfo` of that
//! pidfd still shows the pid, the process has not been reaped, so its pid
//! cannot have been reused, and what `/proc/<pid>` showed meanwhile was
//! that process. It does not tell whether the process `exec`ed since it
//! connected: it keeps its pid (see README, security notes).
//!
//! The one `getsockopt` call is the only unsafe code in the agent; the
//! crate denies `unsafe_code` and this module alone allows it.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// `SO_PEERPIDFD` (include/uapi/asm-generic/socket.h; sparc has its own).
#[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
const SO_PEERPIDFD: libc::c_int = 77;
#[cfg(any(target_arch = "sparc", target_arch = "sparc64"))]
const SO_PEERPIDFD: libc::c_int = 0x56;

/// A pidfd for the process that connected `socket`. Fails with
/// `ENOPROTOOPT` on kernels without `SO_PEERPIDFD` (before 6.5), `ESRCH`
/// if the process is gone.
pub fn peer_pidfd(socket: &impl AsFd) -> io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the socket descriptor is borrowed, so open for the call; the
    // kernel writes at most `len` bytes, the size of `fd`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if fd < 0 || len as usize != std::mem::size_of::<libc::c_int>() {
        return Err(io::Error::other("SO_PEERPIDFD returned no descriptor"));
    }
    // SAFETY: on success the kernel installed a new descriptor for us that
    // nothing else owns; the OwnedFd closes it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The pid of `pidfd`'s process in this pid namespace, or `None` once it
/// has been reaped (its pid may then belong to another process).
pub fn pid_of(pidfd: &OwnedFd) -> io::Result<Option<i32>> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))?;
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i32>().ok())
        .ok_or_else(|| io::Error::other("no Pid in the pidfd's fdinfo"))?;
    Ok((pid > 0).then_some(pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_connecting_process_until_it_is_reaped() {
        let dir = std::env::temp_dir().join(format!("sigil-pidfd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import socket,sys,time\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ntime.sleep(0.3)",
            )
            .arg(&path)
            .spawn()
            .unwrap();
        let (conn, _) = listener.accept().unwrap();
        let pidfd = peer_pidfd(&conn).unwrap();
        assert_eq!(pid_of(&pidfd).unwrap(), Some(child.id() as i32));
        child.wait().unwrap();
        assert_eq!(pid_of(&pidfd).unwrap(), None, "reaped");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
