//! The agent's state and the operations the RPCs call: at most one sandbox, its containers
//! by id, the storage layout, the cgroup manager and the OOM event channel. This module
//! looks things up and serializes sandbox changes and container creation; the work itself is
//! in `sandbox`, `container`, `exec` and `storage`. Every operation validates its input
//! before creating anything, and what it made is removed again on failure.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};

use moat_protocol::agent as pb;
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, Mutex};

use crate::cgroup;
use crate::container::{self, Container};
use crate::error::{AgentError, Result};
use crate::process::Process;
use crate::reaper::{Exit, Reaper};
use crate::sandbox::{self, Sandbox};
use crate::spec;
use crate::storage::Storage;
use crate::sync::LockExt;
use crate::validate::check_name;

/// The agent's whole state.
pub struct Agent {
    reaper: Reaper,
    is_init: bool,
    storage: Storage,
    cgroups: Option<cgroup::Manager>,
    /// Serializes sandbox-level changes and container creation.
    sandbox: Mutex<Option<Sandbox>>,
    containers: StdMutex<HashMap<String, Arc<Container>>>,
    oom_tx: mpsc::UnboundedSender<String>,
    oom_rx: Mutex<mpsc::UnboundedReceiver<String>>,
}

impl Agent {
    /// Creates the agent state; `state_dir` holds mounts and sandbox files
    /// ([`moat_protocol::GUEST_STATE_DIR`] in the guest).
    pub fn new(reaper: Reaper, is_init: bool, state_dir: PathBuf) -> Self {
        let cgroups = match cgroup::find_cgroup2_root() {
            None => {
                tracing::warn!("no cgroup2 hierarchy mounted: containers run without cgroups (no limits, stats, pause)");
                None
            }
            Some(root) => match cgroup::Manager::new(&root) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(
                        "cgroup v2 at {} unusable ({e}): containers run without cgroups",
                        root.display()
                    );
                    None
                }
            },
        };
        Self::with_cgroups(reaper, is_init, state_dir, cgroups)
    }

    /// Agent state that never touches cgroups (for the fuzz harness, which
    /// only exercises request validation and must leave the host alone).
    pub fn without_cgroups(reaper: Reaper, state_dir: PathBuf) -> Self {
        Self::with_cgroups(reaper, false, state_dir, None)
    }

    fn with_cgroups(
        reaper: Reaper,
        is_init: bool,
        state_dir: PathBuf,
        cgroups: Option<cgroup::Manager>,
    ) -> Self {
        let (oom_tx, oom_rx) = mpsc::unbounded_channel();
        Self {
            reaper,
            is_init,
            storage: Storage::new(state_dir),
            cgroups,
            sandbox: Mutex::new(None),
            containers: StdMutex::new(HashMap::new()),
            oom_tx,
            oom_rx: Mutex::new(oom_rx),
        }
    }

    /// Whether the agent is PID 1.
    pub fn is_init(&self) -> bool {
        self.is_init
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .lock_or_recover()
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("container {id:?}")))
    }

    /// Guest facts: versions, kernel, CPUs, memory, cgroup controllers, features.
    pub fn guest_details(&self) -> pb::GuestDetailsResponse {
        let mut r = pb::GuestDetailsResponse::new();
        r.agent_version = env!("CARGO_PKG_VERSION").into();
        r.protocol_version = moat_protocol::PROTOCOL_VERSION;
        r.kernel_release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        r.online_cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        r.mem_total_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .unwrap_or(0)
            * 1024;
        r.cgroup_controllers = self
            .cgroups
            .as_ref()
            .map(|m| m.controllers())
            .unwrap_or_default();
        r.is_init = self.is_init;
        r.features = [
            "tty",
            "stdin",
            "exec",
            "seccomp",
            "pause",
            "stats",
            "oom-events",
            "online-resources",
            "update",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        r
    }

    // ------------------------------------------------------------ sandbox

    /// Creates the sandbox (after configuring the guest's network from the request).
    pub async fn create_sandbox(&self, req: pb::CreateSandboxRequest) -> Result<()> {
        let net = sandbox::validate(&req)?;
        let mut guard = self.sandbox.lock().await;
        if let Some(sb) = guard.as_ref() {
            return Err(AgentError::AlreadyExists(format!("sandbox {:?}", sb.id)));
        }
        net.apply().await?;
        let sb = Sandbox::create(&req, &self.storage, self.cgroups.as_ref(), &self.reaper).await?;
        *guard = Some(sb);
        Ok(())
    }

    /// Destroys the sandbox and every container in it.
    pub async fn destroy_sandbox(&self) -> Result<()> {
        let mut guard = self.sandbox.lock().await;
        let ids: Vec<String> = self.containers.lock_or_recover().keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.remove_container(&id, true).await {
                tracing::warn!("removing container {id:?}: {e}");
            }
        }
        let sb = guard
            .take()
            .ok_or_else(|| AgentError::NotFound("sandbox".into()))?;
        sb.teardown(self.cgroups.as_ref()).await;
        self.storage.unmount_shares();
        tracing::info!("sandbox {:?} destroyed", sb.id);
        Ok(())
    }

    /// Removes everything (agent shutdown).
    pub async fn shutdown(&self) {
        if self.sandbox.lock().await.is_some() {
            if let Err(e) = self.destroy_sandbox().await {
                tracing::warn!("shutdown: {e}");
            }
        }
    }

    // ------------------------------------------------------------ containers

    /// Creates a container (its init process waits for Start).
    pub async fn create_container(&self, req: pb::CreateContainerRequest) -> Result<()> {
        check_name("container id", &req.container_id)?;
        let spec = spec::parse_spec(&req.oci_spec)?;
        let guard = self.sandbox.lock().await;
        let sb = guard.as_ref().ok_or_else(|| {
            AgentError::FailedPrecondition("no sandbox: call CreateSandbox first".into())
        })?;
        if self
            .containers
            .lock_or_recover()
            .contains_key(&req.container_id)
        {
            return Err(AgentError::AlreadyExists(format!(
                "container {:?}",
                req.container_id
            )));
        }
        let pid_ns_of = self.pid_namespace_owner(&req)?;
        let c = Container::create(
            &req,
            &spec,
            sb,
            pid_ns_of.as_deref(),
            &self.storage,
            self.cgroups.as_ref(),
            &self.reaper,
            &self.oom_tx,
        )
        .await?;
        self.containers.lock_or_recover().insert(c.id.clone(), c);
        Ok(())
    }

    /// The container whose PID namespace `req` asks to join (`share_pid_namespace_with`): it
    /// must exist and its init must still run (the namespace dies with it).
    fn pid_namespace_owner(
        &self,
        req: &pb::CreateContainerRequest,
    ) -> Result<Option<Arc<Container>>> {
        let name = &req.share_pid_namespace_with;
        if name.is_empty() {
            return Ok(None);
        }
        check_name("share_pid_namespace_with", name)?;
        let other = self.container(name).map_err(|_| {
            AgentError::NotFound(format!(
                "container {name:?} (whose PID namespace {:?} is to share)",
                req.container_id
            ))
        })?;
        if !other.is_alive() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {name:?} has exited: its PID namespace, which {:?} is to share, is gone",
                req.container_id
            )));
        }
        Ok(Some(other))
    }

    /// Lets a created container run its process.
    pub async fn start_container(&self, id: &str) -> Result<()> {
        self.container(id)?.start().await
    }

    /// Removes a container; `force` kills what still runs.
    pub async fn remove_container(&self, id: &str, force: bool) -> Result<()> {
        self.container(id)?.remove(force).await?;
        self.containers.lock_or_recover().remove(id);
        Ok(())
    }

    /// Runs a new process in a running container.
    pub async fn exec_process(&self, req: pb::ExecProcessRequest) -> Result<()> {
        check_name("exec id", &req.exec_id)?;
        let process = spec::parse_process(&req.process)?;
        let c = self.container(&req.container_id)?;
        c.exec(&self.reaper, &req.exec_id, process).await
    }

    /// Sends a signal to one process, or to every process of the container (`all`).
    pub fn signal(&self, r: &pb::ProcessRef, signal: u32, all: bool) -> Result<()> {
        let sig = Signal::try_from(signal as i32)
            .map_err(|_| AgentError::InvalidArgument(format!("signal {signal}")))?;
        let c = self.container(&r.container_id)?;
        if all {
            c.kill_all(sig);
            return Ok(());
        }
        if r.exec_id.is_empty() {
            return c.signal_init(sig);
        }
        c.process(&r.exec_id)?.signal(sig)
    }

    /// Waits for a process's exit.
    pub async fn wait(&self, r: &pb::ProcessRef) -> Result<Exit> {
        let p = self.process(r)?;
        Ok(p.wait().await)
    }

    /// Looks a process up.
    pub fn process(&self, r: &pb::ProcessRef) -> Result<Arc<Process>> {
        self.container(&r.container_id)?.process(&r.exec_id)
    }

    /// Freezes (`pause`) or thaws a container.
    pub async fn pause(&self, id: &str, pause: bool) -> Result<()> {
        self.container(id)?.pause(pause).await
    }

    /// Container statistics.
    pub fn stats(&self, id: &str) -> Result<pb::StatsContainerResponse> {
        self.container(id)?.stats()
    }

    /// Applies new resources (OCI `LinuxResources` JSON).
    pub fn update(&self, id: &str, resources: &[u8]) -> Result<()> {
        let r = container::parse_resources(resources)?;
        self.container(id)?.update(&r)
    }

    /// PIDs of a container.
    pub fn list_processes(&self, id: &str) -> Result<Vec<i32>> {
        Ok(self.container(id)?.pids())
    }

    /// Waits for the next OOM kill in any container.
    pub async fn next_oom(&self) -> Result<String> {
        let mut rx = self.oom_rx.lock().await;
        rx.recv()
            .await
            .ok_or_else(|| AgentError::FailedPrecondition("agent shutting down".into()))
    }

    /// PID of a process in the sandbox's network namespace (its namespace holder), if a
    /// sandbox exists: port-forward lists and connects there.
    pub async fn sandbox_netns_pid(&self) -> Option<i32> {
        self.sandbox
            .lock()
            .await
            .as_ref()
            .and_then(Sandbox::holder_pid)
    }

    /// Forwards a signal the agent received (as PID 1) to every container's init.
    pub fn forward_signal(&self, sig: Signal) {
        for c in self.containers.lock_or_recover().values() {
            if c.is_alive() {
                let _ = c.signal_init(sig);
            }
        }
    }
}
