//! E2E trials of the guest image: the kernel from `guest-kernel-config/` and its debug initramfs.
//!
//! Owns the in-guest acceptance checks of the guest kernel: it boots to `/init`, offers cgroup v2
//! with the container controllers, and registers the filesystems the agent relies on (overlay,
//! virtiofs, the image filesystem erofs, ext4, tmpfs, devpts, mqueue, cgroup2, ...). The debug
//! initramfs (`guest-kernel-config/build --debug`) has a busybox `/init` that prints
//! `MOAT-CHECK <name>: <value>` lines on the serial console and then reboots, which ends the VMM;
//! these trials boot it under QEMU's microvm machine and under moat-vmm (with a vsock, a disk and
//! a shared directory, whose guest drivers must bind) and check those lines.

use std::collections::BTreeMap;
use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use moat_e2e::{
    bin, ensure, guest_kernel, run_bounded, trial, Check, Context, Failed, Scratch, Trial,
};

/// cgroup v2 controllers the guest kernel must offer at the root (the fragments enable them).
const CONTROLLERS: &[&str] = &["cpuset", "cpu", "io", "memory", "hugetlb", "pids"];

/// Filesystems the guest kernel must register (`/proc/filesystems`).
const FILESYSTEMS: &[&str] = &[
    "overlay",
    "virtiofs",
    "fuse",
    "erofs",
    "ext4",
    "tmpfs",
    "devtmpfs",
    "devpts",
    "mqueue",
    "cgroup2",
    "proc",
    "sysfs",
    "hugetlbfs",
];

/// Guest drivers that must bind to moat-vmm's devices: vsock, virtio-fs, virtio-blk, and the
/// entropy device moat-vmm adds by default.
const VMM_VIRTIO_DRIVERS: &[&str] = &[
    "vmw_vsock_virtio_transport",
    "virtiofs",
    "virtio_blk",
    "virtio_rng",
];

/// Upper bound for one guest boot, in seconds; the software-KVM host is ~30x slower than hardware.
const BOOT_TIMEOUT_SECS: u32 = 180;

/// Kernel command line for the debug image under QEMU: serial console without the boot log
/// (`quiet`; a panic still prints); `reboot=t` makes the final `reboot -f` a triple fault, which
/// `-no-reboot` turns into an exit (microvm has no i8042; a triple fault needs no firmware).
const QEMU_CMDLINE: &str = "console=ttyS0 quiet reboot=t panic=-1";

/// Extra command line under moat-vmm, which itself passes `console=ttyS0 reboot=k panic=1` and
/// its virtio-mmio devices; `reboot -f` then resets through the i8042 port and moat-vmm exits 0.
const VMM_CMDLINE: &str = "quiet";

pub fn trials() -> Vec<Trial> {
    vec![
        trial("guest::debug_image_boots_under_qemu_microvm", qemu_microvm),
        trial("guest::debug_image_boots_under_moat_vmm", moat_vmm),
    ]
}

/// Boots kernel + debug initramfs with `qemu-system-x86_64 -M microvm` and checks the report.
fn qemu_microvm() -> Check {
    let kernel = guest_kernel()?;
    let initrd = debug_initrd()?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm", "-enable-kvm", "-cpu", "host"])
        .args(["-m", "256", "-smp", "1", "-nodefaults", "-no-reboot"])
        .args(["-display", "none", "-nic", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", QEMU_CMDLINE]);
    check_boot("qemu-system-x86_64 -M microvm", &mut cmd).map(drop)
}

/// Boots kernel + debug initramfs with moat-vmm (serial console on its stdout) with a vsock, a
/// block device and a shared directory, and checks that the guest's virtio drivers bound to
/// them (and to the VMM's default entropy device).
fn moat_vmm() -> Check {
    let kernel = guest_kernel()?;
    let initrd = debug_initrd()?;
    let scratch = Scratch::new("guest")?;
    let disk = scratch.path().join("disk.img");
    let share = scratch.path().join("share");
    fs::File::create(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .context(format!("create {}", disk.display()))?;
    fs::create_dir(&share).context(format!("create {}", share.display()))?;
    let mut cmd = Command::new(bin("moat-vmm")?);
    cmd.arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", VMM_CMDLINE, "--mem-mib", "256"])
        .args(["--serial", "stdout", "--vsock-uds"])
        .arg(scratch.path().join("vsock.sock"))
        .arg("--blk")
        .arg(&disk)
        .arg("--fs")
        .arg(format!("share={}", share.display()));
    let report = check_boot("moat-vmm", &mut cmd)?;
    require(
        "virtio drivers bound to moat-vmm's devices",
        VMM_VIRTIO_DRIVERS,
        value(&report, "virtio-drivers"),
    )
}

/// Runs the VMM until the guest reboots, checks what the debug `/init` reported and returns it.
fn check_boot(vmm: &str, cmd: &mut Command) -> Result<BTreeMap<String, String>, Failed> {
    let out = run_bounded(cmd, BOOT_TIMEOUT_SECS)?;
    let console = String::from_utf8_lossy(&out.stdout);
    let report = parse_report(&console);
    ensure(
        report.contains_key("done"),
        format!(
            "the guest's /init did not report `MOAT-CHECK done` ({vmm}: {}); console:\n{console}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    )?;
    require(
        "cgroup v2 controllers",
        CONTROLLERS,
        value(&report, "cgroup-controllers"),
    )?;
    require("filesystems", FILESYSTEMS, value(&report, "filesystems"))?;
    // Both VMMs are set up so that the guest's reboot is a clean exit.
    ensure(
        out.status.success(),
        format!(
            "{vmm} did not exit cleanly after the guest rebooted: {}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    )?;
    Ok(report)
}

/// The debug initramfs (`MOAT_GUEST_INITRD_DEBUG` or `target/guest/initramfs-debug.cpio`).
fn debug_initrd() -> Result<PathBuf, Failed> {
    let path = env::var_os("MOAT_GUEST_INITRD_DEBUG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| moat_e2e::workspace_root().join("target/guest/initramfs-debug.cpio"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "debug guest image {} not found: run guest-kernel-config/build --debug (or set MOAT_GUEST_INITRD_DEBUG)",
            path.display()
        )
        .into())
    }
}

/// Collects the `MOAT-CHECK name: value` lines of a console log (the UART adds `\r`).
fn parse_report(console: &str) -> BTreeMap<String, String> {
    console
        .lines()
        .filter_map(|line| {
            let rest = line.trim_end_matches('\r').strip_prefix("MOAT-CHECK ")?;
            let (name, value) = rest.split_once(':').unwrap_or((rest, ""));
            Some((name.trim().to_string(), value.trim().to_string()))
        })
        .collect()
}

fn value<'a>(report: &'a BTreeMap<String, String>, name: &str) -> &'a str {
    report.get(name).map_or("", String::as_str)
}

/// Fails listing each `wanted` word missing from the space-separated `got`.
fn require(what: &str, wanted: &[&str], got: &str) -> Check {
    let have: Vec<&str> = got.split_whitespace().collect();
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|w| !have.contains(w))
        .collect();
    ensure(
        missing.is_empty(),
        format!(
            "the guest lacks {what}: {} (it reported: {got:?}); check guest-kernel-config/fragments",
            missing.join(", ")
        ),
    )
}
