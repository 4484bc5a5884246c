//! E2E trials of the `moat` command on a real KVM host.

use std::process::Command;

use moat_e2e::{
    bin, bin_dir, ensure, guest_initrd, guest_kernel, run_bounded, trial, Check, Scratch, Trial,
};

pub fn trials() -> Vec<Trial> {
    vec![trial("cli::moat_check_passes_on_a_ready_host", check_ready)]
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
