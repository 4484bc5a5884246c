//! Seccomp filters per VMM thread kind, compiled with rust-vmm's `seccompiler`.
//!
//! Each thread that can be reached by guest input installs the allowlist of its kind once its
//! setup is done and before it handles guest input: a vCPU thread before its first `KVM_RUN`,
//! a device worker thread (virtio-fs, virtio-blk) before its event loop, the main thread
//! (device event loop) once the vCPUs are started, the control socket threads before they read
//! a request. A syscall outside the list kills the whole VMM (`SECCOMP_RET_KILL_PROCESS`,
//! SIGSYS): a compromised thread cannot open files, sockets or processes it never needed.
//! Filters are per thread (no TSYNC) and inherited by threads a filtered thread creates.
//! `--no-seccomp` turns all of this off (debugging, profiling).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The kinds of VMM threads, each with its own allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU: `KVM_RUN` and the port I/O / MMIO device handlers it calls.
    Vcpu,
    /// The main thread's event loop: vsock (Unix sockets), virtio-net (tap reads, writes and
    /// offload settings), rng, serial input, signals, control requests, and the final teardown.
    EventLoop,
    /// A virtio-fs or virtio-blk worker thread: file system calls on the shared directory or
    /// disk image.
    Worker,
    /// The control socket's accept and connection threads.
    Api,
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules did not compile (a bug in this module).
    #[error("cannot build the {0:?} seccomp filter: {1}")]
    Build(ThreadKind, #[source] seccompiler::BackendError),
    /// The rules did not compile to BPF.
    #[error("cannot compile the {0:?} seccomp filter: {1}")]
    Compile(ThreadKind, #[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the {0:?} seccomp filter: {1}")]
    Install(ThreadKind, #[source] seccompiler::Error),
}

/// Whether the VMM's threads run under their seccomp filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompPolicy {
    /// Every thread installs its filter (the default).
    #[default]
    Enforce,
    /// No filters (`--no-seccomp`).
    Off,
}

impl SeccompPolicy {
    /// Installs `kind`'s filter on the calling thread, unless the policy is off.
    pub fn apply(self, kind: ThreadKind) -> Result<(), SeccompError> {
        match self {
            SeccompPolicy::Enforce => apply(kind),
            SeccompPolicy::Off => Ok(()),
        }
    }
}

/// Syscalls every thread makes: memory management (the allocator, thread stacks), futexes
/// (locks, channels, joins), reading and writing fds it already has (eventfds, the log on
/// stderr), time, signal return (the vCPU kick) and exiting.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
];

/// Creating threads (the control socket's per-connection threads): `clone`/`clone3` and what
/// a new Rust thread does on its own before running its closure.
const THREADS: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
];

/// Unix socket traffic: vsock's host side and the control socket.
const SOCKETS: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// The event loop's own extra syscalls: guest-initiated vsock connections to `PATH_<port>`,
/// setting accepted sockets non-blocking, and at teardown removing the sockets it created.
const EVENT_LOOP: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_eventfd2,
];

/// File system calls of the virtio-fs passthrough (fuse-backend-rs) and virtio-blk.
const WORKER: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_openat,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_newfstatat,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_getxattr,
    libc::SYS_setxattr,
    libc::SYS_listxattr,
    libc::SYS_removexattr,
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_dup,
    libc::SYS_umask,
    libc::SYS_getuid,
    libc::SYS_getgid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_copy_file_range,
];

/// `KVM_RUN` (`_IO(KVMIO, 0x80)`): the only ioctl a vCPU thread makes once running.
const KVM_RUN: u64 = 0xae80;
/// `FIONBIO`: what `set_nonblocking` issues on accepted/connected Unix sockets.
const FIONBIO: u64 = 0x5421;
/// `TUNSETOFFLOAD`: virtio-net sets the tap's offloads when the driver (re)activates it.
const TUNSETOFFLOAD: u64 = libc::TUNSETOFFLOAD;

/// An allowlist entry for `ioctl` restricted to the given request numbers.
fn ioctl_rules(kind: ThreadKind, requests: &[u64]) -> Result<Vec<SeccompRule>, SeccompError> {
    requests
        .iter()
        .map(|&req| {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, req)
                .map_err(|e| SeccompError::Build(kind, e))?;
            SeccompRule::new(vec![cond]).map_err(|e| SeccompError::Build(kind, e))
        })
        .collect()
}

/// The allowlist of `kind`: syscall number → rules (empty: allowed with any arguments).
fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut sets: Vec<&[i64]> = vec![COMMON];
    let ioctls: &[u64] = match kind {
        ThreadKind::Vcpu => &[KVM_RUN],
        ThreadKind::EventLoop => {
            sets.extend([SOCKETS, EVENT_LOOP]);
            &[FIONBIO, TUNSETOFFLOAD]
        }
        ThreadKind::Worker => {
            sets.push(WORKER);
            &[]
        }
        ThreadKind::Api => {
            sets.extend([SOCKETS, THREADS, &[libc::SYS_unlink][..]]);
            &[FIONBIO]
        }
    };
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = sets
        .into_iter()
        .flatten()
        .map(|&nr| (nr, Vec::new()))
        .collect();
    if !ioctls.is_empty() {
        map.insert(libc::SYS_ioctl, ioctl_rules(kind, ioctls)?);
    }
    Ok(map)
}

/// Compiles `kind`'s filter: allowlisted syscalls pass, anything else kills the process.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let f = SeccompFilter::new(
        rules(kind)?,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(kind, e))?;
    f.try_into().map_err(|e| SeccompError::Compile(kind, e))
}

/// Installs `kind`'s filter on the calling thread (sets `no_new_privs` first).
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let prog = filter(kind)?;
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Install(kind, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ThreadKind; 4] = [
        ThreadKind::Vcpu,
        ThreadKind::EventLoop,
        ThreadKind::Worker,
        ThreadKind::Api,
    ];

    /// Forks; the child installs `prog` and runs `body`, then exits 0. Returns the child's
    /// wait status. Only async-signal-safe calls happen in the child.
    fn in_filtered_child(prog: &BpfProgram, body: impl FnOnce()) -> libc::c_int {
        // SAFETY: fork in a test; the child only makes raw syscalls and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            if seccompiler::apply_filter(prog).is_err() {
                // SAFETY: leaving the child.
                unsafe { libc::_exit(100) };
            }
            body();
            // SAFETY: leaving the child.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    #[test]
    fn every_filter_compiles() {
        for kind in ALL {
            assert!(!filter(kind).unwrap().is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn vcpu_filter_kills_on_a_forbidden_syscall() {
        let prog = filter(ThreadKind::Vcpu).unwrap();
        let status = in_filtered_child(&prog, || {
            // SAFETY: a raw syscall with no memory arguments; it must not return.
            unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    #[test]
    fn vcpu_filter_kills_on_a_non_kvm_run_ioctl() {
        let prog = filter(ThreadKind::Vcpu).unwrap();
        let status = in_filtered_child(&prog, || {
            let on: libc::c_int = 1;
            // SAFETY: FIONBIO on stdin with a valid pointer; must be killed before it runs.
            unsafe { libc::ioctl(0, FIONBIO as _, &on) };
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    #[test]
    fn allowed_syscalls_pass() {
        for kind in ALL {
            let prog = filter(kind).unwrap();
            let status = in_filtered_child(&prog, || {
                // SAFETY: plain syscalls on no memory or on a local buffer.
                unsafe {
                    libc::syscall(libc::SYS_getpid);
                    let buf = [0u8; 0];
                    libc::syscall(libc::SYS_write, 2, buf.as_ptr(), 0);
                }
            });
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "{kind:?}: status {status:#x}"
            );
        }
    }

    #[test]
    fn only_the_event_loop_may_set_tap_offloads() {
        for (kind, killed) in [(ThreadKind::EventLoop, false), (ThreadKind::Vcpu, true)] {
            let prog = filter(kind).unwrap();
            let status = in_filtered_child(&prog, || {
                // SAFETY: on fd -1 the ioctl fails with EBADF if the filter lets it through.
                unsafe { libc::ioctl(-1, libc::TUNSETOFFLOAD, 0) };
            });
            assert_eq!(libc::WIFSIGNALED(status), killed, "{kind:?}: {status:#x}");
        }
    }

    #[test]
    fn worker_filter_forbids_sockets_and_exec() {
        let prog = filter(ThreadKind::Worker).unwrap();
        for nr in [libc::SYS_socket, libc::SYS_execve] {
            let status = in_filtered_child(&prog, || {
                // SAFETY: null arguments; the syscall must be killed before it runs.
                unsafe { libc::syscall(nr, 0, 0, 0) };
            });
            assert_eq!(libc::WTERMSIG(status), libc::SIGSYS, "syscall {nr}");
        }
    }

    #[test]
    fn policy_off_installs_nothing() {
        // Would kill the test process if it installed anything forbidding the harness' calls.
        SeccompPolicy::Off.apply(ThreadKind::Vcpu).unwrap();
    }
}
