//! The crate-level error of agent operations ([`AgentError`]) and its mapping onto ttrpc
//! status codes ([`AgentError::code`]).
//!
//! Each module keeps the error of its own concern (`CgroupError` in `cgroup`, `SpecError` in
//! `spec`, `NetConfError` in `netconf`, …); [`AgentError`] wraps them with `#[from]`, so an
//! operation propagates them with `?` and the server sees one type. Variants that describe the
//! request itself (`NotFound`, `AlreadyExists`, `InvalidArgument`, `FailedPrecondition`) carry
//! the message the client gets.

use moat_protocol::ttrpc::Code;

use crate::cgroup::CgroupError;
use crate::netconf::NetConfError;
use crate::seccomp::SeccompError;
use crate::spawn::SpawnError;
use crate::spec::SpecError;
use crate::stdio::StdioError;

/// Errors of agent operations; the server maps them onto ttrpc codes with [`AgentError::code`].
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
    /// A signal for a process that has already exited (and been reaped). NOT_FOUND, as
    /// containerd's runc shim answers (`errdefs.ErrNotFound`): containerd treats a Kill
    /// answered NOT_FOUND as done, which is what a StopContainer racing the exit needs.
    #[error("process {0} already finished")]
    ProcessFinished(i32),
    /// `UpdateContainer`'s resources are not OCI `LinuxResources` JSON.
    #[error("invalid request: resources JSON: {0}")]
    ResourcesJson(#[source] serde_json::Error),
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
    /// The sandbox's network configuration was refused or could not be applied.
    #[error("{prefix}{0}", prefix = if .0.is_request_error() { "invalid request: " } else { "" })]
    NetConf(#[from] NetConfError),
    /// Container setup failed.
    #[error("container setup: {0}")]
    Spawn(#[from] SpawnError),
    /// CPUs or memory could not be brought online.
    #[error("bringing resources online: {0}")]
    Resources(#[from] crate::resources::ResourcesError),
    /// A blocking setup task (run off the runtime with `spawn_blocking`) panicked or was
    /// cancelled.
    #[error("{what}: {source}")]
    Task {
        /// Which task.
        what: &'static str,
        /// Why it did not finish.
        #[source]
        source: tokio::task::JoinError,
    },
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

/// Result of agent operations.
pub type Result<T> = std::result::Result<T, AgentError>;

impl AgentError {
    /// The ttrpc status code the client gets for this error.
    pub fn code(&self) -> Code {
        match self {
            AgentError::NotFound(_) | AgentError::ProcessFinished(_) => Code::NOT_FOUND,
            AgentError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            AgentError::InvalidArgument(_)
            | AgentError::ResourcesJson(_)
            | AgentError::Spec(_)
            | AgentError::Seccomp(_) => Code::INVALID_ARGUMENT,
            // The VM lacks a device the shim gave it, or netlink failed: a setup problem, not
            // a missing object of the agent's (NOT_FOUND would also read "… not found" twice).
            AgentError::NetConf(e) if e.is_request_error() => Code::INVALID_ARGUMENT,
            AgentError::NetConf(_) => Code::FAILED_PRECONDITION,
            AgentError::FailedPrecondition(_) | AgentError::Task { .. } => {
                Code::FAILED_PRECONDITION
            }
            AgentError::Cgroup(CgroupError::Disabled(_))
            | AgentError::Cgroup(CgroupError::NoController { .. }) => Code::FAILED_PRECONDITION,
            AgentError::Cgroup(CgroupError::Io { .. })
            | AgentError::Stdio(_)
            | AgentError::Spawn(_)
            | AgentError::Resources(_)
            | AgentError::Sys { .. }
            | AgentError::Io { .. } => Code::INTERNAL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_protocol::net::Mac;

    #[test]
    fn netconf_errors_map_to_rpc_codes() {
        let nf = NetConfError::MacNotFound {
            mac: Mac([2, 0, 0, 0, 0, 1]),
            name: "eth0".into(),
            present: "lo".into(),
        };
        let e = AgentError::from(nf);
        assert_eq!(e.code(), Code::FAILED_PRECONDITION);
        assert!(e.to_string().contains("02:00:00:00:00:01"), "{e}");
        assert!(!e.to_string().starts_with("invalid request"), "{e}");
        let inv = AgentError::from(NetConfError::Invalid("x".into()));
        assert_eq!(inv.code(), Code::INVALID_ARGUMENT);
        assert_eq!(inv.to_string(), "invalid request: network configuration: x");
    }

    #[test]
    fn request_errors_map_to_their_codes() {
        assert_eq!(AgentError::NotFound("c".into()).code(), Code::NOT_FOUND);
        let gone = AgentError::ProcessFinished(42);
        assert_eq!(gone.code(), Code::NOT_FOUND);
        assert_eq!(gone.to_string(), "process 42 already finished");
        assert_eq!(
            AgentError::AlreadyExists("c".into()).code(),
            Code::ALREADY_EXISTS
        );
        let json = serde_json::from_str::<u32>("x").unwrap_err();
        let e = AgentError::ResourcesJson(json);
        assert_eq!(e.code(), Code::INVALID_ARGUMENT);
        assert!(
            e.to_string()
                .starts_with("invalid request: resources JSON: "),
            "{e}"
        );
        assert_eq!(
            AgentError::from(CgroupError::Disabled("stats")).code(),
            Code::FAILED_PRECONDITION
        );
    }
}
