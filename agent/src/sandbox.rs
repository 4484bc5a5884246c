//! The sandbox's lifecycle: validating a `CreateSandbox` request, building the sandbox (DNS
//! file, shared mounts, sandbox cgroup, the namespace holder that owns the UTS, IPC and
//! optionally network and PID namespaces) and tearing it down again — also half-built, after
//! a failed step.

use std::path::PathBuf;
use std::sync::Arc;

use moat_protocol::agent as pb;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cgroup::Manager;
use crate::error::{AgentError, Result};
use crate::ipc::{InitConfig, Kind, Ns};
use crate::netconf::NetConfig;
use crate::process::{self, Process};
use crate::reaper::Reaper;
use crate::storage::{umount, Storage};
use crate::validate::check_name;

/// The pod: its namespaces (held by a helper process), files, mounts and cgroup.
pub struct Sandbox {
    /// The sandbox id (names its directory and cgroup).
    pub id: String,
    /// Whether the containers share the holder's PID namespace.
    pub shared_pidns: bool,
    holder: Option<Arc<Process>>,
    dir: PathBuf,
    mounts: Vec<PathBuf>,
}

/// Checks everything in `req` before anything is created; returns its network configuration.
pub fn validate(req: &pb::CreateSandboxRequest) -> Result<NetConfig> {
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
    let net = NetConfig::from_request(&req.interfaces, &req.routes)?;
    if req.new_network_namespace && !net.is_empty() {
        return Err(AgentError::InvalidArgument(
            "interfaces/routes need new_network_namespace = false: a new namespace has only lo"
                .into(),
        ));
    }
    Ok(net)
}

/// The `resolv.conf` text for the request's DNS fields, `None` when it sets none.
fn resolv_conf(req: &pb::CreateSandboxRequest) -> Option<String> {
    if req.dns_servers.is_empty() && req.dns_searches.is_empty() && req.dns_options.is_empty() {
        return None;
    }
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
    Some(text)
}

impl Sandbox {
    /// Builds the sandbox of a request [`validate`] accepted; on failure removes whatever it
    /// made.
    pub async fn create(
        req: &pb::CreateSandboxRequest,
        storage: &Storage,
        cgroups: Option<&Manager>,
        reaper: &Reaper,
    ) -> Result<Self> {
        let dir = storage.sandbox_dir(&req.sandbox_id);
        std::fs::create_dir_all(&dir).map_err(|source| AgentError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let mut sb = Sandbox {
            id: req.sandbox_id.clone(),
            holder: None,
            shared_pidns: req.shared_pid_namespace,
            dir,
            mounts: Vec::new(),
        };
        match sb.build(req, storage, cgroups, reaper).await {
            Ok(()) => {
                tracing::info!(
                    "sandbox {:?} created (holder pid {:?})",
                    sb.id,
                    sb.holder_pid()
                );
                Ok(sb)
            }
            Err(e) => {
                sb.teardown(cgroups).await;
                Err(e)
            }
        }
    }

    async fn build(
        &mut self,
        req: &pb::CreateSandboxRequest,
        storage: &Storage,
        cgroups: Option<&Manager>,
        reaper: &Reaper,
    ) -> Result<()> {
        if let Some(text) = resolv_conf(req) {
            let p = self.dir.join("resolv.conf");
            std::fs::write(&p, text).map_err(|source| AgentError::Io {
                what: format!("writing {}", p.display()),
                source,
            })?;
        }
        for m in &req.shared_mounts {
            let target = storage.mount_shared(&self.dir, m)?;
            self.mounts.push(target);
        }
        if let Some(cg) = cgroups {
            cg.create_sandbox(&self.id)?;
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
        let (holder, res) = process::spawn_holder(reaper, cfg).await?;
        self.holder = Some(holder);
        res?;
        Ok(())
    }

    /// PID of the namespace holder (the sandbox's namespaces are `/proc/<pid>/ns/*`).
    pub fn holder_pid(&self) -> Option<i32> {
        self.holder.as_ref().map(|h| h.pid)
    }

    /// Kills the holder and removes the mounts, files and sandbox cgroup. The containers must
    /// be gone already.
    pub async fn teardown(&self, cgroups: Option<&Manager>) {
        if let Some(h) = &self.holder {
            if h.exited().is_none() {
                let _ = kill(Pid::from_raw(h.pid), Signal::SIGKILL);
            }
            h.wait().await;
        }
        for m in self.mounts.iter().rev() {
            umount(m);
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", self.dir.display());
            }
        }
        if let Some(cg) = cgroups {
            cg.remove_sandbox(&self.id);
        }
    }
}
