//! Duties of the agent when it is PID 1 of the microVM: boot marker, a
//! pivot-able root (a bind mount of the initramfs), the basic filesystems, entropy,
//! the console, and powering the VM off.

use std::path::Path;

use nix::mount::{mount, MsFlags};

/// I/O port and value of the boot marker (see the VMM's interface).
const BOOT_MARKER_PORT: u16 = 0x3f0;
const BOOT_MARKER_VALUE: u8 = 123;

/// Errors of early boot.
#[derive(Debug, thiserror::Error)]
pub enum Pid1Error {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Tells the VMM that init was reached (`outb 123, 0x3f0`).
pub fn boot_marker() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: ioperm grants access to one port; the out instruction only
    // touches that port. Failure (not in a VM / no privilege) is ignored.
    unsafe {
        if libc::ioperm(BOOT_MARKER_PORT as libc::c_ulong, 1, 1) == 0 {
            std::arch::asm!("out dx, al", in("dx") BOOT_MARKER_PORT, in("al") BOOT_MARKER_VALUE, options(nomem, nostack, preserves_flags));
            libc::ioperm(BOOT_MARKER_PORT as libc::c_ulong, 1, 0);
        }
    }
}

fn mnt(
    src: &str,
    dst: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), Pid1Error> {
    std::fs::create_dir_all(dst).map_err(|source| Pid1Error::Io {
        what: format!("mkdir {dst}"),
        source,
    })?;
    match mount(Some(src), dst, Some(fstype), flags, data) {
        Ok(()) | Err(nix::Error::EBUSY) => Ok(()),
        Err(source) => Err(Pid1Error::Sys {
            what: format!("mount {fstype} on {dst}"),
            source,
        }),
    }
}

/// Whether `/` is the kernel's initial rootfs (pivot_root cannot leave it).
fn root_is_initramfs() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| {
            s.lines().any(|l| {
                let mut parts = l.split(" - ");
                let pre = parts.next().unwrap_or("");
                let post = parts.next().unwrap_or("");
                pre.split_whitespace().nth(4) == Some("/") && post.starts_with("rootfs ")
            })
        })
        .unwrap_or(false)
}

/// If `/` is the initramfs, gives it a mount that containers can `pivot_root` away from.
///
/// The kernel's rootfs is the root of the mount tree, and `pivot_root` refuses to move a root
/// that has no parent mount. A bind mount of the same rootfs, moved over `/` and chrooted into,
/// has one: the files stay where the kernel unpacked them and nothing is copied. (Copying the
/// image into a tmpfs instead costs boot time and keeps a second copy of the agent in guest RAM
/// for the VM's life, since the rootfs itself can never be freed.)
fn switch_root_if_needed() -> Result<(), Pid1Error> {
    if !root_is_initramfs() {
        return Ok(());
    }
    let sys = |what: &'static str| {
        move |source| Pid1Error::Sys {
            what: what.into(),
            source,
        }
    };
    let new = Path::new("/.moat-root");
    std::fs::create_dir_all(new).map_err(|source| Pid1Error::Io {
        what: "mkdir /.moat-root".into(),
        source,
    })?;
    mount(Some("/"), new, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(sys("bind-mounting the initramfs"))?;
    // /proc is mounted again on the new root by the caller; this one would stay hidden below it.
    let _ = nix::mount::umount2("/proc", nix::mount::MntFlags::MNT_DETACH);
    nix::unistd::chdir(new).map_err(sys("chdir new root"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(sys("moving the new root"))?;
    nix::unistd::chroot(".").map_err(sys("chroot"))?;
    nix::unistd::chdir("/").map_err(sys("chdir /"))?;
    // The mount point is a directory of the same file system, now empty and of no further use.
    let _ = std::fs::remove_dir(new);
    tracing::debug!("root is a bind mount of the initramfs: containers can pivot_root");
    Ok(())
}

/// Feeds the kernel RNG from RDRAND when the CPU has it, so that early
/// `getrandom` callers in containers do not stall.
fn seed_entropy() {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("rdrand") {
            tracing::info!("no RDRAND: kernel entropy left as is");
            return;
        }
        #[repr(C)]
        struct RandPoolInfo {
            entropy_count: libc::c_int,
            buf_size: libc::c_int,
            buf: [u64; 8],
        }
        let mut info = RandPoolInfo {
            entropy_count: 0,
            buf_size: 64,
            buf: [0; 8],
        };
        for w in info.buf.iter_mut() {
            let mut v = 0u64;
            // SAFETY: the CPU supports RDRAND (checked above).
            if unsafe { std::arch::x86_64::_rdrand64_step(&mut v) } == 1 {
                *w = v;
                info.entropy_count += 64;
            }
        }
        nix::ioctl_write_ptr_bad!(rndaddentropy, 0x4008_5203, RandPoolInfo);
        match std::fs::OpenOptions::new().write(true).open("/dev/urandom") {
            Ok(f) => {
                use std::os::fd::AsRawFd;
                // SAFETY: RNDADDENTROPY reads a rand_pool_info of the given size.
                if let Err(e) = unsafe { rndaddentropy(f.as_raw_fd(), &info) } {
                    tracing::warn!("RNDADDENTROPY: {e}");
                }
            }
            Err(e) => tracing::warn!("opening /dev/urandom: {e}"),
        }
    }
}

fn attach_console() {
    use std::os::fd::AsRawFd;
    if let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
                // SAFETY: duplicates the open console onto a standard descriptor that is not
                // open (checked above), so no descriptor another owner holds is replaced.
                unsafe { libc::dup2(f.as_raw_fd(), fd) };
            }
        }
    }
}

/// Early PID 1 setup; must run before any thread exists.
pub fn early() -> Result<(), Pid1Error> {
    boot_marker();
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mnt("proc", "/proc", "proc", nodev, None)?;
    switch_root_if_needed()?;
    mnt("proc", "/proc", "proc", nodev, None)?;
    mnt(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    attach_console();
    mnt("sysfs", "/sys", "sysfs", nodev, None)?;
    mnt(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mnt("tmpfs", "/dev/shm", "tmpfs", nodev, Some("mode=1777"))?;
    mnt(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mnt(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mnt("cgroup2", "/sys/fs/cgroup", "cgroup2", nodev, None)?;
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    seed_entropy();
    if let Err(e) = crate::net::loopback_up() {
        tracing::warn!("{e}: localhost will not work in the guest's root network namespace");
    }
    let _ = nix::unistd::sethostname("moat");
    Ok(())
}

/// Ends the VM; never returns.
///
/// With ACPI power-off available (the kernel has ACPI and the firmware tables announce the S5
/// sleep state; moat-vmm's do), `RB_POWER_OFF` enters S5 and the VMM exits with
/// `guest-poweroff`. Otherwise `RB_POWER_OFF` would only halt the CPUs and leave the VMM
/// running, so the agent falls back to `RB_AUTOBOOT`, which resets through the i8042
/// (moat-vmm's default `reboot=k`) or a triple fault, either of which ends the VMM (as with
/// Firecracker) with `guest-reset`.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let mode = if acpi_power_off_available() {
        tracing::info!("powering the VM off (ACPI S5)");
        nix::sys::reboot::RebootMode::RB_POWER_OFF
    } else {
        tracing::info!("ending the VM (reboot through the VMM; no ACPI power-off)");
        nix::sys::reboot::RebootMode::RB_AUTOBOOT
    };
    let _ = nix::sys::reboot::reboot(mode);
    // reboot() only returns on failure; PID 1 must not exit.
    loop {
        nix::unistd::pause();
    }
}

/// Whether `reboot(RB_POWER_OFF)` powers the VM off rather than halting it: Linux registers
/// its ACPI power-off handler when the namespace has an `_S5_` object, which moat-vmm (and
/// QEMU) put in the DSDT. `/sys/firmware/acpi/tables/DSDT` exists only when the kernel runs
/// with ACPI (not built without `CONFIG_ACPI`, not with `acpi=off`).
fn acpi_power_off_available() -> bool {
    std::fs::read("/sys/firmware/acpi/tables/DSDT")
        .map(|dsdt| dsdt.windows(4).any(|w| w == b"_S5_"))
        .unwrap_or(false)
}
