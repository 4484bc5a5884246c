//! A container's lifecycle: create (rootfs, cgroup, namespaces, the init process set up and
//! waiting), start, pause/resume, resource updates, stats, signals to all its processes, and
//! removal, which undoes everything create made. Processes exec'd into a running container
//! are in `exec`.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use moat_protocol::agent as pb;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Spec};
use tokio::sync::mpsc;

use crate::cgroup::{self, Cgroup, CgroupError, Manager};
use crate::error::{AgentError, Result};
use crate::ipc::{InitConfig, Kind, Ns, RootfsPlan};
use crate::process::{self, Process, WaitFor};
use crate::reaper::Reaper;
use crate::sandbox::Sandbox;
use crate::seccomp;
use crate::spec;
use crate::storage::{umount, Storage};
use crate::sync::LockExt;

/// Where a container is in its lifecycle (its init's exit is tracked by the process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Set up; the init process waits for Start.
    Created,
    /// Started.
    Running,
    /// Frozen (`cgroup.freeze`).
    Paused,
}

/// A container: its init process, exec'd processes and what was made for it.
pub struct Container {
    /// The container id.
    pub id: String,
    /// The init process.
    pub init: Arc<Process>,
    /// Exec'd processes by exec id.
    pub(crate) execs: Mutex<HashMap<String, Arc<Process>>>,
    pub(crate) state: Mutex<State>,
    /// The init's control socket until Start takes it.
    control: Mutex<Option<UnixStream>>,
    pub(crate) cgroup: Option<Cgroup>,
    rootfs_mount: Option<PathBuf>,
    own_pidns: bool,
    pub(crate) seccomp: Vec<seccomp::RawProgram>,
    oom_task: Option<tokio::task::JoinHandle<()>>,
}

/// Reports the container `id` on `tx` each time the kernel OOM-kills in its cgroup.
fn watch_oom(
    cg: Cgroup,
    id: String,
    tx: mpsc::UnboundedSender<String>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(w) = cgroup::watch_file(&cg.memory_events()) else {
            return;
        };
        let mut last = cg.oom_kills();
        loop {
            w.changed().await;
            let n = cg.oom_kills();
            if n > last {
                tracing::info!("container {id:?}: OOM kill (count {n})");
                if tx.send(id.clone()).is_err() {
                    return;
                }
            }
            last = n;
        }
    })
}

impl Container {
    /// Creates container `req.container_id` from its validated `spec` in sandbox `sb`: rootfs,
    /// cgroup, and an init process set up and waiting for [`Container::start`]. The container
    /// joins the PID namespace of `pid_ns_of` (a running container of the sandbox, from
    /// `share_pid_namespace_with`) if given, else the sandbox's shared one, else gets its own.
    /// On failure everything made so far is removed again. OOM kills are reported on `oom_tx`.
    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        req: &pb::CreateContainerRequest,
        spec: &Spec,
        sb: &Sandbox,
        pid_ns_of: Option<&Container>,
        storage: &Storage,
        cgroups: Option<&Manager>,
        reaper: &Reaper,
        oom_tx: &mpsc::UnboundedSender<String>,
    ) -> Result<Arc<Self>> {
        let id = req.container_id.clone();
        let linux = spec.linux().clone().unwrap_or_default();
        let seccomp = match linux.seccomp() {
            Some(p) => seccomp::compile(p)?,
            None => Vec::new(),
        };
        let process = spec
            .process()
            .clone()
            .ok_or_else(|| AgentError::InvalidArgument("process missing".into()))?;
        let holder = sb.holder_pid().ok_or_else(|| {
            AgentError::FailedPrecondition("sandbox has no namespace holder".into())
        })?;
        let rootfs = storage.rootfs(&id, spec, req.rootfs.as_ref())?;
        let cleanup_mount = |m: &Option<PathBuf>| {
            if let Some(m) = m {
                umount(m);
            }
        };
        let cg = match cgroups {
            Some(m) => match m.create(&sb.id, &id, linux.resources().as_ref()) {
                Ok(c) => Some(c),
                Err(e) => {
                    cleanup_mount(&rootfs.mount);
                    return Err(e.into());
                }
            },
            None => {
                if linux.resources().is_some() {
                    tracing::warn!("container {id:?}: resources ignored, no cgroup v2");
                }
                None
            }
        };
        let mut new_ns = vec![Ns::Mount];
        let mut join = vec![
            (Ns::Uts, PathBuf::from(format!("/proc/{holder}/ns/uts"))),
            (Ns::Ipc, PathBuf::from(format!("/proc/{holder}/ns/ipc"))),
            (Ns::Net, PathBuf::from(format!("/proc/{holder}/ns/net"))),
        ];
        let own_pidns = match pid_ns_of {
            _ if sb.shared_pidns => {
                join.push((Ns::Pid, PathBuf::from(format!("/proc/{holder}/ns/pid"))));
                false
            }
            Some(other) => {
                tracing::info!(
                    "container {id:?} joins the PID namespace of container {:?}",
                    other.id
                );
                join.push((
                    Ns::Pid,
                    PathBuf::from(format!("/proc/{}/ns/pid", other.init.pid)),
                ));
                false
            }
            None => {
                new_ns.push(Ns::Pid);
                true
            }
        };
        for ns in linux.namespaces().iter().flatten() {
            if ns.path().is_some() {
                tracing::info!("container {id:?}: namespace path {:?} ignored; the sandbox's namespaces are used", ns.path());
            }
            if ns.typ() == LinuxNamespaceType::Cgroup && cg.is_some() {
                new_ns.push(Ns::Cgroup);
            }
        }
        let plan = RootfsPlan {
            path: rootfs.path,
            readonly: spec
                .root()
                .as_ref()
                .is_some_and(|r| r.readonly().unwrap_or(false))
                || req.rootfs.as_ref().is_some_and(|r| r.readonly),
            mounts: spec.mounts().clone().unwrap_or_default(),
            devices: linux.devices().clone().unwrap_or_default(),
            masked_paths: linux.masked_paths().clone().unwrap_or_default(),
            readonly_paths: linux.readonly_paths().clone().unwrap_or_default(),
        };
        let cfg = InitConfig {
            kind: Kind::Container,
            cgroup_procs: cg.as_ref().map(|c| c.procs_file()),
            join_namespaces: join,
            new_namespaces: new_ns,
            enter_root: None,
            rootfs: Some(plan),
            hostname: None,
            domainname: None,
            sysctl: linux
                .sysctl()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            process: Some(process.clone()),
            seccomp: seccomp.clone(),
        };
        let terminal = process.terminal().unwrap_or(false);
        let (init, sock) = match process::spawn(reaper, cfg, terminal, WaitFor::Ready).await {
            Ok(v) => v,
            Err(e) => {
                if let Some(c) = &cg {
                    let _ = c.kill_all();
                    let _ = c.remove().await;
                }
                cleanup_mount(&rootfs.mount);
                return Err(e);
            }
        };
        let has_memory = cgroups.is_some_and(|m| m.controllers().iter().any(|c| c == "memory"));
        let oom_task = cg
            .as_ref()
            .filter(|_| has_memory)
            .map(|c| watch_oom(c.clone(), id.clone(), oom_tx.clone()));
        tracing::info!("container {id:?} created (pid {})", init.pid);
        Ok(Arc::new(Container {
            id,
            init,
            execs: Mutex::new(HashMap::new()),
            state: Mutex::new(State::Created),
            control: Mutex::new(sock),
            cgroup: cg,
            rootfs_mount: rootfs.mount,
            own_pidns,
            seccomp,
            oom_task,
        }))
    }

    /// Lets the created container's init `execve` its process; its errors (such as
    /// "executable not found") come back here.
    pub async fn start(&self) -> Result<()> {
        let sock = self.control.lock_or_recover().take();
        let Some(sock) = sock else {
            return Err(AgentError::FailedPrecondition(format!(
                "container {:?} was already started",
                self.id
            )));
        };
        tokio::task::spawn_blocking(move || process::release(sock))
            .await
            .map_err(|source| AgentError::Task {
                what: "start task",
                source,
            })??;
        *self.state.lock_or_recover() = State::Running;
        tracing::info!("container {:?} started", self.id);
        Ok(())
    }

    /// Stops what still runs (refused for a started, running container without `force`) and
    /// removes the cgroup and the rootfs mount. The caller forgets the container afterwards.
    pub async fn remove(&self, force: bool) -> Result<()> {
        let started = self.control.lock_or_recover().is_none();
        if self.init.exited().is_none() {
            if started && !force {
                return Err(AgentError::FailedPrecondition(format!(
                    "container {:?} is running; stop it or remove with force",
                    self.id
                )));
            }
            if *self.state.lock_or_recover() == State::Paused {
                if let Some(cg) = &self.cgroup {
                    let _ = cg.freeze(false).await;
                }
            }
            self.kill_all(Signal::SIGKILL);
            let _ = kill(Pid::from_raw(self.init.pid), Signal::SIGKILL);
            self.init.wait().await;
        }
        // Processes left in a shared PID namespace.
        self.kill_all(Signal::SIGKILL);
        self.control.lock_or_recover().take();
        if let Some(t) = &self.oom_task {
            t.abort();
        }
        if let Some(cg) = &self.cgroup {
            cg.remove().await?;
        }
        if let Some(m) = &self.rootfs_mount {
            umount(m);
        }
        tracing::info!("container {:?} removed", self.id);
        Ok(())
    }

    /// The init process (`exec_id` empty) or an exec'd one.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock_or_recover()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                AgentError::NotFound(format!("exec {exec_id:?} of container {:?}", self.id))
            })
    }

    /// Every PID of the container (from its cgroup, else its PID namespace, else the
    /// processes the agent started).
    pub fn pids(&self) -> Vec<i32> {
        if let Some(cg) = &self.cgroup {
            if let Ok(p) = cg.pids() {
                return p;
            }
        }
        let mut out = Vec::new();
        if self.init.exited().is_some() {
            return out;
        }
        if self.own_pidns {
            if let Ok(ns) = std::fs::read_link(format!("/proc/{}/ns/pid", self.init.pid)) {
                for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                    let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok())
                    else {
                        continue;
                    };
                    if std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                        .ok()
                        .as_ref()
                        == Some(&ns)
                    {
                        out.push(pid);
                    }
                }
                return out;
            }
        }
        out.push(self.init.pid);
        for p in self.execs.lock_or_recover().values() {
            if p.exited().is_none() {
                out.push(p.pid);
            }
        }
        out
    }

    /// Sends `sig` to the container's init process. When that is the init of the container's
    /// own PID namespace, a signal the kernel would discard (default disposition) is held until
    /// the process can take it ([`Process::signal_pidns_init`]).
    pub fn signal_init(&self, sig: Signal) -> Result<()> {
        if self.own_pidns {
            self.init.signal_pidns_init(sig)
        } else {
            self.init.signal(sig)
        }
    }

    /// Sends `sig` to every process of the container (SIGKILL through `cgroup.kill` when it
    /// can; the init as [`Container::signal_init`] does).
    pub fn kill_all(&self, sig: Signal) {
        if sig == Signal::SIGKILL {
            if let Some(cg) = &self.cgroup {
                if cg.kill_all().is_ok() {
                    return;
                }
            }
        }
        for pid in self.pids() {
            if pid == self.init.pid {
                let _ = self.signal_init(sig);
            } else {
                let _ = kill(Pid::from_raw(pid), sig);
            }
        }
    }

    /// Whether the init process is still running (not reaped).
    pub fn is_alive(&self) -> bool {
        self.init.exited().is_none()
    }

    /// Freezes (`pause`) a running container or thaws a paused one.
    pub async fn pause(&self, pause: bool) -> Result<()> {
        let cg = self
            .cgroup
            .as_ref()
            .ok_or(CgroupError::Disabled("pause/resume"))?;
        let want = if pause { State::Running } else { State::Paused };
        if *self.state.lock_or_recover() != want || self.init.exited().is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {:?} is not {}",
                self.id,
                if pause { "running" } else { "paused" }
            )));
        }
        cg.freeze(pause).await?;
        *self.state.lock_or_recover() = if pause { State::Paused } else { State::Running };
        Ok(())
    }

    /// The container's cgroup statistics.
    pub fn stats(&self) -> Result<pb::StatsContainerResponse> {
        let cg = self.cgroup.as_ref().ok_or(CgroupError::Disabled("stats"))?;
        Ok(cg.stats())
    }

    /// Applies validated new resources to the container's cgroup.
    pub fn update(&self, resources: &LinuxResources) -> Result<()> {
        let cg = self
            .cgroup
            .as_ref()
            .ok_or(CgroupError::Disabled("update"))?;
        cg.apply(resources)?;
        Ok(())
    }
}

/// Parses and validates `UpdateContainer`'s resources JSON.
pub fn parse_resources(resources: &[u8]) -> Result<LinuxResources> {
    let r: LinuxResources = serde_json::from_slice(resources).map_err(AgentError::ResourcesJson)?;
    spec::validate_resources("resources", &r)?;
    Ok(r)
}
