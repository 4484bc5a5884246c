//! The containerd Task service (runtime v2, `containerd.task.v2.Task`): each call is mapped onto
//! the pod VM's agent. This module owns the shim's view of containers and processes (status, stdio,
//! exit), the exit monitors, and the events published to containerd.
//!
//! One shim serves one pod: the first `Create` boots the VM ([`Sandbox::boot`]); later containers
//! of the same pod (grouped by the CRI sandbox-id annotation) go into the same VM; `Shutdown` after
//! the last `Delete` stops the VM and ends the shim.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::util::timestamp;
use containerd_shim_protos::api;
use containerd_shim_protos::cgroups_v2::metrics as cg2;
use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::rt::WireType;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{CodedInputStream, Enum, Message, MessageDyn, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::{self, r#async::TtrpcContext};
use moat_protocol::agent as pb;
use moat_protocol::ttrpc::context as agent_ctx;
use serde_json::Value;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::io::{self, Stdio};
use crate::rootfs;
use crate::sandbox::{Sandbox, SandboxSpec, SHARED_FS_TAG};

/// How long a process's output may keep flowing after it exited before its exit is reported.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// Exit status reported when the VM died under a process.
const VM_GONE_STATUS: u32 = 255;
const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

type TtrpcResult<T> = ttrpc::Result<T>;

fn status(code: ttrpc::Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn not_found(what: impl std::fmt::Display) -> ttrpc::Error {
    status(ttrpc::Code::NOT_FOUND, format!("{what} not found"))
}

fn internal(e: impl std::fmt::Display) -> ttrpc::Error {
    status(ttrpc::Code::INTERNAL, e.to_string())
}

fn agent_error(call: &str, id: &str, e: moat_protocol::ttrpc::Error) -> ttrpc::Error {
    // Keep the agent's status code (NOT_FOUND, INVALID_ARGUMENT, …) so containerd maps it right.
    if let moat_protocol::ttrpc::Error::RpcStatus(s) = &e {
        let code = ttrpc::Code::from_i32(s.code.value()).unwrap_or(ttrpc::Code::INTERNAL);
        return status(code, format!("{call} {id}: {}", s.message));
    }
    status(
        ttrpc::Code::UNAVAILABLE,
        format!("{call} {id}: agent unreachable: {e}"),
    )
}

#[derive(Clone, Copy, Debug)]
struct Exit {
    status: u32,
    at_seconds: i64,
    at_nanos: i32,
}

impl Exit {
    fn now(status: u32) -> Self {
        let ts = timestamp().unwrap_or_default();
        Self {
            status,
            at_seconds: ts.seconds,
            at_nanos: ts.nanos,
        }
    }

    fn timestamp(&self) -> Timestamp {
        Timestamp {
            seconds: self.at_seconds,
            nanos: self.at_nanos,
            ..Default::default()
        }
    }
}

/// One process: a container's init (`exec_id` empty) or an exec.
struct Process {
    exec_id: String,
    stdio: Stdio,
    /// For execs: the OCI process JSON.
    spec: Vec<u8>,
    started: Mutex<bool>,
    exit: watch::Sender<Option<Exit>>,
    close_stdin: Arc<Notify>,
}

impl Process {
    fn new(exec_id: &str, stdio: Stdio, spec: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            exec_id: exec_id.to_owned(),
            stdio,
            spec,
            started: Mutex::new(false),
            exit: watch::channel(None).0,
            close_stdin: Arc::new(Notify::new()),
        })
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    fn is_started(&self) -> bool {
        self.started.lock().map(|g| *g).unwrap_or(false)
    }
}

struct Container {
    bundle: PathBuf,
    init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
    paused: bool,
}

/// The Task service of one shim (one pod).
pub struct TaskService {
    namespace: String,
    publisher: Arc<RemotePublisher>,
    exit: Arc<ExitSignal>,
    sandbox: Arc<tokio::sync::Mutex<Option<Arc<Sandbox>>>>,
    containers: Mutex<HashMap<String, Container>>,
}

impl TaskService {
    pub fn new(namespace: &str, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Self {
        Self {
            namespace: namespace.to_owned(),
            publisher: Arc::new(publisher),
            exit,
            sandbox: Arc::new(tokio::sync::Mutex::new(None)),
            containers: Mutex::new(HashMap::new()),
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        publish(&self.publisher, &self.namespace, topic, event).await;
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Container>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The process named by (container, exec id).
    fn process(&self, id: &str, exec_id: &str) -> TtrpcResult<Arc<Process>> {
        let containers = self.containers();
        let c = containers
            .get(id)
            .ok_or_else(|| not_found(format!("container {id}")))?;
        if exec_id.is_empty() {
            Ok(c.init.clone())
        } else {
            c.execs
                .get(exec_id)
                .cloned()
                .ok_or_else(|| not_found(format!("exec {exec_id} of container {id}")))
        }
    }

    async fn running_sandbox(&self) -> TtrpcResult<Arc<Sandbox>> {
        self.sandbox.lock().await.clone().ok_or_else(|| {
            status(
                ttrpc::Code::FAILED_PRECONDITION,
                "the pod VM is not running",
            )
        })
    }

    fn pid(&self, sandbox: &Sandbox) -> u32 {
        sandbox.vmm_pid()
    }

    /// Starts the relays and the exit monitor of a process that the agent has just started.
    fn monitor(&self, sandbox: Arc<Sandbox>, id: &str, proc_: Arc<Process>) {
        let pref = pb::ProcessRef {
            container_id: id.to_owned(),
            exec_id: proc_.exec_id.clone(),
            ..Default::default()
        };
        let relays = io::start(
            &sandbox.agent,
            &pref,
            &proc_.stdio,
            proc_.close_stdin.clone(),
        );
        let publisher = self.publisher.clone();
        let namespace = self.namespace.clone();
        let id = id.to_owned();
        let pid = self.pid(&sandbox);
        tokio::spawn(async move {
            let req = pb::WaitProcessRequest {
                process: Some(pref).into(),
                ..Default::default()
            };
            let code = tokio::select! {
                res = sandbox.agent.wait_process(agent_ctx::Context::default(), &req) => match res {
                    Ok(r) => r.exit_status as u32,
                    Err(e) => {
                        warn!("wait for {id}/{}: {e}", proc_.exec_id);
                        VM_GONE_STATUS
                    }
                },
                _ = sandbox.wait_vmm_exit() => {
                    warn!("the pod VM exited while {id}/{} ran", proc_.exec_id);
                    VM_GONE_STATUS
                }
            };
            // Output still in flight comes through the VM: once moat-vmm is gone there is none.
            tokio::select! {
                res = tokio::time::timeout(DRAIN_LIMIT, relays.drained()) => if res.is_err() {
                    warn!(
                        "output of {id}/{} still flowing {DRAIN_LIMIT:?} after exit; reporting exit",
                        proc_.exec_id
                    );
                },
                _ = sandbox.wait_vmm_exit() => {}
            }
            // Nothing reads stdin any more: end its relay (also one still waiting for a writer).
            proc_.close_stdin.notify_one();
            let exit = Exit::now(code);
            proc_.exit.send_replace(Some(exit));
            info!("{id}/{} exited with {code}", proc_.exec_id);
            let event = ev::TaskExit {
                container_id: id.clone(),
                id: if proc_.exec_id.is_empty() {
                    id.clone()
                } else {
                    proc_.exec_id.clone()
                },
                pid,
                exit_status: code,
                exited_at: MessageField::some(exit.timestamp()),
                ..Default::default()
            };
            publish(
                &publisher,
                &namespace,
                topics::TASK_EXIT_EVENT_TOPIC,
                Box::new(event),
            )
            .await;
        });
    }

    /// Boots the pod VM unless it runs already.
    async fn ensure_sandbox(
        &self,
        req: &api::CreateTaskRequest,
        spec: &Value,
    ) -> TtrpcResult<(Arc<Sandbox>, bool)> {
        let mut slot = self.sandbox.lock().await;
        if let Some(s) = slot.as_ref() {
            if !s.vmm_exited() {
                return Ok((s.clone(), false));
            }
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                "the pod VM has exited; delete the pod and create it again",
            ));
        }
        let config_path = config_path_option(req.options.as_ref());
        let config = Config::load(config_path.as_deref())
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        let sandbox_id = spec
            .pointer(&format!(
                "/annotations/{}",
                SANDBOX_ID_ANNOTATION.replace('/', "~1")
            ))
            .and_then(Value::as_str)
            .unwrap_or(&req.id)
            .to_owned();
        rootfs::check_id(&sandbox_id)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        let hostname = spec
            .get("hostname")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let sandbox = Sandbox::boot(
            &config,
            &SandboxSpec {
                namespace: self.namespace.clone(),
                id: sandbox_id,
                hostname,
                netns: crate::network::netns_path(spec)
                    .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?,
            },
        )
        .await
        .map_err(internal)?;
        self.spawn_oom_watcher(sandbox.clone());
        *slot = Some(sandbox.clone());
        Ok((sandbox, true))
    }

    fn spawn_oom_watcher(&self, sandbox: Arc<Sandbox>) {
        let publisher = self.publisher.clone();
        let namespace = self.namespace.clone();
        tokio::spawn(async move {
            loop {
                let res = sandbox
                    .agent
                    .get_oom_event(
                        agent_ctx::Context::default(),
                        &pb::GetOomEventRequest::new(),
                    )
                    .await;
                match res {
                    Ok(e) => {
                        info!("OOM in container {}", e.container_id);
                        let event = ev::TaskOOM {
                            container_id: e.container_id,
                            ..Default::default()
                        };
                        publish(
                            &publisher,
                            &namespace,
                            topics::TASK_OOM_EVENT_TOPIC,
                            Box::new(event),
                        )
                        .await;
                    }
                    Err(e) => {
                        debug!("OOM watcher ends: {e}");
                        break;
                    }
                }
            }
        });
    }

    async fn create_in_vm(
        &self,
        sandbox: &Sandbox,
        req: &api::CreateTaskRequest,
    ) -> TtrpcResult<()> {
        let shared = sandbox.shared_dir();
        let bundle = Path::new(&req.bundle);
        let rel = rootfs::mount_rootfs(&shared, &req.id, bundle, &req.rootfs).map_err(internal)?;
        let spec = rootfs::guest_spec(&shared, &req.id, bundle)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        let create = pb::CreateContainerRequest {
            container_id: req.id.clone(),
            oci_spec: spec,
            rootfs: Some(pb::Rootfs {
                source: Some(pb::rootfs::Source::VirtioFs(pb::VirtioFsRootfs {
                    tag: SHARED_FS_TAG.to_owned(),
                    path: rel,
                    ..Default::default()
                })),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        sandbox
            .agent
            .create_container(agent_ctx::Context::default(), &create)
            .await
            .map_err(|e| agent_error("CreateContainer", &req.id, e))?;
        Ok(())
    }

    /// Freezes (`paused`) or thaws a container's cgroup in the guest and tells containerd.
    async fn set_paused(&self, id: &str, paused: bool) -> TtrpcResult<api::Empty> {
        self.process(id, "")?;
        let sandbox = self.running_sandbox().await?;
        let r = container_req(id);
        let ctx = agent_ctx::Context::default();
        let (res, call) = if paused {
            (
                sandbox.agent.pause_container(ctx, &r).await,
                "PauseContainer",
            )
        } else {
            (
                sandbox.agent.resume_container(ctx, &r).await,
                "ResumeContainer",
            )
        };
        res.map_err(|e| agent_error(call, id, e))?;
        if let Some(c) = self.containers().get_mut(id) {
            c.paused = paused;
        }
        let container_id = id.to_owned();
        if paused {
            let event = ev::TaskPaused {
                container_id,
                ..Default::default()
            };
            self.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(event))
                .await;
        } else {
            let event = ev::TaskResumed {
                container_id,
                ..Default::default()
            };
            self.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(event))
                .await;
        }
        Ok(api::Empty::new())
    }

    /// Stops the VM if no container is left (after a failed create or the last delete).
    async fn stop_sandbox_if_unused(&self) {
        if !self.containers().is_empty() {
            return;
        }
        let sandbox = self.sandbox.lock().await.take();
        if let Some(s) = sandbox {
            s.stop().await;
        }
    }
}

async fn publish(
    publisher: &RemotePublisher,
    namespace: &str,
    topic: &str,
    event: Box<dyn MessageDyn>,
) {
    if let Err(e) = publisher
        .publish(Default::default(), topic, namespace, event)
        .await
    {
        warn!("publish {topic}: {e}");
    }
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

fn read_spec(bundle: &str) -> TtrpcResult<Value> {
    let path = Path::new(bundle).join("config.json");
    let text = std::fs::read(&path).map_err(|e| {
        status(
            ttrpc::Code::INVALID_ARGUMENT,
            format!("read {}: {e}", path.display()),
        )
    })?;
    serde_json::from_slice(&text).map_err(|e| {
        status(
            ttrpc::Code::INVALID_ARGUMENT,
            format!("{}: {e}", path.display()),
        )
    })
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

fn proc_status(p: &Process, paused: bool) -> api::Status {
    if p.exited().is_some() {
        api::Status::STOPPED
    } else if !p.is_started() {
        api::Status::CREATED
    } else if paused {
        api::Status::PAUSED
    } else {
        api::Status::RUNNING
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
        rootfs::check_id(&req.id)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        if self.containers().contains_key(&req.id) {
            return Err(status(
                ttrpc::Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id),
            ));
        }
        let spec = read_spec(&req.bundle)?;
        let (sandbox, _booted) = self.ensure_sandbox(&req, &spec).await?;
        if let Err(e) = self.create_in_vm(&sandbox, &req).await {
            rootfs::remove_container_files(&sandbox.shared_dir(), &req.id);
            self.stop_sandbox_if_unused().await;
            return Err(e);
        }
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let pid = self.pid(&sandbox);
        self.containers().insert(
            req.id.clone(),
            Container {
                bundle: PathBuf::from(&req.bundle),
                init: Process::new("", stdio, Vec::new()),
                execs: HashMap::new(),
                paused: false,
            },
        );
        info!("created container {} in pod VM {}", req.id, sandbox.id);
        let event = ev::TaskCreate {
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
        };
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event))
            .await;
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
        let proc_ = self.process(&req.id, &req.exec_id)?;
        if proc_.is_started() {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("{} {} already started", req.id, req.exec_id),
            ));
        }
        let sandbox = self.running_sandbox().await?;
        if req.exec_id.is_empty() {
            let r = container_req(&req.id);
            sandbox
                .agent
                .start_container(agent_ctx::Context::default(), &r)
                .await
                .map_err(|e| agent_error("StartContainer", &req.id, e))?;
        } else {
            let r = pb::ExecProcessRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                process: proc_.spec.clone(),
                ..Default::default()
            };
            sandbox
                .agent
                .exec_process(agent_ctx::Context::default(), &r)
                .await
                .map_err(|e| agent_error("ExecProcess", &req.id, e))?;
        }
        if let Ok(mut s) = proc_.started.lock() {
            *s = true;
        }
        self.monitor(sandbox.clone(), &req.id, proc_);
        let pid = self.pid(&sandbox);
        if req.exec_id.is_empty() {
            let event = ev::TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(event))
                .await;
        } else {
            let event = ev::TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event))
                .await;
        }
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
        let proc_ = self.process(&req.id, &req.exec_id)?;
        let sandbox = self.sandbox.lock().await.clone();
        let pid = sandbox.as_ref().map(|s| self.pid(s)).unwrap_or(0);
        if !req.exec_id.is_empty() {
            if proc_.is_started() && proc_.exited().is_none() {
                return Err(status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("exec {} is still running", req.exec_id),
                ));
            }
            if let Some(c) = self.containers().get_mut(&req.id) {
                c.execs.remove(&req.exec_id);
            }
        } else {
            if proc_.is_started() && proc_.exited().is_none() {
                return Err(status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("container {} is still running; kill it first", req.id),
                ));
            }
            if let Some(s) = sandbox.as_ref().filter(|s| !s.vmm_exited()) {
                let r = pb::RemoveContainerRequest {
                    container_id: req.id.clone(),
                    force: true,
                    ..Default::default()
                };
                if let Err(e) = s
                    .agent
                    .remove_container(agent_ctx::Context::default(), &r)
                    .await
                {
                    warn!("RemoveContainer {}: {e}", req.id);
                }
            }
            if let Some(s) = sandbox.as_ref() {
                rootfs::remove_container_files(&s.shared_dir(), &req.id);
            }
            self.containers().remove(&req.id);
        }
        let exit = proc_.exited().unwrap_or_else(|| Exit::now(0));
        if req.exec_id.is_empty() {
            let event = ev::TaskDelete {
                container_id: req.id.clone(),
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(exit.timestamp()),
                ..Default::default()
            };
            self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event))
                .await;
        }
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
        self.process(&req.id, "")?;
        let sandbox = self.running_sandbox().await?;
        let r = container_req(&req.id);
        let resp = sandbox
            .agent
            .list_processes(agent_ctx::Context::default(), &r)
            .await
            .map_err(|e| agent_error("ListProcesses", &req.id, e))?;
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
        self.set_paused(&req.id, true).await
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.set_paused(&req.id, false).await
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let proc_ = self.process(&req.id, &req.exec_id)?;
        if proc_.exited().is_some() {
            return Err(not_found(format!(
                "process {} {} (already finished)",
                req.id, req.exec_id
            )));
        }
        let sandbox = self.running_sandbox().await?;
        let r = pb::SignalProcessRequest {
            process: process_ref(&req.id, &req.exec_id),
            signal: req.signal,
            all: req.all,
            ..Default::default()
        };
        sandbox
            .agent
            .signal_process(agent_ctx::Context::default(), &r)
            .await
            .map_err(|e| agent_error("SignalProcess", &req.id, e))?;
        Ok(api::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        rootfs::check_id(&req.exec_id)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
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
        {
            let mut containers = self.containers();
            let c = containers
                .get_mut(&req.id)
                .ok_or_else(|| not_found(format!("container {}", req.id)))?;
            if c.init.exited().is_some() {
                return Err(status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("container {} is not running", req.id),
                ));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(status(
                    ttrpc::Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            c.execs
                .insert(req.exec_id.clone(), Process::new(&req.exec_id, stdio, spec));
        }
        let event = ev::TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(api::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.process(&req.id, &req.exec_id)?;
        let sandbox = self.running_sandbox().await?;
        let r = pb::TtyResizeRequest {
            process: process_ref(&req.id, &req.exec_id),
            rows: req.height,
            cols: req.width,
            ..Default::default()
        };
        sandbox
            .agent
            .tty_resize(agent_ctx::Context::default(), &r)
            .await
            .map_err(|e| agent_error("TtyResize", &req.id, e))?;
        Ok(api::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let proc_ = self.process(&req.id, &req.exec_id)?;
        if req.stdin {
            proc_.close_stdin.notify_one();
        }
        Ok(api::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        self.process(&req.id, "")?;
        let sandbox = self.running_sandbox().await?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        let r = pb::UpdateContainerRequest {
            container_id: req.id.clone(),
            resources,
            ..Default::default()
        };
        sandbox
            .agent
            .update_container(agent_ctx::Context::default(), &r)
            .await
            .map_err(|e| agent_error("UpdateContainer", &req.id, e))?;
        Ok(api::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let proc_ = self.process(&req.id, &req.exec_id)?;
        let mut rx = proc_.exit.subscribe();
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(internal)?
            .unwrap_or_else(|| Exit::now(VM_GONE_STATUS));
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
        self.process(&req.id, "")?;
        let sandbox = self.running_sandbox().await?;
        let r = container_req(&req.id);
        let s = sandbox
            .agent
            .stats_container(agent_ctx::Context::default(), &r)
            .await
            .map_err(|e| agent_error("StatsContainer", &req.id, e))?;
        let metrics = to_cgroup_v2_metrics(&s);
        let any = Any {
            type_url: "io.containerd.cgroups.v2.Metrics".to_owned(),
            value: metrics.write_to_bytes().map_err(internal)?,
            ..Default::default()
        };
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        self.process(&req.id, "")?;
        let task_pid = match self.sandbox.lock().await.as_ref() {
            Some(s) => self.pid(s),
            None => 0,
        };
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            ..Default::default()
        })
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %_req.id))]
    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        if !self.containers().is_empty() {
            return Ok(api::Empty::new());
        }
        // containerd bounds this call with a short deadline (and takes a late answer for a dead
        // shim); stopping a guest can take longer. So the teardown runs as its own task and the
        // shim exits when it is done.
        let slot = self.sandbox.clone();
        let exit = self.exit.clone();
        tokio::spawn(async move {
            let sandbox = slot.lock().await.take();
            if let Some(s) = sandbox {
                s.stop().await;
            }
            info!("last task gone: shim exits");
            exit.signal();
        });
        Ok(api::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "task", skip_all, fields(id = %req.id))]
    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let proc_ = self.process(&req.id, &req.exec_id)?;
        let (bundle, paused) = {
            let containers = self.containers();
            let c = containers
                .get(&req.id)
                .ok_or_else(|| not_found(format!("container {}", req.id)))?;
            (c.bundle.display().to_string(), c.paused)
        };
        let pid = match self.sandbox.lock().await.as_ref() {
            Some(s) => self.pid(s),
            None => 0,
        };
        let exit = proc_.exited();
        Ok(api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle,
            pid,
            status: proc_status(&proc_, paused).into(),
            stdin: proc_.stdio.stdin.clone(),
            stdout: proc_.stdio.stdout.clone(),
            stderr: proc_.stdio.stderr.clone(),
            terminal: proc_.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| e.timestamp()).into(),
            ..Default::default()
        })
    }
}

/// Maps the agent's cgroup v2 numbers onto containerd's `io.containerd.cgroups.v2.Metrics`.
fn to_cgroup_v2_metrics(s: &pb::StatsContainerResponse) -> cg2::Metrics {
    let mut m = cg2::Metrics::new();
    if let Some(p) = s.pids.as_ref() {
        m.pids = MessageField::some(cg2::PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        });
    }
    if let Some(c) = s.cpu.as_ref() {
        m.cpu = MessageField::some(cg2::CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(mem) = s.memory.as_ref() {
        m.memory = MessageField::some(cg2::MemoryStat {
            usage: mem.usage_bytes,
            usage_limit: mem.limit_bytes,
            max_usage: mem.peak_bytes,
            anon: mem.anon_bytes,
            file: mem.file_bytes,
            ..Default::default()
        });
        m.memory_events = MessageField::some(cg2::MemoryEvents {
            oom: mem.oom_events,
            oom_kill: mem.oom_kill_events,
            ..Default::default()
        });
    }
    if let Some(io) = s.io.as_ref() {
        m.io = MessageField::some(cg2::IOStat {
            usage: vec![cg2::IOEntry {
                rbytes: io.read_bytes,
                wbytes: io.write_bytes,
                rios: io.read_ios,
                wios: io.write_ios,
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    m
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
    fn stats_map_to_cgroup_v2_metrics() {
        let s = pb::StatsContainerResponse {
            pids: Some(pb::PidsStats {
                current: 3,
                limit: 10,
                ..Default::default()
            })
            .into(),
            memory: Some(pb::MemoryStats {
                usage_bytes: 4096,
                oom_kill_events: 1,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let m = to_cgroup_v2_metrics(&s);
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.pids.limit, 10);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory_events.oom_kill, 1);
        assert!(m.cpu.is_none());
    }
}
