//! The shim process's lifecycle, as containerd drives it (`containerd_shim::asynchronous::Shim`):
//! `start` spawns (or reuses, for a pod) the long-running shim server and prints its address;
//! `delete` cleans up after a shim that died; the server runs the Task service until `Shutdown`.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{ExitSignal, Shim};
use containerd_shim::util::{timestamp, write_str_to_file};
use containerd_shim::{
    socket_address, Config as ShimConfig, DeleteResponse, Error, Flags, StartOpts,
};
use containerd_shim_protos::protobuf::MessageField;
use serde_json::Value;
use tracing::{info, warn};

use crate::config::Config;
use crate::pod;
use crate::rootfs;
use crate::sandbox;
use crate::task::TaskService;

/// Exit status reported for a task whose shim died (as runc's shim does: killed).
const DEAD_SHIM_STATUS: u32 = 128 + 9;
/// How long the library's graceful server shutdown may take once the shim is done.
const GRACEFUL_EXIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The shim process containerd runs (`start`, `delete`, and the long-running server).
pub struct Service {
    namespace: String,
    id: String,
    /// The shim's own ttrpc socket (`unix:///run/containerd/s/…`), removed on exit.
    socket: String,
    /// containerd's address: with the namespace and pod id it names the shim socket.
    address: String,
    exit: Arc<ExitSignal>,
}

/// The pod a container belongs to: the CRI sandbox id, or the container itself.
fn sandbox_id_of(bundle: &Path, container_id: &str) -> String {
    std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .map(|spec| pod::sandbox_id(&spec, container_id))
        .unwrap_or_else(|| container_id.to_owned())
}

/// Sends the shim server's log lines to containerd: the FIFO `log` in the bundle directory (the
/// server's working directory), which containerd copies into its own log. The level is the
/// configured `log_level`; when the configuration cannot be read, `info` (the error itself is
/// reported when the first container is created).
fn init_logging() {
    let level = Config::load(None)
        .ok()
        .and_then(|c| moat_logging::parse_level(&c.log_level))
        .unwrap_or(moat_logging::LevelFilter::INFO);
    let output = match std::fs::OpenOptions::new().write(true).open("log") {
        Ok(fifo) => moat_logging::Output::File(fifo),
        // Run by hand, outside containerd: there is no FIFO.
        Err(_) => moat_logging::Output::Stderr,
    };
    let _ = moat_logging::init("containerd-shim-moat-v2", level, output);
}

/// Removes the shim socket at `address` (`unix:///run/containerd/s/…`) if it is there.
fn remove_socket(address: &str) {
    let path = address.trim_start_matches("unix://");
    if path.is_empty() {
        return;
    }
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!("remove shim socket {path}: {e}");
        }
    }
}

#[async_trait]
impl Shim for Service {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, config: &mut ShimConfig) -> Self {
        // moat-vmm is our child and is waited for by tokio; the library must not reap it.
        config.no_reaper = true;
        // Logging is moat's tracing subscriber, set up in `create_task_service`.
        config.no_setup_logger = true;
        Service {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            socket: args.socket.clone(),
            address: args.address.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // containerd runs `start` in the bundle directory.
        let grouping = sandbox_id_of(Path::new("."), &opts.id);
        let address = spawn(&opts, &grouping).await?;
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        // The shim of this task is gone: remove what it left behind.
        let sandbox_id = sandbox_id_of(Path::new("."), &self.id);
        let config = Config::load(None).unwrap_or_default();
        let dir = sandbox::state_dir(&config, &self.namespace, &sandbox_id);
        if sandbox_id == self.id {
            info!("delete: cleaning up pod VM state {}", dir.display());
            sandbox::cleanup_state(&dir);
            // A shim that was killed could not remove its socket; nobody serves it any more.
            let socket = socket_address(&self.address, &self.namespace, &sandbox_id);
            remove_socket(&socket);
        } else {
            rootfs::remove_container_files(&dir.join("shared"), &self.id);
        }
        Ok(DeleteResponse {
            pid: 0,
            exit_status: DEAD_SHIM_STATUS,
            exited_at: MessageField::some(timestamp()?),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        // The library only removes the socket named in the bundle's `address` file, which
        // containerd has deleted by now: remove it here (open connections stay usable).
        remove_socket(&self.socket);
        // The library now shuts its ttrpc server down gracefully, which waits for every
        // connection to end; a peer that went away mid-call can hold that forever. Everything the
        // shim owns is torn down by now, so the graceful part gets a deadline.
        std::thread::spawn(|| {
            std::thread::sleep(GRACEFUL_EXIT_LIMIT);
            std::process::exit(0);
        });
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        init_logging();
        TaskService::new(&self.namespace, publisher, self.exit.clone())
    }
}

/// Starts the long-running shim server for `grouping` (the pod) and returns its address: what
/// `containerd_shim::asynchronous::spawn` does, less its reading of `start`'s standard input as
/// runc's options. containerd hands `start` the runtime's options there; from containerd 2.x on
/// they arrive for every runtime, and moat's (`ConfigPath`, read at Create) are not runc's, so
/// the library's parse failed every pod with a protobuf error. moat takes no shim cgroup from
/// them; the server gets the OOM score the library would give it.
async fn spawn(opts: &StartOpts, grouping: &str) -> Result<String, Error> {
    let io = |context: &'static str| {
        move |err: std::io::Error| Error::IoError {
            context: context.to_owned(),
            err,
        }
    };
    let exe = std::env::current_exe().map_err(io("finding the shim binary"))?;
    let cwd = std::env::current_dir().map_err(io("reading the bundle directory"))?;
    let address = socket_address(&opts.address, &opts.namespace, grouping);
    let mut command = tokio::process::Command::new(exe);
    command
        .current_dir(cwd)
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .args([
            "-namespace",
            &opts.namespace,
            "-id",
            &opts.id,
            "-address",
            &opts.address,
            "-socket",
            &address,
        ]);
    if opts.debug {
        command.arg("-debug");
    }
    let mut child = command.spawn().map_err(io("starting the shim server"))?;
    if let Some(pid) = child.id() {
        containerd_shim::cgroup::adjust_oom_score(pid)?;
    }
    // The server closes its standard output once it serves (or, for a pod whose server runs
    // already, once it has pointed `address` at that one).
    if let Some(mut out) = child.stdout.take() {
        tokio::io::copy(&mut out, &mut tokio::io::stderr())
            .await
            .map_err(io("waiting for the shim server to serve"))?;
    }
    Ok(address)
}
