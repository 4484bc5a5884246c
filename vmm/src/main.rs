//! `moat-vmm`: boots one microVM from the command line (see `moat-vmm --help` and
//! docs/vmm.md) and exits with a status that says why the VM stopped.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use moat_vmm::api::{ApiServer, Command, Response};
use moat_vmm::config::{check_fs_tag, ConfigError, VmConfig, USAGE};
use moat_vmm::exit::{ExitNotifier, ExitReason};

/// Blocks SIGTERM/SIGINT/SIGHUP in this (and every later) thread and returns a signalfd
/// delivering them to the event loop.
fn termination_signalfd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain libc calls on a locally owned, initialised sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// With `--defer-start`: serves the control socket until `start` (returns true) or `stop`
/// or a signal (returns false), applying `add-fs`/`add-blk` to `cfg`.
fn wait_for_start(
    cfg: &mut VmConfig,
    api: &ApiServer,
    signals: &OwnedFd,
    exit: &ExitNotifier,
) -> bool {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: api.evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two initialised pollfd structs.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            if let Some(signo) = moat_vmm::vmm::read_signalfd(signals) {
                exit.notify(ExitReason::Signal(signo));
                return false;
            }
        }
        let _ = api.evt.read();
        while let Ok(req) = api.requests.try_recv() {
            let (response, started) = match req.command {
                Command::Start => (Response::ok(), true),
                Command::Stop => {
                    exit.notify(ExitReason::Stopped);
                    let _ = req.reply.send(Response::ok());
                    return false;
                }
                Command::AddFs(share) => match check_fs_tag(&share.tag) {
                    Err(why) => (Response::error(why), false),
                    Ok(()) if !share.dir.is_dir() => (
                        Response::error(format!("{} is not a directory", share.dir.display())),
                        false,
                    ),
                    Ok(()) => {
                        cfg.fs.push(share);
                        (Response::ok(), false)
                    }
                },
                Command::AddBlk(disk) => {
                    if disk.path.is_file() {
                        cfg.blk.push(disk);
                        (Response::ok(), false)
                    } else {
                        (
                            Response::error(format!("{} is not a file", disk.path.display())),
                            false,
                        )
                    }
                }
                Command::Status => (
                    Response {
                        state: Some("created".into()),
                        ..Response::ok()
                    },
                    false,
                ),
                Command::Metrics => (
                    Response {
                        metrics: Some(moat_vmm::metrics::VmMetrics {
                            vcpus: u64::from(cfg.vcpus),
                            mem_bytes: cfg.mem_mib << 20,
                            ..Default::default()
                        }),
                        ..Response::ok()
                    },
                    false,
                ),
                Command::Pause | Command::Resume | Command::ResizeMemory { .. } => {
                    (Response::error("the VM is not started"), false)
                }
                Command::Wait => (
                    Response::error("wait is answered by the connection thread"),
                    false,
                ),
            };
            let _ = req.reply.send(response);
            if started {
                return true;
            }
        }
    }
}

fn run() -> i32 {
    let start = Instant::now();
    // Log lines (moat's tracing format, crate moat-logging) go to stderr; the level is
    // `MOAT_VMM_LOG` = error|warn|info|debug|trace (default warn), set by the shim from its
    // configured `log_level`.
    let level = moat_logging::level_from_env("MOAT_VMM_LOG", moat_logging::LevelFilter::WARN);
    let _ = moat_logging::init("moat-vmm", level, moat_logging::Output::Stderr);
    let mut cfg = match VmConfig::from_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(ConfigError::Help) => {
            println!("{USAGE}");
            return 0;
        }
        Err(e) => {
            eprintln!("moat-vmm: {e}\n{USAGE}");
            return 2;
        }
    };
    // Before any thread exists (the control socket's come next), so that every thread, and
    // the taps opened while building the VM, live in the pod's network namespace.
    if let Some(ns) = &cfg.netns {
        if let Err(e) = moat_vmm::devices::virtio::tap::join_netns(ns) {
            eprintln!("moat-vmm: {e}");
            return 1;
        }
    }
    // Still single-threaded, and already in the pod's network namespace.
    if cfg.jail.enabled {
        match moat_vmm::jail::enter(&mut cfg) {
            Ok(moat_vmm::jail::Role::Vmm) => moat_vmm::builder::log_timeline(start, "jail entered"),
            Ok(moat_vmm::jail::Role::Supervisor(code)) => return code,
            Err(e) => {
                eprintln!("moat-vmm: {e}");
                return 1;
            }
        }
    }
    let signals = match termination_signalfd() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("moat-vmm: cannot set up signal handling: {e}");
            return 1;
        }
    };
    let exit = match ExitNotifier::new() {
        Ok(e) => Arc::new(e),
        Err(e) => {
            eprintln!("moat-vmm: cannot create eventfd: {e}");
            return 1;
        }
    };
    let api = match cfg
        .api_sock
        .as_deref()
        .map(|p| ApiServer::start(p, exit.clone(), cfg.seccomp))
        .transpose()
    {
        Ok(a) => a,
        Err(e) => {
            eprintln!("moat-vmm: {e}");
            return 1;
        }
    };
    let finish = |mut api: Option<ApiServer>, reason: ExitReason| {
        exit.notify(reason);
        exit.mark_finished();
        if let Some(a) = api.as_mut() {
            a.shutdown();
        }
    };
    if cfg.defer_start {
        let Some(server) = api.as_ref() else {
            return 2;
        };
        if !wait_for_start(&mut cfg, server, &signals, &exit) {
            let reason = exit.wait();
            finish(api, reason.clone());
            eprintln!("moat-vmm: stopped before start: {reason}");
            return reason.exit_code();
        }
    }
    let api_evt = match api.as_ref().map(|a| a.evt.try_clone()).transpose() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("moat-vmm: cannot create eventfd: {e}");
            finish(api, ExitReason::VmmError(e.to_string()));
            return 1;
        }
    };
    let mut vmm = match moat_vmm::builder::build(&cfg, start, exit.clone(), api_evt, Some(signals))
    {
        Ok(v) => v,
        Err(e) => {
            eprintln!("moat-vmm: {e}");
            let reason = ExitReason::VmmError(e.to_string());
            let code = reason.exit_code();
            // `wait` callers learn about the failure before the socket goes away.
            finish(api, reason);
            return code;
        }
    };
    vmm.set_api(api);
    tracing::info!("VM built in {} ms", start.elapsed().as_millis());
    let reason = vmm.run();
    eprintln!(
        "moat-vmm: VM stopped: {reason} (exit status {})",
        reason.exit_code()
    );
    reason.exit_code()
}

fn main() {
    std::process::exit(run());
}
