//! `moat check`: is this host ready to run moat pods? One line per item, each saying what was
//! found and, when it is not right, what to do; the command fails when any item fails.
//!
//! Items: the KVM device and its kind (hardware VMX/SVM, PVM, none) and access to it; moat-vmm;
//! the guest kernel and initramfs (present, the right format, and, where a `vmlinux.config` lies
//! beside the kernel as in a build tree, the kernel built with what moat needs); containerd, its
//! version, the shim on its PATH, and the moat runtime in the configuration containerd actually
//! runs with (the `--config` of the running containerd, else its default path, found by
//! [`moat_cli::containerd_config::locate`]; imports included, confirmed by the real
//! containerd's `config dump`, and whether containerd has read the file since it last changed);
//! cgroup v2 and namespaces; the host kernel features the shim's pod network needs (tc ingress
//! qdisc, u32 classifier, mirred action, tun/tap: [`moat_shim::host_features::HOST_FEATURES`])
//! and overlayfs (the snapshot mounts of containerd's default snapshotter, which the shim
//! mounts). No vsock module is needed on the host: moat-vmm's virtio-vsock is a userspace device
//! behind a Unix socket (hybrid vsock), not `vhost_vsock`; the `vsock` line says so and whether
//! `vhost_vsock` is loaded anyway.
//!
//! Everything is read below a root directory (`/` normally), so the classification is unit-tested
//! on a fake tree.

use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use moat_cli::containerd_config::{self as cc, RUNTIME_TYPE};
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
            // The installer ships the kernel without its config: nothing to verify, nothing wrong.
            Err(_) => items.push(item(
                Verdict::Ok,
                "guest kernel",
                format!("{} (ELF vmlinux)", kernel.display()),
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

fn check_containerd() -> Vec<Item> {
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
    items
}

/// `path` (absolute, as containerd names it) inside the tree at `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Whether the containerd config containerd runs with has the moat runtime. `binary`, when
/// given, is asked for its `config dump` of the file (the truth, drop-ins included).
fn check_containerd_config(root: &Path, binary: Option<&Path>) -> Vec<Item> {
    const NAME: &str = "containerd config";
    let proc = root.join("proc");
    let location = cc::locate(&proc, None);
    let file = under(root, &location.path);
    let shown = format!("{} ({})", location.path.display(), location.reason());
    let install =
        format!("run `moat install` to add it (`ctr --runtime {RUNTIME_TYPE}` works without it)");
    let text = match cc::read_config(&file) {
        Ok(Some(t)) => t,
        Ok(None) => {
            return vec![item(
                Verdict::Warn,
                NAME,
                format!("no {shown}: containerd runs on its defaults, without a moat runtime, so Kubernetes cannot select moat; {install}"),
            )]
        }
        Err(e) => return vec![item(Verdict::Warn, NAME, e.to_string())],
    };
    let scan = match cc::scan(&file, &text) {
        Ok(s) => s,
        Err(e) => return vec![item(Verdict::Fail, NAME, e.to_string())],
    };
    let mut items = Vec::new();
    let dumped = binary.map(|b| (b, cc::dump_file(b, &file)));
    let found = scan
        .runtimes
        .iter()
        .find(|r| r.runtime_type.as_deref() == Some(RUNTIME_TYPE));
    let in_dump = match &dumped {
        Some((_, Ok(d))) => Some(cc::dumped_runtimes(d)),
        _ => None,
    };
    let dump_has = |name: &str| {
        in_dump
            .as_ref()
            .map(|rs| rs.iter().any(|(n, t)| n == name && t == RUNTIME_TYPE))
    };
    match (found, &in_dump) {
        (Some(r), _) if dump_has(&r.name) != Some(false) => {
            let from = if r.file == file {
                String::new()
            } else {
                format!(" (from the import {})", r.file.display())
            };
            let checked = if in_dump.is_some() { ", as `containerd config dump` confirms" } else { "" };
            items.push(item(
                Verdict::Ok,
                NAME,
                format!("{shown} has runtime {} ({RUNTIME_TYPE}){from}{checked}", r.name),
            ));
        }
        (Some(r), _) => items.push(item(
            Verdict::Warn,
            NAME,
            format!(
                "{} defines runtime {} ({RUNTIME_TYPE}) but containerd's `config dump` of {shown} does not show it (a plugin of another config version?); {install}",
                r.file.display(),
                r.name
            ),
        )),
        (None, Some(rs)) if rs.iter().any(|(_, t)| t == RUNTIME_TYPE) => {
            let names: Vec<&str> = rs.iter().filter(|(_, t)| t == RUNTIME_TYPE).map(|(n, _)| n.as_str()).collect();
            items.push(item(
                Verdict::Ok,
                NAME,
                format!("containerd's `config dump` of {shown} has runtime {} ({RUNTIME_TYPE}), from a drop-in containerd reads by itself", names.join(", ")),
            ));
        }
        (None, _) => items.push(item(
            Verdict::Warn,
            NAME,
            format!("{shown} has no runtime of type {RUNTIME_TYPE}, so Kubernetes cannot select moat; {install}"),
        )),
    }
    if let Some((b, Err(e))) = &dumped {
        items.push(item(
            Verdict::Warn,
            NAME,
            format!(
                "{} cannot read {}: {e}",
                b.display(),
                location.path.display()
            ),
        ));
    }
    for (import, why) in &scan.bad_imports {
        items.push(item(
            Verdict::Warn,
            NAME,
            format!("import {}: {why}", import.display()),
        ));
    }
    if scan.cri_disabled {
        items.push(item(
            Verdict::Warn,
            NAME,
            format!("{} disables the CRI plugin (disabled_plugins): Kubernetes cannot use containerd at all", location.path.display()),
        ));
    }
    if let Some(c) = &location.containerd {
        if cc::started_before_change(&proc, c.pid, &file) == Some(true) {
            items.push(item(
                Verdict::Warn,
                NAME,
                format!(
                    "containerd (pid {}) started before {} last changed, so it runs without the change: systemctl restart containerd",
                    c.pid,
                    location.path.display()
                ),
            ));
        }
    }
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

/// The host's vsock: moat needs none (hybrid vsock); says whether `vhost_vsock` is there anyway.
fn check_vsock(root: &Path) -> Item {
    let state = match module_state(root, "vhost_vsock", "CONFIG_VHOST_VSOCK") {
        ModuleState::Loaded => "vhost_vsock is loaded (moat does not use it)",
        ModuleState::BuiltIn => "vhost_vsock is built in (moat does not use it)",
        _ => "vhost_vsock is not loaded, and need not be",
    };
    item(
        Verdict::Ok,
        "vsock",
        format!("no host vsock module needed: moat-vmm's virtio-vsock is a userspace device behind a Unix socket (hybrid vsock); {state}"),
    )
}

/// Runs every check against the tree at `root` with `config`.
pub fn run(root: &Path, config: &Config) -> Vec<Item> {
    let mut items = check_kvm(root);
    items.extend(check_guest(config));
    items.extend(check_containerd());
    let location = cc::locate(&root.join("proc"), None);
    items.extend(check_containerd_config(
        root,
        cc::containerd_binary(&location).as_deref(),
    ));
    items.extend(check_kernel_features(root));
    items.extend(check_host_network(root));
    items.push(check_vsock(root));
    items
}

#[cfg(test)]
mod tests;
