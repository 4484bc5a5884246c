//! vCPU threads. Each runs `KVM_RUN` in a loop, dispatches port I/O and MMIO exits to the
//! buses, and turns guest shutdown/triple fault/errors into an [`ExitReason`].
//!
//! Stopping and pausing: the controller changes the shared [`VcpuControl`] state and sends
//! each thread the kick signal; the handler sets `kvm_run.immediate_exit`, so a thread that
//! is inside `KVM_RUN`, or about to enter it, returns `EINTR` and re-reads the state.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::{lock, Bus};
use crate::exit::{ExitNotifier, ExitReason};
use crate::seccomp::{SeccompPolicy, ThreadKind};

/// Errors starting vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// Installing the kick signal handler failed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    /// The OS refused a thread.
    #[error("cannot spawn vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Offset from SIGRTMIN of the signal used to kick vCPU threads out of `KVM_RUN`.
const KICK_SIGNAL_OFFSET: i32 = 0;

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PTR.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU loop
            // while the VcpuFd (which owns the mapping) is alive; a byte store is
            // async-signal-safe.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

/// Desired run state of all vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Run the guest.
    Running,
    /// Park in the control condvar.
    Paused,
    /// Leave the run loop.
    Stopping,
}

/// Shared run-state control of the vCPU threads.
pub struct VcpuControl {
    state: Mutex<(RunState, usize)>,
    cv: Condvar,
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self {
            state: Mutex::new((RunState::Running, 0)),
            cv: Condvar::new(),
        }
    }
}

impl VcpuControl {
    /// Called by a vCPU between runs: blocks while paused; false when it must stop.
    fn may_run(&self) -> bool {
        let mut s = lock(&self.state);
        if s.0 == RunState::Paused {
            s.1 += 1;
            self.cv.notify_all();
            while s.0 == RunState::Paused {
                s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.1 -= 1;
        }
        s.0 == RunState::Running
    }

    fn set(&self, state: RunState) {
        lock(&self.state).0 = state;
        self.cv.notify_all();
    }

    /// Waits until `n` vCPUs are parked (or the VM is stopping).
    fn wait_parked(&self, n: usize) {
        let mut s = lock(&self.state);
        while s.0 == RunState::Paused && s.1 < n {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Everything a vCPU thread dispatches to.
#[derive(Clone)]
pub struct VcpuContext {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where the VM's end is reported.
    pub exit: Arc<ExitNotifier>,
    /// Whether the vCPU threads install their seccomp filter before the first `KVM_RUN`.
    pub seccomp: SeccompPolicy,
    /// Run-state control.
    pub control: Arc<VcpuControl>,
}

/// The running vCPU threads.
pub struct Vcpus {
    threads: Vec<JoinHandle<()>>,
    control: Arc<VcpuControl>,
}

impl Vcpus {
    /// Starts one thread per vCPU fd.
    pub fn start(fds: Vec<VcpuFd>, ctx: VcpuContext) -> Result<Self, VcpuError> {
        register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, kick_handler)
            .map_err(VcpuError::SignalHandler)?;
        let control = ctx.control.clone();
        let mut vcpus = Vcpus {
            threads: Vec::new(),
            control,
        };
        for (i, fd) in fds.into_iter().enumerate() {
            let ctx = ctx.clone();
            let t = crate::thread_builder(format!("vcpu{i}"))
                .spawn(move || run_loop(fd, i, ctx))
                .map_err(VcpuError::Spawn)?;
            vcpus.threads.push(t);
        }
        Ok(vcpus)
    }

    fn kick_all(&self) {
        for t in &self.threads {
            if !t.is_finished() {
                // ESRCH when the thread is just exiting: nothing to kick.
                let _ = t.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET);
            }
        }
    }

    /// Parks every vCPU and returns once all are parked.
    pub fn pause(&self) {
        self.control.set(RunState::Paused);
        self.kick_all();
        let alive = self.threads.iter().filter(|t| !t.is_finished()).count();
        self.control.wait_parked(alive);
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.control.set(RunState::Running);
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.control.set(RunState::Stopping);
        self.kick_all();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn run_loop(mut fd: VcpuFd, index: usize, ctx: VcpuContext) {
    let run_ptr: *mut kvm_run = fd.get_kvm_run();
    KVM_RUN_PTR.with(|p| p.set(run_ptr));
    if let Err(e) = ctx.seccomp.apply(ThreadKind::Vcpu) {
        ctx.exit
            .notify(ExitReason::VmmError(format!("vCPU {index}: {e}")));
        return;
    }
    while ctx.control.may_run() {
        let outcome = match fd.run() {
            Ok(exit) => handle_exit(exit, &ctx),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(ExitReason::VcpuError(format!("vCPU {index}: KVM_RUN: {e}"))),
        };
        if let Some(reason) = outcome {
            ctx.exit.notify(reason);
            break;
        }
    }
    KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
}

/// Handles one exit; `Some` ends the VM.
fn handle_exit(exit: VcpuExit<'_>, ctx: &VcpuContext) -> Option<ExitReason> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ctx.pio.read(u64::from(port), data);
            None
        }
        VcpuExit::IoOut(port, data) => {
            ctx.pio.write(u64::from(port), data);
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.mmio.read(addr, data);
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.mmio.write(addr, data);
            None
        }
        VcpuExit::Shutdown => Some(ExitReason::TripleFault),
        // With the in-kernel LAPIC, KVM handles HLT itself; an HLT exit only happens without
        // one, where nothing could ever wake the vCPU again.
        VcpuExit::Hlt => Some(ExitReason::GuestShutdown),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                Some(ExitReason::GuestShutdown)
            }
            other => Some(ExitReason::VcpuError(format!("guest system event {other}"))),
        },
        VcpuExit::FailEntry(reason, cpu) => Some(ExitReason::VcpuError(format!(
            "VM entry failed on cpu {cpu}: hardware reason {reason:#x}"
        ))),
        VcpuExit::InternalError => Some(ExitReason::VcpuError(
            "KVM internal error (emulation failure)".into(),
        )),
        other => Some(ExitReason::VcpuError(format!(
            "unhandled vCPU exit {other:?}"
        ))),
    }
}
