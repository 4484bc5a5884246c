//! The moat shim as a library: `containerd-shim-moat-v2` (src/main.rs) is a thin entry point over
//! it, and the `moat` command reads the same configuration through [`config`].
//!
//! The data path, in one direction: [`service`] (shim lifecycle) → [`task`] (the Task API at the
//! edge) → [`process`] (containers, processes, exit monitoring; stdio relays in [`io`]) and
//! [`pod`] (the pod VM's lifecycle, behind [`pod::PodVm`]) → [`sandbox`] (the moat-vmm pod VM:
//! process, agent connection, state directory) → [`network`] (the pod netns bridged to the VM's
//! NICs, over [`netns`]). Beside them: [`rootfs`] (container files shared with the agent),
//! [`namespaces`] (CRI namespaces and propagation: translated, or refused where a VM cannot do
//! them) and [`mounts`] (unmounting below a directory), [`mount_namespace`] (the
//! daemon's own mount namespace, where all of that lives); [`events`] (the ordered event channel to
//! containerd), [`oom`] (OOM events), [`metrics`] (stats for containerd), [`error`] (Task errors
//! and their ttrpc codes), [`config`] (the TOML configuration), [`resources`] (a running pod's size and its growth,
//! over [`vmm_control`], moat-vmm's control socket).

pub mod cgroup;
pub mod config;
pub mod error;
pub mod events;
pub mod host_features;
pub mod info;
mod io;
mod metrics;
pub mod mount_namespace;
mod mounts;
mod namespaces;
mod netns;
pub mod network;
mod oom;
pub mod pod;
pub mod portforward;
mod process;
pub mod resources;
mod rootfs;
mod sandbox;
pub mod service;
pub mod sizing;
pub mod task;
pub mod vmm_control;
