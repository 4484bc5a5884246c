//! The private channel between the agent and its `__init` helper process:
//! length-prefixed JSON messages over a Unix socket pair, plus the
//! configuration the helper needs to build a container, an exec'd process
//! or the sandbox's namespace holder.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Upper bound for one message (an OCI spec with a large seccomp profile
/// stays well below this).
const MAX_MESSAGE: u32 = 16 << 20;

/// Errors of the agent ↔ helper channel.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    /// The socket failed.
    #[error("helper channel I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A message did not parse.
    #[error("helper channel message: {0}")]
    Json(#[from] serde_json::Error),
    /// A message was larger than [`MAX_MESSAGE`].
    #[error("helper channel message of {0} bytes is too large")]
    TooLarge(u32),
    /// Passing a descriptor failed, or the message carried none (or more than one).
    #[error("helper channel: passing the terminal: {0}")]
    Fd(String),
}

/// Linux namespace kinds the agent handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ns {
    /// Mount namespace.
    Mount,
    /// PID namespace.
    Pid,
    /// UTS (hostname) namespace.
    Uts,
    /// IPC namespace.
    Ipc,
    /// Network namespace.
    Net,
    /// Cgroup namespace.
    Cgroup,
}

impl Ns {
    /// The `CLONE_NEW*` flag.
    pub fn flag(self) -> nix::sched::CloneFlags {
        use nix::sched::CloneFlags as F;
        match self {
            Ns::Mount => F::CLONE_NEWNS,
            Ns::Pid => F::CLONE_NEWPID,
            Ns::Uts => F::CLONE_NEWUTS,
            Ns::Ipc => F::CLONE_NEWIPC,
            Ns::Net => F::CLONE_NEWNET,
            Ns::Cgroup => F::CLONE_NEWCGROUP,
        }
    }

    /// The file name under `/proc/<pid>/ns/`.
    pub fn proc_name(self) -> &'static str {
        match self {
            Ns::Mount => "mnt",
            Ns::Pid => "pid",
            Ns::Uts => "uts",
            Ns::Ipc => "ipc",
            Ns::Net => "net",
            Ns::Cgroup => "cgroup",
        }
    }
}

/// What the helper builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// The sandbox's namespace holder: sets the hostname and idles (reaping
    /// orphans when it is PID 1 of the shared PID namespace).
    Sandbox,
    /// A container's init process: full rootfs setup, then waits for Start.
    Container,
    /// A process exec'd into a running container.
    Exec,
}

/// Everything a container's rootfs setup needs (already validated by the agent).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootfsPlan {
    /// Absolute path of the rootfs directory in the agent's mount namespace.
    pub path: PathBuf,
    /// Remount the root read-only after setup.
    pub readonly: bool,
    /// OCI mounts, in order.
    pub mounts: Vec<oci_spec::runtime::Mount>,
    /// Extra device nodes.
    pub devices: Vec<oci_spec::runtime::LinuxDevice>,
    /// Paths hidden from the container.
    pub masked_paths: Vec<String>,
    /// Paths made read-only.
    pub readonly_paths: Vec<String>,
}

/// The helper's instructions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitConfig {
    /// What to build.
    pub kind: Kind,
    /// `cgroup.procs` file to join first (None: no cgroup).
    pub cgroup_procs: Option<PathBuf>,
    /// Namespaces to join: kind and `/proc/<pid>/ns/*` path.
    pub join_namespaces: Vec<(Ns, PathBuf)>,
    /// Namespaces to create.
    pub new_namespaces: Vec<Ns>,
    /// Root directory to enter after joining the namespaces
    /// (`/proc/<pid>/root` of the container's init, for execs). Needed
    /// because `setns` puts us at the mount namespace's root, which is not
    /// the container's root when the agent itself runs chrooted (as PID 1
    /// after leaving the initramfs).
    pub enter_root: Option<PathBuf>,
    /// Rootfs setup (Container only).
    pub rootfs: Option<RootfsPlan>,
    /// Hostname to set (only with a new UTS namespace).
    pub hostname: Option<String>,
    /// Domain name to set (only with a new UTS namespace).
    pub domainname: Option<String>,
    /// sysctls to write after the rootfs setup.
    pub sysctl: BTreeMap<String, String>,
    /// The process to run (None for Sandbox).
    pub process: Option<oci_spec::runtime::Process>,
    /// Compiled seccomp programs, each a list of raw `sock_filter`s
    /// (code, jt, jf, k), installed in order.
    pub seccomp: Vec<Vec<(u16, u8, u8, u32)>>,
}

/// Messages from the helper.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum InitMsg {
    /// The PID of the process that will run the workload (in the agent's PID namespace).
    Pid(i32),
    /// Setup done; waiting for Start (Container) or idling (Sandbox).
    Ready,
    /// Setup failed.
    Error(String),
    /// The process's terminal was made in the container's own `devpts` (as runc makes it, so
    /// `tty` and `ttyname(3)` name it there); its master follows, see [`send_fd`].
    Console,
}

/// Sends `fd` as `SCM_RIGHTS` on a one-byte message (after [`InitMsg::Console`]).
pub fn send_fd(sock: &UnixStream, fd: RawFd) -> Result<(), IpcError> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let fds = [fd];
    loop {
        match sendmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &[std::io::IoSlice::new(b"C")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        ) {
            Err(nix::Error::EINTR) => continue,
            r => {
                return r
                    .map(drop)
                    .map_err(|e| IpcError::Fd(format!("sendmsg: {e}")))
            }
        }
    }
}

/// Receives the one descriptor [`send_fd`] sent (close-on-exec).
pub fn recv_fd(sock: &UnixStream) -> Result<OwnedFd, IpcError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = loop {
        match recvmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::Error::EINTR) => continue,
            r => break r.map_err(|e| IpcError::Fd(format!("recvmsg: {e}")))?,
        }
    };
    let mut got = Vec::new();
    for c in msg
        .cmsgs()
        .map_err(|e| IpcError::Fd(format!("control message: {e}")))?
    {
        if let ControlMessageOwned::ScmRights(fds) = c {
            got.extend(fds);
        }
    }
    // SAFETY: the kernel just installed these descriptors in this process; nothing owns them.
    let mut owned: Vec<OwnedFd> = got
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if msg.bytes != 1 || owned.len() != 1 {
        return Err(IpcError::Fd(format!(
            "expected one descriptor on a one-byte message, got {} on {} bytes",
            owned.len(),
            msg.bytes
        )));
    }
    owned
        .pop()
        .ok_or_else(|| IpcError::Fd("no descriptor".into()))
}

/// The byte the agent sends to let a created container exec its process.
pub const START_BYTE: u8 = b'S';

/// Sends one message.
pub fn send<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), IpcError> {
    let body = serde_json::to_vec(msg)?;
    let len = u32::try_from(body.len()).map_err(|_| IpcError::TooLarge(u32::MAX))?;
    if len > MAX_MESSAGE {
        return Err(IpcError::TooLarge(len));
    }
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    Ok(())
}

/// Receives one message; `Ok(None)` on a clean end of stream.
pub fn recv<R: Read, T: for<'de> Deserialize<'de>>(r: &mut R) -> Result<Option<T>, IpcError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = match r.read(&mut len[got..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(IpcError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        got += n;
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_MESSAGE {
        return Err(IpcError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    Ok(Some(serde_json::from_slice(&body)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_eof() {
        let mut buf = Vec::new();
        send(&mut buf, &InitMsg::Pid(42)).unwrap();
        send(&mut buf, &InitMsg::Error("boom".into())).unwrap();
        let mut r = &buf[..];
        assert!(matches!(
            recv::<_, InitMsg>(&mut r).unwrap(),
            Some(InitMsg::Pid(42))
        ));
        assert!(
            matches!(recv::<_, InitMsg>(&mut r).unwrap(), Some(InitMsg::Error(m)) if m == "boom")
        );
        assert!(recv::<_, InitMsg>(&mut r).unwrap().is_none());
    }

    /// The console handover: a framed message, then the descriptor on its own byte; the
    /// receiver gets the same open file (a pipe here: what is written to the sent end is read
    /// from the kept one) and a message without a descriptor is an error.
    #[test]
    fn a_descriptor_passes_after_its_message() {
        use std::io::Read;
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        send(&mut a, &InitMsg::Console).unwrap();
        send_fd(&a, w.as_raw_fd()).unwrap();
        drop(w);
        assert!(matches!(
            recv::<_, InitMsg>(&mut b).unwrap(),
            Some(InitMsg::Console)
        ));
        let got = recv_fd(&b).unwrap();
        nix::unistd::write(&got, b"through").unwrap();
        drop(got);
        let mut text = String::new();
        std::fs::File::from(r).read_to_string(&mut text).unwrap();
        assert_eq!(text, "through");
        a.write_all(b"C").unwrap();
        assert!(matches!(recv_fd(&b), Err(IpcError::Fd(_))));
    }

    #[test]
    fn rejects_oversized_and_truncated() {
        let mut r = &(MAX_MESSAGE + 1).to_be_bytes()[..];
        assert!(matches!(
            recv::<_, InitMsg>(&mut r),
            Err(IpcError::TooLarge(_))
        ));
        let mut r = &[0u8, 0][..];
        assert!(recv::<_, InitMsg>(&mut r).is_err());
    }
}
