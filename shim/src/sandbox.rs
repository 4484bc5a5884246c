//! A pod's microVM, as the shim sees it: the state directory, the `moat-vmm` process, the
//! directory shared into the guest over virtio-fs, and the ttrpc connection to the agent.
//!
//! Layout of `<state_dir>/<namespace>/<sandbox-id>/`:
//!
//! | entry | what |
//! |---|---|
//! | `vmm.pid` | pid of moat-vmm (used by `delete` to clean up after a dead shim) |
//! | `vmm.log` | moat-vmm's own stdout/stderr |
//! | `console.log` | the guest's serial console |
//! | `vsock.sock` | moat-vmm's hybrid vsock socket (`CONNECT 1024` reaches the agent) |
//! | `api.sock` | moat-vmm's control socket |
//! | `network.json` | what [`crate::network`] created in the pod's netns (undone by [`cleanup_state`]) |
//! | `shared/` | shared into the guest as virtio-fs tag [`moat_protocol::SHARED_FS_TAG`]; holds each container's rootfs at `<container-id>/rootfs`; a small `nodev,nosuid` tmpfs (1 MiB), private towards the host, shared towards moat-vmm's jail ([`crate::mounts::make_share`]) |

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use moat_protocol::agent::{CreateSandboxRequest, DestroySandboxRequest, VersionRequest};
use moat_protocol::agent_ttrpc_async::AgentClient;
use moat_protocol::connect::{self, AgentAddress, ConnectError};
use moat_protocol::ttrpc::context;
use moat_protocol::{ensure_compatible, VersionMismatch, AGENT_VSOCK_PORT, SHARED_FS_TAG};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::cgroup::{self, CgroupError, PodCgroup};
use crate::config::Config;
use crate::mounts::{make_share, unmount_below};
use crate::network;
use crate::resources::PodGrowth;
use crate::sizing::{PodResources, Room, VmSize};

/// How long a well-behaved guest gets to power off before moat-vmm is killed.
const POWER_OFF_GRACE: Duration = Duration::from_secs(10);
/// Time limit of one agent call made while tearing down.
const TEARDOWN_CALL: Duration = Duration::from_secs(10);

/// Errors booting or talking to a pod's VM.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A file the configuration names does not exist.
    #[error("{what} {path} not found: set `{key}` in the moat config (see docs/shim.md)")]
    MissingFile {
        /// What the file is, for the reader.
        what: &'static str,
        /// The configuration key that names it.
        key: &'static str,
        /// The path looked at.
        path: PathBuf,
    },
    /// The pod's host cgroup could not be made or entered.
    #[error("sandbox {id}: {source} (set sandbox_cgroup = false in the moat config to run the VM outside the pod's cgroup)")]
    Cgroup {
        /// The pod.
        id: String,
        /// The error.
        #[source]
        source: CgroupError,
    },
    /// A file or process operation on the host failed.
    #[error("sandbox {id}: {what}: {source}")]
    Io {
        /// The pod.
        id: String,
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// moat-vmm ended before the agent answered.
    #[error("sandbox {id}: moat-vmm exited ({status}) before the agent answered; check {images}; its last output:\n{tail}")]
    VmmDied {
        /// The pod.
        id: String,
        /// How moat-vmm ended.
        status: String,
        /// The guest images it was given, named for the reader.
        images: String,
        /// The end of moat-vmm's log and the guest console.
        tail: String,
    },
    /// The agent did not answer within the boot timeout.
    #[error("sandbox {id}: the guest agent did not answer: {source}; the guest console ended with:\n{tail}")]
    AgentUnreachable {
        /// The pod.
        id: String,
        /// Why the connection failed.
        #[source]
        source: ConnectError,
        /// The end of the guest console.
        tail: String,
    },
    /// An agent call made while booting failed.
    #[error("sandbox {id}: agent call {call} failed: {source}")]
    Agent {
        /// The pod.
        id: String,
        /// The agent RPC.
        call: &'static str,
        /// The error.
        #[source]
        source: moat_protocol::ttrpc::Error,
    },
    /// The pod network could not be set up.
    #[error("sandbox {id}: {source}")]
    Network {
        /// The pod.
        id: String,
        /// The error.
        #[source]
        source: Box<crate::network::NetworkError>,
    },
    /// The shared directory could not be made a `nodev,nosuid` mount of its own.
    #[error("sandbox {id}: shared directory: {source}")]
    Share {
        /// The pod.
        id: String,
        /// The error.
        #[source]
        source: crate::mounts::MountError,
    },
    /// The guest's agent speaks another protocol version than this shim.
    #[error("sandbox {id}: {source}")]
    ProtocolMismatch {
        /// The pod.
        id: String,
        /// The versions.
        #[source]
        source: VersionMismatch,
    },
}

/// What is needed to boot a pod's VM.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// containerd's namespace (a level of the state directory).
    pub namespace: String,
    /// The pod id.
    pub id: String,
    /// The guest's hostname.
    pub hostname: String,
    /// The pod's network namespace ([`crate::network::netns_path`] of the spec); `None`: the VM
    /// gets no NIC.
    pub netns: Option<PathBuf>,
    /// vCPUs and memory ([`crate::sizing`]).
    pub size: VmSize,
    /// Room to grow into while running ([`crate::resources`]).
    pub room: Room,
    /// What the pod asked for at start.
    pub resources: PodResources,
    /// The sandbox's `linux.cgroupsPath`, where moat-vmm runs ([`crate::cgroup`]).
    pub cgroups_path: Option<String>,
}

/// A running pod VM with a connected agent.
pub struct Sandbox {
    /// The pod id.
    pub id: String,
    /// The pod's state directory (layout above).
    pub dir: PathBuf,
    /// The connection to the guest's agent.
    pub agent: AgentClient,
    vmm_pid: u32,
    /// `Some(status)` once moat-vmm has exited.
    vmm_exit: watch::Receiver<Option<String>>,
    /// The VM's size and its growth.
    pub growth: PodGrowth,
}

/// The state directory of a sandbox.
pub fn state_dir(config: &Config, namespace: &str, id: &str) -> PathBuf {
    config.state_dir.join(namespace).join(id)
}

fn require(path: &Path, what: &'static str, key: &'static str) -> Result<(), SandboxError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(SandboxError::MissingFile {
            what,
            key,
            path: path.to_owned(),
        })
    }
}

impl Sandbox {
    /// Boots the pod's VM and waits for its agent.
    pub async fn boot(config: &Config, spec: &SandboxSpec) -> Result<Arc<Self>, SandboxError> {
        require(&config.vmm, "moat-vmm binary", "vmm")?;
        require(&config.kernel, "guest kernel", "kernel")?;
        require(&config.initrd, "guest initramfs", "initrd")?;

        let id = spec.id.clone();
        let dir = state_dir(config, &spec.namespace, &id);
        let io = |what: &str| {
            let id = id.clone();
            let what = what.to_owned();
            move |source| SandboxError::Io { id, what, source }
        };
        if dir.exists() {
            warn!(
                "sandbox {id}: stale state in {}; cleaning it up",
                dir.display()
            );
            cleanup_state(&dir);
        }
        let shared = dir.join("shared");
        std::fs::create_dir_all(&shared).map_err(io(&format!("create {}", shared.display())))?;
        // A small tmpfs of its own: nodev,nosuid, out of the host's propagation, shared with the
        // VMM's jail only (see mounts::make_share). cleanup_state unmounts it.
        if let Err(source) = make_share(&shared) {
            cleanup_state(&dir);
            return Err(SandboxError::Share { id, source });
        }
        // Recorded in the state directory: cleanup_state undoes it.
        let net = match &spec.netns {
            Some(netns) => network::setup(netns, &dir).await.map_err(|source| {
                cleanup_state(&dir);
                SandboxError::Network {
                    id: id.clone(),
                    source: Box::new(source),
                }
            })?,
            None => network::PodNetwork::default(),
        };

        let log_path = dir.join("vmm.log");
        let console = dir.join("console.log");
        let vsock = dir.join("vsock.sock");
        let log = std::fs::File::create(&log_path).map_err(io("create vmm.log"))?;
        let log2 = log.try_clone().map_err(io("dup vmm.log"))?;

        let mut cmdline = String::from(if config.debug_console {
            "debug"
        } else {
            "quiet"
        });
        // The kernel hands unknown KEY=value words to init (the agent) as environment.
        cmdline.push_str(" MOAT_AGENT_LOG=");
        cmdline.push_str(&config.log_level);
        if spec.room.max_vcpus > spec.size.vcpus {
            // The other vCPUs exist but stay offline until the pod grows.
            cmdline.push_str(&format!(" maxcpus={}", spec.size.vcpus));
        }
        if !config.kernel_params.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&config.kernel_params);
        }
        let mut cmd = Command::new(&config.vmm);
        cmd.env("MOAT_VMM_LOG", &config.log_level);
        cmd.arg("--kernel")
            .arg(&config.kernel)
            .arg("--initrd")
            .arg(&config.initrd)
            .arg("--vcpus")
            .arg(spec.room.max_vcpus.max(spec.size.vcpus).to_string())
            .arg("--mem-mib")
            .arg(spec.size.memory_mib.to_string())
            .args(
                (spec.room.hotplug_mib > 0)
                    .then(|| {
                        [
                            "--mem-hotplug-mib".to_owned(),
                            spec.room.hotplug_mib.to_string(),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .arg("--cmdline")
            .arg(&cmdline)
            .arg("--serial")
            .arg(format!("file:{}", console.display()))
            .arg("--vsock-uds")
            .arg(&vsock)
            .arg("--fs")
            .arg(format!("{SHARED_FS_TAG}={}", shared.display()))
            .arg("--api-sock")
            .arg(dir.join("api.sock"))
            .args(net.vmm_args())
            .args((!config.vmm_user_namespace).then_some("--no-userns"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let cgroup = match spec
            .cgroups_path
            .as_deref()
            .filter(|_| config.sandbox_cgroup)
        {
            Some(path) => {
                let root = Path::new(cgroup::CGROUP_ROOT);
                match cgroup::resolve(root, path).and_then(|d| PodCgroup::create(root, d, &dir)) {
                    Ok(c) => Some(c),
                    Err(source) => {
                        cleanup_state(&dir);
                        return Err(SandboxError::Cgroup { id, source });
                    }
                }
            }
            None => None,
        };
        if let Some(cg) = &cgroup {
            let fd = cg.procs_fd();
            info!("sandbox {id}: moat-vmm runs in cgroup {}", cg.dir.display());
            // SAFETY: between fork and exec the closure only calls write(2), which is
            // async-signal-safe, on a descriptor opened before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        info!("sandbox {id}: starting {cmd:?}");
        let mut child = cmd.spawn().map_err(|e| {
            cleanup_state(&dir);
            io("start moat-vmm")(e)
        })?;
        let vmm_pid = child.id().unwrap_or(0);
        std::fs::write(dir.join("vmm.pid"), vmm_pid.to_string()).map_err(io("write vmm.pid"))?;

        let (exit_tx, vmm_exit) = watch::channel(None);
        let watcher_id = id.clone();
        tokio::spawn(async move {
            let status = child
                .wait()
                .await
                .map(|s: ExitStatus| s.to_string())
                .unwrap_or_else(|e| format!("unknown: {e}"));
            info!("sandbox {watcher_id}: moat-vmm exited: {status}");
            let _ = exit_tx.send(Some(status));
        });

        let address = AgentAddress::HybridVsock {
            uds: vsock,
            port: AGENT_VSOCK_PORT,
        };
        let timeout = Duration::from_secs(config.boot_timeout_secs);
        let agent = tokio::select! {
            res = connect::connect(&address, timeout) => match res {
                Ok(agent) => agent,
                Err(source) => {
                    let _ = kill(Pid::from_raw(vmm_pid as i32), Signal::SIGKILL);
                    wait_exit(vmm_exit.clone()).await;
                    let tail = tail_of(&console);
                    cleanup_state(&dir);
                    return Err(SandboxError::AgentUnreachable { id, source, tail });
                }
            },
            status = wait_exit(vmm_exit.clone()) => {
                let tail = format!("{}{}", tail_of(&log_path), tail_of(&console));
                cleanup_state(&dir);
                return Err(SandboxError::VmmDied {
                    id,
                    status,
                    images: format!(
                        "the kernel {} and the initramfs {}",
                        config.kernel.display(),
                        config.initrd.display()
                    ),
                    tail,
                });
            }
        };

        let growth = PodGrowth::new(
            config.clone(),
            &id,
            dir.join("api.sock"),
            spec.size,
            spec.room,
            spec.resources,
        );
        let sandbox = Arc::new(Self {
            id: id.clone(),
            dir,
            agent,
            vmm_pid,
            vmm_exit,
            growth,
        });
        let version = sandbox
            .agent
            .version(
                context::with_timeout(TEARDOWN_CALL.as_nanos() as i64),
                &VersionRequest::new(),
            )
            .await
            .map_err(|source| sandbox.agent_err("Version", source))?;
        if let Err(source) = ensure_compatible(&version) {
            sandbox.stop().await;
            return Err(SandboxError::ProtocolMismatch { id, source });
        }
        let req = CreateSandboxRequest {
            sandbox_id: id.clone(),
            hostname: spec.hostname.clone(),
            interfaces: net.interfaces,
            routes: net.routes,
            ..Default::default()
        };
        if let Err(source) = sandbox
            .agent
            .create_sandbox(context::Context::default(), &req)
            .await
        {
            let err = sandbox.agent_err("CreateSandbox", source);
            sandbox.stop().await;
            return Err(err);
        }
        info!(
            "sandbox {}: agent {} ready (moat-vmm pid {vmm_pid})",
            sandbox.id, version.agent_version
        );
        Ok(sandbox)
    }

    /// Wraps an agent call error.
    pub fn agent_err(
        &self,
        call: &'static str,
        source: moat_protocol::ttrpc::Error,
    ) -> SandboxError {
        SandboxError::Agent {
            id: self.id.clone(),
            call,
            source,
        }
    }

    /// The host directory shared into the guest.
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }

    /// moat-vmm's pid (the host process that holds the pod).
    pub fn vmm_pid(&self) -> u32 {
        self.vmm_pid
    }

    /// True once moat-vmm has exited.
    pub fn vmm_exited(&self) -> bool {
        self.vmm_exit.borrow().is_some()
    }

    /// Waits until moat-vmm has exited.
    pub async fn wait_vmm_exit(&self) {
        wait_exit(self.vmm_exit.clone()).await;
    }

    /// Stops the VM: asks the agent to power off, waits for moat-vmm to exit for a grace period,
    /// then kills it; removes the state directory (unmounting whatever is left in it).
    pub async fn stop(&self) {
        if !self.vmm_exited() {
            let req = DestroySandboxRequest {
                power_off: true,
                ..Default::default()
            };
            let ctx = context::with_timeout(TEARDOWN_CALL.as_nanos() as i64);
            if let Err(e) = self.agent.destroy_sandbox(ctx, &req).await {
                info!("sandbox {}: DestroySandbox: {e} (killing the VM)", self.id);
            }
            if tokio::time::timeout(POWER_OFF_GRACE, self.wait_vmm_exit())
                .await
                .is_err()
            {
                warn!(
                    "sandbox {}: guest did not power off; killing moat-vmm",
                    self.id
                );
                let _ = kill(Pid::from_raw(self.vmm_pid as i32), Signal::SIGKILL);
                self.wait_vmm_exit().await;
            }
        }
        cleanup_state(&self.dir);
    }
}

/// The last lines of a log file, for error messages (the file goes with the state directory).
fn tail_of(path: &Path) -> String {
    const LINES: usize = 25;
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for l in &lines[lines.len().saturating_sub(LINES)..] {
        out.push_str("  | ");
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Waits for moat-vmm's exit and returns how it ended.
async fn wait_exit(mut rx: watch::Receiver<Option<String>>) -> String {
    match rx.wait_for(Option::is_some).await {
        Ok(status) => status.clone().unwrap_or_default(),
        Err(_) => "unknown".to_owned(),
    }
}

/// Removes a sandbox state directory after killing a moat-vmm named by its `vmm.pid` (if it still
/// runs), undoing its pod network ([`network::teardown_recorded`]) and unmounting everything
/// below it. Used by normal teardown and by `delete` after a dead
/// shim. Errors are logged: cleanup goes as far as it can.
pub fn cleanup_state(dir: &Path) {
    if let Ok(pid) = std::fs::read_to_string(dir.join("vmm.pid")) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if pid > 0 && comm.trim() == "moat-vmm" {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    network::teardown_recorded(dir);
    cgroup::remove_recorded(Path::new(cgroup::CGROUP_ROOT), dir);
    if !unmount_below(dir) {
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!("cannot remove {}: {e}", dir.display());
        }
    }
}
