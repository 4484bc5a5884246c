//! The control socket: a Unix stream socket speaking line-delimited JSON, one request per
//! line, one response line each (protocol in docs/vmm.md).
//!
//! An accept thread serves each connection on its own thread. Requests that need the VMM
//! (`start`, `stop`, `pause`, `resume`, `status`, `metrics`, `add-fs`, `add-blk`,
//! `resize-memory`) travel over a channel
//! to the VMM thread, which is woken through an eventfd; `wait` blocks in the connection
//! thread until the VM has been torn down.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{BlkConfig, FsShare};
use crate::devices::lock;
use crate::exit::{ExitNotifier, ExitReason};
use crate::seccomp::{SeccompPolicy, ThreadKind};

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Command {
    /// Boot a VM started with `--defer-start`.
    Start,
    /// Stop the guest and exit.
    Stop,
    /// Park all vCPUs.
    Pause,
    /// Resume parked vCPUs.
    Resume,
    /// Report state and boot time.
    Status,
    /// Report the VM's counters: vCPUs, memory, boot time, per-device I/O counters.
    Metrics,
    /// Block until the VMM has stopped the VM; answers with the exit status.
    Wait,
    /// Add a virtio-fs share (before `start` only).
    AddFs(FsShare),
    /// Add a virtio-blk disk (before `start` only).
    AddBlk(BlkConfig),
    /// Ask the guest to have `hotplug_mib` MiB of the virtio-mem region plugged (a multiple of
    /// 2 MiB, at most `--mem-hotplug-mib`); answered at once, the guest plugs on its own time
    /// (`status` reports what it has plugged).
    ResizeMemory {
        /// Hotplug memory wanted, MiB.
        hotplug_mib: u64,
    },
}

/// A response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// VM state (`created`, `running`, `paused`, `stopped`) for `status`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Hotplug memory the guest has plugged, MiB (`status`, `resize-memory`; with virtio-mem).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugged_mib: Option<u64>,
    /// Hotplug memory requested, MiB (`status`, `resize-memory`; with virtio-mem).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_mib: Option<u64>,
    /// Milliseconds from VMM start to the guest's boot marker, once seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_ms: Option<u64>,
    /// Counters (`metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<crate::metrics::VmMetrics>,
    /// Process exit status the VMM exits with (`wait`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Exit reason name (`wait`), see docs/vmm.md.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable exit detail (`wait`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Response {
    /// Success without data.
    pub fn ok() -> Self {
        Self {
            ok: true,
            ..Default::default()
        }
    }

    /// Failure with a message.
    pub fn error(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            ..Default::default()
        }
    }
}

/// A request waiting for the VMM thread, with the way back.
pub struct ApiRequest {
    /// What to do.
    pub command: Command,
    /// Where the answer goes.
    pub reply: Sender<Response>,
}

/// Errors starting the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Binding the socket failed.
    #[error("cannot listen on control socket {path}: {err}")]
    Bind {
        /// Socket path.
        path: String,
        /// OS error.
        #[source]
        err: std::io::Error,
    },
    /// A thread or eventfd could not be created.
    #[error("cannot start the control socket: {0}")]
    Setup(#[source] std::io::Error),
}

/// Client connections: a handle to shut each down, and its thread.
type Connections = Arc<Mutex<Vec<(UnixStream, JoinHandle<()>)>>>;

/// The running control socket server.
pub struct ApiServer {
    path: PathBuf,
    listener: UnixListener,
    accept_thread: Option<JoinHandle<()>>,
    conns: Connections,
    /// Signalled whenever a request is queued.
    pub evt: EventFd,
    /// Queued requests.
    pub requests: Receiver<ApiRequest>,
}

impl ApiServer {
    /// Listens on `path` (a stale socket file is replaced).
    /// The accept thread (and the connection threads it creates) run under the control-socket
    /// seccomp filter when `seccomp` says so.
    pub fn start(
        path: &Path,
        exit: Arc<ExitNotifier>,
        seccomp: SeccompPolicy,
    ) -> Result<Self, ApiError> {
        let bind_err = |err| ApiError::Bind {
            path: path.display().to_string(),
            err,
        };
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(bind_err(e)),
            _ => {}
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(ApiError::Setup)?;
        let (tx, rx) = mpsc::channel();
        let conns: Connections = Arc::default();
        let accept_listener = listener.try_clone().map_err(ApiError::Setup)?;
        let accept_evt = evt.try_clone().map_err(ApiError::Setup)?;
        let accept_conns = conns.clone();
        let accept_thread = crate::thread_builder("api")
            .spawn(move || {
                if let Err(e) = seccomp.apply(ThreadKind::Api) {
                    exit.notify(ExitReason::VmmError(e.to_string()));
                    return;
                }
                accept_loop(accept_listener, tx, accept_evt, exit, accept_conns)
            })
            .map_err(ApiError::Setup)?;
        Ok(Self {
            path: path.to_path_buf(),
            listener,
            accept_thread: Some(accept_thread),
            conns,
            evt,
            requests: rx,
        })
    }

    /// Stops accepting, ends every connection once its pending answers are written, and joins
    /// all threads. Call after `ExitNotifier::mark_finished` so `wait` callers get their answer.
    pub fn shutdown(&mut self) {
        // SAFETY: shutdown(2) on our own listening socket fd; it wakes the blocked accept().
        unsafe {
            libc::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&self.listener),
                libc::SHUT_RDWR,
            )
        };
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        let conns: Vec<_> = lock(&self.conns).drain(..).collect();
        for (stream, thread) in conns {
            let _ = stream.shutdown(std::net::Shutdown::Read);
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(
    listener: UnixListener,
    tx: Sender<ApiRequest>,
    evt: EventFd,
    exit: Arc<ExitNotifier>,
    conns: Connections,
) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // EINVAL after shutdown(): the server is stopping.
            Err(_) => return,
        };
        if exit.is_finished() {
            return;
        }
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        let (tx, exit) = (tx.clone(), exit.clone());
        let Ok(evt) = evt.try_clone() else {
            continue;
        };
        let spawned = crate::thread_builder("api-conn")
            .spawn(move || serve_connection(stream, tx, evt, exit));
        if let Ok(t) = spawned {
            lock(&conns).push((handle, t));
        }
    }
}

fn serve_connection(
    stream: UnixStream,
    tx: Sender<ApiRequest>,
    evt: EventFd,
    exit: Arc<ExitNotifier>,
) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else {
            return;
        };
        if line.trim().is_empty() {
            continue;
        }
        let response = match serde_json::from_str::<Command>(&line) {
            Err(e) => Response::error(format!("bad request: {e}")),
            Ok(Command::Wait) => {
                let (reason, code) = exit.wait_finished();
                Response {
                    ok: true,
                    exit_code: Some(code),
                    reason: Some(reason.name().to_string()),
                    detail: Some(reason.to_string()),
                    ..Default::default()
                }
            }
            Ok(command) => {
                let (reply, answer) = mpsc::channel();
                if tx.send(ApiRequest { command, reply }).is_err() || evt.write(1).is_err() {
                    Response::error("the VM is shutting down")
                } else {
                    answer
                        .recv()
                        .unwrap_or_else(|_| Response::error("the VM is shutting down"))
                }
            }
        };
        let mut text = serde_json::to_string(&response).unwrap_or_else(|_| "{\"ok\":false}".into());
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_parsing() {
        let c: Command =
            serde_json::from_str(r#"{"cmd":"add-fs","tag":"rootfs","dir":"/srv"}"#).unwrap();
        assert_eq!(
            c,
            Command::AddFs(FsShare {
                tag: "rootfs".into(),
                dir: "/srv".into()
            })
        );
        let c: Command = serde_json::from_str(r#"{"cmd":"add-blk","path":"/d"}"#).unwrap();
        assert_eq!(
            c,
            Command::AddBlk(BlkConfig {
                path: "/d".into(),
                read_only: false
            })
        );
        assert_eq!(
            serde_json::from_str::<Command>(r#"{"cmd":"wait"}"#).unwrap(),
            Command::Wait
        );
        assert_eq!(
            serde_json::from_str::<Command>(r#"{"cmd":"resize-memory","hotplug_mib":512}"#)
                .unwrap(),
            Command::ResizeMemory { hotplug_mib: 512 }
        );
        assert!(
            serde_json::from_str::<Command>(r#"{"cmd":"resize-memory","hotplug_mib":-1}"#).is_err()
        );
        assert_eq!(
            serde_json::from_str::<Command>(r#"{"cmd":"metrics"}"#).unwrap(),
            Command::Metrics
        );
        assert!(serde_json::from_str::<Command>(r#"{"cmd":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<Command>(r#"{"cmd":"add-fs","tag":"t"}"#).is_err());
    }

    #[test]
    fn round_trip_over_the_socket() {
        let path = std::env::temp_dir().join(format!("moat-api-{}", std::process::id()));
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut server = ApiServer::start(&path, exit.clone(), SeccompPolicy::Enforce).unwrap();
        let client = UnixStream::connect(&path).unwrap();
        let mut reader = BufReader::new(client.try_clone().unwrap());
        let mut w = client.try_clone().unwrap();
        w.write_all(b"{\"cmd\":\"status\"}\nnot json\n").unwrap();
        // The VMM side answers the status request.
        let req = server.requests.recv().unwrap();
        assert_eq!(req.command, Command::Status);
        req.reply
            .send(Response {
                state: Some("running".into()),
                ..Response::ok()
            })
            .unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "{\"ok\":true,\"state\":\"running\"}\n");
        line.clear();
        reader.read_line(&mut line).unwrap();
        let r: Response = serde_json::from_str(&line).unwrap();
        assert!(!r.ok && r.error.unwrap().starts_with("bad request"));
        // wait answers once the VM is finished.
        w.write_all(b"{\"cmd\":\"wait\"}\n").unwrap();
        exit.notify(crate::exit::ExitReason::Signal(15));
        exit.mark_finished();
        line.clear();
        reader.read_line(&mut line).unwrap();
        let r: Response = serde_json::from_str(&line).unwrap();
        assert_eq!(
            (r.exit_code, r.reason.as_deref()),
            (Some(143), Some("signal"))
        );
        server.shutdown();
        assert!(!path.exists());
    }
}
