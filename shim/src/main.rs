//! `containerd-shim-moat-v2`: containerd's runtime v2 shim for moat (runtime type
//! `io.containerd.moat.v2`). Each pod runs in its own microVM booted with moat-vmm; containers
//! are created in it through the moat agent.
//!
//! The data path, in one direction: [`service`] (shim lifecycle) → [`task`] (Task API) →
//! [`sandbox`] (the pod VM: moat-vmm + agent connection) → [`rootfs`] (container files shared
//! into the guest) and [`io`] (stdio relays). [`config`] is the TOML configuration.

mod config;
mod io;
mod rootfs;
mod sandbox;
mod service;
mod task;

#[tokio::main]
async fn main() {
    containerd_shim::asynchronous::run::<service::Service>("io.containerd.moat.v2", None).await;
}
