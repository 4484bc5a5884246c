//! `containerd-shim-moat-v2`: containerd's runtime v2 shim for moat (runtime type
//! `io.containerd.moat.v2`). Each pod runs in its own microVM booted with moat-vmm; containers
//! are created in it through the moat agent. The work is in the `moat_shim` library.

#[tokio::main]
async fn main() {
    // containerd 2.x asks `-info` before it uses a runtime: answer and leave (the shim library
    // would try to start a shim without its environment).
    if moat_shim::info::requested(std::env::args()) {
        use std::io::Write;
        let out = moat_shim::info::runtime_info().map_err(std::io::Error::other);
        let written = out.and_then(|b| std::io::stdout().write_all(&b));
        if let Err(e) = written {
            eprintln!("containerd-shim-moat-v2 -info: {e}");
            std::process::exit(1);
        }
        return;
    }
    // moat-vmm is the shim's child and tokio waits for it. The library's reaper (`waitpid(-1)` on
    // SIGCHLD) would take its exit status first, and the library sets its signal handling up
    // before `Shim::new` runs, so "no reaper" must be said here.
    let config = containerd_shim::Config {
        no_reaper: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<moat_shim::service::Service>(
        "io.containerd.moat.v2",
        Some(config),
    )
    .await;
}
