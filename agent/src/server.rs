//! The ttrpc `Agent` service: decodes requests, calls [`Agent`], and maps
//! errors onto ttrpc status codes.

use std::sync::Arc;

use async_trait::async_trait;
use moat_protocol::agent as pb;
use moat_protocol::agent_ttrpc_async as svc;
use moat_protocol::{protobuf, ttrpc};
use ttrpc::r#async::TtrpcContext;
use ttrpc::{Code, Error as TtrpcError};

use crate::agent::Agent;
use crate::error::AgentError;
use crate::stdio::{ProcessIo, Stream};

/// The service object.
pub struct Service {
    agent: Arc<Agent>,
    /// Told when DestroySandbox asked for a power-off.
    poweroff: tokio::sync::mpsc::UnboundedSender<()>,
}

impl Service {
    /// Wraps the agent state.
    pub fn new(agent: Arc<Agent>, poweroff: tokio::sync::mpsc::UnboundedSender<()>) -> Self {
        Self { agent, poweroff }
    }
}

impl Service {
    /// One read of a process's stdout or stderr (`pick`); empty data means end of stream.
    async fn read_stream(
        &self,
        req: &pb::ReadStreamRequest,
        pick: impl FnOnce(&ProcessIo) -> &tokio::sync::Mutex<Option<Arc<Stream>>>,
    ) -> R<pb::ReadStreamResponse> {
        let p = self.agent.process(&pref(&req.process)?).map_err(status)?;
        let guard = pick(&p.io).lock().await;
        let mut r = pb::ReadStreamResponse::new();
        if let Some(s) = guard.as_ref() {
            r.data = s
                .read(req.max_len as usize)
                .await
                .map_err(|e| status(e.into()))?;
        }
        Ok(r)
    }
}

/// The ttrpc status for `e` (code from [`AgentError::code`], message its text); logged.
fn status(e: AgentError) -> TtrpcError {
    tracing::warn!("request failed: {e}");
    TtrpcError::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
}

type R<T> = ttrpc::Result<T>;

fn pref(p: &protobuf::MessageField<pb::ProcessRef>) -> R<pb::ProcessRef> {
    p.as_ref().cloned().ok_or_else(|| {
        TtrpcError::RpcStatus(ttrpc::get_status(
            Code::INVALID_ARGUMENT,
            "process reference missing",
        ))
    })
}

#[async_trait]
impl svc::Agent for Service {
    async fn version(&self, _: &TtrpcContext, _: pb::VersionRequest) -> R<pb::VersionResponse> {
        let mut r = pb::VersionResponse::new();
        r.agent_version = env!("CARGO_PKG_VERSION").into();
        r.protocol_version = moat_protocol::PROTOCOL_VERSION;
        Ok(r)
    }

    async fn health(&self, _: &TtrpcContext, _: pb::HealthRequest) -> R<pb::HealthResponse> {
        let mut r = pb::HealthResponse::new();
        r.status = pb::health_response::Status::SERVING.into();
        Ok(r)
    }

    async fn get_guest_details(
        &self,
        _: &TtrpcContext,
        _: pb::GuestDetailsRequest,
    ) -> R<pb::GuestDetailsResponse> {
        Ok(self.agent.guest_details())
    }

    #[tracing::instrument(level = "info", name = "rpc", skip_all, fields(sandbox = %req.sandbox_id))]
    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        req: pb::CreateSandboxRequest,
    ) -> R<pb::Empty> {
        self.agent.create_sandbox(req).await.map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn destroy_sandbox(
        &self,
        _: &TtrpcContext,
        req: pb::DestroySandboxRequest,
    ) -> R<pb::Empty> {
        self.agent.destroy_sandbox().await.map_err(status)?;
        if req.power_off && self.agent.is_init() {
            let _ = self.poweroff.send(());
        }
        Ok(pb::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "rpc", skip_all, fields(container = %req.container_id))]
    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: pb::CreateContainerRequest,
    ) -> R<pb::Empty> {
        self.agent.create_container(req).await.map_err(status)?;
        Ok(pb::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "rpc", skip_all, fields(container = %req.container_id))]
    async fn start_container(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::Empty> {
        self.agent
            .start_container(&req.container_id)
            .await
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "rpc", skip_all, fields(container = %req.container_id))]
    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: pb::RemoveContainerRequest,
    ) -> R<pb::Empty> {
        self.agent
            .remove_container(&req.container_id, req.force)
            .await
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "rpc", skip_all, fields(container = %req.container_id))]
    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: pb::UpdateContainerRequest,
    ) -> R<pb::Empty> {
        self.agent
            .update(&req.container_id, &req.resources)
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> R<pb::StatsContainerResponse> {
        self.agent.stats(&req.container_id).map_err(status)
    }

    #[tracing::instrument(level = "info", name = "rpc", skip_all, fields(container = %req.container_id))]
    async fn pause_container(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::Empty> {
        self.agent
            .pause(&req.container_id, true)
            .await
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "rpc", skip_all, fields(container = %req.container_id))]
    async fn resume_container(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::Empty> {
        self.agent
            .pause(&req.container_id, false)
            .await
            .map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> R<pb::ListProcessesResponse> {
        let mut r = pb::ListProcessesResponse::new();
        r.pids = self
            .agent
            .list_processes(&req.container_id)
            .map_err(status)?;
        Ok(r)
    }

    #[tracing::instrument(level = "info", name = "rpc", skip_all, fields(container = %req.container_id, exec = %req.exec_id))]
    async fn exec_process(&self, _: &TtrpcContext, req: pb::ExecProcessRequest) -> R<pb::Empty> {
        self.agent.exec_process(req).await.map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: pb::SignalProcessRequest,
    ) -> R<pb::Empty> {
        let p = pref(&req.process)?;
        self.agent.signal(&p, req.signal, req.all).map_err(status)?;
        Ok(pb::Empty::new())
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: pb::WaitProcessRequest,
    ) -> R<pb::WaitProcessResponse> {
        let p = pref(&req.process)?;
        let e = self.agent.wait(&p).await.map_err(status)?;
        let mut r = pb::WaitProcessResponse::new();
        r.exit_status = e.status;
        r.exited_at_ns = e.at_ns;
        Ok(r)
    }

    async fn write_stdin(
        &self,
        _: &TtrpcContext,
        req: pb::WriteStdinRequest,
    ) -> R<pb::WriteStdinResponse> {
        let p = self.agent.process(&pref(&req.process)?).map_err(status)?;
        let stream = p.io.stdin.lock().await.clone();
        let stream = stream.ok_or_else(|| status(crate::stdio::StdioError::Closed.into()))?;
        let mut r = pb::WriteStdinResponse::new();
        r.written = stream
            .write(&req.data)
            .await
            .map_err(|e| status(e.into()))? as u32;
        Ok(r)
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: pb::CloseStdinRequest) -> R<pb::Empty> {
        let p = self.agent.process(&pref(&req.process)?).map_err(status)?;
        let taken = p.io.stdin.lock().await.take();
        if let (Some(s), Some(_)) = (taken, p.io.tty.as_ref()) {
            // A terminal has no half-close: send EOF (^D) to the line discipline.
            s.write(&[4]).await.map_err(|e| status(e.into()))?;
        }
        Ok(pb::Empty::new())
    }

    async fn read_stdout(
        &self,
        _: &TtrpcContext,
        req: pb::ReadStreamRequest,
    ) -> R<pb::ReadStreamResponse> {
        self.read_stream(&req, |io| &io.stdout).await
    }

    async fn read_stderr(
        &self,
        _: &TtrpcContext,
        req: pb::ReadStreamRequest,
    ) -> R<pb::ReadStreamResponse> {
        self.read_stream(&req, |io| &io.stderr).await
    }

    async fn tty_resize(&self, _: &TtrpcContext, req: pb::TtyResizeRequest) -> R<pb::Empty> {
        let p = self.agent.process(&pref(&req.process)?).map_err(status)?;
        let tty = p.io.tty.as_ref().ok_or_else(|| {
            status(AgentError::FailedPrecondition(
                "process has no terminal".into(),
            ))
        })?;
        let rows = u16::try_from(req.rows)
            .map_err(|_| status(AgentError::InvalidArgument("rows".into())))?;
        let cols = u16::try_from(req.cols)
            .map_err(|_| status(AgentError::InvalidArgument("cols".into())))?;
        tty.resize(rows, cols).map_err(|e| status(e.into()))?;
        Ok(pb::Empty::new())
    }

    #[tracing::instrument(level = "info", name = "rpc", skip_all, fields(vcpus = req.vcpus))]
    async fn online_resources(
        &self,
        _: &TtrpcContext,
        req: pb::OnlineResourcesRequest,
    ) -> R<pb::OnlineResourcesResponse> {
        // Bringing a CPU up takes a while: off the runtime's threads.
        let done = tokio::task::spawn_blocking(move || {
            let root = std::path::Path::new("/");
            let onlined = crate::resources::online_memory(root)?;
            let cpus = crate::resources::set_online_cpus(root, req.vcpus)?;
            Ok::<_, crate::resources::ResourcesError>((
                onlined,
                cpus,
                crate::resources::mem_total_bytes(root),
            ))
        })
        .await
        .map_err(|source| {
            status(AgentError::Task {
                what: "online resources",
                source,
            })
        })?;
        let (onlined, cpus, mem) = done.map_err(|e| status(e.into()))?;
        tracing::info!(
            "{cpus} CPUs online, MemTotal {} MiB ({onlined} memory blocks onlined)",
            mem >> 20
        );
        let mut r = pb::OnlineResourcesResponse::new();
        r.online_cpus = cpus;
        r.mem_total_bytes = mem;
        Ok(r)
    }

    async fn list_listening_ports(
        &self,
        _: &TtrpcContext,
        _: pb::ListListeningPortsRequest,
    ) -> R<pb::ListListeningPortsResponse> {
        let pid = self
            .agent
            .sandbox_netns_pid()
            .await
            .ok_or_else(|| status(AgentError::FailedPrecondition("no sandbox".into())))?;
        let mut r = pb::ListListeningPortsResponse::new();
        r.ports = crate::portforward::listening_ports(pid)
            .map_err(status)?
            .into_iter()
            .map(u32::from)
            .collect();
        Ok(r)
    }

    async fn get_oom_event(&self, _: &TtrpcContext, _: pb::GetOomEventRequest) -> R<pb::OomEvent> {
        let id = self.agent.next_oom().await.map_err(status)?;
        let mut r = pb::OomEvent::new();
        r.container_id = id;
        Ok(r)
    }
}
