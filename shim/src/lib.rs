//! The moat shim as a library: `containerd-shim-moat-v2` (src/main.rs) is a thin entry point over
//! it, and the `moat` command reads the same configuration through [`config`].
//!
//! The data path, in one direction: [`service`] (shim lifecycle) → [`task`] (Task API) →
//! [`sandbox`] (the pod VM: moat-vmm + agent connection) → [`rootfs`] (container files shared
//! into the guest), [`network`] (the pod netns bridged to the VM's NICs) and [`io`] (stdio
//! relays). [`config`] is the TOML configuration.

pub mod config;
mod io;
pub mod network;
mod rootfs;
mod sandbox;
pub mod service;
mod task;
