//! The VMM's confinement (the "jail"), on unless `--no-jail`: set up at the top of `main`,
//! while the process is still single-threaded, before any device or guest memory exists.
//!
//! [`enter`] splits the process in two:
//! - the **supervisor** (the pid the caller started) stays in the caller's namespaces; it
//!   forwards SIGTERM/SIGINT/SIGHUP to the VMM, waits for it and exits with its status (a VMM
//!   killed by signal N: 128 + N), then undoes what it did to the host mount table;
//! - the **VMM** is PID 1 of a new pid namespace, in new mount, IPC and UTS namespaces, dies
//!   with the supervisor (`PR_SET_PDEATHSIG`), and sees a root file system that is a read-only
//!   tmpfs holding only the paths its configuration names, bind-mounted at the same absolute
//!   paths (files read-only where the VM only reads them), `/dev/kvm`, `/dev/null`,
//!   `/dev/urandom` (and `/dev/net/tun` with `--net`) and a `/proc` limited to processes. It runs
//!   with rlimits on fds, address space and core dumps, an empty capability bounding set, no
//!   ambient capabilities, `no_new_privs`, and either no capabilities at all (as uid 0, or as
//!   `--jail-uid`/`--jail-gid`) or, when it serves virtio-fs, only the file-ownership
//!   capabilities the in-process server needs. docs/security.md explains each choice.
//!
//! Every path of the configuration is made canonical first (absolute, no symlinks), so the
//! same strings name the same files inside the jail.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability};
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{
    fork, pipe2, pivot_root, setgroups, setresgid, setresuid, ForkResult, Gid, Pid, Uid,
};

use crate::config::{SerialOut, VmConfig};

/// `RLIMIT_NOFILE` of a VMM without virtio-fs: vsock connections, disks, taps, eventfds and
/// KVM fds stay far below it.
pub const NOFILE: u64 = 4096;
/// `RLIMIT_NOFILE` of a VMM serving virtio-fs (capped by `/proc/sys/fs/nr_open`): the
/// passthrough server holds one fd per guest-cached inode, as virtiofsd does.
pub const NOFILE_FS: u64 = 1 << 20;
/// `RLIMIT_AS` is guest RAM plus this margin (MiB) for the VMM's own mappings: thread stacks,
/// malloc arenas (up to 64 MiB of address space each), the binary and its buffers.
pub const AS_MARGIN_MIB: u64 = 4096;
/// Where the new root is assembled before `pivot_root` (in the VMM's own mount namespace;
/// the host's /tmp is not touched).
const STAGING: &str = "/tmp";

/// The capabilities a VMM serving virtio-fs keeps (virtiofsd's set): the passthrough server
/// switches its effective uid/gid to the guest caller's for each request and creates, chowns
/// and chmods files on the guest's behalf, device nodes and file capabilities included.
pub const FS_CAPS: [Capability; 8] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_MKNOD,
    Capability::CAP_SETFCAP,
];

/// Devices the VMM may open, bound into the jail when they exist on the host.
const DEVICES: [&str; 3] = ["/dev/kvm", "/dev/null", "/dev/urandom"];
/// The tap clone device, bound only when the VM has `--net` devices.
const TUN: &str = "/dev/net/tun";

/// Confinement options (`--no-jail`, `--jail-uid`, `--jail-gid`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// Confine the VMM (the default); `--no-jail` turns it off.
    pub enabled: bool,
    /// Run as this uid/gid instead of uid 0 without capabilities. The caller makes sure that
    /// uid/gid can open `/dev/kvm` and everything the configuration names.
    pub ids: Option<(u32, u32)>,
}

impl Default for JailConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ids: None,
        }
    }
}

/// Jail set-up failures (the VMM exits with status 1 and the message).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Something started a thread before the jail: namespaces cannot be entered then.
    #[error("the jail must be set up while moat-vmm is single-threaded, but {0} threads run")]
    Threaded(usize),
    /// A path the configuration names cannot be resolved or opened.
    #[error("jail: {what} {path}: {err}")]
    Path {
        /// Which option the path comes from.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        err: io::Error,
    },
    /// A system call of the set-up failed.
    #[error("jail: {op}: {err} (confinement needs root; --no-jail runs the VMM unconfined)")]
    Sys {
        /// What was being done.
        op: String,
        /// The error.
        err: nix::Error,
    },
    /// Changing the capability sets failed.
    #[error("jail: {op}: {err}")]
    Caps {
        /// What was being done.
        op: &'static str,
        /// The error.
        err: caps::errors::CapsError,
    },
    /// A file operation while building the new root failed.
    #[error("jail: {op} {path}: {err}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        err: io::Error,
    },
}

fn sys(op: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let op = op.into();
    move |err| JailError::Sys { op, err }
}

fn caps_err(op: &'static str) -> impl FnOnce(caps::errors::CapsError) -> JailError {
    move |err| JailError::Caps { op, err }
}

/// Which side of the fork [`enter`] returned on.
#[derive(Debug, PartialEq, Eq)]
pub enum Role {
    /// The confined VMM: go on building and running the VM.
    Vmm,
    /// The supervisor, after the VMM exited: exit with this status.
    Supervisor(i32),
}

/// How a path is bound into the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// A file the VMM only reads.
    ReadOnly,
    /// A file the VMM writes.
    ReadWrite,
    /// A directory the VMM creates files or sockets in, or serves over virtio-fs
    /// (recursively, with later host mounts below it propagating in).
    Dir,
    /// A device node.
    Device,
}

/// Makes `p` canonical. A path that does not resolve is only made absolute: it is not bound
/// into the jail, and the VMM reports it when it opens it, as it would unconfined.
fn canonical(p: &Path) -> PathBuf {
    fs::canonicalize(p)
        .or_else(|_| std::path::absolute(p))
        .unwrap_or_else(|_| p.to_owned())
}

/// Makes the directory of `p` canonical (the file itself may not exist yet).
fn canonical_parent(p: &Path) -> PathBuf {
    match (p.parent(), p.file_name()) {
        (Some(d), Some(name)) if !d.as_os_str().is_empty() => canonical(d).join(name),
        (_, Some(_)) => canonical(Path::new(".")).join(p),
        _ => canonical(p),
    }
}

/// Rewrites every path of `cfg` to its canonical form, so that it names the same file inside
/// the jail (whose root holds no symlinks and whose working directory is `/`).
pub fn canonicalize(cfg: &mut VmConfig) {
    cfg.kernel = canonical(&cfg.kernel);
    if let Some(i) = cfg.initrd.as_mut() {
        *i = canonical(i);
    }
    for b in &mut cfg.blk {
        b.path = canonical(&b.path);
    }
    for f in &mut cfg.fs {
        f.dir = canonical(&f.dir);
    }
    if let SerialOut::File(p) = &mut cfg.serial {
        *p = canonical_parent(p);
    }
    if let Some(v) = cfg.vsock.as_mut() {
        v.uds = canonical_parent(&v.uds);
    }
    if let Some(a) = cfg.api_sock.as_mut() {
        *a = canonical_parent(a);
    }
}

/// The paths to bind into the jail, parents before children (a canonical `cfg`); of those,
/// only the ones `exists` says are there.
fn plan(cfg: &VmConfig, exists: impl Fn(&Path) -> bool) -> Vec<(PathBuf, Kind)> {
    let mut binds: BTreeMap<PathBuf, Kind> = BTreeMap::new();
    let mut add = |p: &Path, k: Kind| {
        if !exists(p) {
            return;
        }
        let e = binds.entry(p.to_owned()).or_insert(k);
        // The same file named twice (say, read-only and read-write) gets the wider access.
        *e = (*e).max(k);
    };
    add(&cfg.kernel, Kind::ReadOnly);
    if let Some(i) = &cfg.initrd {
        add(i, Kind::ReadOnly);
    }
    for b in &cfg.blk {
        add(
            &b.path,
            if b.read_only {
                Kind::ReadOnly
            } else {
                Kind::ReadWrite
            },
        );
    }
    for f in &cfg.fs {
        add(&f.dir, Kind::Dir);
    }
    let sockets = [
        match &cfg.serial {
            SerialOut::File(p) => Some(p),
            _ => None,
        },
        cfg.vsock.as_ref().map(|v| &v.uds),
        cfg.api_sock.as_ref(),
    ];
    for p in sockets.into_iter().flatten() {
        if let Some(d) = p.parent() {
            add(d, Kind::Dir);
        }
    }
    for d in DEVICES {
        add(Path::new(d), Kind::Device);
    }
    if !cfg.net.is_empty() {
        add(Path::new(TUN), Kind::Device);
    }
    binds.into_iter().collect()
}

/// The capabilities the VMM keeps (when it stays uid 0).
fn kept_caps(cfg: &VmConfig) -> HashSet<Capability> {
    let mut keep = HashSet::new();
    // A deferred start may receive `add-fs` before boot.
    if !cfg.fs.is_empty() || cfg.defer_start {
        keep.extend(FS_CAPS);
    }
    if !cfg.net.is_empty() {
        // Attaching to a tap its owner did not hand to our uid (TUNSETIFF).
        keep.insert(Capability::CAP_NET_ADMIN);
    }
    keep
}

/// One line of /proc/self/mountinfo, the fields the jail needs.
#[derive(Debug, PartialEq, Eq)]
struct MountEntry {
    mount_point: PathBuf,
    shared: bool,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let digits = b.get(i + 1..i + 4);
        if b[i] == b'\\' && digits.is_some_and(|d| d.iter().all(|c| (b'0'..=b'7').contains(c))) {
            let v = digits
                .unwrap_or_default()
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let mount_point = PathBuf::from(unescape(fields.get(4)?));
            let shared = fields.get(6..sep)?.iter().any(|f| f.starts_with("shared:"));
            Some(MountEntry {
                mount_point,
                shared,
            })
        })
        .collect()
}

/// Whether mounts the host makes below `dir` later reach a copy of it in another mount
/// namespace: the topmost mount holding `dir` must be shared.
fn propagates(entries: &[MountEntry], dir: &Path) -> bool {
    let mut best: Option<&MountEntry> = None;
    for e in entries {
        if dir.starts_with(&e.mount_point)
            && best.is_none_or(|b| {
                e.mount_point.components().count() >= b.mount_point.components().count()
            })
        {
            best = Some(e);
        }
    }
    best.is_some_and(|e| e.shared)
}

/// Host side, for each virtio-fs share: the shim mounts container root file systems below the
/// share after the VM started, and the guest must see them. They reach the jail's copy of the
/// share only through mount propagation, so a share whose host mount is not shared is made a
/// shared bind mount of itself (undone by the supervisor when the VMM exits). Returns what to
/// undo.
fn make_shares_propagate(cfg: &VmConfig) -> Result<Vec<PathBuf>, JailError> {
    if cfg.fs.is_empty() {
        return Ok(Vec::new());
    }
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(|err| JailError::Io {
        op: "read",
        path: "/proc/self/mountinfo".into(),
        err,
    })?;
    let entries = parse_mountinfo(&info);
    let mut made = Vec::new();
    for share in &cfg.fs {
        if propagates(&entries, &share.dir) || made.contains(&share.dir) {
            continue;
        }
        let d = share.dir.as_path();
        let res = mount(
            Some(d),
            d,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(sys(format!("bind {} on itself", d.display())));
        if let Err(e) = res {
            undo_shares(&made);
            return Err(e);
        }
        made.push(share.dir.clone());
        if let Err(err) = mount(
            None::<&str>,
            d,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        ) {
            undo_shares(&made);
            return Err(sys(format!("make {} a shared mount", d.display()))(err));
        }
    }
    Ok(made)
}

fn undo_shares(made: &[PathBuf]) {
    for d in made.iter().rev() {
        if let Err(e) = umount2(d, MntFlags::MNT_DETACH) {
            tracing::warn!("jail: cannot unmount {}: {e}", d.display());
        }
    }
}

fn thread_count() -> usize {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(1)
}

fn termination_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set
}

/// Confines the VMM (see the module doc). Canonicalizes `cfg`'s paths first. Returns
/// [`Role::Vmm`] in the confined process and [`Role::Supervisor`] with the exit status in the
/// original one once the VMM has exited. Must run before any thread is started.
pub fn enter(cfg: &mut VmConfig) -> Result<Role, JailError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(JailError::Threaded(threads));
    }
    canonicalize(cfg);
    let binds = plan(cfg, Path::exists);
    let nr_open = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(NOFILE_FS);
    let made = make_shares_propagate(cfg)?;

    // Termination signals stay blocked from here on in both processes: the supervisor takes
    // them with sigwait, the VMM (PID 1 of its namespace, which drops signals it neither
    // handles nor blocks) with the signalfd `main` creates; one sent in between stays pending.
    let mut supervised = termination_signals();
    supervised.add(Signal::SIGCHLD);
    let mut old = SigSet::empty();
    let set_up = (|| {
        // An inherited SIG_IGN would have the kernel reap the VMM before the supervisor can
        // collect its status.
        // SAFETY: restores the default disposition; no handler is installed.
        unsafe { nix::sys::signal::signal(Signal::SIGCHLD, nix::sys::signal::SigHandler::SigDfl) }
            .map_err(sys("reset SIGCHLD"))?;
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&supervised), Some(&mut old))
            .map_err(sys("block signals"))?;
        let (alive_r, alive_w) = pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
        unshare(CloneFlags::CLONE_NEWPID).map_err(sys("unshare the pid namespace"))?;
        // SAFETY: the process is single-threaded (checked above), so the child may run
        // arbitrary code.
        let forked = unsafe { fork() }.map_err(sys("fork"))?;
        Ok::<_, JailError>((forked, alive_r, alive_w))
    })();
    let (forked, alive_r, alive_w) = match set_up {
        Ok(v) => v,
        Err(e) => {
            undo_shares(&made);
            return Err(e);
        }
    };
    match forked {
        ForkResult::Parent { child } => {
            drop(alive_r);
            let code = supervise(child, &supervised);
            undo_shares(&made);
            drop(alive_w);
            Ok(Role::Supervisor(code))
        }
        ForkResult::Child => {
            drop(alive_w);
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(sys("PR_SET_PDEATHSIG"))?;
            // The supervisor may have died before the line above: then the pipe is closed.
            let mut fds = [PollFd::new(alive_r.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0) {
                std::process::exit(1);
            }
            drop(alive_r);
            let mut mask = old;
            for s in termination_signals().iter() {
                mask.add(s);
            }
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&mask), None)
                .map_err(sys("set the signal mask"))?;
            confine(cfg, &binds, nr_open)?;
            Ok(Role::Vmm)
        }
    }
}

/// Forwards termination signals to `child` until it exits; returns its exit status.
fn supervise(child: Pid, set: &SigSet) -> i32 {
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return code,
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    eprintln!("moat-vmm: the jailed VMM was killed by {sig}");
                    return 128 + sig as i32;
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("moat-vmm: waiting for the jailed VMM: {e}");
                    return 1;
                }
            },
            Ok(sig) => {
                let _ = kill(child, sig);
            }
            Err(_) => {}
        }
    }
}

/// In the forked VMM: namespaces, the new root, rlimits, credentials.
fn confine(cfg: &VmConfig, binds: &[(PathBuf, Kind)], nr_open: u64) -> Result<(), JailError> {
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
        .map_err(sys("unshare the mount, IPC and UTS namespaces"))?;
    // Nothing done below may propagate back to the host; host mounts still propagate in.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(sys("make / a slave mount"))?;
    build_root(binds)?;
    limit(cfg, nr_open)?;
    drop_privileges(cfg)
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JailError {
    let path = path.to_owned();
    move |err| JailError::Io { op, path, err }
}

/// Assembles the new root on a tmpfs at [`STAGING`] and pivots into it.
fn build_root(binds: &[(PathBuf, Kind)]) -> Result<(), JailError> {
    // Held open first: the tmpfs below may hide some of them.
    let mut sources = Vec::with_capacity(binds.len());
    for (path, kind) in binds {
        // O_PATH: nothing is read or written through it, device nodes are not opened.
        let fd: OwnedFd = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(path)
            .map_err(|err| JailError::Path {
                what: "bind source",
                path: path.clone(),
                err,
            })?
            .into();
        sources.push((path, *kind, fd));
    }
    let staging = Path::new(STAGING);
    let common = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("moat-vmm-root"),
        staging,
        Some("tmpfs"),
        common,
        Some("mode=0755,size=1m,nr_inodes=4096"),
    )
    .map_err(sys(format!("mount a tmpfs on {STAGING}")))?;
    for (path, kind, fd) in &sources {
        let target = staging.join(path.strip_prefix("/").unwrap_or(path));
        let parent = target.parent().unwrap_or(staging);
        fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        if fs::symlink_metadata(&target).is_err() {
            if *kind == Kind::Dir {
                fs::create_dir(&target).map_err(io_err("create", &target))?;
            } else {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(io_err("create", &target))?;
            }
        }
        let source = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(sys(format!("bind {} into the jail", path.display())))?;
        let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID;
        flags |= MsFlags::MS_NOEXEC;
        if *kind != Kind::Device {
            // A guest that creates a device node in a virtio-fs share cannot open it through
            // the VMM.
            flags |= MsFlags::MS_NODEV;
        }
        if *kind == Kind::ReadOnly {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
            .map_err(sys(format!("restrict the bind of {}", path.display())))?;
    }
    drop(sources);
    mount_proc(&staging.join("proc"))?;
    std::env::set_current_dir(staging).map_err(io_err("chdir", staging))?;
    pivot_root(".", ".").map_err(sys("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detach the old root"))?;
    std::env::set_current_dir("/").map_err(io_err("chdir", Path::new("/")))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | common,
        None::<&str>,
    )
    .map_err(sys("make the jail root read-only"))
}

/// A proc of the VMM's own pid namespace (the virtio-fs server reopens files through
/// /proc/self/fd). With `subset=pid` (Linux 5.8+) it holds only process directories; on
/// older kernels /proc/sys and /proc/sysrq-trigger, writable by uid 0 without capabilities,
/// are made read-only.
fn mount_proc(target: &Path) -> Result<(), JailError> {
    fs::create_dir(target).map_err(io_err("create", target))?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if mount(
        Some("proc"),
        target,
        Some("proc"),
        flags,
        Some("subset=pid"),
    )
    .is_ok()
    {
        return Ok(());
    }
    mount(Some("proc"), target, Some("proc"), flags, None::<&str>)
        .map_err(sys("mount /proc in the jail"))?;
    for p in ["sys", "sysrq-trigger"] {
        let p = target.join(p);
        mount(
            Some(&p),
            &p,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(sys(format!("bind {}", p.display())))?;
        mount(
            None::<&str>,
            &p,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | flags,
            None::<&str>,
        )
        .map_err(sys(format!("make {} read-only", p.display())))?;
    }
    Ok(())
}

/// The rlimits of the jailed VMM.
fn rlimits(cfg: &VmConfig, nr_open: u64) -> [(Resource, u64); 3] {
    let nofile = if cfg.fs.is_empty() && !cfg.defer_start {
        NOFILE
    } else {
        NOFILE_FS.min(nr_open)
    };
    [
        (Resource::RLIMIT_NOFILE, nofile),
        (
            Resource::RLIMIT_AS,
            (cfg.mem_mib + AS_MARGIN_MIB).saturating_mul(1 << 20),
        ),
        // A core dump would hold guest memory.
        (Resource::RLIMIT_CORE, 0),
    ]
}

fn limit(cfg: &VmConfig, nr_open: u64) -> Result<(), JailError> {
    for (res, v) in rlimits(cfg, nr_open) {
        let (_, hard) = getrlimit(res).map_err(sys(format!("getrlimit {res:?}")))?;
        // Raising a hard limit needs CAP_SYS_RESOURCE: without it, the current one stays.
        match setrlimit(res, v, v) {
            Ok(()) => {}
            Err(_) if v > hard => {
                setrlimit(res, hard, hard).map_err(sys(format!("setrlimit {res:?}")))?
            }
            Err(e) => return Err(sys(format!("setrlimit {res:?}"))(e)),
        }
    }
    Ok(())
}

fn drop_privileges(cfg: &VmConfig) -> Result<(), JailError> {
    for c in caps::all() {
        caps::drop(None, CapSet::Bounding, c).map_err(caps_err("clear the bounding set"))?;
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_err("clear the ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_err("clear the inheritable set"))?;
    match cfg.jail.ids {
        Some((uid, gid)) => {
            let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
            setgroups(&[]).map_err(sys("setgroups"))?;
            setresgid(gid, gid, gid).map_err(sys(format!("setresgid {gid}")))?;
            // Leaving uid 0 clears the permitted and effective sets.
            setresuid(uid, uid, uid).map_err(sys(format!("setresuid {uid}")))?;
        }
        None => {
            let keep = kept_caps(cfg);
            caps::set(None, CapSet::Effective, &keep).map_err(caps_err("set the effective set"))?;
            caps::set(None, CapSet::Permitted, &keep).map_err(caps_err("set the permitted set"))?;
        }
    }
    nix::sys::prctl::set_no_new_privs().map_err(sys("PR_SET_NO_NEW_PRIVS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(args: &str) -> VmConfig {
        VmConfig::from_args(args.split_whitespace().map(String::from)).unwrap()
    }

    #[test]
    fn plan_binds_what_the_config_names_parents_first() {
        let c = cfg(
            "--kernel /k/vmlinux --initrd /k/initrd --blk /d/a:ro --blk /d/b --fs r=/s/shared \
             --serial file:/s/console.log --vsock-uds /s/vsock.sock --api-sock /s/api.sock \
             --net tap=t0",
        );
        let p = plan(&c, |_| true);
        let want: Vec<(PathBuf, Kind)> = vec![
            ("/d/a".into(), Kind::ReadOnly),
            ("/d/b".into(), Kind::ReadWrite),
            ("/dev/kvm".into(), Kind::Device),
            ("/dev/net/tun".into(), Kind::Device),
            ("/dev/null".into(), Kind::Device),
            ("/dev/urandom".into(), Kind::Device),
            ("/k/initrd".into(), Kind::ReadOnly),
            ("/k/vmlinux".into(), Kind::ReadOnly),
            ("/s".into(), Kind::Dir),
            ("/s/shared".into(), Kind::Dir),
        ];
        assert_eq!(p, want);
        // No tun without --net, nothing missing, wider access wins on duplicates.
        let p = plan(&cfg("--kernel /k --blk /k:rw --initrd /i"), |p| {
            [Path::new("/k"), Path::new("/dev/kvm")].contains(&p)
        });
        assert_eq!(
            p,
            vec![
                ("/dev/kvm".into(), Kind::Device),
                ("/k".into(), Kind::ReadWrite)
            ]
        );
    }

    #[test]
    fn canonicalize_resolves_relative_paths_and_new_files() {
        let dir = std::env::temp_dir().join(format!("moat-jail-canon-{}", std::process::id()));
        fs::create_dir_all(dir.join("real")).unwrap();
        let _ = fs::remove_file(dir.join("link"));
        std::os::unix::fs::symlink(dir.join("real"), dir.join("link")).unwrap();
        fs::write(dir.join("real/k"), b"").unwrap();
        let l = dir.join("link");
        let mut c = cfg(&format!(
            "--kernel {0}/k --serial file:{0}/console --api-sock {0}/api.sock",
            l.display()
        ));
        canonicalize(&mut c);
        let real = fs::canonicalize(dir.join("real")).unwrap();
        assert_eq!(c.kernel, real.join("k"));
        assert_eq!(c.serial, SerialOut::File(real.join("console")));
        assert_eq!(c.api_sock, Some(real.join("api.sock")));
        // Missing paths are made absolute and left for the VMM to report.
        let mut c = cfg("--kernel missing/k --api-sock a.sock");
        canonicalize(&mut c);
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(c.kernel, cwd.join("missing/k"));
        assert_eq!(
            c.api_sock,
            Some(fs::canonicalize(&cwd).unwrap().join("a.sock"))
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn mountinfo_propagation() {
        let info = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 22 0:40 / /run rw shared:5 - tmpfs tmpfs rw
31 30 0:41 / /run/a\\040b rw master:3 - tmpfs tmpfs rw
32 30 0:42 / /run/p rw - tmpfs tmpfs rw
";
        let e = parse_mountinfo(info);
        assert_eq!(
            e[2],
            MountEntry {
                mount_point: "/run/a b".into(),
                shared: false
            }
        );
        assert!(!propagates(&e, Path::new("/srv/x")));
        assert!(propagates(&e, Path::new("/run/x/y")));
        assert!(!propagates(&e, Path::new("/run/a b/c")));
        assert!(!propagates(&e, Path::new("/run/p")));
        // A later mount on the same point is the visible one.
        let e = parse_mountinfo(&format!(
            "{info}33 32 0:43 / /run/p rw shared:9 - tmpfs t rw\n"
        ));
        assert!(propagates(&e, Path::new("/run/p/q")));
    }

    #[test]
    fn caps_and_limits_follow_the_devices() {
        let plain = cfg("--kernel /k --mem-mib 512");
        assert!(kept_caps(&plain).is_empty());
        let l = rlimits(&plain, 1 << 30);
        assert_eq!(l[0], (Resource::RLIMIT_NOFILE, NOFILE));
        assert_eq!(l[1], (Resource::RLIMIT_AS, (512 + AS_MARGIN_MIB) << 20));
        assert_eq!(l[2], (Resource::RLIMIT_CORE, 0));
        let fs = cfg("--kernel /k --fs t=/d --net tap=t0");
        let k = kept_caps(&fs);
        assert!(FS_CAPS.iter().all(|c| k.contains(c)));
        assert!(k.contains(&Capability::CAP_NET_ADMIN));
        assert!(!k.contains(&Capability::CAP_SYS_ADMIN));
        assert_eq!(k.len(), FS_CAPS.len() + 1);
        assert_eq!(rlimits(&fs, 65536)[0], (Resource::RLIMIT_NOFILE, 65536));
    }

    #[test]
    fn unescape_octal() {
        assert_eq!(unescape("a\\040b\\011c\\\\d"), "a b\tc\\\\d");
        assert_eq!(unescape("end\\04"), "end\\04");
    }
}
