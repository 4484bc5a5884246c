//! The jailed VMM's user namespace (on unless `--no-userns`).
//!
//! The VMM enters it last, after its mount, pid, IPC and UTS namespaces exist, its new root
//! is built and its rlimits are set, all while it is still real root. So every other
//! namespace of the VMM stays owned by the initial user namespace, where the VMM holds no
//! capability: it can neither mount nor unmount anything, nor change its hostname, nor raise
//! a hard rlimit, even with every capability of its own namespace. What it keeps after
//! [`super::privileges::drop_privileges`] (the virtio-fs set, or nothing) acts only on objects
//! of its own user namespace: file ownership checks (`CAP_CHOWN`, `CAP_DAC_OVERRIDE`,
//! `CAP_FOWNER`, ...) pass for every inode whose owner is mapped, which with the identity map
//! is every inode; everything the kernel checks in the initial namespace fails (device nodes,
//! `CAP_MKNOD`; `CAP_NET_ADMIN` over the host's network namespaces, `CAP_SYS_*`, ...).
//!
//! The map is the identity over the whole id range (`0 0 4294967295`, the initial namespace's
//! own), so uid N inside is uid N on the host: files the guest creates through virtio-fs as a
//! container's uid 1000 are owned by 1000 on the host, and `/dev/kvm`, the disks and the
//! sockets are reached by the same DAC checks as before.
//!
//! Only a process of the parent namespace with `CAP_SETUID`/`CAP_SETGID` there may write such
//! a map, so the supervisor writes it: the VMM unshares, says so over a pipe, the supervisor
//! writes `/proc/<vmm>/uid_map`, `deny` to `setgroups` and `gid_map`, and answers over a
//! second pipe. A closed pipe on either side means the other side failed.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;

use nix::fcntl::OFlag;
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{pipe2, Pid};

use super::error::{sys, JailError};

/// The uid and gid map: every id maps to itself.
pub const IDENTITY_MAP: &str = "0 0 4294967295\n";

/// Both pipes, before the fork.
#[derive(Debug)]
pub(super) struct Sync {
    ready: (OwnedFd, OwnedFd),
    mapped: (OwnedFd, OwnedFd),
}

/// The VMM's ends: it writes `ready` and reads `mapped`.
#[derive(Debug)]
pub(super) struct VmmSide {
    ready: OwnedFd,
    mapped: OwnedFd,
}

/// The supervisor's ends: it reads `ready` and writes `mapped`.
#[derive(Debug)]
pub(super) struct SupervisorSide {
    ready: OwnedFd,
    mapped: OwnedFd,
}

impl Sync {
    pub(super) fn new() -> Result<Self, JailError> {
        Ok(Self {
            ready: pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe"))?,
            mapped: pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe"))?,
        })
    }

    /// After the fork, in the VMM: closes the supervisor's ends.
    pub(super) fn vmm(self) -> VmmSide {
        VmmSide {
            ready: self.ready.1,
            mapped: self.mapped.0,
        }
    }

    /// After the fork, in the supervisor: closes the VMM's ends.
    pub(super) fn supervisor(self) -> SupervisorSide {
        SupervisorSide {
            ready: self.ready.0,
            mapped: self.mapped.1,
        }
    }
}

/// Reads one byte; `false` on end of file (the writer is gone).
fn read_byte(fd: &OwnedFd) -> nix::Result<bool> {
    let mut b = [0u8; 1];
    loop {
        match nix::unistd::read(fd.as_raw_fd(), &mut b) {
            Ok(n) => return Ok(n == 1),
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

fn write_byte(fd: &OwnedFd) -> nix::Result<()> {
    loop {
        match nix::unistd::write(fd.as_fd(), &[1]) {
            Ok(_) => return Ok(()),
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

impl VmmSide {
    /// In the VMM: enters a new user namespace and returns once the supervisor has mapped it.
    pub(super) fn enter(self) -> Result<(), JailError> {
        unshare(CloneFlags::CLONE_NEWUSER).map_err(|err| JailError::UserNs { err })?;
        write_byte(&self.ready).map_err(sys("tell the supervisor about the user namespace"))?;
        drop(self.ready);
        match read_byte(&self.mapped) {
            Ok(true) => Ok(()),
            Ok(false) => Err(JailError::UserNsNotMapped),
            Err(e) => Err(sys("wait for the user namespace map")(e)),
        }
    }
}

impl SupervisorSide {
    /// In the supervisor: waits until `vmm` has entered its user namespace, then writes the
    /// identity maps and lets it go on. Returns `Ok` without mapping if the VMM failed before
    /// (it reports why itself); on `Err` the VMM learns it from the closed pipe and exits.
    pub(super) fn map(self, vmm: Pid) -> Result<(), JailError> {
        if !read_byte(&self.ready).map_err(sys("wait for the VMM's user namespace"))? {
            return Ok(());
        }
        write_maps(vmm)?;
        write_byte(&self.mapped).map_err(sys("tell the VMM its user namespace is mapped"))
    }
}

/// Writes the identity maps of `pid`'s user namespace (`setgroups` is denied before the gid
/// map, as the kernel requires of that order).
pub(super) fn write_maps(pid: Pid) -> Result<(), JailError> {
    for (file, text) in [
        ("uid_map", IDENTITY_MAP),
        ("setgroups", "deny\n"),
        ("gid_map", IDENTITY_MAP),
    ] {
        let path = PathBuf::from(format!("/proc/{pid}/{file}"));
        // One write(2): the kernel takes a map only whole, in a single write.
        std::fs::write(&path, text).map_err(|err| JailError::Io {
            op: "write",
            path,
            err,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    /// `errno` of the last failed call, in the forked child (no allocation).
    fn errno() -> i32 {
        // SAFETY: reads the calling thread's errno.
        unsafe { *libc::__errno_location() }
    }

    /// In a forked child: enters a user namespace through [`VmmSide::enter`] (the supervisor
    /// side runs in the parent, as in the jail), then, with every capability of that
    /// namespace, tries what the jailed VMM must and must not be able to do in `dir`. Exit
    /// status 0 when everything went as expected, else the number of the failed check.
    #[test]
    fn capabilities_count_only_in_the_vmms_user_namespace() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
        let dir = std::env::temp_dir().join(format!("moat-userns-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let _cleanup = Cleanup(dir.clone());
        // Like an emptyDir: writable by the container's users (leaving euid 0 drops the
        // effective capabilities, as in the virtio-fs server).
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let c_dir = CString::new(dir.to_str().unwrap()).unwrap();
        // SAFETY: a valid path; the fd is closed below.
        let dirfd = unsafe { libc::open(c_dir.as_ptr(), libc::O_PATH | libc::O_DIRECTORY) };
        assert!(dirfd >= 0);
        let sync = Sync::new().unwrap();
        // SAFETY: the child makes raw system calls, the small allocations of
        // `VmmSide::enter` (glibc's fork leaves malloc usable) and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let check = |n: i32, ok: bool| {
                if !ok {
                    // SAFETY: leaving the child.
                    unsafe { libc::_exit(n) };
                }
            };
            check(1, sync.vmm().enter().is_ok());
            // SAFETY: raw system calls on valid NUL-terminated strings and on fds of this
            // process; `_exit` leaves the child.
            unsafe {
                // Every capability in its own namespace...
                check(
                    2,
                    caps::has_cap(None, caps::CapSet::Effective, caps::Capability::CAP_MKNOD)
                        .unwrap_or(false),
                );
                // ... but no device node: CAP_MKNOD counts in the initial namespace only.
                let r = libc::mknodat(
                    dirfd,
                    c"null".as_ptr(),
                    libc::S_IFCHR | 0o666,
                    libc::makedev(1, 3),
                );
                check(4, r < 0 && errno() == libc::EPERM);
                // No mount (the mount namespace belongs to the initial user namespace), no
                // hostname change, no raised hard limit.
                let r = libc::mount(
                    c"none".as_ptr(),
                    c_dir.as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                );
                check(5, r < 0 && errno() == libc::EPERM);
                check(
                    6,
                    libc::sethostname(c"x".as_ptr(), 1) < 0 && errno() == libc::EPERM,
                );
                let big = libc::rlimit {
                    rlim_cur: libc::RLIM_INFINITY,
                    rlim_max: libc::RLIM_INFINITY,
                };
                let low = libc::rlimit {
                    rlim_cur: 64,
                    rlim_max: 64,
                };
                check(7, libc::setrlimit(libc::RLIMIT_NOFILE, &low) == 0);
                check(8, libc::setrlimit(libc::RLIMIT_NOFILE, &big) < 0);
                // FIFOs, and the file-ownership capabilities on host inodes (identity map).
                check(
                    9,
                    libc::mknodat(dirfd, c"fifo".as_ptr(), libc::S_IFIFO | 0o644, 0) == 0,
                );
                check(
                    10,
                    libc::fchownat(dirfd, c"fifo".as_ptr(), 1000, 1000, 0) == 0,
                );
                // Acting as a container's uid 1000, as the virtio-fs server does per request.
                check(11, libc::syscall(libc::SYS_setresgid, -1, 1000, -1) == 0);
                check(12, libc::syscall(libc::SYS_setresuid, -1, 1000, -1) == 0);
                // O_PATH dirfd: openat needs a real directory fd.
                let d = libc::openat(dirfd, c".".as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
                check(13, d >= 0);
                let f = libc::openat(d, c"as1000".as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644);
                check(14, f >= 0);
                libc::_exit(0);
            }
        }
        sync.supervisor().map(Pid::from_raw(pid)).unwrap();
        // Before waitpid: a zombie's /proc entry is still there.
        let map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(dirfd) };
        {
            assert!(libc::WIFEXITED(status), "status {status:#x}");
            assert_eq!(libc::WEXITSTATUS(status), 0, "failed check");
            assert_eq!(
                map.split_whitespace().collect::<Vec<_>>(),
                ["0", "0", "4294967295"]
            );
            assert!(std::fs::symlink_metadata(dir.join("null")).is_err());
            let fifo = std::fs::symlink_metadata(dir.join("fifo")).unwrap();
            assert!(fifo.file_type().is_fifo());
            assert_eq!((fifo.uid(), fifo.gid()), (1000, 1000));
            let f = std::fs::metadata(dir.join("as1000")).unwrap();
            assert_eq!(
                (f.uid(), f.gid()),
                (1000, 1000),
                "owned by the caller's uid on the host"
            );
        }
    }

    struct Cleanup(std::path::PathBuf);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
