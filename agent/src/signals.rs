//! Signal dispositions of a process as the kernel reports them in `/proc/<pid>/status`
//! (`SigBlk`, `SigIgn`, `SigCgt`), and what a signal sent to a PID-namespace init now would do.
//!
//! The kernel discards a signal sent to the init of a PID namespace (`SIGNAL_UNKILLABLE`) whose
//! disposition is `SIG_DFL` — from inside the namespace and, except SIGKILL/SIGSTOP, from an
//! ancestor namespace too (`kernel/signal.c`, `sig_task_ignored`) — unless the signal is
//! blocked, in which case it stays pending (`sig_ignored` never ignores a blocked signal). The
//! agent uses [`Fate`] to hold such a signal instead of losing it (see `process.rs`).

use nix::sys::signal::Signal;

/// The signal masks of a process (bit `n - 1` is signal `n`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dispositions {
    /// Blocked by the (main) thread.
    pub blocked: u64,
    /// Ignored (`SIG_IGN`).
    pub ignored: u64,
    /// Caught (a handler is installed).
    pub caught: u64,
}

/// What a signal sent now to a PID-namespace init would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The process handles the signal, or has it blocked (the kernel keeps it pending): send it.
    Deliver,
    /// The process ignores it (`SIG_IGN`): the kernel drops it, as for any process.
    Ignored,
    /// Default disposition: the kernel would discard it (init of its PID namespace).
    Discarded,
}

fn bit(sig: Signal) -> u64 {
    1u64 << ((sig as i32 - 1) as u32 & 63)
}

impl Dispositions {
    /// Parses the text of `/proc/<pid>/status`; `None` when a mask line is missing or malformed.
    pub fn parse(status: &str) -> Option<Self> {
        let mask = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        };
        Some(Self {
            blocked: mask("SigBlk:")?,
            ignored: mask("SigIgn:")?,
            caught: mask("SigCgt:")?,
        })
    }

    /// Reads the masks of process `pid`; `None` when it is gone.
    pub fn read(pid: i32) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
    }

    /// What sending `sig` now would do if the process is the init of its PID namespace.
    /// SIGKILL and SIGSTOP from the agent (an ancestor namespace) always arrive.
    pub fn fate(&self, sig: Signal) -> Fate {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            return Fate::Deliver;
        }
        let b = bit(sig);
        if self.caught & b != 0 || self.blocked & b != 0 {
            Fate::Deliver
        } else if self.ignored & b != 0 {
            Fate::Ignored
        } else {
            Fate::Discarded
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str =
        "Name:\tsh\nState:\tS (sleeping)\nSigQ:\t0/7823\nSigPnd:\t0000000000000000\n\
ShdPnd:\t0000000000000000\nSigBlk:\t0000000000000002\nSigIgn:\t0000000000001000\n\
SigCgt:\t0000000000004000\nCapInh:\t0000000000000000\n";

    #[test]
    fn parses_masks_and_tells_the_fate() {
        let d = Dispositions::parse(STATUS).unwrap();
        assert_eq!(
            d,
            Dispositions {
                blocked: 0x2,
                ignored: 0x1000,
                caught: 0x4000
            }
        );
        assert_eq!(d.fate(Signal::SIGTERM), Fate::Deliver); // 15: caught
        assert_eq!(d.fate(Signal::SIGINT), Fate::Deliver); // 2: blocked
        assert_eq!(d.fate(Signal::SIGPIPE), Fate::Ignored); // 13
        assert_eq!(d.fate(Signal::SIGHUP), Fate::Discarded); // 1: default
        assert_eq!(d.fate(Signal::SIGUSR1), Fate::Discarded);
        assert_eq!(d.fate(Signal::SIGKILL), Fate::Deliver);
        assert_eq!(d.fate(Signal::SIGSTOP), Fate::Deliver);
        assert!(Dispositions::parse("Name:\tsh\nSigBlk:\tzz\n").is_none());
        assert!(Dispositions::parse("").is_none());
    }

    #[test]
    fn reads_this_process() {
        assert!(Dispositions::read(std::process::id() as i32).is_some());
    }
}
