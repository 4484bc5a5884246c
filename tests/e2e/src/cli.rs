//! E2E trials of the `moat` command on a real KVM host.

use std::process::Command;

use moat_e2e::{
    bin, bin_dir, ensure, guest_initrd, guest_kernel, run_bounded, trial, Check, Scratch, Trial,
};

pub fn trials() -> Vec<Trial> {
    vec![
        trial("cli::moat_check_passes_on_a_ready_host", check_ready),
        trial("cli::moat_demo_prints_the_containers_output", demo),
    ]
}

/// `moat demo` against the run's containerd: builds and imports its image into the `moat-demo`
/// namespace, runs the container in a microVM, and prints the container's own lines.
fn demo() -> Check {
    let c = moat_e2e::containerd::Containerd::shared()?;
    let out = run_bounded(
        Command::new(bin("moat")?)
            .arg("demo")
            .arg("--address")
            .arg(&c.socket),
        moat_e2e::containerd::CTR_LIMIT,
    )?;
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure(
        out.status.success(),
        format!(
            "moat demo failed ({}):\n{text}\n{stderr}\ncontainerd log:\n{}",
            out.status,
            c.log_tail()
        ),
    )?;
    ensure(
        text.lines().any(|l| l == "Hello from a moat microVM!"),
        format!("no greeting from the container in:\n{text}"),
    )?;
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let guest = text
        .lines()
        .find_map(|l| l.strip_prefix("guest kernel: "))
        .and_then(|l| l.split(',').next())
        .unwrap_or_default();
    ensure(
        !guest.is_empty() && guest != host.trim(),
        format!(
            "the demo container should report the guest kernel, not the host's {host:?}:\n{text}"
        ),
    )?;
    // The demo's container is gone (`ctr run --rm`).
    let left = c.run_ctr(&["--namespace", "moat-demo", "containers", "ls", "-q"])?;
    ensure(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        format!(
            "containers left in namespace moat-demo: {}",
            String::from_utf8_lossy(&left.stdout)
        ),
    )
}

fn check_ready() -> Check {
    let scratch = Scratch::new("cli")?;
    let config = scratch.path().join("moat.toml");
    std::fs::write(
        &config,
        format!(
            "vmm = \"{}\"\nkernel = \"{}\"\ninitrd = \"{}\"\n",
            bin("moat-vmm")?.display(),
            guest_kernel()?.display(),
            guest_initrd()?.display()
        ),
    )
    .map_err(|e| format!("write {}: {e}", config.display()))?;
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = run_bounded(
        Command::new(bin("moat")?)
            .arg("check")
            .arg("--config")
            .arg(&config)
            .env("PATH", path),
        60,
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "ok   kvm: hardware KVM",
        "ok   guest kernel",
        "ok   guest initramfs",
        "ok   shim",
    ] {
        ensure(
            text.contains(expected),
            format!("no line {expected:?} in:\n{text}"),
        )?;
    }
    ensure(
        out.status.success() && text.contains("moat check: ready"),
        format!(
            "moat check should pass on this host ({}):\n{text}",
            out.status
        ),
    )
}
