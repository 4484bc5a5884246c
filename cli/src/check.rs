//! `moat check`: is this host ready to run moat pods? One line per item, each saying what was
//! found and, when it is not right, what to do; the command fails when any item fails.
//!
//! Items: the KVM device and its kind (hardware VMX/SVM, PVM, none) and access to it; moat-vmm;
//! the guest kernel and initramfs (present, the right format, the kernel built with what moat
//! needs); containerd, its version, the shim on its PATH and the runtime in its config; cgroup v2
//! and namespaces; the host kernel features the shim's pod network needs (tc ingress qdisc, u32
//! classifier, mirred action, tun/tap: [`moat_shim::host_features::HOST_FEATURES`]) and overlayfs (the
//! snapshot mounts of containerd's default snapshotter, which the shim mounts). No vsock module
//! is needed on the host: moat-vmm's virtio-vsock is a userspace device behind a Unix socket
//! (hybrid vsock), not `vhost_vsock`.
//!
//! Everything is read below a root directory (`/` normally), so the classification is unit-tested
//! on a fake tree.

use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use moat_shim::config::Config;
use moat_shim::host_features::{module_state, HostFeature, ModuleState, HOST_FEATURES};

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

/// One line for a host kernel feature provided by `module` (built with `config`): what
/// [`module_state`] found and, when it is not usable, what to do. `loads_itself` says who loads
/// a module that is installed but not loaded: the shim (its pod network features) or the kernel
/// on first use (overlayfs, on the first mount).
fn feature_item(
    root: &Path,
    name: &'static str,
    feature: &HostFeature,
    loads_itself: &str,
) -> Item {
    let HostFeature {
        what,
        module,
        config,
    } = feature;
    match module_state(root, module, config) {
        ModuleState::Loaded => item(Verdict::Ok, name, format!("{what}: {module} loaded")),
        ModuleState::BuiltIn => item(
            Verdict::Ok,
            name,
            format!("{what}: built into the kernel ({config}=y)"),
        ),
        ModuleState::Loadable => item(
            Verdict::Ok,
            name,
            format!("{what}: module {module} installed, not loaded yet ({loads_itself}; or now: modprobe {module})"),
        ),
        ModuleState::NotInstalled { release } => item(
            Verdict::Fail,
            name,
            format!(
                "{what} unavailable: kernel {release} builds {module} as a module ({config}=m) but \
                 /lib/modules/{release} does not have it: install the kernel's modules package \
                 (e.g. linux-modules-extra-{release}), then modprobe {module}"
            ),
        ),
        ModuleState::NotFound { release } => item(
            Verdict::Fail,
            name,
            format!(
                "{what} unavailable: {module} is neither built into kernel {release} nor \
                 installed in /lib/modules/{release}: install the kernel's modules package \
                 (e.g. linux-modules-extra-{release}) or use a kernel with {config}"
            ),
        ),
        ModuleState::NotInKernel { release } => item(
            Verdict::Fail,
            name,
            format!(
                "{what} unavailable: kernel {release} is built without {config} (no {module}): \
                 run moat on a kernel that has it"
            ),
        ),
        ModuleState::Unknown if !root.join("proc/modules").exists() => item(
            Verdict::Warn,
            name,
            format!(
                "{what}: this kernel has no loadable modules (no /proc/modules), so it needs \
                 {config}=y, which nothing here shows: pods fail without it"
            ),
        ),
        ModuleState::Unknown => item(
            Verdict::Warn,
            name,
            format!(
                "{what}: {module} is not loaded and no module list or kernel config tells whether \
                 the kernel has it: modprobe {module} (pods fail without it)"
            ),
        ),
    }
}

/// overlayfs on the host: containerd's default snapshotter hands the shim overlay mounts.
const OVERLAY: HostFeature = HostFeature {
    what: "overlayfs",
    module: "overlay",
    config: "CONFIG_OVERLAY_FS",
};

/// The host kernel features pods need besides KVM: the shim's tap + tc redirect
/// ([`HOST_FEATURES`]), `/dev/net/tun`, and overlayfs.
fn check_host_network(root: &Path) -> Vec<Item> {
    let mut items: Vec<Item> = HOST_FEATURES
        .iter()
        .map(|f| {
            let name = match f.module {
                "sch_ingress" => "tc ingress",
                "cls_u32" => "tc u32",
                "act_mirred" => "tc mirred",
                "tun" => "tun",
                _ => "host kernel",
            };
            feature_item(
                root,
                name,
                f,
                "the shim loads it at the first pod with a network",
            )
        })
        .collect();
    // The tap device node: devtmpfs makes it when tun is built in or loaded (and kmod's static
    // nodes before); the shim opens it for every tap.
    if !root.join("dev/net/tun").exists() {
        if let Some(tun) = items.iter_mut().find(|i| i.name == "tun") {
            if tun.verdict == Verdict::Ok {
                tun.verdict = Verdict::Warn;
                tun.text.push_str(
                    "; but /dev/net/tun does not exist: modprobe tun (or mknod /dev/net/tun c 10 200)",
                );
            }
        }
    }
    let overlay_listed = fs::read_to_string(root.join("proc/filesystems")).is_ok_and(|t| {
        t.lines()
            .any(|l| l.split_whitespace().last() == Some("overlay"))
    });
    items.push(if overlay_listed {
        item(
            Verdict::Ok,
            "overlay",
            "overlayfs: registered in /proc/filesystems",
        )
    } else {
        feature_item(
            root,
            "overlay",
            &OVERLAY,
            "the kernel loads it at the first overlay mount",
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
    items.extend(check_host_network(root));
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

    fn write(root: &Path, path: &str, text: &str) {
        let p = root.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    #[test]
    fn host_network_features_ok_when_loaded_or_built_in() {
        let d = tempfile_dir::Dir::new();
        write(
            &d.0,
            "proc/modules",
            "sch_ingress 16384 2 - Live 0x0\ncls_u32 28672 2 - Live 0x0\nact_mirred 24576 2 - Live 0x0\n",
        );
        write(&d.0, "proc/sys/kernel/osrelease", "6.1.0-57-amd64\n");
        write(
            &d.0,
            "lib/modules/6.1.0-57-amd64/modules.builtin",
            "kernel/drivers/net/tun.ko\n",
        );
        write(&d.0, "dev/net/tun", "");
        write(&d.0, "proc/filesystems", "nodev\ttmpfs\nnodev\toverlay\n");
        let items = check_host_network(&d.0);
        let names: Vec<&str> = items.iter().map(|i| i.name).collect();
        assert_eq!(
            names,
            ["tc ingress", "tc u32", "tc mirred", "tun", "overlay"]
        );
        assert!(items.iter().all(|i| i.verdict == Verdict::Ok), "{items:#?}");
        assert!(
            items[3].text.contains("built into the kernel"),
            "{}",
            items[3]
        );
    }

    #[test]
    fn missing_host_network_features_fail_with_the_module_to_load() {
        let d = tempfile_dir::Dir::new();
        write(&d.0, "proc/modules", "");
        write(&d.0, "proc/sys/kernel/osrelease", "6.1.0-57-amd64\n");
        write(&d.0, "lib/modules/6.1.0-57-amd64/modules.builtin", "");
        write(
            &d.0,
            "lib/modules/6.1.0-57-amd64/modules.dep",
            "kernel/net/sched/sch_ingress.ko.xz:\nkernel/drivers/net/tun.ko.xz:\n",
        );
        write(
            &d.0,
            "boot/config-6.1.0-57-amd64",
            "CONFIG_NET_SCH_INGRESS=m\nCONFIG_NET_CLS_U32=m\n# CONFIG_NET_ACT_MIRRED is not set\nCONFIG_TUN=m\nCONFIG_OVERLAY_FS=m\n",
        );
        let items = check_host_network(&d.0);
        let by = |name: &str| items.iter().find(|i| i.name == name).unwrap().clone();
        // Installed, not loaded: the shim loads it; fine.
        assert_eq!(by("tc ingress").verdict, Verdict::Ok);
        assert!(
            by("tc ingress").text.contains("modprobe sch_ingress"),
            "{}",
            by("tc ingress")
        );
        // =m but not installed, and not built at all: fail, saying what to do.
        assert_eq!(by("tc u32").verdict, Verdict::Fail);
        assert!(
            by("tc u32")
                .text
                .contains("linux-modules-extra-6.1.0-57-amd64"),
            "{}",
            by("tc u32")
        );
        assert_eq!(by("tc mirred").verdict, Verdict::Fail);
        assert!(
            by("tc mirred").text.contains("CONFIG_NET_ACT_MIRRED"),
            "{}",
            by("tc mirred")
        );
        // Loadable but no device node yet.
        assert_eq!(by("tun").verdict, Verdict::Warn);
        assert!(by("tun").text.contains("/dev/net/tun"), "{}", by("tun"));
        // Not registered, =m, not in modules.dep: not installed.
        assert_eq!(by("overlay").verdict, Verdict::Fail);
        assert!(
            by("overlay").text.contains("overlayfs unavailable"),
            "{}",
            by("overlay")
        );
    }

    #[test]
    fn host_network_feature_in_no_module_list_fails() {
        let d = tempfile_dir::Dir::new();
        write(&d.0, "proc/modules", "");
        write(&d.0, "proc/sys/kernel/osrelease", "6.8.0-1-generic\n");
        write(&d.0, "lib/modules/6.8.0-1-generic/modules.builtin", "");
        write(&d.0, "lib/modules/6.8.0-1-generic/modules.dep", "");
        let items = check_host_network(&d.0);
        assert_eq!(items[2].name, "tc mirred");
        assert_eq!(items[2].verdict, Verdict::Fail, "{}", items[2]);
        assert!(
            items[2]
                .text
                .contains("linux-modules-extra-6.8.0-1-generic"),
            "{}",
            items[2]
        );
    }

    #[test]
    fn unknown_host_network_features_warn() {
        let d = tempfile_dir::Dir::new();
        let items = check_host_network(&d.0);
        assert!(
            items.iter().all(|i| i.verdict == Verdict::Warn),
            "{items:#?}"
        );
        assert!(
            items[0].text.contains("no loadable modules"),
            "{}",
            items[0]
        );
        write(&d.0, "proc/modules", "");
        let items = check_host_network(&d.0);
        assert!(
            items.iter().all(|i| i.verdict == Verdict::Warn),
            "{items:#?}"
        );
        assert!(
            items[0].text.contains("modprobe sch_ingress"),
            "{}",
            items[0]
        );
    }
}
