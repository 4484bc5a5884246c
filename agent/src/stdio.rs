//! A process's standard streams on the agent side: pipes (stdin, stdout,
//! stderr) or one pseudo-terminal master, read and written asynchronously
//! through tokio's `AsyncFd`.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Mutex;

/// Maximum bytes returned by one read.
pub const MAX_READ: usize = 1 << 20;

/// Errors of stream handling.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// Registering with the reactor failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The stream was closed already.
    #[error("stdin is closed")]
    Closed,
}

/// One non-blocking descriptor registered with tokio.
pub struct Stream {
    fd: AsyncFd<OwnedFd>,
    /// A pty master reports EIO once the slave side is gone: that is EOF.
    is_pty: bool,
}

impl Stream {
    /// Wraps `fd`, making it non-blocking.
    pub fn new(fd: OwnedFd, is_pty: bool) -> Result<Self, StdioError> {
        let fl = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(|source| StdioError::Sys {
            what: "F_GETFL",
            source,
        })?;
        fcntl(
            fd.as_raw_fd(),
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK),
        )
        .map_err(|source| StdioError::Sys {
            what: "F_SETFL",
            source,
        })?;
        // SAFETY: `fd` is a valid descriptor this stream exclusively owns.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| StdioError::Io {
                    what: "registering stream",
                    source: e.into_parts().1,
                })?;
        Ok(Self { fd, is_pty })
    }

    /// Reads up to `max` bytes; an empty result means end of stream.
    pub async fn read(&self, max: usize) -> Result<Vec<u8>, StdioError> {
        let mut buf = vec![0u8; max.clamp(1, MAX_READ)];
        loop {
            let mut guard = self.fd.readable().await.map_err(|source| StdioError::Io {
                what: "waiting for output",
                source,
            })?;
            match guard.try_io(|fd| {
                nix::unistd::read(fd.as_raw_fd(), &mut buf).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Ok(Err(e)) if self.is_pty && e.raw_os_error() == Some(libc::EIO) => {
                    return Ok(Vec::new())
                }
                Ok(Err(e)) => {
                    return Err(StdioError::Io {
                        what: "reading output",
                        source: e,
                    })
                }
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes some of `data`; returns how much.
    pub async fn write(&self, data: &[u8]) -> Result<usize, StdioError> {
        if data.is_empty() {
            return Ok(0);
        }
        loop {
            let mut guard = self.fd.writable().await.map_err(|source| StdioError::Io {
                what: "waiting for stdin",
                source,
            })?;
            match guard
                .try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(std::io::Error::from))
            {
                Ok(r) => {
                    return r.map_err(|source| StdioError::Io {
                        what: "writing stdin",
                        source,
                    })
                }
                Err(_would_block) => continue,
            }
        }
    }

    /// Sets the terminal window size (pty only).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), StdioError> {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a valid winsize from the pointer.
        if unsafe { libc::ioctl(self.fd.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(StdioError::Sys {
                what: "TIOCSWINSZ",
                source: nix::Error::last(),
            });
        }
        Ok(())
    }
}

/// The agent's ends of a process's streams.
pub struct ProcessIo {
    /// Where stdin goes (pipe write end or pty master); None once closed.
    pub stdin: Mutex<Option<std::sync::Arc<Stream>>>,
    /// Stdout (pipe read end or pty master).
    pub stdout: Mutex<Option<std::sync::Arc<Stream>>>,
    /// Stderr (pipe read end; None with a terminal).
    pub stderr: Mutex<Option<std::sync::Arc<Stream>>>,
    /// The pty master when the process has a terminal.
    pub tty: Option<std::sync::Arc<Stream>>,
}

/// The child's ends, handed to the helper as fds 0, 1, 2.
pub struct ChildIo {
    /// stdin, stdout, stderr.
    pub fds: [OwnedFd; 3],
}

/// Pipes for a process without a terminal: the agent's ends and the child's (stdin, stdout,
/// stderr). A process with a terminal gets its pty from the helper ([`from_pty`]).
pub fn pipes() -> Result<(ProcessIo, ChildIo), StdioError> {
    use std::sync::Arc;
    let p = || {
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|source| StdioError::Sys {
            what: "pipe2",
            source,
        })
    };
    let (in_r, in_w) = p()?;
    let (out_r, out_w) = p()?;
    let (err_r, err_w) = p()?;
    Ok((
        ProcessIo {
            stdin: Mutex::new(Some(Arc::new(Stream::new(in_w, false)?))),
            stdout: Mutex::new(Some(Arc::new(Stream::new(out_r, false)?))),
            stderr: Mutex::new(Some(Arc::new(Stream::new(err_r, false)?))),
            tty: None,
        },
        ChildIo {
            fds: [in_r, out_w, err_w],
        },
    ))
}

/// The streams of a process whose terminal's `master` the helper made in the container: stdin
/// and stdout are the master, stderr goes to the terminal too.
pub fn from_pty(master: OwnedFd) -> Result<ProcessIo, StdioError> {
    use std::sync::Arc;
    let master = Arc::new(Stream::new(master, true)?);
    Ok(ProcessIo {
        stdin: Mutex::new(Some(master.clone())),
        stdout: Mutex::new(Some(master.clone())),
        stderr: Mutex::new(None),
        tty: Some(master),
    })
}
