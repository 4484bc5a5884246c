//! The containerd Task service (runtime v2, `containerd.task.v2.Task`) at the edge: each call is
//! checked, translated into agent calls and delegated — the containers and processes to
//! [`crate::process`], the pod VM to [`crate::pod`], container files to [`crate::rootfs`], events
//! to [`crate::events`], statistics to [`crate::metrics`]. Errors are [`TaskError`]s, which carry
//! their ttrpc status code.
//!
//! One shim serves one pod: the first `Create` boots the VM; later containers of the same pod
//! (grouped by the CRI sandbox-id annotation) go into the same VM; `Shutdown` after the last
//! `Delete` stops the VM and ends the shim.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::{self, r#async::TtrpcContext};
use moat_protocol::agent as pb;
use moat_protocol::ttrpc::context as agent_ctx;
use serde_json::Value;
use tracing::{info, warn};

use crate::error::TaskError;
use crate::events::{self, EventSender};
use crate::io::Stdio;
use crate::metrics;
use crate::namespaces;
use crate::pod::{Pod, PodLauncher, PodVm, VmmLauncher};
use crate::process::{self, Container, Exit, Process, Registry};
use crate::rootfs;
use crate::sizing::PodResources;

type TtrpcResult<T> = ttrpc::Result<T>;

/// The Task service of one shim (one pod).
pub struct TaskService {
    exit: Arc<ExitSignal>,
    events: EventSender,
    pod: Pod,
    containers: Registry,
}

impl TaskService {
    /// The production service: pod VMs booted with moat-vmm, events published to containerd
    /// through `publisher`; `exit` is signalled when the shim is done.
    pub fn new(namespace: &str, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Self {
        let events = events::forwarder(namespace, publisher);
        Self::with_backend(namespace, Box::new(VmmLauncher), events, exit)
    }

    /// A service whose pod VM comes from `launcher` and whose events go to `events` (see
    /// [`events::forwarder`]).
    pub fn with_backend(
        namespace: &str,
        launcher: Box<dyn PodLauncher>,
        events: EventSender,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            exit,
            pod: Pod::new(namespace, launcher, events.clone()),
            events,
            containers: Registry::default(),
        }
    }

    /// Mounts the container's files into the VM's shared directory and creates it in the agent
    /// (in the pod's sandbox container's pid namespace when `spec` shares the pod's).
    async fn create_in_vm(
        &self,
        vm: &dyn PodVm,
        req: &api::CreateTaskRequest,
        spec: &Value,
    ) -> Result<(), TaskError> {
        let share_pid_namespace_with =
            namespaces::pid_namespace_owner(spec, vm.pid())?.unwrap_or_default();
        if req.id != vm.id() {
            // A container beyond the pod's own ask grows the VM before it is created.
            let asks = spec
                .pointer("/linux/resources")
                .map(PodResources::from_linux_resources)
                .unwrap_or_default();
            vm.set_container_resources(&req.id, Some(asks)).await?;
        }
        let shared = vm.shared_dir();
        let bundle = Path::new(&req.bundle);
        let rel = rootfs::mount_rootfs(&shared, &req.id, bundle, &req.rootfs)
            .map_err(TaskError::Rootfs)?;
        let spec = rootfs::guest_spec(&shared, &req.id, bundle, &|rel| vm.agent_path(rel))
            .map_err(TaskError::GuestSpec)?;
        let create = pb::CreateContainerRequest {
            container_id: req.id.clone(),
            oci_spec: spec,
            rootfs: MessageField::some(vm.rootfs(&rel)),
            share_pid_namespace_with,
            ..Default::default()
        };
        vm.agent()
            .create_container(agent_ctx::Context::default(), &create)
            .await
            .map_err(TaskError::agent("CreateContainer", &req.id))?;
        Ok(())
    }

    async fn create_container(&self, req: &api::CreateTaskRequest) -> Result<u32, TaskError> {
        rootfs::check_id(&req.id).map_err(TaskError::BadId)?;
        if self.containers.contains(&req.id) {
            return Err(TaskError::AlreadyExists(format!("container {}", req.id)));
        }
        let spec = read_spec(&req.bundle)?;
        // Before anything is made: a refused pod leaves no VM and no files behind.
        namespaces::check_vm_limits(&spec)?;
        let vm = self
            .pod
            .ensure(&req.id, req.options.as_ref(), &spec)
            .await?;
        if let Err(e) = self.create_in_vm(vm.as_ref(), req, &spec).await {
            rootfs::remove_container_files(&vm.shared_dir(), &req.id);
            if let Err(e) = vm.set_container_resources(&req.id, None).await {
                warn!("container {}: forgetting its resources: {e}", req.id);
            }
            self.pod.stop_if_unused(!self.containers.is_empty()).await;
            return Err(e);
        }
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Process::new("", stdio, Vec::new());
        self.containers
            .insert(&req.id, Container::new(PathBuf::from(&req.bundle), init));
        info!("created container {} in pod VM {}", req.id, vm.id());
        let pid = vm.pid();
        self.events.send(
            topics::TASK_CREATE_EVENT_TOPIC,
            ev::TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(ev::TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                checkpoint: req.checkpoint.clone(),
                pid,
                ..Default::default()
            },
        );
        Ok(pid)
    }

    async fn start_process(&self, id: &str, exec_id: &str) -> Result<u32, TaskError> {
        let proc_ = self.containers.process(id, exec_id)?;
        if proc_.is_started() {
            return Err(TaskError::AlreadyStarted {
                id: id.to_owned(),
                exec_id: exec_id.to_owned(),
            });
        }
        let vm = self.pod.running().await?;
        let ctx = agent_ctx::Context::default();
        if exec_id.is_empty() {
            vm.agent()
                .start_container(ctx, &container_req(id))
                .await
                .map_err(TaskError::agent("StartContainer", id))?;
        } else {
            let r = pb::ExecProcessRequest {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                process: proc_.spec().to_vec(),
                ..Default::default()
            };
            vm.agent()
                .exec_process(ctx, &r)
                .await
                .map_err(TaskError::agent("ExecProcess", id))?;
        }
        let pid = vm.pid();
        process::started(vm, id, proc_, self.events.clone(), pid);
        Ok(pid)
    }

    async fn delete_process(&self, id: &str, exec_id: &str) -> Result<(u32, Exit), TaskError> {
        let proc_ = self.containers.process(id, exec_id)?;
        let vm = self.pod.current().await;
        let pid = vm.as_ref().map(|vm| vm.pid()).unwrap_or(0);
        let running = proc_.is_started() && proc_.exited().is_none();
        if !exec_id.is_empty() {
            if running {
                return Err(TaskError::StillRunning(format!(
                    "exec {exec_id} is still running"
                )));
            }
            self.containers.remove_exec(id, exec_id);
        } else {
            if running {
                return Err(TaskError::StillRunning(format!(
                    "container {id} is still running; kill it first"
                )));
            }
            if let Some(vm) = vm.as_ref().filter(|vm| !vm.exited()) {
                let r = pb::RemoveContainerRequest {
                    container_id: id.to_owned(),
                    force: true,
                    ..Default::default()
                };
                if let Err(e) = vm
                    .agent()
                    .remove_container(agent_ctx::Context::default(), &r)
                    .await
                {
                    warn!("RemoveContainer {id}: {e}");
                }
            }
            if let Some(vm) = vm.as_ref() {
                rootfs::remove_container_files(&vm.shared_dir(), id);
                if id != vm.id() {
                    // Bookkeeping only: the VM does not shrink (free pages go back by reporting).
                    if let Err(e) = vm.set_container_resources(id, None).await {
                        warn!("container {id}: forgetting its resources: {e}");
                    }
                }
            }
            self.containers.remove(id);
        }
        let exit = proc_.exited().unwrap_or_else(|| Exit::now(0));
        if exec_id.is_empty() {
            self.events.send(
                topics::TASK_DELETE_EVENT_TOPIC,
                ev::TaskDelete {
                    container_id: id.to_owned(),
                    pid,
                    exit_status: exit.status,
                    exited_at: MessageField::some(exit.timestamp()),
                    ..Default::default()
                },
            );
        }
        Ok((pid, exit))
    }

    /// Freezes (`paused`) or thaws a container's cgroup in the guest and tells containerd.
    async fn set_paused(&self, id: &str, paused: bool) -> Result<(), TaskError> {
        self.containers.process(id, "")?;
        let vm = self.pod.running().await?;
        let r = container_req(id);
        let ctx = agent_ctx::Context::default();
        if paused {
            vm.agent()
                .pause_container(ctx, &r)
                .await
                .map_err(TaskError::agent("PauseContainer", id))?;
        } else {
            vm.agent()
                .resume_container(ctx, &r)
                .await
                .map_err(TaskError::agent("ResumeContainer", id))?;
        }
        self.containers.set_paused(id, paused);
        let container_id = id.to_owned();
        if paused {
            let event = ev::TaskPaused {
                container_id,
                ..Default::default()
            };
            self.events.send(topics::TASK_PAUSED_EVENT_TOPIC, event);
        } else {
            let event = ev::TaskResumed {
                container_id,
                ..Default::default()
            };
            self.events.send(topics::TASK_RESUMED_EVENT_TOPIC, event);
        }
        Ok(())
    }

    async fn add_exec(&self, req: &api::ExecProcessRequest) -> Result<(), TaskError> {
        rootfs::check_id(&req.exec_id).map_err(TaskError::BadId)?;
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        self.containers
            .add_exec(&req.id, Process::new(&req.exec_id, stdio, spec))?;
        self.events.send(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            ev::TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            },
        );
        Ok(())
    }

    async fn signal(&self, req: &api::KillRequest) -> Result<(), TaskError> {
        let proc_ = self.containers.process(&req.id, &req.exec_id)?;
        if proc_.exited().is_some() {
            return Err(TaskError::NotFound(format!(
                "process {} {} (already finished)",
                req.id, req.exec_id
            )));
        }
        let vm = self.pod.running().await?;
        let r = pb::SignalProcessRequest {
            process: process_ref(&req.id, &req.exec_id),
            signal: req.signal,
            all: req.all,
            ..Default::default()
        };
        vm.agent()
            .signal_process(agent_ctx::Context::default(), &r)
            .await
            .map_err(TaskError::agent("SignalProcess", &req.id))?;
        Ok(())
    }

    async fn process_state(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<api::StateResponse, TaskError> {
        let proc_ = self.containers.process(id, exec_id)?;
        let (bundle, paused) = self.containers.bundle_and_paused(id)?;
        let exit = proc_.exited();
        let stdio = proc_.stdio();
        Ok(api::StateResponse {
            id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            bundle: bundle.display().to_string(),
            pid: self.pod.pid().await,
            status: proc_.status(paused).into(),
            stdin: stdio.stdin.clone(),
            stdout: stdio.stdout.clone(),
            stderr: stdio.stderr.clone(),
            terminal: stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| e.timestamp()).into(),
            ..Default::default()
        })
    }

    async fn container_stats(&self, id: &str) -> Result<api::StatsResponse, TaskError> {
        self.containers.process(id, "")?;
        let vm = self.pod.running().await?;
        let s = vm
            .agent()
            .stats_container(agent_ctx::Context::default(), &container_req(id))
            .await
            .map_err(TaskError::agent("StatsContainer", id))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(metrics::to_any(&s)?),
            ..Default::default()
        })
    }
}

/// Reads the bundle's OCI spec.
fn read_spec(bundle: &str) -> Result<Value, TaskError> {
    let path = Path::new(bundle).join("config.json");
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(source) => return Err(TaskError::ReadSpec { path, source }),
    };
    serde_json::from_slice(&text).map_err(|source| TaskError::ParseSpec { path, source })
}

/// The agent's name for a process.
fn process_ref(id: &str, exec_id: &str) -> MessageField<pb::ProcessRef> {
    MessageField::some(pb::ProcessRef {
        container_id: id.to_owned(),
        exec_id: exec_id.to_owned(),
        ..Default::default()
    })
}

/// The agent's name for a container.
fn container_req(id: &str) -> pb::ContainerRequest {
    pb::ContainerRequest {
        container_id: id.to_owned(),
        ..Default::default()
    }
}

#[async_trait]
impl Task for TaskService {
    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = self.create_container(&req).await?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = self.start_process(&req.id, &req.exec_id).await?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let (pid, exit) = self.delete_process(&req.id, &req.exec_id).await?;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        })
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        self.containers.process(&req.id, "")?;
        let vm = self.pod.running().await?;
        let resp = vm
            .agent()
            .list_processes(agent_ctx::Context::default(), &container_req(&req.id))
            .await
            .map_err(TaskError::agent("ListProcesses", &req.id))?;
        let processes = resp
            .pids
            .iter()
            .map(|&pid| api::ProcessInfo {
                pid: pid as u32,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.set_paused(&req.id, true).await?;
        Ok(api::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.set_paused(&req.id, false).await?;
        Ok(api::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.signal(&req).await?;
        Ok(api::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        self.add_exec(&req).await?;
        Ok(api::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.containers.process(&req.id, &req.exec_id)?;
        let vm = self.pod.running().await?;
        let r = pb::TtyResizeRequest {
            process: process_ref(&req.id, &req.exec_id),
            rows: req.height,
            cols: req.width,
            ..Default::default()
        };
        vm.agent()
            .tty_resize(agent_ctx::Context::default(), &r)
            .await
            .map_err(TaskError::agent("TtyResize", &req.id))?;
        Ok(api::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let proc_ = self.containers.process(&req.id, &req.exec_id)?;
        if req.stdin {
            proc_.close_stdin();
        }
        Ok(api::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        self.containers.process(&req.id, "")?;
        let vm = self.pod.running().await?;
        if let Some(any) = req.resources.as_ref() {
            // Grow the VM first: the container may use its new limit as soon as it has it.
            let json: Value =
                serde_json::from_slice(&any.value).map_err(|source| TaskError::ParseSpec {
                    path: "UpdateTaskRequest.resources".into(),
                    source,
                })?;
            vm.set_container_resources(&req.id, Some(PodResources::from_linux_resources(&json)))
                .await?;
        }
        let r = pb::UpdateContainerRequest {
            container_id: req.id.clone(),
            resources: req
                .resources
                .as_ref()
                .map(|a| a.value.clone())
                .unwrap_or_default(),
            ..Default::default()
        };
        vm.agent()
            .update_container(agent_ctx::Context::default(), &r)
            .await
            .map_err(TaskError::agent("UpdateContainer", &req.id))?;
        Ok(api::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let proc_ = self.containers.process(&req.id, &req.exec_id)?;
        let exit = proc_.wait().await?;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        })
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        Ok(self.container_stats(&req.id).await?)
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        self.containers.process(&req.id, "")?;
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.pod.pid().await,
            ..Default::default()
        })
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %_req.id))]
    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        if self.containers.is_empty() {
            self.pod.shut_down(self.exit.clone());
        }
        Ok(api::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        Ok(self.process_state(&req.id, &req.exec_id).await?)
    }
}
