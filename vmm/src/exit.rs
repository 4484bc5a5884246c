//! Why the VM stopped, and the process exit status for each reason.
//!
//! Whoever ends the VM first (a vCPU, the i8042, a signal, the control socket) records the
//! reason in the shared [`ExitNotifier`] and wakes the event loop; later reasons are ignored.

use std::sync::{Condvar, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// The reason the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest pulsed the reset line through the i8042 (Linux `reboot` with `reboot=k`).
    GuestReset,
    /// The guest powered off: ACPI S5 through the FADT's PM1a control register (`poweroff`;
    /// produced by `devices::legacy::AcpiPm`).
    GuestPowerOff,
    /// The guest asked KVM for a system shutdown or reset (`KVM_EXIT_SYSTEM_EVENT`).
    GuestShutdown,
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`): a crash, or `reboot=t`.
    TripleFault,
    /// A vCPU hit an error KVM cannot continue from; the text says which.
    VcpuError(String),
    /// A device or the event loop failed; the text says which.
    VmmError(String),
    /// The control socket asked the VM to stop.
    Stopped,
    /// The VMM received this signal (SIGTERM, SIGINT).
    Signal(i32),
}

impl ExitReason {
    /// The process exit status (see docs/vmm.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestReset
            | ExitReason::GuestPowerOff
            | ExitReason::GuestShutdown
            | ExitReason::Stopped => 0,
            ExitReason::VmmError(_) => 1,
            ExitReason::TripleFault => 3,
            ExitReason::VcpuError(_) => 4,
            ExitReason::Signal(n) => 128 + n,
        }
    }

    /// A short machine-readable name, used by the control socket.
    pub fn name(&self) -> &'static str {
        match self {
            ExitReason::GuestReset => "guest-reset",
            ExitReason::GuestPowerOff => "guest-poweroff",
            ExitReason::GuestShutdown => "guest-shutdown",
            ExitReason::TripleFault => "triple-fault",
            ExitReason::VcpuError(_) => "vcpu-error",
            ExitReason::VmmError(_) => "vmm-error",
            ExitReason::Stopped => "stopped",
            ExitReason::Signal(_) => "signal",
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::VcpuError(s) | ExitReason::VmmError(s) => write!(f, "{}: {s}", self.name()),
            ExitReason::Signal(n) => write!(f, "signal {n}"),
            _ => f.write_str(self.name()),
        }
    }
}

/// First-wins exit reason plus an eventfd that wakes the event loop.
pub struct ExitNotifier {
    reason: Mutex<Option<ExitReason>>,
    finished: Mutex<bool>,
    done: Condvar,
    evt: EventFd,
}

impl ExitNotifier {
    /// A notifier with no reason recorded.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            finished: Mutex::new(false),
            done: Condvar::new(),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the event loop.
    pub fn notify(&self, reason: ExitReason) {
        let mut r = crate::devices::lock(&self.reason);
        if r.is_none() {
            *r = Some(reason);
            // An eventfd write only fails on counter overflow, which cannot happen here.
            let _ = self.evt.write(1);
            self.done.notify_all();
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        crate::devices::lock(&self.reason).clone()
    }

    /// Blocks until a reason is recorded.
    pub fn wait(&self) -> ExitReason {
        let mut r = crate::devices::lock(&self.reason);
        loop {
            if let Some(reason) = r.as_ref() {
                return reason.clone();
            }
            r = self.done.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Records that the VM is torn down (threads joined, devices dropped); wakes
    /// `wait_finished`.
    pub fn mark_finished(&self) {
        *crate::devices::lock(&self.finished) = true;
        let _r = crate::devices::lock(&self.reason);
        self.done.notify_all();
    }

    /// Whether `mark_finished` was called.
    pub fn is_finished(&self) -> bool {
        *crate::devices::lock(&self.finished)
    }

    /// Blocks until the VM is torn down; returns the reason and exit status.
    pub fn wait_finished(&self) -> (ExitReason, i32) {
        let mut r = crate::devices::lock(&self.reason);
        loop {
            if self.is_finished() {
                if let Some(reason) = r.as_ref() {
                    return (reason.clone(), reason.exit_code());
                }
            }
            r = self.done.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The eventfd signalled on the first `notify`.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let n = ExitNotifier::new().unwrap();
        assert_eq!(n.reason(), None);
        n.notify(ExitReason::TripleFault);
        n.notify(ExitReason::GuestReset);
        assert_eq!(n.wait(), ExitReason::TripleFault);
        assert_eq!(n.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(ExitReason::GuestReset.exit_code(), 0);
        assert_eq!(ExitReason::Signal(libc::SIGTERM).exit_code(), 143);
        assert_eq!(ExitReason::TripleFault.exit_code(), 3);
        assert_eq!(ExitReason::VcpuError("x".into()).exit_code(), 4);
        assert_eq!(ExitReason::VmmError("x".into()).to_string(), "vmm-error: x");
    }
}
