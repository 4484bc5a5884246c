//! `moat check`: is this host ready to run moat pods? One line per item, each saying what was
//! found and, when it is not right, what to do; the command fails when any item fails.
//!
//! Items: the KVM device and its kind (hardware VMX/SVM, PVM, none) and access to it; moat-vmm;
//! the guest kernel and initramfs (present, the right format, the kernel built with what moat
//! needs); containerd, its version, the shim on its PATH and the runtime in its config; cgroup v2
//! and namespaces.
//!
//! Everything is read below a root directory (`/` normally), so the classification is unit-tested
//! on a fake tree.

use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use moat_shim::config::Config;

/// How an item turned out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

/// One checked item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub verdict: Verdict,
    pub name: &'static str,
    pub text: String,
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        write!(f, "{tag} {}: {}", self.name, self.text)
    }
}

fn item(verdict: Verdict, name: &'static str, text: impl Into<String>) -> Item {
    Item {
        verdict,
        name,
        text: text.into(),
    }
}

/// The kind of KVM this host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// kvm_intel (VMX) or kvm_amd (SVM).
    Hardware(&'static str),
    /// PVM: runs PVM-enlightened guests only.
    Pvm,
    /// /dev/kvm exists but no known backend module is loaded.
    Unknown,
    /// No /dev/kvm.
    None,
}

/// Classifies the KVM of the tree at `root`.
pub fn kvm_kind(root: &Path) -> KvmKind {
    if !root.join("dev/kvm").exists() {
        return KvmKind::None;
    }
    let module = |m: &str| root.join("sys/module").join(m).exists();
    if module("kvm_pvm") {
        KvmKind::Pvm
    } else if module("kvm_intel") {
        KvmKind::Hardware("kvm_intel, VMX")
    } else if module("kvm_amd") {
        KvmKind::Hardware("kvm_amd, SVM")
    } else {
        KvmKind::Unknown
    }
}

fn check_kvm(root: &Path) -> Vec<Item> {
    let kind = kvm_kind(root);
    let mut items = vec![match kind {
        KvmKind::Hardware(which) => item(Verdict::Ok, "kvm", format!("hardware KVM ({which})")),
        KvmKind::Pvm => item(
            Verdict::Fail,
            "kvm",
            "/dev/kvm is PVM (kvm_pvm): it cannot boot moat's guest kernel; run moat on a host \
             with hardware virtualization (VMX/SVM), or test with tests/kvm-host/run",
        ),
        KvmKind::Unknown => item(
            Verdict::Warn,
            "kvm",
            "/dev/kvm exists but neither kvm_intel nor kvm_amd is loaded; moat may not boot",
        ),
        KvmKind::None => item(
            Verdict::Fail,
            "kvm",
            "no /dev/kvm: enable virtualization in the firmware and load kvm_intel or kvm_amd \
             (modprobe kvm_intel / kvm_amd)",
        ),
    }];
    if kind != KvmKind::None {
        let dev = root.join("dev/kvm");
        items.push(
            match fs::OpenOptions::new().read(true).write(true).open(&dev) {
                Ok(_) => item(
                    Verdict::Ok,
                    "kvm access",
                    format!("{} opens read-write", dev.display()),
                ),
                Err(e) => item(
                    Verdict::Fail,
                    "kvm access",
                    format!(
                        "cannot open {} read-write ({e}): run as root or add the user to group kvm",
                        dev.display()
                    ),
                ),
            },
        );
    }
    items
}

fn has_magic(path: &Path, magic: &[u8]) -> bool {
    let mut buf = vec![0u8; magic.len()];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut buf))
        .map(|()| buf == magic)
        .unwrap_or(false)
}

/// Kernel options moat cannot work without.
const REQUIRED_KERNEL_OPTIONS: &[&str] = &[
    "CONFIG_PVH=y",
    "CONFIG_VIRTIO_MMIO=y",
    "CONFIG_VIRTIO_VSOCKETS=y",
    "CONFIG_VIRTIO_FS=y",
    "CONFIG_OVERLAY_FS=y",
    "CONFIG_CGROUPS=y",
];

fn check_guest(config: &Config) -> Vec<Item> {
    let mut items = Vec::new();
    let vmm = &config.vmm;
    items.push(if vmm.is_file() {
        item(Verdict::Ok, "moat-vmm", vmm.display().to_string())
    } else {
        item(
            Verdict::Fail,
            "moat-vmm",
            format!(
                "{} not found: install it or set `vmm` in the moat config",
                vmm.display()
            ),
        )
    });

    let kernel = &config.kernel;
    if !kernel.is_file() {
        items.push(item(
            Verdict::Fail,
            "guest kernel",
            format!(
                "{} not found: build it (guest-kernel-config/build) and set `kernel`",
                kernel.display()
            ),
        ));
    } else if !has_magic(kernel, b"\x7fELF") {
        items.push(item(
            Verdict::Fail,
            "guest kernel",
            format!(
                "{} is not an ELF vmlinux (moat boots the uncompressed kernel)",
                kernel.display()
            ),
        ));
    } else {
        let config_file = PathBuf::from(format!("{}.config", kernel.display()));
        match fs::read_to_string(&config_file) {
            Ok(text) => {
                let missing: Vec<&str> = REQUIRED_KERNEL_OPTIONS
                    .iter()
                    .copied()
                    .filter(|opt| !text.lines().any(|l| l == *opt))
                    .collect();
                items.push(if missing.is_empty() {
                    item(
                        Verdict::Ok,
                        "guest kernel",
                        format!("{} (config has what moat needs)", kernel.display()),
                    )
                } else {
                    item(
                        Verdict::Fail,
                        "guest kernel",
                        format!(
                            "{} lacks {}: rebuild with guest-kernel-config/build",
                            kernel.display(),
                            missing.join(", ")
                        ),
                    )
                });
            }
            Err(_) => items.push(item(
                Verdict::Warn,
                "guest kernel",
                format!(
                    "{} present; no {} to verify its options",
                    kernel.display(),
                    config_file.display()
                ),
            )),
        }
    }

    let initrd = &config.initrd;
    items.push(if !initrd.is_file() {
        item(
            Verdict::Fail,
            "guest initramfs",
            format!(
                "{} not found: build it (guest-kernel-config/build) and set `initrd`",
                initrd.display()
            ),
        )
    } else if !has_magic(initrd, &[0x1f, 0x8b]) && !has_magic(initrd, b"070701") {
        item(
            Verdict::Fail,
            "guest initramfs",
            format!(
                "{} is neither a gzip nor a newc cpio archive",
                initrd.display()
            ),
        )
    } else {
        item(Verdict::Ok, "guest initramfs", initrd.display().to_string())
    });
    items
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

fn check_containerd(root: &Path) -> Vec<Item> {
    let mut items = Vec::new();
    match find_on_path("containerd") {
        Some(bin) => {
            let version = Command::new(&bin)
                .arg("--version")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            items.push(item(
                Verdict::Ok,
                "containerd",
                format!("{} ({version})", bin.display()),
            ));
        }
        None => items.push(item(
            Verdict::Fail,
            "containerd",
            "not found on PATH: install containerd 1.6 or newer (apt-get install containerd)",
        )),
    }
    items.push(match find_on_path("containerd-shim-moat-v2") {
        Some(p) => item(Verdict::Ok, "shim", p.display().to_string()),
        None => item(
            Verdict::Fail,
            "shim",
            "containerd-shim-moat-v2 is not on PATH: containerd cannot start moat pods (install it to /usr/local/bin)",
        ),
    });
    let conf = root.join("etc/containerd/config.toml");
    items.push(match fs::read_to_string(&conf) {
        Ok(text) if text.contains("io.containerd.moat.v2") => item(
            Verdict::Ok,
            "containerd config",
            format!("{} has runtime io.containerd.moat.v2", conf.display()),
        ),
        Ok(_) => item(
            Verdict::Warn,
            "containerd config",
            format!(
                "{} has no io.containerd.moat.v2 runtime: Kubernetes cannot select moat (see docs/shim.md); ctr --runtime still works",
                conf.display()
            ),
        ),
        Err(_) => item(
            Verdict::Warn,
            "containerd config",
            format!("no {}: add the moat runtime for Kubernetes (see docs/shim.md)", conf.display()),
        ),
    });
    items
}

fn check_kernel_features(root: &Path) -> Vec<Item> {
    let mut items = Vec::new();
    items.push(if root.join("sys/fs/cgroup/cgroup.controllers").exists() {
        item(Verdict::Ok, "cgroup", "cgroup v2 mounted at /sys/fs/cgroup")
    } else {
        item(
            Verdict::Warn,
            "cgroup",
            "no cgroup v2 at /sys/fs/cgroup: pod VMs cannot be limited by host cgroups (boot with systemd.unified_cgroup_hierarchy=1)",
        )
    });
    let missing: Vec<&str> = ["mnt", "pid", "net", "uts", "ipc"]
        .into_iter()
        .filter(|ns| !root.join("proc/self/ns").join(ns).exists())
        .collect();
    items.push(if missing.is_empty() {
        item(Verdict::Ok, "namespaces", "mnt, pid, net, uts, ipc")
    } else {
        item(
            Verdict::Fail,
            "namespaces",
            format!(
                "missing {}: the host kernel lacks namespace support",
                missing.join(", ")
            ),
        )
    });
    items
}

/// Runs every check against the tree at `root` with `config`.
pub fn run(root: &Path, config: &Config) -> Vec<Item> {
    let mut items = check_kvm(root);
    items.extend(check_guest(config));
    items.extend(check_containerd(root));
    items.extend(check_kernel_features(root));
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(modules: &[&str], kvm: bool) -> tempfile_dir::Dir {
        let d = tempfile_dir::Dir::new();
        for m in modules {
            fs::create_dir_all(d.0.join("sys/module").join(m)).unwrap();
        }
        fs::create_dir_all(d.0.join("dev")).unwrap();
        if kvm {
            fs::write(d.0.join("dev/kvm"), b"").unwrap();
        }
        d
    }

    /// A tiny self-removing temp dir (keeps the crate free of test-only dependencies).
    mod tempfile_dir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "moat-check-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn kvm_kinds_are_told_apart() {
        assert_eq!(
            kvm_kind(&tree(&["kvm", "kvm_intel"], true).0),
            KvmKind::Hardware("kvm_intel, VMX")
        );
        assert_eq!(
            kvm_kind(&tree(&["kvm", "kvm_amd"], true).0),
            KvmKind::Hardware("kvm_amd, SVM")
        );
        assert_eq!(kvm_kind(&tree(&["kvm", "kvm_pvm"], true).0), KvmKind::Pvm);
        assert_eq!(kvm_kind(&tree(&["kvm"], true).0), KvmKind::Unknown);
        assert_eq!(kvm_kind(&tree(&["kvm_amd"], false).0), KvmKind::None);
    }

    #[test]
    fn pvm_and_missing_kvm_fail_with_advice() {
        let pvm = check_kvm(&tree(&["kvm_pvm"], true).0);
        assert_eq!(pvm[0].verdict, Verdict::Fail);
        assert!(
            pvm[0].text.contains("hardware virtualization"),
            "{}",
            pvm[0]
        );
        let none = check_kvm(&tree(&[], false).0);
        assert_eq!(none.len(), 1);
        assert_eq!(none[0].verdict, Verdict::Fail);
        assert!(none[0].text.contains("modprobe"), "{}", none[0]);
    }

    #[test]
    fn guest_images_are_checked_for_presence_format_and_options() {
        let d = tempfile_dir::Dir::new();
        let config = Config {
            vmm: d.0.join("moat-vmm"),
            kernel: d.0.join("vmlinux"),
            initrd: d.0.join("initramfs.cpio"),
            ..Config::default()
        };
        let items = check_guest(&config);
        assert!(
            items.iter().all(|i| i.verdict == Verdict::Fail),
            "{items:?}"
        );

        fs::write(&config.vmm, b"").unwrap();
        fs::write(&config.kernel, b"MZ not an elf").unwrap();
        fs::write(&config.initrd, [0x1f, 0x8b, 0x08]).unwrap();
        let items = check_guest(&config);
        assert_eq!(items[0].verdict, Verdict::Ok);
        assert_eq!(items[1].verdict, Verdict::Fail, "{}", items[1]);
        assert_eq!(items[2].verdict, Verdict::Ok);

        fs::write(&config.kernel, b"\x7fELF....").unwrap();
        fs::write(
            d.0.join("vmlinux.config"),
            "CONFIG_PVH=y\nCONFIG_VIRTIO_MMIO=y\n",
        )
        .unwrap();
        let items = check_guest(&config);
        assert_eq!(items[1].verdict, Verdict::Fail);
        assert!(items[1].text.contains("CONFIG_VIRTIO_FS=y"), "{}", items[1]);

        fs::write(
            d.0.join("vmlinux.config"),
            REQUIRED_KERNEL_OPTIONS.join("\n"),
        )
        .unwrap();
        assert_eq!(check_guest(&config)[1].verdict, Verdict::Ok);
    }
}
