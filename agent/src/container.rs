//! The agent's state and operations: one sandbox (its namespace holder,
//! shared mounts, DNS file and cgroup) and its containers with their
//! processes, streams and exit statuses. Every operation validates its
//! input before creating anything and rolls back what it made on failure.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Process as OciProcess, Spec};
use tokio::sync::{mpsc, watch, Mutex};

use moat_protocol::agent as pb;

use crate::cgroup::{self, Cgroup, CgroupError};
use crate::ipc::{InitConfig, Kind, Ns, RootfsPlan, START_BYTE};
use crate::reaper::{Exit, Reaper};
use crate::seccomp::{self, SeccompError};
use crate::spawn::{spawn_helper, SpawnError};
use crate::spec::{self, SpecError};
use crate::stdio::{self, ProcessIo, StdioError};

/// Errors of agent operations; the server maps them onto ttrpc codes.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Nothing by that name.
    #[error("{0} not found")]
    NotFound(String),
    /// The name is taken.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request itself is wrong.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// The request does not fit the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Bad OCI input.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Seccomp profile problem.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// Cgroup problem.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Stream problem.
    #[error(transparent)]
    Stdio(#[from] StdioError),
    /// Container setup failed.
    #[error("container setup: {0}")]
    Spawn(#[from] SpawnError),
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, AgentError>;

fn check_name(kind: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && s != "."
        && s != "..";
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "{kind} {s:?} must be 1-128 characters of [A-Za-z0-9_.-]"
        )))
    }
}

fn check_rel(field: &str, p: &str) -> Result<()> {
    let path = Path::new(p);
    if path.is_absolute()
        || path.components().any(|c| matches!(c, Component::ParentDir))
        || p.contains('\0')
    {
        return Err(AgentError::InvalidArgument(format!(
            "{field} {p:?} must be relative without \"..\""
        )));
    }
    Ok(())
}

/// One process (a container's init or an exec).
pub struct Process {
    /// PID in the agent's namespace.
    pub pid: i32,
    /// The agent's ends of the streams.
    pub io: ProcessIo,
    exit: watch::Receiver<Option<Exit>>,
}

impl Process {
    fn new(reaper: &Reaper, pid: i32, io: ProcessIo) -> Arc<Self> {
        let (tx, rx) = watch::channel(None);
        let exit = reaper.watch(pid);
        tokio::spawn(async move {
            if let Ok(e) = exit.await {
                let _ = tx.send(Some(e));
            }
        });
        Arc::new(Self { pid, io, exit: rx })
    }

    /// The exit, if it happened.
    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Waits for the exit.
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit.clone();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                // The reaper task is gone; report a generic failure.
                return Exit {
                    status: 255,
                    at_ns: 0,
                };
            }
        }
    }

    fn signal(&self, sig: Signal) -> Result<()> {
        if self.exited().is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "process {} has exited",
                self.pid
            )));
        }
        kill(Pid::from_raw(self.pid), sig).map_err(|source| AgentError::Sys {
            what: format!("kill({}, {sig})", self.pid),
            source,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created,
    Running,
    Paused,
}

/// A container.
pub struct Container {
    id: String,
    init: Arc<Process>,
    execs: StdMutex<HashMap<String, Arc<Process>>>,
    state: StdMutex<State>,
    control: StdMutex<Option<UnixStream>>,
    cgroup: Option<Cgroup>,
    rootfs_mount: Option<PathBuf>,
    own_pidns: bool,
    seccomp: Vec<seccomp::RawProgram>,
    oom_task: Option<tokio::task::JoinHandle<()>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                AgentError::NotFound(format!("exec {exec_id:?} of container {:?}", self.id))
            })
    }

    /// Every PID of the container.
    fn pids(&self) -> Vec<i32> {
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
        for p in self
            .execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            if p.exited().is_none() {
                out.push(p.pid);
            }
        }
        out
    }

    fn kill_all(&self, sig: Signal) {
        if sig == Signal::SIGKILL {
            if let Some(cg) = &self.cgroup {
                if cg.kill_all().is_ok() {
                    return;
                }
            }
        }
        for pid in self.pids() {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }
}

struct Sandbox {
    id: String,
    holder: Option<Arc<Process>>,
    shared_pidns: bool,
    dir: PathBuf,
    mounts: Vec<PathBuf>,
}

/// Where rootfs sources and shared mounts live inside the agent.
struct Layout {
    state_dir: PathBuf,
}

impl Layout {
    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("sandbox").join(id)
    }
}

/// The agent's whole state.
pub struct Agent {
    reaper: Reaper,
    is_init: bool,
    layout: Layout,
    cgroups: Option<cgroup::Manager>,
    /// Serializes sandbox-level changes and container creation.
    sandbox: Mutex<Option<Sandbox>>,
    containers: StdMutex<HashMap<String, Arc<Container>>>,
    oom_tx: mpsc::UnboundedSender<String>,
    oom_rx: Mutex<mpsc::UnboundedReceiver<String>>,
    virtiofs: StdMutex<HashMap<String, PathBuf>>,
}

fn umount(p: &Path) {
    if let Err(e) = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH) {
        tracing::warn!("unmounting {}: {e}", p.display());
    }
    let _ = std::fs::remove_dir(p);
}

impl Agent {
    /// Creates the agent state; `state_dir` holds mounts and sandbox files.
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
            layout: Layout { state_dir },
            cgroups,
            sandbox: Mutex::new(None),
            containers: StdMutex::new(HashMap::new()),
            oom_tx,
            oom_rx: Mutex::new(oom_rx),
            virtiofs: StdMutex::new(HashMap::new()),
        }
    }

    /// Whether the agent is PID 1.
    pub fn is_init(&self) -> bool {
        self.is_init
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("container {id:?}")))
    }

    /// Guest facts.
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
            "update",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        r
    }

    // ------------------------------------------------------------ sandbox

    /// Creates the sandbox.
    pub async fn create_sandbox(&self, req: pb::CreateSandboxRequest) -> Result<()> {
        check_name("sandbox id", &req.sandbox_id)?;
        if req.hostname.len() > 64 || req.hostname.contains(['/', '\0']) {
            return Err(AgentError::InvalidArgument(format!(
                "hostname {:?}",
                req.hostname
            )));
        }
        for m in &req.shared_mounts {
            check_name("shared mount name", &m.name)?;
        }
        for s in req
            .dns_servers
            .iter()
            .chain(&req.dns_searches)
            .chain(&req.dns_options)
        {
            if s.contains(['\n', '\0']) {
                return Err(AgentError::InvalidArgument(format!("DNS entry {s:?}")));
            }
        }
        let net = crate::netconf::NetConfig::from_request(&req.interfaces, &req.routes)?;
        if req.new_network_namespace && !net.is_empty() {
            return Err(AgentError::InvalidArgument(
                "interfaces/routes need new_network_namespace = false: a new namespace has only lo"
                    .into(),
            ));
        }
        let mut guard = self.sandbox.lock().await;
        if let Some(sb) = guard.as_ref() {
            return Err(AgentError::AlreadyExists(format!("sandbox {:?}", sb.id)));
        }
        net.apply().await?;
        let dir = self.layout.sandbox_dir(&req.sandbox_id);
        std::fs::create_dir_all(&dir).map_err(|source| AgentError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let mut sb = Sandbox {
            id: req.sandbox_id.clone(),
            holder: None,
            shared_pidns: req.shared_pid_namespace,
            dir: dir.clone(),
            mounts: Vec::new(),
        };
        match self.build_sandbox(&req, &mut sb).await {
            Ok(()) => {
                tracing::info!(
                    "sandbox {:?} created (holder pid {:?})",
                    sb.id,
                    sb.holder.as_ref().map(|h| h.pid)
                );
                *guard = Some(sb);
                Ok(())
            }
            Err(e) => {
                self.teardown_sandbox(&sb).await;
                Err(e)
            }
        }
    }

    async fn build_sandbox(&self, req: &pb::CreateSandboxRequest, sb: &mut Sandbox) -> Result<()> {
        if !req.dns_servers.is_empty()
            || !req.dns_searches.is_empty()
            || !req.dns_options.is_empty()
        {
            let mut text = String::new();
            for s in &req.dns_servers {
                text.push_str(&format!("nameserver {s}\n"));
            }
            if !req.dns_searches.is_empty() {
                text.push_str(&format!("search {}\n", req.dns_searches.join(" ")));
            }
            if !req.dns_options.is_empty() {
                text.push_str(&format!("options {}\n", req.dns_options.join(" ")));
            }
            let p = sb.dir.join("resolv.conf");
            std::fs::write(&p, text).map_err(|source| AgentError::Io {
                what: format!("writing {}", p.display()),
                source,
            })?;
        }
        for m in &req.shared_mounts {
            let target = sb.dir.join("shared").join(&m.name);
            std::fs::create_dir_all(&target).map_err(|source| AgentError::Io {
                what: format!("creating {}", target.display()),
                source,
            })?;
            let (flags, _prop, data) = crate::init::parse_options(&m.options);
            let (fstype, flags) = if m.fstype == "bind" {
                (None, flags | nix::mount::MsFlags::MS_BIND)
            } else {
                (Some(m.fstype.as_str()), flags)
            };
            nix::mount::mount(
                Some(m.source.as_str()),
                &target,
                fstype,
                flags,
                (!data.is_empty()).then_some(data.as_str()),
            )
            .map_err(|source| AgentError::Sys {
                what: format!(
                    "mounting shared {:?} ({}) on {}",
                    m.name,
                    m.source,
                    target.display()
                ),
                source,
            })?;
            sb.mounts.push(target);
        }
        if let Some(cg) = &self.cgroups {
            cg.create_sandbox(&sb.id)?;
        }
        let mut new_ns = vec![Ns::Uts, Ns::Ipc];
        if req.new_network_namespace {
            new_ns.push(Ns::Net);
        }
        if req.shared_pid_namespace {
            new_ns.push(Ns::Pid);
        }
        let cfg = InitConfig {
            kind: Kind::Sandbox,
            cgroup_procs: None,
            join_namespaces: Vec::new(),
            new_namespaces: new_ns,
            enter_root: None,
            rootfs: None,
            hostname: (!req.hostname.is_empty()).then(|| req.hostname.clone()),
            domainname: None,
            sysctl: Default::default(),
            process: None,
            seccomp: Vec::new(),
        };
        let reaper = self.reaper.clone();
        let (pid, res) = tokio::task::spawn_blocking(move || -> std::result::Result<(i32, std::result::Result<(), SpawnError>), SpawnError> {
            let mut h = spawn_helper(&reaper, &cfg, None)?;
            let r = h.wait_ready();
            Ok((h.pid, r))
        })
        .await
        .map_err(|e| AgentError::FailedPrecondition(format!("sandbox setup task: {e}")))??;
        sb.holder = Some(Process::new(&self.reaper, pid, empty_io()));
        res?;
        Ok(())
    }

    async fn teardown_sandbox(&self, sb: &Sandbox) {
        if let Some(h) = &sb.holder {
            if h.exited().is_none() {
                let _ = kill(Pid::from_raw(h.pid), Signal::SIGKILL);
            }
            h.wait().await;
        }
        for m in sb.mounts.iter().rev() {
            umount(m);
        }
        if let Err(e) = std::fs::remove_dir_all(&sb.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", sb.dir.display());
            }
        }
        if let Some(cg) = &self.cgroups {
            cg.remove_sandbox(&sb.id);
        }
    }

    /// Destroys the sandbox and every container in it.
    pub async fn destroy_sandbox(&self) -> Result<()> {
        let mut guard = self.sandbox.lock().await;
        let ids: Vec<String> = self
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        for id in ids {
            if let Err(e) = self.remove_container(&id, true).await {
                tracing::warn!("removing container {id:?}: {e}");
            }
        }
        let sb = guard
            .take()
            .ok_or_else(|| AgentError::NotFound("sandbox".into()))?;
        self.teardown_sandbox(&sb).await;
        let vfs: Vec<PathBuf> = self
            .virtiofs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in vfs {
            umount(&p);
        }
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

    fn rootfs_path(
        &self,
        id: &str,
        spec: &Spec,
        rootfs: Option<&pb::Rootfs>,
    ) -> Result<(PathBuf, Option<PathBuf>)> {
        use pb::rootfs::Source;
        let src = rootfs.and_then(|r| r.source.as_ref()).ok_or_else(|| {
            AgentError::InvalidArgument(format!(
                "rootfs source missing (spec root.path {:?} is a host path)",
                spec.root().as_ref().map(|r| r.path().display().to_string())
            ))
        })?;
        match src {
            Source::HostPath(h) => {
                let p = PathBuf::from(&h.path);
                if p.components().any(|c| c == std::path::Component::ParentDir) {
                    return Err(AgentError::InvalidArgument(format!(
                        "rootfs host path {:?} must not contain \"..\"",
                        h.path
                    )));
                }
                if !p.is_absolute() || !p.is_dir() {
                    return Err(AgentError::InvalidArgument(format!(
                        "rootfs host path {:?} is not an existing absolute directory",
                        h.path
                    )));
                }
                Ok((p, None))
            }
            Source::VirtioFs(v) => {
                check_name("virtio-fs tag", &v.tag)?;
                check_rel("virtio-fs rootfs path", &v.path)?;
                let mnt = {
                    let mut map = self.virtiofs.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(p) = map.get(&v.tag) {
                        p.clone()
                    } else {
                        let p = self.layout.state_dir.join("virtiofs").join(&v.tag);
                        std::fs::create_dir_all(&p).map_err(|source| AgentError::Io {
                            what: format!("creating {}", p.display()),
                            source,
                        })?;
                        nix::mount::mount(
                            Some(v.tag.as_str()),
                            &p,
                            Some("virtiofs"),
                            nix::mount::MsFlags::empty(),
                            None::<&str>,
                        )
                        .map_err(|source| AgentError::Sys {
                            what: format!("mounting virtio-fs tag {:?}", v.tag),
                            source,
                        })?;
                        map.insert(v.tag.clone(), p.clone());
                        p
                    }
                };
                let root = mnt.join(&v.path);
                let md = std::fs::symlink_metadata(&root).map_err(|source| AgentError::Io {
                    what: format!("rootfs {}", root.display()),
                    source,
                })?;
                if !md.is_dir() {
                    return Err(AgentError::InvalidArgument(format!(
                        "rootfs {} is not a directory",
                        root.display()
                    )));
                }
                Ok((root, None))
            }
            Source::Block(b) => {
                check_rel("block rootfs path", &b.path)?;
                if !b.device.starts_with("/dev/") || b.device.contains("..") {
                    return Err(AgentError::InvalidArgument(format!(
                        "block device {:?}",
                        b.device
                    )));
                }
                let mnt = self.layout.state_dir.join("block").join(id);
                std::fs::create_dir_all(&mnt).map_err(|source| AgentError::Io {
                    what: format!("creating {}", mnt.display()),
                    source,
                })?;
                let (flags, _, data) = crate::init::parse_options(&b.options);
                let fstype = if b.fstype.is_empty() {
                    "ext4"
                } else {
                    b.fstype.as_str()
                };
                if let Err(source) = nix::mount::mount(
                    Some(b.device.as_str()),
                    &mnt,
                    Some(fstype),
                    flags,
                    (!data.is_empty()).then_some(data.as_str()),
                ) {
                    let _ = std::fs::remove_dir(&mnt);
                    return Err(AgentError::Sys {
                        what: format!("mounting {} ({fstype})", b.device),
                        source,
                    });
                }
                Ok((mnt.join(&b.path), Some(mnt)))
            }
            _ => Err(AgentError::InvalidArgument("unknown rootfs source".into())),
        }
    }

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
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&req.container_id)
        {
            return Err(AgentError::AlreadyExists(format!(
                "container {:?}",
                req.container_id
            )));
        }
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
        let (rootfs, rootfs_mount) = self.rootfs_path(&id, &spec, req.rootfs.as_ref())?;
        let cleanup_mount = |m: &Option<PathBuf>| {
            if let Some(m) = m {
                umount(m);
            }
        };
        let cg = match &self.cgroups {
            Some(m) => match m.create(&sb.id, &id, linux.resources().as_ref()) {
                Ok(c) => Some(c),
                Err(e) => {
                    cleanup_mount(&rootfs_mount);
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
        let holder = sb.holder.as_ref().map(|h| h.pid).ok_or_else(|| {
            AgentError::FailedPrecondition("sandbox has no namespace holder".into())
        })?;
        let mut join = vec![
            (Ns::Uts, PathBuf::from(format!("/proc/{holder}/ns/uts"))),
            (Ns::Ipc, PathBuf::from(format!("/proc/{holder}/ns/ipc"))),
            (Ns::Net, PathBuf::from(format!("/proc/{holder}/ns/net"))),
        ];
        if sb.shared_pidns {
            join.push((Ns::Pid, PathBuf::from(format!("/proc/{holder}/ns/pid"))));
        } else {
            new_ns.push(Ns::Pid);
        }
        for ns in linux.namespaces().iter().flatten() {
            if ns.path().is_some() {
                tracing::info!("container {id:?}: namespace path {:?} ignored; the sandbox's namespaces are used", ns.path());
            }
            if ns.typ() == LinuxNamespaceType::Cgroup && cg.is_some() {
                new_ns.push(Ns::Cgroup);
            }
        }
        let plan = RootfsPlan {
            path: rootfs,
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
        let own_pidns = !sb.shared_pidns;
        let result = self
            .spawn_process(cfg, process.terminal().unwrap_or(false), true)
            .await;
        let (proc_, sock) = match result {
            Ok(v) => v,
            Err(e) => {
                if let Some(c) = &cg {
                    let _ = c.kill_all();
                    let _ = c.remove().await;
                }
                cleanup_mount(&rootfs_mount);
                return Err(e);
            }
        };
        let oom_task = cg
            .as_ref()
            .filter(|_| {
                self.cgroups
                    .as_ref()
                    .is_some_and(|m| m.controllers().iter().any(|c| c == "memory"))
            })
            .map(|c| {
                let c = c.clone();
                let tx = self.oom_tx.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    let Ok(w) = cgroup::watch_file(&c.memory_events()) else {
                        return;
                    };
                    let mut last = c.oom_kills();
                    loop {
                        w.changed().await;
                        let n = c.oom_kills();
                        if n > last {
                            tracing::info!("container {id:?}: OOM kill (count {n})");
                            if tx.send(id.clone()).is_err() {
                                return;
                            }
                        }
                        last = n;
                    }
                })
            });
        let container = Arc::new(Container {
            id: id.clone(),
            init: proc_,
            execs: StdMutex::new(HashMap::new()),
            state: StdMutex::new(State::Created),
            control: StdMutex::new(sock),
            cgroup: cg,
            rootfs_mount,
            own_pidns,
            seccomp,
            oom_task,
        });
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), container.clone());
        tracing::info!("container {id:?} created (pid {})", container.init.pid);
        Ok(())
    }

    /// Spawns a helper for `cfg`; for containers waits for Ready and keeps
    /// the control socket, for execs waits for the exec.
    async fn spawn_process(
        &self,
        cfg: InitConfig,
        terminal: bool,
        container: bool,
    ) -> Result<(Arc<Process>, Option<UnixStream>)> {
        let (pio, child) = stdio::create(terminal)?;
        let reaper = self.reaper.clone();
        let (pid, res) = tokio::task::spawn_blocking(move || -> std::result::Result<(i32, std::result::Result<Option<UnixStream>, SpawnError>), SpawnError> {
            let mut h = spawn_helper(&reaper, &cfg, Some(child.fds))?;
            let r = if container { h.wait_ready().map(|()| Some(h.sock)) } else { h.wait_exec().map(|()| None) };
            Ok((h.pid, r))
        })
        .await
        .map_err(|e| AgentError::FailedPrecondition(format!("setup task: {e}")))??;
        let p = Process::new(&self.reaper, pid, pio);
        match res {
            Ok(sock) => Ok((p, sock)),
            Err(e) => {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                p.wait().await;
                Err(e.into())
            }
        }
    }

    /// Lets a created container run its process.
    pub async fn start_container(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        let sock = c.control.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut sock) = sock else {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id:?} was already started"
            )));
        };
        let res = tokio::task::spawn_blocking(move || -> std::result::Result<(), SpawnError> {
            use std::io::Write;
            sock.write_all(&[START_BYTE])
                .map_err(|e| SpawnError::Protocol(format!("sending start: {e}")))?;
            let mut h = crate::spawn::Helper { sock, pid: 0 };
            h.wait_exec()
        })
        .await
        .map_err(|e| AgentError::FailedPrecondition(format!("start task: {e}")))?;
        res?;
        *c.state.lock().unwrap_or_else(|e| e.into_inner()) = State::Running;
        tracing::info!("container {id:?} started");
        Ok(())
    }

    /// Removes a container; `force` kills what still runs.
    pub async fn remove_container(&self, id: &str, force: bool) -> Result<()> {
        let c = self.container(id)?;
        let started = c
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none();
        if c.init.exited().is_none() {
            if started && !force {
                return Err(AgentError::FailedPrecondition(format!(
                    "container {id:?} is running; stop it or remove with force"
                )));
            }
            if *c.state.lock().unwrap_or_else(|e| e.into_inner()) == State::Paused {
                if let Some(cg) = &c.cgroup {
                    let _ = cg.freeze(false).await;
                }
            }
            c.kill_all(Signal::SIGKILL);
            let _ = kill(Pid::from_raw(c.init.pid), Signal::SIGKILL);
            c.init.wait().await;
        }
        // Processes left in a shared PID namespace.
        c.kill_all(Signal::SIGKILL);
        c.control.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = &c.oom_task {
            t.abort();
        }
        if let Some(cg) = &c.cgroup {
            cg.remove().await?;
        }
        if let Some(m) = &c.rootfs_mount {
            umount(m);
        }
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        tracing::info!("container {id:?} removed");
        Ok(())
    }

    /// Runs a new process in a running container.
    pub async fn exec_process(&self, req: pb::ExecProcessRequest) -> Result<()> {
        check_name("exec id", &req.exec_id)?;
        let process: OciProcess = spec::parse_process(&req.process)?;
        let c = self.container(&req.container_id)?;
        if c.init.exited().is_some()
            || *c.state.lock().unwrap_or_else(|e| e.into_inner()) != State::Running
        {
            return Err(AgentError::FailedPrecondition(format!(
                "container {:?} is not running",
                c.id
            )));
        }
        if c.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&req.exec_id)
        {
            return Err(AgentError::AlreadyExists(format!("exec {:?}", req.exec_id)));
        }
        let pid = c.init.pid;
        let mut join: Vec<(Ns, PathBuf)> =
            [Ns::Ipc, Ns::Uts, Ns::Net, Ns::Pid, Ns::Cgroup, Ns::Mount]
                .into_iter()
                .map(|ns| {
                    (
                        ns,
                        PathBuf::from(format!("/proc/{pid}/ns/{}", ns.proc_name())),
                    )
                })
                .collect();
        // Joining the namespace one is already in is harmless, except that
        // the cgroup namespace only exists when the container made one.
        join.retain(|(ns, p)| {
            *ns != Ns::Cgroup
                || std::fs::read_link(p).ok() != std::fs::read_link("/proc/self/ns/cgroup").ok()
        });
        let cfg = InitConfig {
            kind: Kind::Exec,
            cgroup_procs: c.cgroup.as_ref().map(|c| c.procs_file()),
            join_namespaces: join,
            new_namespaces: Vec::new(),
            enter_root: Some(PathBuf::from(format!("/proc/{pid}/root"))),
            rootfs: None,
            hostname: None,
            domainname: None,
            sysctl: Default::default(),
            process: Some(process.clone()),
            seccomp: c.seccomp.clone(),
        };
        let (p, _) = self
            .spawn_process(cfg, process.terminal().unwrap_or(false), false)
            .await?;
        c.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req.exec_id.clone(), p);
        tracing::info!("container {:?}: exec {:?} started", c.id, req.exec_id);
        Ok(())
    }

    /// Sends a signal.
    pub fn signal(&self, r: &pb::ProcessRef, signal: u32, all: bool) -> Result<()> {
        let sig = Signal::try_from(signal as i32)
            .map_err(|_| AgentError::InvalidArgument(format!("signal {signal}")))?;
        let c = self.container(&r.container_id)?;
        if all {
            c.kill_all(sig);
            return Ok(());
        }
        c.process(&r.exec_id)?.signal(sig)
    }

    /// Waits for a process's exit.
    pub async fn wait(&self, r: &pb::ProcessRef) -> Result<Exit> {
        let p = self.container(&r.container_id)?.process(&r.exec_id)?;
        Ok(p.wait().await)
    }

    /// Looks a process up.
    pub fn process(&self, r: &pb::ProcessRef) -> Result<Arc<Process>> {
        self.container(&r.container_id)?.process(&r.exec_id)
    }

    /// Freezes or thaws a container.
    pub async fn pause(&self, id: &str, pause: bool) -> Result<()> {
        let c = self.container(id)?;
        let cg = c
            .cgroup
            .as_ref()
            .ok_or(CgroupError::Disabled("pause/resume"))?;
        let want = if pause { State::Running } else { State::Paused };
        if *c.state.lock().unwrap_or_else(|e| e.into_inner()) != want || c.init.exited().is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id:?} is not {}",
                if pause { "running" } else { "paused" }
            )));
        }
        cg.freeze(pause).await?;
        *c.state.lock().unwrap_or_else(|e| e.into_inner()) =
            if pause { State::Paused } else { State::Running };
        Ok(())
    }

    /// Container statistics.
    pub fn stats(&self, id: &str) -> Result<pb::StatsContainerResponse> {
        let c = self.container(id)?;
        let cg = c.cgroup.as_ref().ok_or(CgroupError::Disabled("stats"))?;
        Ok(cg.stats())
    }

    /// Applies new resources.
    pub fn update(&self, id: &str, resources: &[u8]) -> Result<()> {
        let r: LinuxResources = serde_json::from_slice(resources)
            .map_err(|e| AgentError::InvalidArgument(format!("resources JSON: {e}")))?;
        spec::validate_resources("resources", &r)?;
        let c = self.container(id)?;
        let cg = c.cgroup.as_ref().ok_or(CgroupError::Disabled("update"))?;
        cg.apply(&r)?;
        Ok(())
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
}

fn empty_io() -> ProcessIo {
    ProcessIo {
        stdin: Mutex::new(None),
        stdout: Mutex::new(None),
        stderr: Mutex::new(None),
        tty: None,
    }
}

impl Agent {
    /// Forwards a signal the agent received (as PID 1) to every container's init.
    pub fn forward_signal(&self, sig: nix::sys::signal::Signal) {
        for c in self
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            if c.init.exited().is_none() {
                let _ = kill(Pid::from_raw(c.init.pid), sig);
            }
        }
    }
}
