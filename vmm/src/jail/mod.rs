//! The VMM's confinement (the "jail"), on unless `--no-jail`: set up at the top of `main`,
//! while the process is still single-threaded, before any device or guest memory exists.
//!
//! [`enter`] splits the process in two:
//! - the **supervisor** (the pid the caller started) stays in the caller's namespaces; it
//!   forwards SIGTERM/SIGINT/SIGHUP to the VMM, waits for it and exits with its status (a VMM
//!   killed by signal N: 128 + N), then undoes what it did to the host mount table;
//! - the **VMM** is PID 1 of a new pid namespace, in new mount, IPC and UTS namespaces, dies
//!   with the supervisor (`PR_SET_PDEATHSIG`), and sees a root file system that is a read-only
//!   tmpfs holding only the paths its configuration names, bind-mounted at the same absolute
//!   paths (files read-only where the VM only reads them), `/dev/kvm`, `/dev/null`,
//!   `/dev/urandom` (and `/dev/net/tun` with `--net`) and a `/proc` limited to processes. It runs
//!   with rlimits on fds, address space and core dumps, an empty capability bounding set, no
//!   ambient capabilities, `no_new_privs`, and either no capabilities at all (as uid 0, or as
//!   `--jail-uid`/`--jail-gid`) or, when it serves virtio-fs, only the file-ownership
//!   capabilities the in-process server needs. Last, unless `--no-userns`, it enters a user
//!   namespace of its own with the identity uid/gid map ([`userns`]), so that those
//!   capabilities count only there and it holds none in the host's initial user namespace.
//!   docs/security.md explains each choice.
//!
//! Every path of the configuration is made canonical first (absolute, no symlinks), so the
//! same strings name the same files inside the jail.
//!
//! Layout: [`supervisor`] (the fork, signal forwarding, [`enter`]), [`mounts`] (canonical
//! paths, the bind plan, the new root), [`privileges`] (capabilities, rlimits, uid/gid),
//! [`userns`] (the user namespace and its maps) and [`error`] ([`JailError`]). The options
//! themselves are [`crate::config::JailConfig`].

pub mod error;
pub mod mounts;
pub mod privileges;
pub mod supervisor;
pub mod userns;

pub use error::JailError;
pub use mounts::canonicalize;
pub use privileges::{AS_MARGIN_MIB, FS_CAPS, NOFILE, NOFILE_FS};
pub use supervisor::{enter, Role};
pub use userns::IDENTITY_MAP;
