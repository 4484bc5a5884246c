//! Reaps every child of the agent (it is PID 1 in the guest, and a child
//! subreaper on a host) and hands exit statuses to whoever registered
//! interest in a PID. Exits of PIDs nobody registered yet are kept until
//! they are claimed, so a process that dies before its PID reaches the
//! agent is not lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

use crate::sync::LockExt;

/// Unclaimed exits kept at most (oldest dropped first).
const MAX_UNCLAIMED: usize = 4096;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal.
    pub status: i32,
    /// Unix time of the reap, ns.
    pub at_ns: u64,
}

#[derive(Default)]
struct State {
    waiters: HashMap<i32, oneshot::Sender<Exit>>,
    unclaimed: HashMap<i32, (u64, Exit)>,
    seq: u64,
}

/// The process-wide reaper.
#[derive(Clone, Default)]
pub struct Reaper {
    state: Arc<Mutex<State>>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Reaper {
    /// Starts reaping on SIGCHLD; must be called inside the tokio runtime.
    pub fn start(&self) -> std::io::Result<()> {
        let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                me.reap_all();
                if sig.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(())
    }

    /// Collects every exited child now.
    pub fn reap_all(&self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as i32),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            self.deliver(
                status.0.as_raw(),
                Exit {
                    status: status.1,
                    at_ns: now_ns(),
                },
            );
        }
    }

    fn deliver(&self, pid: i32, exit: Exit) {
        let mut st = self.state.lock_or_recover();
        if let Some(tx) = st.waiters.remove(&pid) {
            let _ = tx.send(exit);
            return;
        }
        tracing::debug!("reaped unregistered pid {pid} (status {})", exit.status);
        st.seq += 1;
        let seq = st.seq;
        st.unclaimed.insert(pid, (seq, exit));
        if st.unclaimed.len() > MAX_UNCLAIMED {
            if let Some(oldest) = st
                .unclaimed
                .iter()
                .min_by_key(|(_, (s, _))| *s)
                .map(|(p, _)| *p)
            {
                st.unclaimed.remove(&oldest);
            }
        }
    }

    /// Registers interest in `pid`'s exit.
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.state.lock_or_recover();
        if let Some((_, exit)) = st.unclaimed.remove(&pid) {
            let _ = tx.send(exit);
        } else {
            st.waiters.insert(pid, tx);
        }
        rx
    }

    /// Declares that nobody cares about `pid`'s exit (helper processes).
    pub fn ignore(&self, pid: i32) {
        let mut st = self.state.lock_or_recover();
        if st.unclaimed.remove(&pid).is_none() {
            let (tx, _rx) = oneshot::channel();
            st.waiters.insert(pid, tx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_exit_is_kept_until_claimed() {
        let r = Reaper::default();
        r.deliver(
            7,
            Exit {
                status: 3,
                at_ns: 1,
            },
        );
        let mut rx = r.watch(7);
        assert_eq!(rx.try_recv().unwrap().status, 3);
        let mut rx = r.watch(8);
        r.deliver(
            8,
            Exit {
                status: 137,
                at_ns: 2,
            },
        );
        assert_eq!(rx.try_recv().unwrap().status, 137);
        r.ignore(9);
        r.deliver(
            9,
            Exit {
                status: 0,
                at_ns: 3,
            },
        );
        assert!(r.state.lock().unwrap().unclaimed.is_empty());
    }
}
