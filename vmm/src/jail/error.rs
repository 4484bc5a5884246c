//! The jail's error type, [`JailError`], and the small adapters the set-up code uses to
//! attach what it was doing (the operation, the path) to a failed system call.

use std::io;
use std::path::{Path, PathBuf};

/// Jail set-up failures (the VMM exits with status 1 and the message).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Something started a thread before the jail: namespaces cannot be entered then.
    #[error("the jail must be set up while moat-vmm is single-threaded, but {0} threads run")]
    Threaded(usize),
    /// A path the configuration names cannot be resolved or opened.
    #[error("jail: {what} {path}: {err}")]
    Path {
        /// Which option the path comes from.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        err: io::Error,
    },
    /// A system call of the set-up failed.
    #[error("jail: {op}: {err} (confinement needs root; --no-jail runs the VMM unconfined)")]
    Sys {
        /// What was being done.
        op: String,
        /// The error.
        #[source]
        err: nix::Error,
    },
    /// The user namespace could not be created.
    #[error(
        "jail: cannot create the VMM's user namespace: {err} (user namespaces may be disabled: \
         user.max_user_namespaces, or an LSM policy; --no-userns keeps the VMM in the caller's \
         user namespace, see docs/security.md)"
    )]
    UserNs {
        /// The error of `unshare(CLONE_NEWUSER)`.
        #[source]
        err: nix::Error,
    },
    /// The supervisor could not write the user namespace's uid/gid maps (it says why).
    #[error("jail: the supervisor did not map the VMM's user namespace")]
    UserNsNotMapped,
    /// Changing the capability sets failed.
    #[error("jail: {op}: {err}")]
    Caps {
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        err: caps::errors::CapsError,
    },
    /// A file operation while building the new root failed.
    #[error("jail: {op} {path}: {err}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        err: io::Error,
    },
}

/// Maps a failed `nix` call to [`JailError::Sys`] naming `op`.
pub(super) fn sys(op: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let op = op.into();
    move |err| JailError::Sys { op, err }
}

/// Maps a failed `caps` call to [`JailError::Caps`] naming `op`.
pub(super) fn caps_err(op: &'static str) -> impl FnOnce(caps::errors::CapsError) -> JailError {
    move |err| JailError::Caps { op, err }
}

/// Maps a failed file operation `op` on `path` to [`JailError::Io`].
pub(super) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JailError {
    let path = path.to_owned();
    move |err| JailError::Io { op, path, err }
}
