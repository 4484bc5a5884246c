//! The Task service's errors and their mapping onto ttrpc status codes, in one place: every Task
//! RPC fails with a [`TaskError`], which becomes the `ttrpc::Error` containerd sees (and maps to
//! its own errdefs: `NOT_FOUND`, `ALREADY_EXISTS`, `FAILED_PRECONDITION`, …).

use containerd_shim_protos::ttrpc::{self, Code};
use moat_protocol::protobuf::Enum;

use crate::config::ConfigError;
use crate::namespaces::NamespaceError;
use crate::network::NetworkError;
use crate::rootfs::RootfsError;
use crate::sandbox::SandboxError;

/// Why a pod VM could not be launched.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The moat configuration is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The pod asks for a larger VM than allowed.
    #[error(transparent)]
    Sizing(#[from] crate::sizing::SizingError),
    /// moat-vmm or the guest agent failed to come up.
    #[error(transparent)]
    Boot(#[from] SandboxError),
    /// Another pod backend failed.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// A failed Task API call.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// No such container or process (the text names it).
    #[error("{0} not found")]
    NotFound(String),
    /// The container or exec (named by the text) exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// `Start` of a process that was started before.
    #[error("{id} {exec_id} already started")]
    AlreadyStarted {
        /// The container.
        id: String,
        /// The exec (empty: the container's init).
        exec_id: String,
    },
    /// The process must have exited for this call (the text says which and what to do).
    #[error("{0}")]
    StillRunning(String),
    /// `Exec` into a container whose init has exited.
    #[error("container {0} is not running")]
    NotRunning(String),
    /// A call that needs the pod VM while none runs.
    #[error("the pod VM is not running")]
    PodNotRunning,
    /// A `Create` after the pod VM died.
    #[error("the pod VM has exited; delete the pod and create it again")]
    PodExited,
    /// A container or exec id that cannot name a directory.
    #[error(transparent)]
    BadId(RootfsError),
    /// The bundle's `config.json` cannot be read.
    #[error("read {path}: {source}")]
    ReadSpec {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The bundle's `config.json` is not JSON.
    #[error("{path}: {source}")]
    ParseSpec {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
    /// The spec names an unusable network namespace.
    #[error(transparent)]
    Netns(#[from] NetworkError),
    /// The spec asks for what a VM pod cannot do (the host's namespaces, propagation back to
    /// the host), or for a pid namespace that is not the pod's.
    #[error(transparent)]
    VmLimit(#[from] NamespaceError),
    /// The pod VM could not be launched.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// The container's rootfs could not be mounted into the shared directory.
    #[error(transparent)]
    Rootfs(RootfsError),
    /// The spec could not be rewritten for the agent (bad JSON, a bind source that is missing).
    #[error(transparent)]
    GuestSpec(RootfsError),
    /// An agent call failed.
    #[error("{call} {id}: {}", agent_detail(source))]
    Agent {
        /// The agent RPC.
        call: &'static str,
        /// The container it was for.
        id: String,
        /// The agent's status, or why it could not be reached.
        #[source]
        source: moat_protocol::ttrpc::Error,
    },
    /// The pod's VM could not grow to what a container asks for.
    #[error(transparent)]
    Grow(#[from] crate::resources::GrowError),
    /// The metrics could not be encoded.
    #[error(transparent)]
    Metrics(#[from] containerd_shim_protos::protobuf::Error),
    /// The exit monitor of a process went away without an exit.
    #[error(transparent)]
    ExitLost(#[from] tokio::sync::watch::error::RecvError),
}

/// The message of an agent call error: the agent's own message, or why it was unreachable.
fn agent_detail(e: &moat_protocol::ttrpc::Error) -> String {
    match e {
        moat_protocol::ttrpc::Error::RpcStatus(s) => s.message.clone(),
        e => format!("agent unreachable: {e}"),
    }
}

impl TaskError {
    /// Wraps a failed agent call `call` made for container `id`.
    pub fn agent(call: &'static str, id: &str) -> impl FnOnce(moat_protocol::ttrpc::Error) -> Self {
        let id = id.to_owned();
        move |source| Self::Agent { call, id, source }
    }

    /// The ttrpc status code containerd gets for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::NotFound(_) => Code::NOT_FOUND,
            Self::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Self::AlreadyStarted { .. }
            | Self::StillRunning(_)
            | Self::NotRunning(_)
            | Self::PodNotRunning
            | Self::PodExited => Code::FAILED_PRECONDITION,
            Self::BadId(_)
            | Self::ReadSpec { .. }
            | Self::ParseSpec { .. }
            | Self::Netns(_)
            | Self::VmLimit(_)
            | Self::GuestSpec(_)
            | Self::Launch(LaunchError::Config(_))
            | Self::Grow(crate::resources::GrowError::Sizing(_))
            | Self::Grow(crate::resources::GrowError::NoMemoryRoom { .. })
            | Self::Grow(crate::resources::GrowError::NoCpuRoom { .. }) => Code::INVALID_ARGUMENT,
            Self::Grow(_) => Code::INTERNAL,
            // Keep the agent's status code (NOT_FOUND, INVALID_ARGUMENT, …) so containerd maps
            // it right; an agent that cannot be reached is UNAVAILABLE.
            Self::Agent { source, .. } => match source {
                moat_protocol::ttrpc::Error::RpcStatus(s) => {
                    Code::from_i32(s.code.value()).unwrap_or(Code::INTERNAL)
                }
                _ => Code::UNAVAILABLE,
            },
            Self::Launch(_) | Self::Rootfs(_) | Self::Metrics(_) | Self::ExitLost(_) => {
                Code::INTERNAL
            }
        }
    }
}

impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_status_codes_are_kept_and_unreachable_is_unavailable() {
        let status = moat_protocol::ttrpc::get_status(
            moat_protocol::ttrpc::Code::NOT_FOUND,
            "no such container".to_owned(),
        );
        let e = TaskError::agent("StartContainer", "c1")(moat_protocol::ttrpc::Error::RpcStatus(
            status,
        ));
        assert_eq!(e.code(), Code::NOT_FOUND);
        assert_eq!(e.to_string(), "StartContainer c1: no such container");
        let e = TaskError::agent("StartContainer", "c1")(moat_protocol::ttrpc::Error::LocalClosed);
        assert_eq!(e.code(), Code::UNAVAILABLE);
        assert!(e
            .to_string()
            .starts_with("StartContainer c1: agent unreachable"));
        assert_eq!(
            TaskError::NotFound("container c9".into()).to_string(),
            "container c9 not found"
        );
    }
}
