//! `moat-protocol`: the wire protocol shared by the shim (host side) and the
//! agent (guest side).
//!
//! The protocol is protobuf over [ttrpc](https://github.com/containerd/ttrpc),
//! defined in `proto/agent.proto` (package `moat.agent.v1`, service `Agent`)
//! and compiled by `build.rs` with the pure-Rust parser. This crate exposes:
//!
//! * [`agent`]: the message types;
//! * [`agent_ttrpc`]: the blocking client ([`agent_ttrpc::AgentClient`]) and
//!   server glue ([`agent_ttrpc::create_agent`]);
//! * [`agent_ttrpc_async`]: the same for tokio;
//! * [`connect`]: helpers that open a client over a plain Unix socket or over
//!   a VMM's hybrid-vsock Unix socket (`CONNECT <port>\n` → `OK <n>\n`);
//! * [`net`]: the text forms of MAC addresses and IP prefixes used in
//!   `CreateSandboxRequest`.
//!
//! The ttrpc version is the one `containerd-shim-protos` uses, so the shim
//! links a single ttrpc.

/// Message types generated from `proto/agent.proto`.
#[allow(warnings, clippy::all)] // generated code
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/sync/agent.rs"));
}

/// Blocking ttrpc client and server glue for the `Agent` service.
#[allow(warnings, clippy::all)] // generated code
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/sync/agent_ttrpc.rs"));
}

/// Asynchronous (tokio) ttrpc client and server glue for the `Agent` service.
#[allow(warnings, clippy::all)] // generated code
pub mod agent_ttrpc_async {
    include!(concat!(env!("OUT_DIR"), "/async/agent_ttrpc.rs"));
}

pub mod connect;
pub mod net;

pub use protobuf;
pub use ttrpc;

/// Version of the wire protocol spoken by this crate. Bumped on any
/// incompatible change; reported by `Agent.Version`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The guest vsock port the agent serves on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The guest vsock port of the agent's port-forward relay: the shim sends one line,
/// `PORT <n>\n` (at most [`FORWARD_HEADER_MAX`] bytes), the agent connects to `127.0.0.1:<n>`
/// (then `[::1]:<n>`) in the sandbox's network namespace and answers `OK\n`, after which the
/// stream carries the TCP connection's bytes both ways; or it answers `ERR <reason>\n` and
/// closes.
pub const FORWARD_VSOCK_PORT: u32 = 1025;

/// The longest header or reply line of the port-forward relay, newline included.
pub const FORWARD_HEADER_MAX: usize = 128;

/// The agent's state directory in the guest (a tmpfs the agent mounts at start).
pub const GUEST_STATE_DIR: &str = "/run/moat";

/// Where the agent mounts each virtio-fs share in the guest: `GUEST_VIRTIOFS_ROOT/<tag>`.
pub const GUEST_VIRTIOFS_ROOT: &str = "/run/moat/virtiofs";

/// The virtio-fs tag of the pod's shared directory (container rootfs and volumes).
pub const SHARED_FS_TAG: &str = "moatfs";

/// The guest path of `rel` inside the pod's shared directory (`SHARED_FS_TAG`).
pub fn guest_shared_path(rel: &str) -> String {
    format!("{GUEST_VIRTIOFS_ROOT}/{SHARED_FS_TAG}/{rel}")
}

/// Fully qualified ttrpc service name (for logs and diagnostics).
pub const SERVICE_NAME: &str = "moat.agent.v1.Agent";

/// The agent speaks a different protocol version than this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("agent {agent_version} speaks protocol {theirs}, this side speaks {PROTOCOL_VERSION}: rebuild the guest image and the shim from the same tree")]
pub struct VersionMismatch {
    /// The agent's binary version.
    pub agent_version: String,
    /// The agent's protocol version.
    pub theirs: u32,
}

/// Checks an `Agent.Version` answer against [`PROTOCOL_VERSION`].
pub fn ensure_compatible(v: &agent::VersionResponse) -> Result<(), VersionMismatch> {
    if v.protocol_version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(VersionMismatch {
            agent_version: v.agent_version.clone(),
            theirs: v.protocol_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_check() {
        let mut v = agent::VersionResponse::new();
        v.agent_version = "0.1.0".into();
        v.protocol_version = PROTOCOL_VERSION;
        assert!(ensure_compatible(&v).is_ok());
        v.protocol_version = PROTOCOL_VERSION + 1;
        let e = ensure_compatible(&v).unwrap_err();
        assert!(e.to_string().contains("rebuild"), "{e}");
    }

    #[test]
    fn guest_paths_nest_under_the_agent_state_dir() {
        assert!(GUEST_VIRTIOFS_ROOT.starts_with(GUEST_STATE_DIR));
        assert_eq!(
            guest_shared_path("c1/rootfs"),
            format!("{GUEST_STATE_DIR}/virtiofs/{SHARED_FS_TAG}/c1/rootfs")
        );
    }
}
