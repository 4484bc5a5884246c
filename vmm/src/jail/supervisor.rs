//! The jail's process structure: [`enter`] checks the process is single-threaded, forks the
//! VMM into a new pid namespace and returns the [`Role`] of each side. The supervisor
//! forwards termination signals and reports the VMM's exit status; the VMM unshares its mount,
//! IPC and UTS namespaces and is confined (new root, rlimits, user namespace, credentials)
//! before it returns. The supervisor writes the user namespace's maps in between.

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::mount::{mount, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, pipe2, ForkResult, Pid};

use super::error::{sys, JailError};
use super::mounts::{build_root, canonicalize, make_shares_propagate, plan, undo_shares, Kind};
use super::privileges::{drop_groups, drop_privileges, limit, NOFILE_FS};
use super::userns::{self, VmmSide};
use crate::config::VmConfig;

/// Which side of the fork [`enter`] returned on.
#[derive(Debug, PartialEq, Eq)]
pub enum Role {
    /// The confined VMM: go on building and running the VM.
    Vmm,
    /// The supervisor, after the VMM exited: exit with this status.
    Supervisor(i32),
}

fn thread_count() -> usize {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(1)
}

fn termination_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set
}

/// Confines the VMM (see the module doc). Canonicalizes `cfg`'s paths first. Returns
/// [`Role::Vmm`] in the confined process and [`Role::Supervisor`] with the exit status in the
/// original one once the VMM has exited. Must run before any thread is started.
pub fn enter(cfg: &mut VmConfig) -> Result<Role, JailError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(JailError::Threaded(threads));
    }
    canonicalize(cfg);
    let binds = plan(cfg, Path::exists);
    let nr_open = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(NOFILE_FS);
    let made = make_shares_propagate(cfg)?;

    // Termination signals stay blocked from here on in both processes: the supervisor takes
    // them with sigwait, the VMM (PID 1 of its namespace, which drops signals it neither
    // handles nor blocks) with the signalfd `main` creates; one sent in between stays pending.
    let mut supervised = termination_signals();
    supervised.add(Signal::SIGCHLD);
    let mut old = SigSet::empty();
    let set_up = (|| {
        // An inherited SIG_IGN would have the kernel reap the VMM before the supervisor can
        // collect its status.
        // SAFETY: restores the default disposition; no handler is installed.
        unsafe { nix::sys::signal::signal(Signal::SIGCHLD, nix::sys::signal::SigHandler::SigDfl) }
            .map_err(sys("reset SIGCHLD"))?;
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&supervised), Some(&mut old))
            .map_err(sys("block signals"))?;
        let (alive_r, alive_w) = pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
        let sync = cfg.jail.userns.then(userns::Sync::new).transpose()?;
        unshare(CloneFlags::CLONE_NEWPID).map_err(sys("unshare the pid namespace"))?;
        // SAFETY: the process is single-threaded (checked above), so the child may run
        // arbitrary code.
        let forked = unsafe { fork() }.map_err(sys("fork"))?;
        Ok::<_, JailError>((forked, alive_r, alive_w, sync))
    })();
    let (forked, alive_r, alive_w, sync) = match set_up {
        Ok(v) => v,
        Err(e) => {
            undo_shares(&made);
            return Err(e);
        }
    };
    match forked {
        ForkResult::Parent { child } => {
            drop(alive_r);
            if let Some(sync) = sync {
                // On failure the VMM sees the closed pipe and exits; supervise() reaps it.
                if let Err(e) = sync.supervisor().map(child) {
                    eprintln!("moat-vmm: {e}");
                }
            }
            let code = supervise(child, &supervised);
            undo_shares(&made);
            drop(alive_w);
            Ok(Role::Supervisor(code))
        }
        ForkResult::Child => {
            drop(alive_w);
            let sync = sync.map(userns::Sync::vmm);
            die_with_supervisor(&alive_r)?;
            let mut mask = old;
            for s in termination_signals().iter() {
                mask.add(s);
            }
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&mask), None)
                .map_err(sys("set the signal mask"))?;
            confine(cfg, &binds, nr_open, sync)?;
            // A change of uid (--jail-uid) clears the parent-death signal: set it again.
            die_with_supervisor(&alive_r)?;
            drop(alive_r);
            Ok(Role::Vmm)
        }
    }
}

/// In the VMM: asks for SIGKILL when the supervisor dies, and exits if it already has (then
/// `alive`, whose write end only the supervisor holds, is at end of file).
fn die_with_supervisor(alive: &OwnedFd) -> Result<(), JailError> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(sys("PR_SET_PDEATHSIG"))?;
    let mut fds = [PollFd::new(alive.as_fd(), PollFlags::POLLIN)];
    if poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0) {
        std::process::exit(1);
    }
    Ok(())
}

/// Forwards termination signals to `child` until it exits; returns its exit status.
fn supervise(child: Pid, set: &SigSet) -> i32 {
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return code,
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    eprintln!("moat-vmm: the jailed VMM was killed by {sig}");
                    return 128 + sig as i32;
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("moat-vmm: waiting for the jailed VMM: {e}");
                    return 1;
                }
            },
            Ok(sig) => {
                let _ = kill(child, sig);
            }
            Err(_) => {}
        }
    }
}

/// In the forked VMM: namespaces, the new root, rlimits, the user namespace (entered last,
/// so that it owns none of the others: see [`userns`]), credentials.
fn confine(
    cfg: &VmConfig,
    binds: &[(PathBuf, Kind)],
    nr_open: u64,
    userns: Option<VmmSide>,
) -> Result<(), JailError> {
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
        .map_err(sys("unshare the mount, IPC and UTS namespaces"))?;
    // Nothing done below may propagate back to the host; host mounts still propagate in.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(sys("make / a slave mount"))?;
    build_root(binds)?;
    // Hard limits above the current ones need CAP_SYS_RESOURCE of the initial namespace.
    limit(cfg, nr_open)?;
    drop_groups(cfg)?;
    if let Some(side) = userns {
        side.enter()?;
    }
    drop_privileges(cfg)
}
