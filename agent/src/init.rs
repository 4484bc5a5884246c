//! The `moat-agent __init` helper: a single-threaded process the agent
//! spawns (fresh `execve` of its own binary, so no state of the threaded
//! agent leaks in) to build one container, exec'd process or the sandbox's
//! namespace holder.
//!
//! Sequence: read [`InitConfig`] from fd 3 → join the cgroup → join
//! namespaces → unshare new ones → fork (so the child is inside the new PID
//! namespace) → the parent reports the child's PID and exits; the child does
//! the rootfs setup (mounts, devices, `pivot_root`; then the sysctls; then masked/read-only
//! paths: [`crate::rootfs`]), reports Ready, waits for Start, drops privileges (rlimits, user, groups,
//! capabilities, no_new_privs, seccomp) and `execve`s the workload. Errors
//! go back to the agent over fd 3; on success the close-on-exec socket simply
//! reaches end of stream.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::SigHandler;
use nix::sys::stat::Mode;
use nix::unistd::{chdir, execve, fork, ForkResult, Gid, Uid};
use oci_spec::runtime::{LinuxCapabilities, Process};

use crate::ipc::{self, InitConfig, InitMsg, Kind, START_BYTE};
use crate::net::NetError;
use crate::rootfs::{finish_rootfs, setup_rootfs, RootfsError};

/// Environment variable naming the control socket fd.
pub const INIT_FD_ENV: &str = "_MOAT_INIT_FD";

/// Errors of container setup inside the helper.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Building the container's mount tree failed.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// Raising `lo` in a new network namespace failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Changing the capability sets failed.
    #[error("{what}: {source}")]
    Caps {
        /// Which change.
        what: String,
        /// The error.
        #[source]
        source: caps::errors::CapsError,
    },
    /// The kernel refused a seccomp filter.
    #[error("installing seccomp filter: {0}")]
    Seccomp(#[source] seccompiler::Error),
    /// The control channel failed.
    #[error(transparent)]
    Ipc(#[from] ipc::IpcError),
    /// The config asks for something that cannot be done.
    #[error("{0}")]
    Bad(String),
}

type Result<T> = std::result::Result<T, InitError>;

fn sys(what: impl FnOnce() -> String) -> impl FnOnce(nix::Error) -> InitError {
    move |source| InitError::Sys {
        what: what(),
        source,
    }
}

fn io(what: impl FnOnce() -> String) -> impl FnOnce(std::io::Error) -> InitError {
    move |source| InitError::Io {
        what: what(),
        source,
    }
}

/// Entry point of `moat-agent __init`; never returns.
pub fn main() -> ! {
    let fd: i32 = match std::env::var(INIT_FD_ENV).ok().and_then(|v| v.parse().ok()) {
        Some(fd) => fd,
        None => {
            eprintln!("moat-agent __init is internal to the agent ({INIT_FD_ENV} not set)");
            std::process::exit(2);
        }
    };
    // SAFETY: the agent passed this descriptor to us and nothing else owns it.
    let mut sock = unsafe { UnixStream::from_raw_fd(fd) };
    if let Err(e) = run(&mut sock) {
        let _ = ipc::send(&mut sock, &InitMsg::Error(e.to_string()));
        std::process::exit(1);
    }
    std::process::exit(0);
}

fn run(sock: &mut UnixStream) -> Result<()> {
    // The descriptor must not reach the workload.
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(sock),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(sys(|| "marking the control socket close-on-exec".into()))?;
    let cfg: InitConfig =
        ipc::recv(sock)?.ok_or_else(|| InitError::Bad("no config received".into()))?;

    if let Some(procs) = &cfg.cgroup_procs {
        std::fs::write(procs, "0").map_err(io(|| format!("joining cgroup {}", procs.display())))?;
    }
    // Open every namespace first: after joining the mount namespace the
    // agent's /proc paths are gone.
    let mut joins = Vec::new();
    for (ns, path) in &cfg.join_namespaces {
        let f = File::open(path).map_err(io(|| format!("opening namespace {}", path.display())))?;
        joins.push((*ns, f, path));
    }
    joins.sort_by_key(|(ns, _, _)| *ns == ipc::Ns::Mount);
    let root = match &cfg.enter_root {
        Some(p) => Some(File::open(p).map_err(io(|| format!("opening {}", p.display())))?),
        None => None,
    };
    for (ns, f, path) in &joins {
        setns(f.as_fd(), ns.flag())
            .map_err(sys(|| format!("joining namespace {}", path.display())))?;
    }
    let mut flags = CloneFlags::empty();
    for ns in &cfg.new_namespaces {
        flags |= ns.flag();
    }
    unshare(flags).map_err(sys(|| format!("unshare({flags:?})")))?;
    if flags.contains(CloneFlags::CLONE_NEWNET) {
        crate::net::loopback_up()?;
    }
    if let Some(root) = &root {
        nix::unistd::fchdir(std::os::fd::AsRawFd::as_raw_fd(root))
            .map_err(sys(|| "entering the container root".into()))?;
        nix::unistd::chroot(".").map_err(sys(|| "chroot into the container root".into()))?;
        chdir("/").map_err(sys(|| "chdir /".into()))?;
    }

    // The child may only talk on the socket once the PID went out, so that
    // the agent always reads Pid first: it waits for a go byte on a pipe.
    let (gate_r, gate_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys(|| "pipe2".into()))?;
    // SAFETY: this process is single-threaded.
    match unsafe { fork() }.map_err(sys(|| "fork".into()))? {
        ForkResult::Parent { child } => {
            drop(gate_r);
            ipc::send(sock, &InitMsg::Pid(child.as_raw()))?;
            File::from(gate_w)
                .write_all(b"G")
                .map_err(io(|| "releasing the child".into()))?;
            std::process::exit(0);
        }
        ForkResult::Child => {
            drop(gate_w);
            // Without the go byte the parent died before reporting our PID:
            // nobody would ever track us, so give up quietly.
            let mut b = [0u8; 1];
            if File::from(gate_r).read_exact(&mut b).is_err() {
                std::process::exit(1);
            }
        }
    }

    match cfg.kind {
        Kind::Sandbox => {
            set_names(&cfg)?;
            ipc::send(sock, &InitMsg::Ready)?;
            idle_forever()
        }
        Kind::Container => {
            let plan = cfg
                .rootfs
                .as_ref()
                .ok_or_else(|| InitError::Bad("container without rootfs".into()))?;
            setup_rootfs(plan)?;
            set_names(&cfg)?;
            // runc's order: after the mounts and pivot_root, before the read-only paths
            // (`/proc/sys` among them) and the read-only root.
            for (k, v) in &cfg.sysctl {
                let p = format!("/proc/sys/{}", k.replace('.', "/"));
                std::fs::write(&p, v).map_err(io(|| format!("sysctl {k}={v}")))?;
            }
            finish_rootfs(plan)?;
            console(sock, &cfg)?;
            ipc::send(sock, &InitMsg::Ready)?;
            let mut b = [0u8; 1];
            match sock.read(&mut b) {
                Ok(1) if b[0] == START_BYTE => {}
                _ => return Err(InitError::Bad("agent went away before start".into())),
            }
            exec_process(&cfg)
        }
        Kind::Exec => {
            console(sock, &cfg)?;
            exec_process(&cfg)
        }
    }
}

/// With a terminal: makes the pty in the container's own `devpts` (its `/dev/ptmx`), puts the
/// slave on fds 0–2 and sends the master to the agent ([`InitMsg::Console`]). runc does the
/// same (its console socket): a pty of the agent's `devpts` would work as a terminal, but
/// `tty`, `ttyname(3)` and `ps` inside the container could not name it.
fn console(sock: &mut UnixStream, cfg: &InitConfig) -> Result<()> {
    let terminal = cfg
        .process
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    if !terminal {
        return Ok(());
    }
    let master = nix::fcntl::open(
        "/dev/ptmx",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys(|| "opening the container's /dev/ptmx".into()))?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    let master = unsafe { std::os::fd::OwnedFd::from_raw_fd(master) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from a valid pointer.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } != 0 {
        return Err(InitError::Sys {
            what: "unlocking the pty".into(),
            source: nix::Error::last(),
        });
    }
    // TIOCGPTPEER opens the slave through the master, not by a path that could be swapped.
    // SAFETY: the ioctl takes open(2) flags by value and returns a new descriptor.
    let slave = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY,
        )
    };
    if slave < 0 {
        return Err(InitError::Sys {
            what: "opening the pty's slave".into(),
            source: nix::Error::last(),
        });
    }
    for target in 0..3 {
        nix::unistd::dup2(slave, target).map_err(sys(|| "putting the pty on stdio".into()))?;
    }
    if slave > 2 {
        let _ = nix::unistd::close(slave);
    }
    ipc::send(sock, &InitMsg::Console)?;
    ipc::send_fd(sock, master.as_raw_fd())?;
    Ok(())
}

fn set_names(cfg: &InitConfig) -> Result<()> {
    if let Some(h) = &cfg.hostname {
        nix::unistd::sethostname(h).map_err(sys(|| format!("sethostname({h})")))?;
    }
    if let Some(d) = &cfg.domainname {
        let c =
            CString::new(d.as_str()).map_err(|_| InitError::Bad("domainname has a NUL".into()))?;
        // SAFETY: valid pointer and length.
        if unsafe { libc::setdomainname(c.as_ptr(), d.len()) } != 0 {
            return Err(InitError::Sys {
                what: "setdomainname".into(),
                source: nix::Error::last(),
            });
        }
    }
    Ok(())
}

/// The sandbox holder: keeps the namespaces alive and, as PID 1 of a
/// shared PID namespace, reaps orphans.
fn idle_forever() -> ! {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGCHLD);
    let _ = set.thread_block();
    loop {
        let _ = set.wait();
        while let Ok(s) = nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG))
        {
            if s == nix::sys::wait::WaitStatus::StillAlive {
                break;
            }
        }
    }
}

// ------------------------------------------------------------------ process

fn exec_process(cfg: &InitConfig) -> Result<()> {
    let p = cfg
        .process
        .as_ref()
        .ok_or_else(|| InitError::Bad("no process".into()))?;
    nix::unistd::setsid().map_err(sys(|| "setsid".into()))?;
    if p.terminal().unwrap_or(false) {
        // SAFETY: TIOCSCTTY on our stdin (the pty slave), no pointers.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
            return Err(InitError::Sys {
                what: "TIOCSCTTY".into(),
                source: nix::Error::last(),
            });
        }
    }
    for r in p.rlimits().iter().flatten() {
        let res = rlimit_resource(&r.typ())?;
        nix::sys::resource::setrlimit(res, r.soft(), r.hard())
            .map_err(sys(|| format!("setrlimit {:?}", r.typ())))?;
    }
    if let Some(adj) = p.oom_score_adj() {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(io(|| "oom_score_adj".into()))?;
    }
    let nnp = p.no_new_privileges().unwrap_or(false);
    if !nnp {
        // Without no_new_privs the filter must go in while we still hold CAP_SYS_ADMIN.
        install_seccomp(cfg)?;
    }
    set_user_and_caps(p)?;
    if let Some(umask) = p.user().umask() {
        nix::sys::stat::umask(Mode::from_bits_truncate(umask));
    }
    if nnp {
        nix::sys::prctl::set_no_new_privs().map_err(sys(|| "PR_SET_NO_NEW_PRIVS".into()))?;
        install_seccomp(cfg)?;
    }
    chdir(p.cwd()).map_err(sys(|| format!("chdir {}", p.cwd().display())))?;

    let args = p.args().clone().unwrap_or_default();
    let env: Vec<String> = p.env().clone().unwrap_or_default();
    let prog = find_program(&args[0], &env)?;
    let cargs: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| InitError::Bad("argument with NUL".into()))?;
    let cenv: Vec<CString> = env
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| InitError::Bad("environment with NUL".into()))?;
    let cprog = CString::new(prog.as_os_str().as_encoded_bytes())
        .map_err(|_| InitError::Bad("bad path".into()))?;
    // The Rust runtime of this helper ignores SIGPIPE, and SIG_IGN survives execve: give the
    // workload the default disposition a fresh process has (`yes | head -1` must end `yes`).
    // SAFETY: setting a standard signal's disposition to SIG_DFL installs no handler.
    unsafe { nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, SigHandler::SigDfl) }
        .map_err(sys(|| "resetting SIGPIPE".into()))?;
    let e = execve(&cprog, &cargs, &cenv).unwrap_err();
    Err(InitError::Sys {
        what: format!("exec {}", args[0]),
        source: e,
    })
}

fn find_program(arg0: &str, env: &[String]) -> Result<PathBuf> {
    if arg0.contains('/') {
        return Ok(PathBuf::from(arg0));
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let cand = Path::new(dir).join(arg0);
        if nix::unistd::access(&cand, nix::unistd::AccessFlags::X_OK).is_ok() && cand.is_file() {
            return Ok(cand);
        }
    }
    Err(InitError::Bad(format!(
        "executable {arg0:?} not found in PATH {path:?}"
    )))
}

fn rlimit_resource(t: &oci_spec::runtime::PosixRlimitType) -> Result<nix::sys::resource::Resource> {
    use nix::sys::resource::Resource as R;
    use oci_spec::runtime::PosixRlimitType as T;
    Ok(match t {
        T::RlimitCpu => R::RLIMIT_CPU,
        T::RlimitFsize => R::RLIMIT_FSIZE,
        T::RlimitData => R::RLIMIT_DATA,
        T::RlimitStack => R::RLIMIT_STACK,
        T::RlimitCore => R::RLIMIT_CORE,
        T::RlimitRss => R::RLIMIT_RSS,
        T::RlimitNproc => R::RLIMIT_NPROC,
        T::RlimitNofile => R::RLIMIT_NOFILE,
        T::RlimitMemlock => R::RLIMIT_MEMLOCK,
        T::RlimitAs => R::RLIMIT_AS,
        T::RlimitLocks => R::RLIMIT_LOCKS,
        T::RlimitSigpending => R::RLIMIT_SIGPENDING,
        T::RlimitMsgqueue => R::RLIMIT_MSGQUEUE,
        T::RlimitNice => R::RLIMIT_NICE,
        T::RlimitRtprio => R::RLIMIT_RTPRIO,
        T::RlimitRttime => R::RLIMIT_RTTIME,
    })
}

/// Converts an OCI capability set into the `caps` crate's.
fn cap_set(set: &Option<oci_spec::runtime::Capabilities>) -> Result<caps::CapsHashSet> {
    let mut out = caps::CapsHashSet::new();
    for c in set.iter().flatten() {
        let name = serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .ok_or_else(|| InitError::Bad(format!("capability {c:?}")))?;
        let cap: caps::Capability = name
            .parse()
            .map_err(|_| InitError::Bad(format!("capability {name} unknown to this agent")))?;
        out.insert(cap);
    }
    Ok(out)
}

fn set_user_and_caps(p: &Process) -> Result<()> {
    let user = p.user();
    let full = caps::all();
    let wanted = p.capabilities().clone().unwrap_or_else(|| {
        // No capabilities object: none at all.
        let mut c = LinuxCapabilities::default();
        c.set_bounding(Some(Default::default()));
        c.set_effective(Some(Default::default()));
        c.set_permitted(Some(Default::default()));
        c.set_inheritable(Some(Default::default()));
        c.set_ambient(Some(Default::default()));
        c
    });
    let bounding = cap_set(wanted.bounding())?;
    let effective = cap_set(wanted.effective())?;
    let permitted = cap_set(wanted.permitted())?;
    let inheritable = cap_set(wanted.inheritable())?;
    let ambient = cap_set(wanted.ambient())?;

    for c in full.difference(&bounding) {
        if caps::has_cap(None, caps::CapSet::Bounding, *c).unwrap_or(false) {
            caps::drop(None, caps::CapSet::Bounding, *c).map_err(|source| InitError::Caps {
                what: format!("dropping {c} from bounding set"),
                source,
            })?;
        }
    }
    nix::sys::prctl::set_keepcaps(true).map_err(sys(|| "PR_SET_KEEPCAPS".into()))?;
    let gids: Vec<Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&gids).map_err(sys(|| "setgroups".into()))?;
    nix::unistd::setresgid(
        Gid::from_raw(user.gid()),
        Gid::from_raw(user.gid()),
        Gid::from_raw(user.gid()),
    )
    .map_err(sys(|| format!("setgid {}", user.gid())))?;
    nix::unistd::setresuid(
        Uid::from_raw(user.uid()),
        Uid::from_raw(user.uid()),
        Uid::from_raw(user.uid()),
    )
    .map_err(sys(|| format!("setuid {}", user.uid())))?;
    nix::sys::prctl::set_keepcaps(false).map_err(sys(|| "PR_SET_KEEPCAPS".into()))?;
    let err = |set: &'static str| {
        move |source: caps::errors::CapsError| InitError::Caps {
            what: format!("setting {set} capabilities"),
            source,
        }
    };
    // Effective first (it must stay a subset of permitted), then the rest.
    caps::set(
        None,
        caps::CapSet::Effective,
        &effective.intersection(&permitted).copied().collect(),
    )
    .map_err(err("effective"))?;
    caps::set(None, caps::CapSet::Permitted, &permitted).map_err(err("permitted"))?;
    caps::set(None, caps::CapSet::Inheritable, &inheritable).map_err(err("inheritable"))?;
    caps::clear(None, caps::CapSet::Ambient).map_err(err("ambient"))?;
    for c in &ambient {
        caps::raise(None, caps::CapSet::Ambient, *c).map_err(err("ambient"))?;
    }
    Ok(())
}

fn install_seccomp(cfg: &InitConfig) -> Result<()> {
    for prog in &cfg.seccomp {
        let filter: Vec<seccompiler::sock_filter> = prog
            .iter()
            .map(|&(code, jt, jf, k)| seccompiler::sock_filter { code, jt, jf, k })
            .collect();
        seccompiler::apply_filter(&filter).map_err(InitError::Seccomp)?;
    }
    Ok(())
}
