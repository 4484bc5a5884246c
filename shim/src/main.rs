//! `containerd-shim-moat-v2`: containerd's runtime v2 shim for moat (runtime type
//! `io.containerd.moat.v2`). Each pod runs in its own microVM booted with moat-vmm; containers
//! are created in it through the moat agent. The work is in the `moat_shim` library.

#[tokio::main]
async fn main() {
    containerd_shim::asynchronous::run::<moat_shim::service::Service>(
        "io.containerd.moat.v2",
        None,
    )
    .await;
}
