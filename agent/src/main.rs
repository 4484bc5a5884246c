//! `moat-agent`: the guest agent of moat microVMs.
//!
//! As PID 1 of the guest it mounts the basic filesystems, writes the boot
//! marker, reaps every process and serves the `moat.agent.v1.Agent` ttrpc
//! service on vsock port 1024; the shim drives container lifecycles through
//! it. Run by hand (`--listen unix:///path.sock`) it does the same on the
//! host, which the integration tests use.
//!
//! Container setup is hand-written on top of `nix` rather than built on
//! youki's `libcontainer`: that crate assumes a host runtime (state
//! directory, systemd/cgroupfs managers, hooks, a `runc`-style CLI flow,
//! many dependencies), while a PID-1 agent needs a small static binary and
//! its own process/stream bookkeeping. The setup steps mirror runc's
//! (namespaces → mounts → devices → pivot_root → masked/read-only paths →
//! rlimits → user → capabilities → no_new_privs → seccomp → exec) and run
//! in a freshly exec'd single-threaded helper (`moat-agent __init`), never
//! in the threaded agent. Seccomp uses the pure-Rust `seccompiler`.

use moat_agent::{agent, init, logger, pid1, portforward, reaper, server};

use std::path::PathBuf;
use std::sync::Arc;

use moat_protocol::ttrpc;
use tokio::signal::unix::{signal, SignalKind};

/// The `--help` text.
fn usage() -> String {
    format!(
        "usage: moat-agent [--listen ADDR] [--forward-listen ADDR] [--state-dir DIR]

  --listen ADDR     vsock://-1:{port} (default) or unix:///PATH.sock
  --forward-listen ADDR
                    the port-forward relay: vsock://-1:{fwd} (default with a vsock
                    --listen; none with a unix one) or unix:///PATH.sock
  --state-dir DIR   where sandbox files and rootfs mounts live (default {state})
  --version         print the version

As PID 1 the agent also mounts /proc, /sys, /dev, /run, cgroup2, writes the
boot marker and powers the VM off on DestroySandbox(power_off) or a fatal error.
Log level: MOAT_AGENT_LOG=error|warn|info|debug|trace.",
        port = moat_protocol::AGENT_VSOCK_PORT,
        fwd = moat_protocol::FORWARD_VSOCK_PORT,
        state = moat_protocol::GUEST_STATE_DIR,
    )
}

/// Errors of the agent's main loop.
#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{0}\n\n{usage}", usage = usage())]
    Usage(String),
    #[error("early boot: {0}")]
    Pid1(#[from] pid1::Pid1Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ttrpc server on {addr}: {source}")]
    Server {
        addr: String,
        #[source]
        source: ttrpc::Error,
    },
}

struct Options {
    listen: String,
    state_dir: PathBuf,
    /// The port-forward listener (see `portforward`), if any.
    forward_listen: Option<portforward::ForwardAddress>,
}

fn parse_args() -> Result<Option<Options>, MainError> {
    let mut o = Options {
        listen: format!("vsock://-1:{}", moat_protocol::AGENT_VSOCK_PORT),
        state_dir: PathBuf::from(moat_protocol::GUEST_STATE_DIR),
        forward_listen: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => {
                o.listen = args
                    .next()
                    .ok_or_else(|| MainError::Usage("--listen needs a value".into()))?
            }
            "--state-dir" => {
                o.state_dir = args
                    .next()
                    .ok_or_else(|| MainError::Usage("--state-dir needs a value".into()))?
                    .into()
            }
            "--forward-listen" => {
                let a = args
                    .next()
                    .ok_or_else(|| MainError::Usage("--forward-listen needs a value".into()))?;
                o.forward_listen =
                    Some(portforward::ForwardAddress::parse(&a).ok_or_else(|| {
                        MainError::Usage(format!("unsupported forward address {a:?}"))
                    })?);
            }
            "--version" => {
                println!(
                    "moat-agent {} (protocol {})",
                    env!("CARGO_PKG_VERSION"),
                    moat_protocol::PROTOCOL_VERSION
                );
                return Ok(None);
            }
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(None);
            }
            // The kernel hands unknown command-line words to init as arguments.
            other if std::process::id() == 1 => tracing::debug!("ignoring argument {other:?}"),
            other => return Err(MainError::Usage(format!("unknown argument {other:?}"))),
        }
    }
    if !(o.listen.starts_with("unix://") || o.listen.starts_with("vsock://")) {
        return Err(MainError::Usage(format!(
            "unsupported listen address {:?}",
            o.listen
        )));
    }
    if o.forward_listen.is_none() && o.listen.starts_with("vsock://") {
        o.forward_listen = Some(portforward::ForwardAddress::Vsock {
            cid: u32::MAX,
            port: moat_protocol::FORWARD_VSOCK_PORT,
        });
    }
    if !o.state_dir.is_absolute() {
        return Err(MainError::Usage("--state-dir must be absolute".into()));
    }
    Ok(Some(o))
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("__init") {
        init::main();
    }
    logger::init();
    close_inherited_fds();
    let is_init = std::process::id() == 1;
    if is_init {
        std::panic::set_hook(Box::new(|info| {
            tracing::error!("fatal: {info}");
            pid1::power_off();
        }));
    }
    let result = (|| -> Result<(), MainError> {
        let Some(opts) = parse_args()? else {
            return Ok(());
        };
        if is_init {
            pid1::early()?;
        } else {
            nix::sys::prctl::set_child_subreaper(true).map_err(|e| MainError::Io {
                what: "PR_SET_CHILD_SUBREAPER".into(),
                source: e.into(),
            })?;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| MainError::Io {
                what: "starting the runtime".into(),
                source,
            })?;
        rt.block_on(serve(opts, is_init))
    })();
    if let Err(e) = result {
        tracing::error!("{e}");
        if is_init {
            pid1::power_off();
        }
        std::process::exit(1);
    }
}

/// Marks every descriptor inherited from our parent (beyond stdio)
/// close-on-exec so none of them reaches a container.
fn close_inherited_fds() {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in fds.into_iter().filter(|fd| *fd > 2) {
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
}

async fn serve(opts: Options, is_init: bool) -> Result<(), MainError> {
    let reaper = reaper::Reaper::default();
    reaper.start().map_err(|source| MainError::Io {
        what: "installing the SIGCHLD handler".into(),
        source,
    })?;
    std::fs::create_dir_all(&opts.state_dir).map_err(|source| MainError::Io {
        what: format!("creating {}", opts.state_dir.display()),
        source,
    })?;
    let agent = Arc::new(agent::Agent::new(reaper, is_init, opts.state_dir.clone()));
    let (poweroff_tx, mut poweroff_rx) = tokio::sync::mpsc::unbounded_channel();
    let service = moat_protocol::agent_ttrpc_async::create_agent(Arc::new(server::Service::new(
        agent.clone(),
        poweroff_tx,
    )));

    let unix_path = opts.listen.strip_prefix("unix://").map(PathBuf::from);
    if let Some(p) = &unix_path {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(MainError::Io {
                    what: format!("removing stale {}", p.display()),
                    source,
                })
            }
        }
    }
    let mut server = ttrpc::asynchronous::Server::new()
        .bind(&opts.listen)
        .map_err(|source| MainError::Server {
            addr: opts.listen.clone(),
            source,
        })?
        .register_service(service);
    server.start().await.map_err(|source| MainError::Server {
        addr: opts.listen.clone(),
        source,
    })?;
    tracing::info!(
        "moat-agent {} serving protocol {} on {}{}",
        env!("CARGO_PKG_VERSION"),
        moat_protocol::PROTOCOL_VERSION,
        opts.listen,
        if is_init { " as PID 1" } else { "" }
    );

    // Port-forward is an extra: without it the pod still runs (logged).
    let forwarder = opts.forward_listen.as_ref().and_then(|addr| {
        let a = agent.clone();
        let lookup: portforward::NetnsLookup = Arc::new(move || {
            let a = a.clone();
            Box::pin(async move { a.sandbox_netns_pid().await })
        });
        match portforward::Forwarder::start(addr, lookup) {
            Ok(f) => {
                tracing::info!("port-forward relay on {addr}");
                Some(f)
            }
            Err(e) => {
                tracing::error!("port-forward unavailable: {e}");
                None
            }
        }
    });

    let sig = |k| {
        signal(k).map_err(|source| MainError::Io {
            what: "installing signal handlers".into(),
            source,
        })
    };
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    let mut hup = sig(SignalKind::hangup())?;
    loop {
        let got = tokio::select! {
            _ = term.recv() => nix::sys::signal::Signal::SIGTERM,
            _ = int.recv() => nix::sys::signal::Signal::SIGINT,
            _ = hup.recv() => nix::sys::signal::Signal::SIGHUP,
            _ = poweroff_rx.recv() => {
                let _ = server.shutdown().await;
                pid1::power_off();
            }
        };
        if is_init {
            tracing::info!("forwarding {got} to the containers");
            agent.forward_signal(got);
            continue;
        }
        tracing::info!("{got}: shutting down");
        break;
    }
    drop(forwarder);
    agent.shutdown().await;
    let _ = server.shutdown().await;
    if let Some(p) = &unix_path {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}
