//! The shim daemon's own mount namespace. Every mount the shim makes for a pod (the share
//! tmpfs, container rootfs snapshots, volume binds and their read-only restrictions) lives in
//! it, never in the host's: host mounts still arrive (the namespace is a slave of the host's,
//! so a volume kubelet mounts after the pod started is seen), nothing the shim mounts goes back,
//! and when the shim and its moat-vmm are gone the namespace and every mount in it go with them,
//! on every path (a killed shim included).
//!
//! It matters beyond tidiness: a host directory that a pod binds and that its owner then removes
//! (critest's read-only-mount specs unmount a tmpfs below it and `rm -r` it while the container
//! still runs) must not be `EBUSY` because of a mount in the host's namespace. Under runc those
//! clones live in the container's mount namespace and the kernel detaches them; in the shim's
//! namespace they are treated the same way.
//!
//! `unshare(CLONE_NEWNS)` is refused in a process with more than one thread, so [`enter`] runs
//! in `main` before the tokio runtime starts.

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// Why the shim could not get its own mount namespace.
#[derive(Debug, thiserror::Error)]
pub enum MountNamespaceError {
    /// `unshare(CLONE_NEWNS)` failed (the shim needs `CAP_SYS_ADMIN`, and must run it before
    /// starting threads).
    #[error("cannot create the shim's mount namespace (unshare CLONE_NEWNS): {0}; the shim must run as root, single-threaded at this point")]
    Unshare(#[source] nix::Error),
    /// Making `/` a recursive slave of the host's mounts failed.
    #[error(
        "cannot make the shim's mount namespace a slave of the host's (mount --make-rslave /): {0}"
    )]
    Slave(#[source] nix::Error),
}

/// Moves the calling (single-threaded) process into a new mount namespace whose mounts are
/// recursive slaves of the host's.
pub fn enter() -> Result<(), MountNamespaceError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(MountNamespaceError::Unshare)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(MountNamespaceError::Slave)
}

/// Whether the shim binary was started as the long-running daemon (a `-socket` to serve, no
/// `start`/`delete` action, not `-info`/`-v`): only the daemon mounts, so only it gets a namespace of its own. `start`
/// and `delete` run in containerd's namespace as containerd expects.
pub fn is_daemon<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> bool {
    match containerd_shim::parse(args.get(1..).unwrap_or_default()) {
        Ok(flags) => {
            flags.action.is_empty() && !flags.socket.is_empty() && !flags.version && !flags.info
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_daemon_invocation_is_the_daemon() {
        let base = [
            "containerd-shim-moat-v2",
            "-namespace",
            "k8s.io",
            "-id",
            "pod1",
            "-address",
            "/run/containerd/containerd.sock",
        ];
        assert!(!is_daemon(&base), "no socket to serve");
        let mut base = base.to_vec();
        base.extend(["-socket", "unix:///run/containerd/s/0123"]);
        assert!(is_daemon(&base));
        for action in ["start", "delete"] {
            let mut a = base.to_vec();
            a.push(action);
            assert!(!is_daemon(&a), "{action}");
        }
        assert!(!is_daemon(&["containerd-shim-moat-v2", "-v"]));
        assert!(!is_daemon(&["containerd-shim-moat-v2", "-info"]));
        assert!(!is_daemon(&["containerd-shim-moat-v2", "-no-such-flag"]));
        assert!(!is_daemon::<&str>(&[]));
    }

    /// In a child process (the test harness is multi-threaded, `pre_exec` runs single-threaded
    /// after the fork): after [`enter`], a mount the child makes is not in the parent's mount
    /// table, and a host mount made afterwards reaches the child (slave propagation).
    #[test]
    fn mounts_stay_in_the_namespace_and_host_mounts_arrive() {
        use std::io::{BufRead, BufReader, Write};
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("moat-mntns-{}", std::process::id()));
        let (inner, later) = (dir.join("inner"), dir.join("later"));
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::create_dir_all(&later).unwrap();
        // The host side must propagate to slaves: `dir` is a shared mount of its own.
        mount(
            Some(&dir),
            &dir,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        mount(
            None::<&str>,
            &dir,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .unwrap();
        let script = r#"mount -t tmpfs moat-inner "$1" && echo mounted || exit 1
read go
if awk -v d="$2" '$5==d {f=1} END {exit !f}' /proc/self/mountinfo; then echo seen; else echo unseen; fi"#;
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script, "sh"])
            .arg(&inner)
            .arg(&later)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        // SAFETY: `enter` makes two system calls and allocates nothing that a lock held by
        // another thread of the parent could guard.
        unsafe { cmd.pre_exec(|| enter().map_err(std::io::Error::other)) };
        let mut child = cmd.spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "mounted");
        let inner_s = inner.to_string_lossy().into_owned();
        let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let leaked = host.lines().any(|l| l.split(' ').nth(4) == Some(&*inner_s));
        mount(
            Some("moat-later"),
            &later,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        writeln!(child.stdin.take().unwrap(), "go").unwrap();
        line.clear();
        out.read_line(&mut line).unwrap();
        let status = child.wait().unwrap();
        let _ = nix::mount::umount2(&later, nix::mount::MntFlags::MNT_DETACH);
        let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!leaked, "the namespace's mount reached the host");
        assert_eq!(
            line.trim(),
            "seen",
            "a later host mount did not reach the namespace"
        );
        assert!(status.success());
    }
}
