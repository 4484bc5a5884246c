//! Starting the `__init` helper from the multi-threaded agent: a plain
//! `fork` whose child only does async-signal-safe work (`dup2`, `sigprocmask`,
//! `execve`), with everything allocated beforehand. The helper gets the
//! process's stdio as fds 0–2 (`/dev/null` when the process has a terminal,
//! which the helper makes in the container and hands back) and its end of the
//! control socket as fd 3, then the configuration; the agent reads back the
//! workload's PID.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg};
use nix::unistd::{fork, ForkResult};

use crate::init::INIT_FD_ENV;
use crate::ipc::{self, InitConfig, InitMsg};
use crate::reaper::Reaper;

/// How long the agent waits for any answer of the helper (TCG guests are slow).
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors starting or talking to the helper.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// The channel failed.
    #[error("container helper: {0}")]
    Ipc(#[from] ipc::IpcError),
    /// The helper reported an error.
    #[error("{0}")]
    Helper(String),
    /// The helper went away or said something unexpected.
    #[error("container helper: {0}")]
    Protocol(String),
    /// Setting up or using the control socket failed.
    #[error("container helper: {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// The agent's handle on a helper once the workload PID is known.
pub struct Helper {
    /// Control socket (blocking, with [`HELPER_TIMEOUT`]).
    pub sock: UnixStream,
    /// PID of the workload process.
    pub pid: i32,
}

impl Helper {
    /// Waits for `Ready` (or an error). With `console`, the terminal's master comes first.
    pub fn wait_ready(&mut self, console: bool) -> Result<Option<OwnedFd>, SpawnError> {
        let master = self.console(console)?;
        match ipc::recv::<_, InitMsg>(&mut self.sock)? {
            Some(InitMsg::Ready) => Ok(master),
            Some(InitMsg::Error(e)) => Err(SpawnError::Helper(e)),
            Some(other) => Err(SpawnError::Protocol(format!("unexpected {other:?}"))),
            None => Err(SpawnError::Protocol("exited during setup".into())),
        }
    }

    /// Waits until the workload was exec'd (end of stream) or failed. With `console`, the
    /// terminal's master comes first.
    pub fn wait_exec(&mut self, console: bool) -> Result<Option<OwnedFd>, SpawnError> {
        let master = self.console(console)?;
        match ipc::recv::<_, InitMsg>(&mut self.sock)? {
            None => Ok(master),
            Some(InitMsg::Error(e)) => Err(SpawnError::Helper(e)),
            Some(other) => Err(SpawnError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// With `wanted`: the pty master the helper made in the container ([`InitMsg::Console`]).
    fn console(&mut self, wanted: bool) -> Result<Option<OwnedFd>, SpawnError> {
        if !wanted {
            return Ok(None);
        }
        match ipc::recv::<_, InitMsg>(&mut self.sock)? {
            Some(InitMsg::Console) => Ok(Some(ipc::recv_fd(&self.sock)?)),
            Some(InitMsg::Error(e)) => Err(SpawnError::Helper(e)),
            Some(other) => Err(SpawnError::Protocol(format!("unexpected {other:?}"))),
            None => Err(SpawnError::Protocol("exited during setup".into())),
        }
    }
}

fn high_dup(fd: RawFd) -> Result<OwnedFd, SpawnError> {
    let n = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(10)).map_err(|source| SpawnError::Sys {
        what: "F_DUPFD_CLOEXEC",
        source,
    })?;
    // SAFETY: fcntl just returned this new descriptor.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(n) })
}

/// Forks and execs the helper, sends `cfg`, and returns once the workload
/// PID is known. Blocking: call from `spawn_blocking`.
pub fn spawn_helper(
    reaper: &Reaper,
    cfg: &InitConfig,
    stdio: Option<[OwnedFd; 3]>,
) -> Result<Helper, SpawnError> {
    let (mine, theirs) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|source| SpawnError::Sys {
        what: "socketpair",
        source,
    })?;
    let stdio = match stdio {
        Some(s) => s,
        None => {
            let null = || {
                nix::fcntl::open(
                    "/dev/null",
                    nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )
                // SAFETY: open just returned this descriptor and nothing else owns it.
                .map(|fd| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
                .map_err(|source| SpawnError::Sys {
                    what: "open /dev/null",
                    source,
                })
            };
            [null()?, null()?, null()?]
        }
    };
    // Sources above 9 so dup2 onto 0..3 never clobbers one still needed.
    let src = [
        high_dup(stdio[0].as_raw_fd())?,
        high_dup(stdio[1].as_raw_fd())?,
        high_dup(stdio[2].as_raw_fd())?,
        high_dup(theirs.as_raw_fd())?,
    ];
    let raw: [RawFd; 4] = [
        src[0].as_raw_fd(),
        src[1].as_raw_fd(),
        src[2].as_raw_fd(),
        src[3].as_raw_fd(),
    ];
    let exe = CString::new("/proc/self/exe").expect("static string");
    let argv = [
        CString::new("moat-agent").expect("static"),
        CString::new("__init").expect("static"),
    ];
    let argv_ptrs: [*const libc::c_char; 3] =
        [argv[0].as_ptr(), argv[1].as_ptr(), std::ptr::null()];
    let env = [
        CString::new(format!("{INIT_FD_ENV}=3")).expect("no NUL"),
        CString::new("PATH=/usr/sbin:/usr/bin:/sbin:/bin").expect("static"),
    ];
    let env_ptrs: [*const libc::c_char; 3] = [env[0].as_ptr(), env[1].as_ptr(), std::ptr::null()];
    let empty_mask = nix::sys::signal::SigSet::empty();

    // SAFETY: the child only calls async-signal-safe functions on data
    // prepared above, then execs or _exits.
    let pid = match unsafe { fork() }.map_err(|source| SpawnError::Sys {
        what: "fork",
        source,
    })? {
        // SAFETY: in the forked child of a threaded process: dup2, sigprocmask, execve and
        // _exit are async-signal-safe, and every pointer (fds, mask, path, argv, envp) points
        // into data built before the fork, which the child's copy of memory still holds.
        ForkResult::Child => unsafe {
            for (target, fd) in raw.iter().enumerate() {
                if libc::dup2(*fd, target as i32) < 0 {
                    libc::_exit(126);
                }
            }
            libc::sigprocmask(libc::SIG_SETMASK, empty_mask.as_ref(), std::ptr::null_mut());
            libc::execve(exe.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr());
            libc::_exit(127);
        },
        ForkResult::Parent { child } => child.as_raw(),
    };
    reaper.ignore(pid);
    drop(src);
    drop(theirs);
    drop(stdio);

    let mut sock = UnixStream::from(mine);
    sock.set_read_timeout(Some(HELPER_TIMEOUT))
        .map_err(|source| SpawnError::Io {
            what: "setting a timeout",
            source,
        })?;
    ipc::send(&mut sock, cfg)?;
    match ipc::recv::<_, InitMsg>(&mut sock)? {
        Some(InitMsg::Pid(pid)) => Ok(Helper { sock, pid }),
        Some(InitMsg::Error(e)) => Err(SpawnError::Helper(e)),
        Some(other) => Err(SpawnError::Protocol(format!("unexpected {other:?}"))),
        None => Err(SpawnError::Protocol("exited before reporting a PID".into())),
    }
}
