//! One process the agent tracks — a container's init, an exec'd process or the sandbox's
//! namespace holder — and how it is started: the `__init` helper is spawned off the runtime
//! (`spawn_blocking`), the agent keeps the process's streams and learns its exit from the
//! reaper.

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::{watch, Mutex};

use crate::error::{AgentError, Result};
use crate::ipc::InitConfig;
use crate::reaper::{Exit, Reaper};
use crate::spawn::{spawn_helper, SpawnError};
use crate::stdio::{self, ProcessIo};

/// One process (a container's init, an exec or the sandbox's namespace holder).
pub struct Process {
    /// PID in the agent's namespace.
    pub pid: i32,
    /// The agent's ends of the streams.
    pub io: ProcessIo,
    exit: watch::Receiver<Option<Exit>>,
}

impl Process {
    /// Tracks `pid`: its exit, announced by `reaper`, becomes visible to [`Process::exited`]
    /// and [`Process::wait`].
    pub fn new(reaper: &Reaper, pid: i32, io: ProcessIo) -> Arc<Self> {
        let (tx, rx) = watch::channel(None);
        let exit = reaper.watch(pid);
        tokio::spawn(async move {
            if let Ok(e) = exit.await {
                let _ = tx.send(Some(e));
            }
        });
        Arc::new(Self { pid, io, exit: rx })
    }

    /// The exit, if it happened.
    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Waits for the exit.
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit.clone();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                // The reaper task is gone; report a generic failure.
                return Exit {
                    status: 255,
                    at_ns: 0,
                };
            }
        }
    }

    /// Sends `sig`; refused once the process has exited (its PID may be reused).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        if self.exited().is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "process {} has exited",
                self.pid
            )));
        }
        kill(Pid::from_raw(self.pid), sig).map_err(|source| AgentError::Sys {
            what: format!("kill({}, {sig})", self.pid),
            source,
        })
    }
}

/// What [`spawn`] waits for after the helper reported the workload's PID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitFor {
    /// `Ready`: a container's init, set up and waiting for Start; the control socket is kept.
    Ready,
    /// The `execve` of the workload (an exec'd process).
    Exec,
}

/// Spawns the helper for `cfg` with fresh streams (a pty when `terminal`) and waits for
/// `wait`. Returns the process and, for [`WaitFor::Ready`], the control socket that later
/// starts it. On failure the process is killed and reaped.
pub async fn spawn(
    reaper: &Reaper,
    cfg: InitConfig,
    terminal: bool,
    wait: WaitFor,
) -> Result<(Arc<Process>, Option<UnixStream>)> {
    let (pio, child) = stdio::create(terminal)?;
    let r = reaper.clone();
    type Spawned = (i32, std::result::Result<Option<UnixStream>, SpawnError>);
    let (pid, res) =
        tokio::task::spawn_blocking(move || -> std::result::Result<Spawned, SpawnError> {
            let mut h = spawn_helper(&r, &cfg, Some(child.fds))?;
            let res = match wait {
                WaitFor::Ready => h.wait_ready().map(|()| Some(h.sock)),
                WaitFor::Exec => h.wait_exec().map(|()| None),
            };
            Ok((h.pid, res))
        })
        .await
        .map_err(|source| AgentError::Task {
            what: "setup task",
            source,
        })??;
    let p = Process::new(reaper, pid, pio);
    match res {
        Ok(sock) => Ok((p, sock)),
        Err(e) => {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            p.wait().await;
            Err(e.into())
        }
    }
}

/// Spawns the sandbox's namespace holder for `cfg` (stdio on `/dev/null`) and waits until it
/// is ready. The holder is tracked even when its setup failed, so the caller can kill and reap
/// it: the second value is that setup's result.
pub async fn spawn_holder(
    reaper: &Reaper,
    cfg: InitConfig,
) -> Result<(Arc<Process>, std::result::Result<(), SpawnError>)> {
    let r = reaper.clone();
    type Spawned = (i32, std::result::Result<(), SpawnError>);
    let (pid, res) =
        tokio::task::spawn_blocking(move || -> std::result::Result<Spawned, SpawnError> {
            let mut h = spawn_helper(&r, &cfg, None)?;
            let res = h.wait_ready();
            Ok((h.pid, res))
        })
        .await
        .map_err(|source| AgentError::Task {
            what: "sandbox setup task",
            source,
        })??;
    Ok((Process::new(reaper, pid, empty_io()), res))
}

/// Streams of a process whose stdio the agent does not keep (the namespace holder).
fn empty_io() -> ProcessIo {
    ProcessIo {
        stdin: Mutex::new(None),
        stdout: Mutex::new(None),
        stderr: Mutex::new(None),
        tty: None,
    }
}

/// Starts a created container's init: sends the start byte on its control socket and waits
/// until the workload was exec'd (or reports why not). Blocking: call from `spawn_blocking`.
pub fn release(mut sock: UnixStream) -> std::result::Result<(), SpawnError> {
    use std::io::Write;
    sock.write_all(&[crate::ipc::START_BYTE])
        .map_err(|source| SpawnError::Io {
            what: "sending start",
            source,
        })?;
    let mut h = crate::spawn::Helper { sock, pid: 0 };
    h.wait_exec()
}
