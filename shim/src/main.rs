//! `containerd-shim-moat-v2`: containerd's runtime v2 shim for moat (runtime type
//! `io.containerd.moat.v2`). Each pod runs in its own microVM booted with moat-vmm; containers
//! are created in it through the moat agent. The work is in the `moat_shim` library.

fn main() {
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
    // The daemon's mounts live in a namespace of its own; unshare is refused once threads run,
    // so this comes before the runtime.
    let args: Vec<_> = std::env::args_os().collect();
    if moat_shim::mount_namespace::is_daemon(&args) {
        if let Err(e) = moat_shim::mount_namespace::enter() {
            eprintln!("containerd-shim-moat-v2: {e}");
            std::process::exit(1);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("containerd-shim-moat-v2: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    // moat-vmm is the shim's child and tokio waits for it. The library's reaper (`waitpid(-1)` on
    // SIGCHLD) would take its exit status first, and the library sets its signal handling up
    // before `Shim::new` runs, so "no reaper" must be said here.
    let config = containerd_shim::Config {
        no_reaper: true,
        ..Default::default()
    };
    runtime.block_on(containerd_shim::asynchronous::run::<
        moat_shim::service::Service,
    >("io.containerd.moat.v2", Some(config)));
}
