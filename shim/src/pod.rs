//! The pod VM's lifecycle as the Task service needs it: which pod a container belongs to (the CRI
//! sandbox-id annotation), launching the VM on the pod's first `Create`, handing the running VM to
//! later calls, and stopping it once no container is left.
//!
//! The VM sits behind [`PodVm`] and is launched by a [`PodLauncher`]: production uses
//! [`VmmLauncher`] (moat-vmm and the agent in the guest, [`crate::sandbox`]); tests can run the
//! agent on the host instead.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::protobuf::rt::WireType;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::CodedInputStream;
use moat_protocol::agent as pb;
use moat_protocol::agent_ttrpc_async::AgentClient;
use moat_protocol::connect::AgentAddress;
use serde_json::Value;
use tokio::sync::Mutex;
use tracing::info;

use crate::config::Config;
use crate::error::{LaunchError, TaskError};
use crate::events::EventSender;
use crate::namespaces::SANDBOX_ID_ANNOTATION;
use crate::network;
use crate::oom;
use crate::portforward::Forwarder;
use crate::rootfs;
use crate::sandbox::{Sandbox, SandboxSpec};
use crate::sizing::{self, PodResources};

/// A running pod VM, as the Task service uses it.
#[async_trait]
pub trait PodVm: Send + Sync {
    /// The pod (sandbox) id.
    fn id(&self) -> &str;
    /// The connection to the pod's agent.
    fn agent(&self) -> &AgentClient;
    /// The host directory whose content the agent sees (container rootfs and bind sources).
    fn shared_dir(&self) -> PathBuf;
    /// How the agent names `rel`, a path relative to [`PodVm::shared_dir`].
    fn agent_path(&self, rel: &str) -> String;
    /// The `Rootfs` to send for a container whose rootfs is at `rel` below the shared directory.
    fn rootfs(&self, rel: &str) -> pb::Rootfs;
    /// The host pid that holds the pod (moat-vmm's), which containerd shows as the task pid.
    fn pid(&self) -> u32;
    /// True once the VM has ended.
    fn exited(&self) -> bool;
    /// Waits until the VM has ended.
    async fn wait_exited(&self);
    /// Stops the VM and removes its state (what [`PodVm::shared_dir`] holds included).
    async fn stop(&self);
    /// Records what container `id` asks for (`None`: removed) and grows the VM if the pod's
    /// total needs it, before the container gets its limits ([`crate::resources`]). A pod VM
    /// that cannot grow accepts everything (the default).
    async fn set_container_resources(
        &self,
        _id: &str,
        _res: Option<PodResources>,
    ) -> Result<(), TaskError> {
        Ok(())
    }
    /// Where the agent's port-forward relay is reached ([`crate::portforward`]); `None`: no
    /// port-forward.
    fn forward_address(&self) -> Option<AgentAddress> {
        None
    }
}

/// What a pod VM is launched with.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// containerd's namespace of the shim.
    pub namespace: String,
    /// The pod id (CRI sandbox id, or the first container's id).
    pub id: String,
    /// The pod's hostname (the first container's spec `hostname`).
    pub hostname: String,
    /// The pod's network namespace ([`network::netns_path`]); `None`: no NIC.
    pub netns: Option<PathBuf>,
    /// The `ConfigPath` of containerd's runtime options, if given.
    pub config_path: Option<PathBuf>,
    /// What the pod asks for ([`sizing`]).
    pub resources: PodResources,
    /// The first container's `linux.cgroupsPath` (the CRI sandbox's: the pod's cgroup).
    pub cgroups_path: Option<String>,
}

/// Launches pod VMs.
#[async_trait]
pub trait PodLauncher: Send + Sync {
    /// Boots the pod's VM and returns it once its agent is ready.
    async fn launch(&self, spec: &PodSpec) -> Result<Arc<dyn PodVm>, LaunchError>;
}

/// The production launcher: moat-vmm with the configured kernel and initramfs.
pub struct VmmLauncher;

#[async_trait]
impl PodLauncher for VmmLauncher {
    async fn launch(&self, spec: &PodSpec) -> Result<Arc<dyn PodVm>, LaunchError> {
        let config = Config::load(spec.config_path.as_deref())?;
        let host = sizing::host_limits();
        let size = sizing::size(&config, &spec.resources, host)?;
        let room = sizing::room(&config, &size, host);
        let sandbox = Sandbox::boot(
            &config,
            &SandboxSpec {
                namespace: spec.namespace.clone(),
                id: spec.id.clone(),
                hostname: spec.hostname.clone(),
                netns: spec.netns.clone(),
                size,
                room,
                resources: spec.resources,
                cgroups_path: spec.cgroups_path.clone(),
            },
        )
        .await?;
        Ok(sandbox)
    }
}

#[async_trait]
impl PodVm for Sandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn agent(&self) -> &AgentClient {
        &self.agent
    }

    fn shared_dir(&self) -> PathBuf {
        Sandbox::shared_dir(self)
    }

    fn agent_path(&self, rel: &str) -> String {
        moat_protocol::guest_shared_path(rel)
    }

    fn rootfs(&self, rel: &str) -> pb::Rootfs {
        pb::Rootfs {
            source: Some(pb::rootfs::Source::VirtioFs(pb::VirtioFsRootfs {
                tag: moat_protocol::SHARED_FS_TAG.to_owned(),
                path: rel.to_owned(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn pid(&self) -> u32 {
        self.vmm_pid()
    }

    fn exited(&self) -> bool {
        self.vmm_exited()
    }

    async fn wait_exited(&self) {
        self.wait_vmm_exit().await;
    }

    async fn stop(&self) {
        Sandbox::stop(self).await;
    }

    async fn set_container_resources(
        &self,
        id: &str,
        res: Option<PodResources>,
    ) -> Result<(), TaskError> {
        self.growth
            .set(&self.agent, id, res)
            .await
            .map(drop)
            .map_err(TaskError::Grow)
    }

    fn forward_address(&self) -> Option<AgentAddress> {
        Some(AgentAddress::HybridVsock {
            uds: self.dir.join("vsock.sock"),
            port: moat_protocol::FORWARD_VSOCK_PORT,
        })
    }
}

/// The pod a container with `spec` belongs to: the CRI sandbox id, or `container_id` itself.
pub fn sandbox_id(spec: &Value, container_id: &str) -> String {
    spec.get("annotations")
        .and_then(|a| a.get(SANDBOX_ID_ANNOTATION))
        .and_then(Value::as_str)
        .unwrap_or(container_id)
        .to_owned()
}

/// The `ConfigPath` of containerd's runtime options (`runtimeoptions.v1.Options`, which CRI and
/// `ctr --runtime-config-path` send to shims other than runc: field 2, a string), if given.
fn config_path_option(options: Option<&Any>) -> Option<PathBuf> {
    let any = options?;
    let mut input = CodedInputStream::from_bytes(&any.value);
    let mut path = None;
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire_type) = (tag >> 3, tag & 7);
        if field == 2 && wire_type == 2 {
            path = input.read_string().ok();
        } else if input.skip_field(WireType::new(wire_type)?).is_err() {
            return None;
        }
    }
    path.filter(|p| !p.is_empty()).map(PathBuf::from)
}

/// The shim's pod: at most one running VM.
pub struct Pod {
    namespace: String,
    launcher: Box<dyn PodLauncher>,
    events: EventSender,
    vm: Arc<Mutex<Option<Arc<dyn PodVm>>>>,
    /// The pod's port-forward (pods with a netns path); dropped before the VM stops.
    forward: Arc<std::sync::Mutex<Option<Forwarder>>>,
}

impl Pod {
    /// A pod of containerd namespace `namespace` whose VM `launcher` boots; OOM events go to
    /// `events`.
    pub fn new(namespace: &str, launcher: Box<dyn PodLauncher>, events: EventSender) -> Self {
        Self {
            namespace: namespace.to_owned(),
            launcher,
            events,
            vm: Arc::new(Mutex::new(None)),
            forward: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// The running VM, booted first if this is the pod's first container (`container_id` with
    /// `spec` and containerd's runtime `options`).
    pub async fn ensure(
        &self,
        container_id: &str,
        options: Option<&Any>,
        spec: &Value,
    ) -> Result<Arc<dyn PodVm>, TaskError> {
        let mut slot = self.vm.lock().await;
        if let Some(vm) = slot.as_ref() {
            if !vm.exited() {
                return Ok(vm.clone());
            }
            return Err(TaskError::PodExited);
        }
        let id = sandbox_id(spec, container_id);
        rootfs::check_id(&id).map_err(TaskError::BadId)?;
        let pod = PodSpec {
            namespace: self.namespace.clone(),
            id,
            hostname: spec
                .get("hostname")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            netns: network::netns_path(spec)?,
            config_path: config_path_option(options),
            resources: PodResources::from_spec(spec),
            cgroups_path: spec
                .pointer("/linux/cgroupsPath")
                .and_then(Value::as_str)
                .filter(|p| !p.is_empty())
                .map(str::to_owned),
        };
        let vm = self.launcher.launch(&pod).await?;
        oom::spawn_watcher(vm.agent().clone(), self.events.clone());
        if let (Some(netns), Some(guest)) = (pod.netns.clone(), vm.forward_address()) {
            let f = Forwarder::spawn(netns, vm.agent().clone(), guest);
            *self.forward.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
        }
        *slot = Some(vm.clone());
        Ok(vm)
    }

    /// The running VM, for calls that need one.
    pub async fn running(&self) -> Result<Arc<dyn PodVm>, TaskError> {
        self.current().await.ok_or(TaskError::PodNotRunning)
    }

    /// The VM, if one was booted and not stopped.
    pub async fn current(&self) -> Option<Arc<dyn PodVm>> {
        self.vm.lock().await.clone()
    }

    /// The task pid containerd shows: the VM's host pid (0 without a VM).
    pub async fn pid(&self) -> u32 {
        self.current().await.map(|vm| vm.pid()).unwrap_or(0)
    }

    /// Ends the pod's port-forward: its listeners close, its relays end.
    fn stop_forwarding(&self) {
        let mut slot = self.forward.lock().unwrap_or_else(|p| p.into_inner());
        drop(slot.take());
    }

    /// Stops the VM unless containers are left (`in_use`): after a failed create or the last
    /// delete.
    pub async fn stop_if_unused(&self, in_use: bool) {
        if in_use {
            return;
        }
        let vm = self.vm.lock().await.take();
        self.stop_forwarding();
        if let Some(vm) = vm {
            vm.stop().await;
        }
    }

    /// Stops the VM in a task of its own and then signals `exit` (the shim ends). containerd
    /// bounds `Shutdown` with a short deadline, and stopping a guest can take longer.
    pub fn shut_down(&self, exit: Arc<ExitSignal>) {
        let slot = self.vm.clone();
        let forward = self.forward.clone();
        tokio::spawn(async move {
            let vm = slot.lock().await.take();
            drop(forward.lock().unwrap_or_else(|p| p.into_inner()).take());
            if let Some(vm) = vm {
                vm.stop().await;
            }
            info!("last task gone: shim exits");
            exit.signal();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_path_comes_from_runtime_options() {
        // runtimeoptions.v1.Options { type_url: "x", config_path: "/etc/moat/alt.toml" }
        let mut value = vec![0x0a, 1, b'x', 0x12, 18];
        value.extend_from_slice(b"/etc/moat/alt.toml");
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        assert_eq!(
            config_path_option(Some(&any)),
            Some(PathBuf::from("/etc/moat/alt.toml"))
        );
        assert_eq!(config_path_option(None), None);
        let garbage = Any {
            value: vec![0xff, 0xff, 0xff],
            ..Default::default()
        };
        assert_eq!(config_path_option(Some(&garbage)), None);
    }

    #[test]
    fn sandbox_id_is_the_cri_annotation_or_the_container() {
        let spec = serde_json::json!({"annotations": {SANDBOX_ID_ANNOTATION: "pod-1"}});
        assert_eq!(sandbox_id(&spec, "c1"), "pod-1");
        assert_eq!(sandbox_id(&serde_json::json!({}), "c1"), "c1");
    }
}
