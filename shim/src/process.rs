//! The shim's view of the pod's containers and processes: the registry (a container's init and
//! execs, its bundle, paused or not), each process's state (created, running, stopped, exit
//! status and time) and the exit monitor that follows a started process — relaying its stdio
//! ([`crate::io`]), waiting for its exit in the agent (or for the VM to die under it) and
//! reporting it (`/tasks/exit`) only after its output has drained.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use containerd_shim::util::timestamp;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::topics;
use moat_protocol::agent as pb;
use moat_protocol::ttrpc::context;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::error::TaskError;
use crate::events::EventSender;
use crate::io::{self, Stdio};
use crate::pod::PodVm;

/// How long a process's output may keep flowing after it exited before its exit is reported.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// Exit status reported when the VM died under a process.
pub const VM_GONE_STATUS: u32 = 255;

/// How and when a process ended.
#[derive(Clone, Copy, Debug)]
pub struct Exit {
    /// The exit status (128 + signal for a killed process).
    pub status: u32,
    at_seconds: i64,
    at_nanos: i32,
}

impl Exit {
    /// An exit with `status`, now.
    pub fn now(status: u32) -> Self {
        let ts = timestamp().unwrap_or_default();
        Self {
            status,
            at_seconds: ts.seconds,
            at_nanos: ts.nanos,
        }
    }

    /// When it happened.
    pub fn timestamp(&self) -> Timestamp {
        Timestamp {
            seconds: self.at_seconds,
            nanos: self.at_nanos,
            ..Default::default()
        }
    }
}

/// One process: a container's init (`exec_id` empty) or an exec.
pub struct Process {
    exec_id: String,
    stdio: Stdio,
    /// For execs: the OCI process JSON.
    spec: Vec<u8>,
    started: Mutex<bool>,
    exit: watch::Sender<Option<Exit>>,
    close_stdin: Arc<Notify>,
}

impl Process {
    /// A created, not yet started process with containerd's FIFOs `stdio`; `spec` is an exec's
    /// OCI process JSON (empty for a container's init).
    pub fn new(exec_id: &str, stdio: Stdio, spec: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            exec_id: exec_id.to_owned(),
            stdio,
            spec,
            started: Mutex::new(false),
            exit: watch::channel(None).0,
            close_stdin: Arc::new(Notify::new()),
        })
    }

    /// The exec id (empty for a container's init).
    pub fn exec_id(&self) -> &str {
        &self.exec_id
    }

    /// containerd's FIFOs of the process.
    pub fn stdio(&self) -> &Stdio {
        &self.stdio
    }

    /// An exec's OCI process JSON.
    pub fn spec(&self) -> &[u8] {
        &self.spec
    }

    /// The exit, once the process has ended and its output has drained.
    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// True once the agent has started the process.
    pub fn is_started(&self) -> bool {
        *self.started.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_started(&self) {
        *self.started.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }

    /// Waits for the exit.
    pub async fn wait(&self) -> Result<Exit, TaskError> {
        let mut rx = self.exit.subscribe();
        let exit = rx.wait_for(Option::is_some).await?;
        Ok(exit.unwrap_or_else(|| Exit::now(VM_GONE_STATUS)))
    }

    /// Closes stdin once what containerd already wrote has been forwarded (`CloseIO`).
    pub fn close_stdin(&self) {
        self.close_stdin.notify_one();
    }

    /// The status containerd shows for the process.
    pub fn status(&self, paused: bool) -> api::Status {
        if self.exited().is_some() {
            api::Status::STOPPED
        } else if !self.is_started() {
            api::Status::CREATED
        } else if paused {
            api::Status::PAUSED
        } else {
            api::Status::RUNNING
        }
    }
}

/// A container of the pod.
pub struct Container {
    /// Its bundle directory.
    pub bundle: PathBuf,
    /// Its init process.
    pub init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
    paused: bool,
}

impl Container {
    /// A created container with init process `init`.
    pub fn new(bundle: PathBuf, init: Arc<Process>) -> Self {
        Self {
            bundle,
            init,
            execs: HashMap::new(),
            paused: false,
        }
    }
}

/// The containers of the pod, by id.
#[derive(Default)]
pub struct Registry {
    containers: Mutex<HashMap<String, Container>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True if container `id` exists.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// True when no container is left.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Adds container `id`.
    pub fn insert(&self, id: &str, container: Container) {
        self.lock().insert(id.to_owned(), container);
    }

    /// Forgets container `id` and its execs.
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// The process named by (container, exec id).
    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, TaskError> {
        let containers = self.lock();
        let c = containers
            .get(id)
            .ok_or_else(|| TaskError::NotFound(format!("container {id}")))?;
        if exec_id.is_empty() {
            Ok(c.init.clone())
        } else {
            c.execs
                .get(exec_id)
                .cloned()
                .ok_or_else(|| TaskError::NotFound(format!("exec {exec_id} of container {id}")))
        }
    }

    /// Registers a new exec of a running container.
    pub fn add_exec(&self, id: &str, process: Arc<Process>) -> Result<(), TaskError> {
        let mut containers = self.lock();
        let c = containers
            .get_mut(id)
            .ok_or_else(|| TaskError::NotFound(format!("container {id}")))?;
        if c.init.exited().is_some() {
            return Err(TaskError::NotRunning(id.to_owned()));
        }
        if c.execs.contains_key(process.exec_id()) {
            return Err(TaskError::AlreadyExists(format!(
                "exec {}",
                process.exec_id()
            )));
        }
        c.execs.insert(process.exec_id().to_owned(), process);
        Ok(())
    }

    /// Forgets an exec.
    pub fn remove_exec(&self, id: &str, exec_id: &str) {
        if let Some(c) = self.lock().get_mut(id) {
            c.execs.remove(exec_id);
        }
    }

    /// Records whether container `id` is paused.
    pub fn set_paused(&self, id: &str, paused: bool) {
        if let Some(c) = self.lock().get_mut(id) {
            c.paused = paused;
        }
    }

    /// Container `id`'s bundle and whether it is paused.
    pub fn bundle_and_paused(&self, id: &str) -> Result<(PathBuf, bool), TaskError> {
        let containers = self.lock();
        let c = containers
            .get(id)
            .ok_or_else(|| TaskError::NotFound(format!("container {id}")))?;
        Ok((c.bundle.clone(), c.paused))
    }
}

/// Marks `process` (of container `id`) started, queues its start event (`TaskStart` or
/// `TaskExecStarted`, with the pod's `pid`), then relays its stdio and monitors its exit: the
/// exit event is queued after the start event, and before any caller of [`Process::wait`] or
/// [`Process::exited`] sees the exit.
pub fn started(vm: Arc<dyn PodVm>, id: &str, process: Arc<Process>, events: EventSender, pid: u32) {
    process.mark_started();
    if process.exec_id.is_empty() {
        events.send(
            topics::TASK_START_EVENT_TOPIC,
            ev::TaskStart {
                container_id: id.to_owned(),
                pid,
                ..Default::default()
            },
        );
    } else {
        events.send(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            ev::TaskExecStarted {
                container_id: id.to_owned(),
                exec_id: process.exec_id.clone(),
                pid,
                ..Default::default()
            },
        );
    }
    let pref = pb::ProcessRef {
        container_id: id.to_owned(),
        exec_id: process.exec_id.clone(),
        ..Default::default()
    };
    let relays = io::start(
        vm.agent(),
        &pref,
        &process.stdio,
        process.close_stdin.clone(),
    );
    let id = id.to_owned();
    tokio::spawn(async move {
        let exec_id = process.exec_id.clone();
        let req = pb::WaitProcessRequest {
            process: Some(pref).into(),
            ..Default::default()
        };
        let code = tokio::select! {
            res = vm.agent().wait_process(context::Context::default(), &req) => match res {
                Ok(r) => r.exit_status as u32,
                Err(e) => {
                    warn!("wait for {id}/{exec_id}: {e}");
                    VM_GONE_STATUS
                }
            },
            _ = vm.wait_exited() => {
                warn!("the pod VM exited while {id}/{exec_id} ran");
                VM_GONE_STATUS
            }
        };
        // Output still in flight comes through the VM: once the VM is gone there is none.
        tokio::select! {
            drained = relays.drain_or_cut(DRAIN_LIMIT) => if !drained {
                warn!(
                    "output of {id}/{exec_id} still flowing {DRAIN_LIMIT:?} after exit; \
                     closing it and reporting exit"
                );
            },
            _ = vm.wait_exited() => {}
        }
        // Nothing reads stdin any more: end its relay (also one still waiting for a writer).
        process.close_stdin.notify_one();
        let exit = Exit::now(code);
        info!("{id}/{exec_id} exited with {code}");
        // Queued before the exit becomes visible: a Delete prompted by it comes after.
        events.send(
            topics::TASK_EXIT_EVENT_TOPIC,
            ev::TaskExit {
                container_id: id.clone(),
                id: if exec_id.is_empty() {
                    id.clone()
                } else {
                    exec_id
                },
                pid,
                exit_status: code,
                exited_at: MessageField::some(exit.timestamp()),
                ..Default::default()
            },
        );
        process.exit.send_replace(Some(exit));
    });
}
