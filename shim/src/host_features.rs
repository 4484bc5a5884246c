//! The host kernel features pod networking needs ([`HOST_FEATURES`]: the tc ingress qdisc, the
//! u32 classifier, the mirred action and tun/tap): whether each is built in, loaded or loadable
//! ([`module_state`], also what `moat check` reports), loading the missing ones before the shim
//! touches a pod's netns ([`ensure_host_features`]), and turning a kernel answer that means "no
//! such feature" into an error that names the module and how to load it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{info, warn};

use crate::netns::NetworkError;

/// A host kernel feature the pod network needs, provided by a module or built in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFeature {
    /// What it is, for messages (`tc ingress qdisc`).
    pub what: &'static str,
    /// The module that provides it (`sch_ingress`).
    pub module: &'static str,
    /// The kernel option that builds it (`CONFIG_NET_SCH_INGRESS`).
    pub config: &'static str,
}

/// The tc ingress qdisc, put on the veth and on the tap.
pub const TC_INGRESS: HostFeature = HostFeature {
    what: "tc ingress qdisc",
    module: "sch_ingress",
    config: "CONFIG_NET_SCH_INGRESS",
};
/// The u32 classifier of the match-all redirect filters.
pub const TC_U32: HostFeature = HostFeature {
    what: "tc u32 classifier",
    module: "cls_u32",
    config: "CONFIG_NET_CLS_U32",
};
/// The mirred action of the redirect filters.
pub const TC_MIRRED: HostFeature = HostFeature {
    what: "tc mirred action",
    module: "act_mirred",
    config: "CONFIG_NET_ACT_MIRRED",
};
/// tun/tap: `/dev/net/tun`, for the taps moat-vmm opens.
pub const TUN: HostFeature = HostFeature {
    what: "tun/tap devices",
    module: "tun",
    config: "CONFIG_TUN",
};
/// Everything the tap/tc bridge needs from the host kernel.
pub const HOST_FEATURES: &[HostFeature] = &[TC_INGRESS, TC_U32, TC_MIRRED, TUN];

/// Whether the kernel of the tree at a root has a module's feature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleState {
    /// Listed in `/proc/modules`.
    Loaded,
    /// Built into the kernel (`modules.builtin`, `/boot/config-*` `=y`, or `/sys/module/<name>`).
    BuiltIn,
    /// Installed as a module (`modules.dep`), not loaded yet.
    Loadable,
    /// The kernel builds it as a module (`=m`) but `/lib/modules/<release>` does not have it.
    NotInstalled {
        /// The kernel release (`uname -r`).
        release: String,
    },
    /// The kernel's config says it is not built at all.
    NotInKernel {
        /// The kernel release.
        release: String,
    },
    /// Neither built in nor installed per `/lib/modules/<release>`, and no kernel config says
    /// whether it would be a module (not built, or in a modules package not installed).
    NotFound {
        /// The kernel release.
        release: String,
    },
    /// Not loaded, and neither the module lists nor the kernel config tell more.
    Unknown,
}

impl ModuleState {
    /// True when the feature is usable now, without loading anything.
    pub fn present(&self) -> bool {
        matches!(self, ModuleState::Loaded | ModuleState::BuiltIn)
    }
}

/// Module names are spelled with `_` or `-` interchangeably.
fn same_module(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .all(|(x, y)| x == y || (x == b'-' || x == b'_') && (y == b'-' || y == b'_'))
}

/// The module name of a `modules.builtin` / `modules.dep` path (`kernel/net/sched/sch_ingress.ko.xz`).
fn module_of_path(path: &str) -> Option<&str> {
    let file = path.rsplit('/').next()?;
    let (name, _) = file.split_once(".ko")?;
    Some(name)
}

/// Classifies `module` for the kernel running the tree at `root` (`/` normally; a fake tree in
/// tests): `/proc/modules`, `/sys/module`, `/lib/modules/<release>/modules.{builtin,dep}` and
/// `/boot/config-<release>`.
pub fn module_state(root: &Path, module: &str, config: &str) -> ModuleState {
    let read = |p: &str| std::fs::read_to_string(root.join(p)).ok();
    if read("proc/modules").is_some_and(|t| {
        t.lines()
            .filter_map(|l| l.split_whitespace().next())
            .any(|m| same_module(m, module))
    }) {
        return ModuleState::Loaded;
    }
    if root.join("sys/module").join(module).exists() {
        return ModuleState::BuiltIn;
    }
    let release = read("proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_default();
    if release.is_empty() {
        return ModuleState::Unknown;
    }
    let listed = |file: &str| {
        read(&format!("lib/modules/{release}/{file}")).map(|t| {
            t.lines()
                .filter_map(|l| module_of_path(l.split(':').next().unwrap_or("")))
                .any(|m| same_module(m, module))
        })
    };
    let builtin = listed("modules.builtin");
    let installed = listed("modules.dep");
    if builtin == Some(true) {
        return ModuleState::BuiltIn;
    }
    if installed == Some(true) {
        return ModuleState::Loadable;
    }
    let setting = read(&format!("boot/config-{release}")).map(|t| {
        t.lines()
            .find_map(|l| {
                let v = l.strip_prefix(config)?.strip_prefix('=')?;
                Some(v.trim().to_owned())
            })
            .unwrap_or_default()
    });
    match setting.as_deref() {
        Some("y") => ModuleState::BuiltIn,
        Some("m") if installed.is_some() => ModuleState::NotInstalled { release },
        Some("m") => ModuleState::Unknown,
        Some(_) => ModuleState::NotInKernel { release },
        // No config to ask; both lists present and neither names it: not in this kernel.
        None if builtin.is_some() && installed.is_some() => ModuleState::NotFound { release },
        None => ModuleState::Unknown,
    }
}

/// What [`ensure_host_features`] could not make present, with why, by module.
#[derive(Debug, Clone, Default)]
pub struct HostFeatureNotes(Vec<(&'static str, String)>);

impl HostFeatureNotes {
    fn note(&self, module: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(m, _)| *m == module)
            .map(|(_, n)| n.as_str())
    }
}

/// Set once every host feature was found present: later pods skip the check.
static HOST_FEATURES_PRESENT: AtomicBool = AtomicBool::new(false);

/// Runs `modprobe MODULE` (from `PATH`, else `/sbin` or `/usr/sbin`); `Err` says why it failed.
fn modprobe(module: &str) -> Result<(), String> {
    let mut last = String::new();
    for prog in ["modprobe", "/sbin/modprobe", "/usr/sbin/modprobe"] {
        match std::process::Command::new(prog)
            .arg(module)
            .stdin(std::process::Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => {
                let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                return Err(if err.is_empty() {
                    format!("modprobe {module} exited with {}", out.status)
                } else {
                    err
                });
            }
            Err(e) => last = format!("cannot run modprobe: {e}"),
        }
    }
    Err(last)
}

/// Makes sure every [`HOST_FEATURES`] module is built in or loaded, loading the missing ones
/// with `modprobe`. Never fails by itself (the lists it reads can be incomplete, and the kernel
/// may load a module on first use): what it could not load is logged and returned, so that a
/// later failure of the feature can say why.
pub fn ensure_host_features() -> HostFeatureNotes {
    let mut notes = HostFeatureNotes::default();
    if HOST_FEATURES_PRESENT.load(Ordering::Relaxed) {
        return notes;
    }
    let root = Path::new("/");
    for f in HOST_FEATURES {
        let state = module_state(root, f.module, f.config);
        if state.present() {
            continue;
        }
        match modprobe(f.module) {
            Ok(()) => info!("host kernel: loaded {} for the {}", f.module, f.what),
            Err(why) => {
                let note = match &state {
                    ModuleState::NotInKernel { release } => {
                        format!("kernel {release} is built without {}; {why}", f.config)
                    }
                    ModuleState::NotInstalled { release } | ModuleState::NotFound { release } => {
                        format!(
                            "{} is not installed in /lib/modules/{release} (install the kernel's \
                         modules package, e.g. linux-modules-extra-{release}); {why}",
                            f.module
                        )
                    }
                    _ => why,
                };
                warn!(
                    "host kernel: {} ({}) is not loaded and modprobe failed: {note}",
                    f.what, f.module
                );
                notes.0.push((f.module, note));
            }
        }
    }
    if notes.0.is_empty() {
        HOST_FEATURES_PRESENT.store(true, Ordering::Relaxed);
    }
    notes
}

/// True for errors that mean "the kernel has no such qdisc/classifier/action/device".
pub(crate) fn means_missing_feature(errno: i32) -> bool {
    [libc::ENOENT, libc::EOPNOTSUPP, libc::ENODEV, libc::ENXIO].contains(&errno)
}

/// The [`NetworkError::HostFeature`] for a failed `step` that needed `features` (several when
/// the kernel's answer does not tell which one is missing, as for a u32 filter with a mirred
/// action); the ones [`ensure_host_features`] did load are left out when others remain.
pub(crate) fn host_feature_error(
    netns: &Path,
    features: &[HostFeature],
    notes: &HostFeatureNotes,
    step: String,
    source: Box<dyn std::error::Error + Send + Sync>,
) -> NetworkError {
    let noted: Vec<&HostFeature> = features
        .iter()
        .filter(|f| notes.note(f.module).is_some())
        .collect();
    let named: Vec<&HostFeature> = if noted.is_empty() {
        features.iter().collect()
    } else {
        noted
    };
    let what = named.iter().map(|f| f.what).collect::<Vec<_>>().join(" / ");
    let modules = named.iter().map(|f| f.module).collect::<Vec<_>>();
    let mut advice = format!(
        "load {} (modprobe {}), or use a host kernel with {}",
        modules.join(" and "),
        modules.join(" && modprobe "),
        named
            .iter()
            .map(|f| f.config)
            .collect::<Vec<_>>()
            .join(", ")
    );
    for f in &named {
        if let Some(n) = notes.note(f.module) {
            advice.push_str(&format!("; the shim's modprobe {}: {n}", f.module));
        }
    }
    NetworkError::HostFeature {
        netns: netns.to_owned(),
        what,
        advice,
        step,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A fake root for [`module_state`], removed on drop.
    struct Tree(PathBuf);

    impl Tree {
        fn new(files: &[(&str, &str)]) -> Tree {
            use std::sync::atomic::AtomicU32;
            static N: AtomicU32 = AtomicU32::new(0);
            let root = std::env::temp_dir().join(format!(
                "moat-network-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            for (path, text) in files {
                let p = root.join(path);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, text).unwrap();
            }
            std::fs::create_dir_all(&root).unwrap();
            Tree(root)
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const REL: (&str, &str) = ("proc/sys/kernel/osrelease", "6.1.0-57-amd64\n");

    #[test]
    fn module_states_from_procfs_module_lists_and_kernel_config() {
        let state = |t: &Tree| module_state(&t.0, "sch_ingress", "CONFIG_NET_SCH_INGRESS");
        let loaded = Tree::new(&[(
            "proc/modules",
            "act_mirred 28672 2 - Live 0x0\nsch_ingress 16384 2 - Live 0x0\n",
        )]);
        assert_eq!(state(&loaded), ModuleState::Loaded);
        let builtin = Tree::new(&[
            REL,
            ("proc/modules", ""),
            (
                "lib/modules/6.1.0-57-amd64/modules.builtin",
                "kernel/net/sched/sch_ingress.ko\n",
            ),
        ]);
        assert_eq!(state(&builtin), ModuleState::BuiltIn);
        let loadable = Tree::new(&[
            REL,
            ("lib/modules/6.1.0-57-amd64/modules.builtin", ""),
            (
                "lib/modules/6.1.0-57-amd64/modules.dep",
                "kernel/net/sched/cls_u32.ko.xz:\nkernel/net/sched/sch_ingress.ko.xz: kernel/x.ko.xz\n",
            ),
        ]);
        assert_eq!(state(&loadable), ModuleState::Loadable);
        assert!(!state(&loadable).present());
        let not_installed = Tree::new(&[
            REL,
            ("lib/modules/6.1.0-57-amd64/modules.builtin", ""),
            (
                "lib/modules/6.1.0-57-amd64/modules.dep",
                "kernel/net/sched/cls_u32.ko:\n",
            ),
            ("boot/config-6.1.0-57-amd64", "CONFIG_NET_SCH_INGRESS=m\n"),
        ]);
        assert!(matches!(
            state(&not_installed),
            ModuleState::NotInstalled { .. }
        ));
        let not_built = Tree::new(&[
            REL,
            (
                "boot/config-6.1.0-57-amd64",
                "# CONFIG_NET_SCH_INGRESS is not set\n",
            ),
        ]);
        assert!(matches!(state(&not_built), ModuleState::NotInKernel { .. }));
        let config_y = Tree::new(&[
            REL,
            ("boot/config-6.1.0-57-amd64", "CONFIG_NET_SCH_INGRESS=y\n"),
        ]);
        assert_eq!(state(&config_y), ModuleState::BuiltIn);
        assert_eq!(state(&Tree::new(&[REL])), ModuleState::Unknown);
        assert_eq!(state(&Tree::new(&[])), ModuleState::Unknown);
        // `-` and `_` are the same in module names.
        let dashed = Tree::new(&[("proc/modules", "sch-ingress 1 0 - Live 0x0\n")]);
        assert_eq!(state(&dashed), ModuleState::Loaded);
    }

    #[test]
    fn missing_feature_errors_name_the_module_and_how_to_load_it() {
        let source =
            || -> Box<dyn std::error::Error + Send + Sync> { Box::new(nix::Error::ENOENT) };
        let netns = Path::new("/run/netns/p");
        let e = host_feature_error(
            netns,
            &[TC_INGRESS],
            &HostFeatureNotes::default(),
            "adding an ingress qdisc to eth0".into(),
            source(),
        )
        .to_string();
        assert!(
            e.contains("tc ingress qdisc unavailable in the host kernel: load sch_ingress (modprobe sch_ingress)"),
            "{e}"
        );
        assert!(e.contains("CONFIG_NET_SCH_INGRESS"), "{e}");
        assert!(e.contains("adding an ingress qdisc to eth0"), "{e}");
        // The filter's error does not say whether u32 or mirred is missing: both are named,
        // unless the shim could load one of them.
        let e = host_feature_error(
            netns,
            &[TC_U32, TC_MIRRED],
            &HostFeatureNotes::default(),
            "redirecting".into(),
            source(),
        )
        .to_string();
        assert!(
            e.contains("load cls_u32 and act_mirred (modprobe cls_u32 && modprobe act_mirred)"),
            "{e}"
        );
        let notes = HostFeatureNotes(vec![(
            "act_mirred",
            "modprobe: FATAL: Module act_mirred not found".into(),
        )]);
        let e = host_feature_error(
            netns,
            &[TC_U32, TC_MIRRED],
            &notes,
            "redirecting".into(),
            source(),
        )
        .to_string();
        assert!(e.contains("tc mirred action unavailable"), "{e}");
        assert!(!e.contains("cls_u32"), "{e}");
        assert!(e.contains("Module act_mirred not found"), "{e}");
        assert!(means_missing_feature(libc::ENOENT));
        assert!(means_missing_feature(libc::EOPNOTSUPP));
        assert!(!means_missing_feature(libc::EEXIST));
        assert!(!means_missing_feature(libc::EPERM));
    }
}
