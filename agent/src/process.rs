//! One process the agent tracks — a container's init, an exec'd process or the sandbox's
//! namespace holder — and how it is started: the `__init` helper is spawned off the runtime
//! (`spawn_blocking`), the agent keeps the process's streams and learns its exit from the
//! reaper. Also signal delivery, including the signals held for a PID-namespace init until it
//! can take them ([`Process::signal_pidns_init`]).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::{watch, Mutex};

use crate::error::{AgentError, Result};
use crate::ipc::InitConfig;
use crate::reaper::{Exit, Reaper};
use crate::signals::{Dispositions, Fate};
use crate::spawn::{spawn_helper, SpawnError};
use crate::stdio::{self, ProcessIo};
use crate::sync::LockExt;

/// First and longest pause between two looks at a held signal's target (doubling in between).
const HOLD_POLL_FIRST: Duration = Duration::from_millis(1);
const HOLD_POLL_MAX: Duration = Duration::from_millis(200);

/// One process (a container's init, an exec or the sandbox's namespace holder).
pub struct Process {
    /// PID in the agent's namespace.
    pub pid: i32,
    /// The agent's ends of the streams.
    pub io: ProcessIo,
    exit: watch::Receiver<Option<Exit>>,
    /// Signals held for this process (bit `n - 1` = signal `n`); a task delivers them while
    /// any is set (see [`Process::signal_pidns_init`]).
    held: Arc<StdMutex<u64>>,
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
        Arc::new(Self {
            pid,
            io,
            exit: rx,
            held: Arc::new(StdMutex::new(0)),
        })
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

    /// Sends `sig`; refused with [`AgentError::ProcessFinished`] (NOT_FOUND) once the process
    /// has exited (its PID may be reused).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        if self.exited().is_some() {
            return Err(AgentError::ProcessFinished(self.pid));
        }
        match kill(Pid::from_raw(self.pid), sig) {
            Ok(()) => Ok(()),
            // Reaped, and the reaper's news not yet here.
            Err(nix::Error::ESRCH) => Err(AgentError::ProcessFinished(self.pid)),
            Err(source) => Err(AgentError::Sys {
                what: format!("kill({}, {sig})", self.pid),
                source,
            }),
        }
    }

    /// Sends `sig` to this process, the init of its own PID namespace, without the kernel
    /// discarding it. The kernel drops a signal whose disposition is `SIG_DFL` when it is sent
    /// to a PID-namespace init (SIGKILL/SIGSTOP from an ancestor namespace excepted), but keeps
    /// a *blocked* one pending. A workload that has not yet installed its handler (a SIGTERM
    /// right after Start, before the shell ran `trap`) would lose the signal and never stop;
    /// so the agent treats such a signal as if the process had it blocked: it holds it and
    /// sends it once the process catches or blocks it, drops it if the process sets `SIG_IGN`
    /// (as the kernel drops a pending signal then), and forgets it when the process exits.
    /// Signals the process already catches, blocks or ignores go straight through, as do
    /// SIGKILL and SIGSTOP. Standard signals held twice count once, as pending ones do.
    pub fn signal_pidns_init(&self, sig: Signal) -> Result<()> {
        if self.exited().is_some() {
            return Err(AgentError::ProcessFinished(self.pid));
        }
        let fate = match Dispositions::read(self.pid) {
            Some(d) => d.fate(sig),
            None => Fate::Deliver,
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return self.signal(sig);
        };
        if fate != Fate::Discarded {
            return self.signal(sig);
        }
        let mut held = self.held.lock_or_recover();
        let idle = *held == 0;
        *held |= 1u64 << ((sig as i32 - 1) & 63);
        tracing::debug!(
            "pid {}: {sig} held until the process catches or blocks it",
            self.pid
        );
        if idle {
            rt.spawn(deliver_held(self.pid, self.held.clone(), self.exit.clone()));
        }
        Ok(())
    }
}

/// Delivers the signals held for `pid` (see [`Process::signal_pidns_init`]) as its dispositions
/// allow, until none is held or the process has exited. There is no kernel notification of a
/// `sigaction` change, so it looks at `/proc/<pid>/status` after 1 ms, then at doubling
/// intervals of at most 200 ms.
async fn deliver_held(pid: i32, held: Arc<StdMutex<u64>>, mut exit: watch::Receiver<Option<Exit>>) {
    let mut pause = HOLD_POLL_FIRST;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = exit.wait_for(Option::is_some) => {}
        }
        let exited = exit.borrow().is_some() || exit.has_changed().is_err();
        pause = (pause * 2).min(HOLD_POLL_MAX);
        let mut bits = held.lock_or_recover();
        let d = if exited {
            None
        } else {
            Dispositions::read(pid)
        };
        let Some(d) = d else {
            *bits = 0;
            return;
        };
        for n in 1..=64 {
            let b = 1u64 << (n - 1);
            if *bits & b == 0 {
                continue;
            }
            let Ok(sig) = Signal::try_from(n) else {
                *bits &= !b;
                continue;
            };
            match d.fate(sig) {
                Fate::Deliver => {
                    *bits &= !b;
                    tracing::debug!("pid {pid}: delivering held {sig}");
                    if let Err(e) = kill(Pid::from_raw(pid), sig) {
                        tracing::debug!("pid {pid}: held {sig}: {e}");
                    }
                }
                Fate::Ignored => *bits &= !b,
                Fate::Discarded => {}
            }
        }
        if *bits == 0 {
            return;
        }
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

/// Spawns the helper for `cfg` with fresh streams and waits for `wait`. With `terminal` the
/// helper makes the pty inside the container (its own `devpts`, as runc does) and hands the
/// master back; else the streams are pipes made here. Returns the process and, for
/// [`WaitFor::Ready`], the control socket that later starts it. On failure the process is
/// killed and reaped.
pub async fn spawn(
    reaper: &Reaper,
    cfg: InitConfig,
    terminal: bool,
    wait: WaitFor,
) -> Result<(Arc<Process>, Option<UnixStream>)> {
    let (pipes, child_fds) = if terminal {
        (None, None)
    } else {
        let (pio, child) = stdio::pipes()?;
        (Some(pio), Some(child.fds))
    };
    let r = reaper.clone();
    type Waited = (Option<UnixStream>, Option<OwnedFd>);
    type Spawned = (i32, std::result::Result<Waited, SpawnError>);
    let (pid, res) =
        tokio::task::spawn_blocking(move || -> std::result::Result<Spawned, SpawnError> {
            let mut h = spawn_helper(&r, &cfg, child_fds)?;
            let pid = h.pid;
            let res = match wait {
                WaitFor::Ready => h.wait_ready(terminal).map(|m| (Some(h.sock), m)),
                WaitFor::Exec => h.wait_exec(terminal).map(|m| (None, m)),
            };
            Ok((pid, res))
        })
        .await
        .map_err(|source| AgentError::Task {
            what: "setup task",
            source,
        })??;
    // The streams: the pipes made here, or the terminal the helper sent (a helper that had to
    // send one and did not failed in `wait_*`).
    let streams = res.map_err(AgentError::from).and_then(|(sock, master)| {
        let pio = match (pipes, master) {
            (Some(pio), _) => pio,
            (None, master) => master
                .map(stdio::from_pty)
                .transpose()?
                .unwrap_or_else(empty_io),
        };
        Ok((pio, sock))
    });
    match streams {
        Ok((pio, sock)) => Ok((Process::new(reaper, pid, pio), sock)),
        Err(e) => {
            let p = Process::new(reaper, pid, empty_io());
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            p.wait().await;
            Err(e)
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
            let res = h.wait_ready(false).map(drop);
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
    h.wait_exec(false).map(drop)
}
