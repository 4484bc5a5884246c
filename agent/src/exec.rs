//! Processes exec'd into a running container: they join all of its namespaces (the cgroup
//! namespace only when the container has its own), its cgroup and its root, and run under
//! its seccomp profile.

use std::path::PathBuf;

use oci_spec::runtime::Process as OciProcess;

use crate::container::{Container, State};
use crate::error::{AgentError, Result};
use crate::ipc::{InitConfig, Kind, Ns};
use crate::process::{self, WaitFor};
use crate::reaper::Reaper;
use crate::sync::LockExt;

/// The namespaces of the process `pid` an exec joins: all of them, except a cgroup
/// namespace that is the agent's own (joining the namespace one is in is harmless otherwise).
fn namespaces_of(pid: i32) -> Vec<(Ns, PathBuf)> {
    let mut join: Vec<(Ns, PathBuf)> = [Ns::Ipc, Ns::Uts, Ns::Net, Ns::Pid, Ns::Cgroup, Ns::Mount]
        .into_iter()
        .map(|ns| {
            (
                ns,
                PathBuf::from(format!("/proc/{pid}/ns/{}", ns.proc_name())),
            )
        })
        .collect();
    join.retain(|(ns, p)| {
        *ns != Ns::Cgroup
            || std::fs::read_link(p).ok() != std::fs::read_link("/proc/self/ns/cgroup").ok()
    });
    join
}

impl Container {
    /// Runs the validated `process` as exec `exec_id` in this running container; returns once
    /// it was exec'd.
    pub async fn exec(&self, reaper: &Reaper, exec_id: &str, process: OciProcess) -> Result<()> {
        if self.init.exited().is_some() || *self.state.lock_or_recover() != State::Running {
            return Err(AgentError::FailedPrecondition(format!(
                "container {:?} is not running",
                self.id
            )));
        }
        if self.execs.lock_or_recover().contains_key(exec_id) {
            return Err(AgentError::AlreadyExists(format!("exec {exec_id:?}")));
        }
        let pid = self.init.pid;
        let terminal = process.terminal().unwrap_or(false);
        let cfg = InitConfig {
            kind: Kind::Exec,
            cgroup_procs: self.cgroup.as_ref().map(|c| c.procs_file()),
            join_namespaces: namespaces_of(pid),
            new_namespaces: Vec::new(),
            enter_root: Some(PathBuf::from(format!("/proc/{pid}/root"))),
            rootfs: None,
            hostname: None,
            domainname: None,
            sysctl: Default::default(),
            process: Some(process),
            seccomp: self.seccomp.clone(),
        };
        let (p, _) = process::spawn(reaper, cfg, terminal, WaitFor::Exec).await?;
        self.execs.lock_or_recover().insert(exec_id.to_owned(), p);
        tracing::info!("container {:?}: exec {exec_id:?} started", self.id);
        Ok(())
    }
}
