//! Pod networking on the host: connects the pod's network namespace (made by
//! CNI, named in the OCI spec) to the microVM, and undoes it.
//!
//! Model ("tc redirect", as Kata's default): inside the pod's netns, next to
//! each veth-like interface CNI created, the shim creates a persistent tap
//! `tap<N>_moat` with the veth's MTU, puts an ingress qdisc on both and a
//! match-all u32 filter with a `mirred egress redirect` action on each, so
//! every frame arriving on the veth leaves through the tap (into the VM) and
//! every frame the VM sends leaves through the veth. moat-vmm joins the
//! netns (`--netns`) and opens the taps (`--net tap=...,mac=<veth MAC>`);
//! the guest interface takes the veth's MAC, addresses and routes, which the
//! shim reads here and hands to the agent in `CreateSandbox`.
//!
//! What was created is recorded in `<state dir>/network.json`, so teardown
//! ([`teardown_recorded`]) also works from `delete` after a crashed shim.
//! Teardown deletes the taps (which drops their qdisc and filter) and the
//! ingress qdiscs put on the veths (which drops their filters), leaving the
//! netns as CNI made it. A failed setup undoes its own steps before
//! returning.
//!
//! The bridge needs four host kernel features: the ingress qdisc (`sch_ingress`), the u32
//! classifier (`cls_u32`), the mirred action (`act_mirred`) and tun/tap (`tun`)
//! ([`HOST_FEATURES`]). Before touching the netns, setup makes sure each is built in or loaded,
//! running `modprobe` for the ones that are not ([`ensure_host_features`]); a netlink or
//! `/dev/net/tun` failure that means "no such kernel feature" (`ENOENT`, `EOPNOTSUPP`, `ENODEV`)
//! becomes [`NetworkError::HostFeature`], naming the module and how to load it, instead of a
//! bare "No such file or directory". `moat check` reports the same features
//! ([`module_state`]).
//!
//! Netlink goes through the `rtnetlink` crate. Every operation runs on a
//! dedicated thread that has joined the pod's netns ([`crate::netns`], which
//! also reads the links, addresses and routes CNI made); this module owns the
//! tap/tc bridge, its record and its teardown.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::TryStreamExt;
use moat_protocol::agent as pb;
use rtnetlink::packet_route::link::InfoKind;
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{info, warn};

pub use crate::netns::NetworkError;
use crate::netns::{addresses, errno_of, in_netns, links, nl, routes, Link};

/// Suffix of the taps the shim creates (`tap0_moat`, ...).
pub const TAP_SUFFIX: &str = "_moat";
/// File in the sandbox state directory that records what setup created.
pub const RECORD_FILE: &str = "network.json";
/// `ETH_P_ALL` in network byte order, as tc filters expect their protocol.
const ETH_P_ALL_BE: u16 = (libc::ETH_P_ALL as u16).to_be();

/// The pod network namespace named by the OCI spec: the `path` of the
/// `linux.namespaces` entry of type `network`. `None` when there is no such
/// entry or it has no path (no pod network: the VM gets no NIC).
pub fn netns_path(spec: &Value) -> Result<Option<PathBuf>, NetworkError> {
    let Some(list) = spec.pointer("/linux/namespaces").and_then(Value::as_array) else {
        return Ok(None);
    };
    let path = list
        .iter()
        .find(|ns| ns.get("type").and_then(Value::as_str) == Some("network"))
        .and_then(|ns| ns.get("path"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    if path.is_empty() {
        return Ok(None);
    }
    if !path.starts_with('/') {
        return Err(NetworkError::RelativePath(path.to_owned()));
    }
    Ok(Some(PathBuf::from(path)))
}

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
fn means_missing_feature(errno: i32) -> bool {
    [libc::ENOENT, libc::EOPNOTSUPP, libc::ENODEV, libc::ENXIO].contains(&errno)
}

/// The [`NetworkError::HostFeature`] for a failed `step` that needed `features` (several when
/// the kernel's answer does not tell which one is missing, as for a u32 filter with a mirred
/// action); the ones [`ensure_host_features`] did load are left out when others remain.
fn host_feature_error(
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

/// One veth bridged to one tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bridged {
    /// The CNI interface.
    pub veth: String,
    /// The tap the shim created.
    pub tap: String,
    /// True once the shim added the veth's ingress qdisc.
    pub veth_qdisc: bool,
}

/// What setup created in the netns (the content of [`RECORD_FILE`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The netns path.
    pub netns: PathBuf,
    /// The pairs, in VM NIC order.
    pub links: Vec<Bridged>,
}

/// A set-up pod network.
#[derive(Debug, Clone, Default)]
pub struct PodNetwork {
    /// What to undo.
    pub record: Record,
    /// moat-vmm's `--net` values, in order.
    pub vmm_nets: Vec<String>,
    /// Interfaces for the agent.
    pub interfaces: Vec<pb::Interface>,
    /// Routes for the agent.
    pub routes: Vec<pb::Route>,
}

impl PodNetwork {
    /// moat-vmm arguments: `--netns PATH` and one `--net` per interface
    /// (nothing when the netns had no interface to bridge).
    pub fn vmm_args(&self) -> Vec<OsString> {
        if self.vmm_nets.is_empty() {
            return Vec::new();
        }
        let mut args = vec![
            OsString::from("--netns"),
            self.record.netns.clone().into_os_string(),
        ];
        for n in &self.vmm_nets {
            args.push("--net".into());
            args.push(n.into());
        }
        args
    }
}

/// Sets up the pod network in the netns at `netns` and records it in
/// `state_dir`. On error nothing is left in the netns.
pub async fn setup(netns: &Path, state_dir: &Path) -> Result<PodNetwork, NetworkError> {
    let netns = netns.to_owned();
    let record_path = state_dir.join(RECORD_FILE);
    let net = {
        let netns2 = netns.clone();
        tokio::task::spawn_blocking(move || setup_blocking(&netns2))
            .await
            .map_err(|_| NetworkError::Worker(netns.clone()))??
    };
    let json = serde_json::to_vec_pretty(&net.record).expect("a Record serializes");
    if let Err(source) = std::fs::write(&record_path, json) {
        teardown(&net.record);
        return Err(NetworkError::Record {
            path: record_path,
            source,
        });
    }
    info!(
        "pod network {}: bridged {:?}",
        netns.display(),
        net.record.links
    );
    Ok(net)
}

fn setup_blocking(netns: &Path) -> Result<PodNetwork, NetworkError> {
    let path = netns.to_owned();
    // In the shim's own (host) namespaces: modprobe is a host matter.
    let notes = ensure_host_features();
    in_netns(netns, move |handle| async move {
        let mut net = PodNetwork {
            record: Record {
                netns: path.clone(),
                links: Vec::new(),
            },
            ..Default::default()
        };
        match bridge_all(&handle, &path, &notes, &mut net).await {
            Ok(()) => Ok(net),
            Err(e) => {
                undo(&handle, &net.record).await;
                Err(e)
            }
        }
    })
}

/// True for an interface to bridge: an Ethernet-like device (has a MAC),
/// not loopback and not a tun/tap (ours or anyone's).
fn bridgeable(l: &Link) -> bool {
    !l.loopback
        && l.mac.is_some()
        && !matches!(l.kind, Some(InfoKind::Tun))
        && !l.name.ends_with(TAP_SUFFIX)
}

async fn bridge_all(
    handle: &Handle,
    netns: &Path,
    notes: &HostFeatureNotes,
    net: &mut PodNetwork,
) -> Result<(), NetworkError> {
    // A netlink failure that means "no such kernel feature" names the feature and its module.
    let tc = |features: &'static [HostFeature], step: String| {
        move |e: rtnetlink::Error| {
            if means_missing_feature(errno_of(&e)) {
                host_feature_error(netns, features, notes, step, Box::new(e))
            } else {
                nl(netns, step)(e)
            }
        }
    };
    let all = links(handle, netns).await?;
    for (n, veth) in all.iter().filter(|l| bridgeable(l)).enumerate() {
        let tap = format!("tap{n}{TAP_SUFFIX}");
        let mac = veth.mac.expect("bridgeable links have a MAC");
        create_tap(netns, &tap, notes)?;
        net.record.links.push(Bridged {
            veth: veth.name.clone(),
            tap: tap.clone(),
            veth_qdisc: false,
        });
        let tap_index = handle
            .link()
            .get()
            .match_name(tap.clone())
            .execute()
            .try_next()
            .await
            .map_err(nl(netns, format!("looking up {tap}")))?
            .map(|m| m.header.index)
            .ok_or_else(|| NetworkError::Netlink {
                netns: netns.to_owned(),
                what: format!("looking up {tap}"),
                source: rtnetlink::Error::RequestFailed,
            })?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(tap_index)
                    .mtu(veth.mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(netns, format!("setting {tap} up with MTU {}", veth.mtu)))?;
        match add_ingress(handle, veth.index).await {
            Ok(()) => {
                if let Some(last) = net.record.links.last_mut() {
                    last.veth_qdisc = true;
                }
            }
            Err(e) if errno_of(&e) == libc::EEXIST => {
                return Err(NetworkError::IngressTaken {
                    netns: netns.to_owned(),
                    veth: veth.name.clone(),
                })
            }
            Err(e) => {
                return Err(tc(
                    &[TC_INGRESS],
                    format!("adding an ingress qdisc to {}", veth.name),
                )(e))
            }
        }
        add_ingress(handle, tap_index).await.map_err(tc(
            &[TC_INGRESS],
            format!("adding an ingress qdisc to {tap}"),
        ))?;
        redirect(handle, veth.index, tap_index).await.map_err(tc(
            &[TC_U32, TC_MIRRED],
            format!(
                "redirecting {} to {tap} (u32 filter, mirred action)",
                veth.name
            ),
        ))?;
        redirect(handle, tap_index, veth.index).await.map_err(tc(
            &[TC_U32, TC_MIRRED],
            format!(
                "redirecting {tap} to {} (u32 filter, mirred action)",
                veth.name
            ),
        ))?;

        net.vmm_nets.push(format!("tap={tap},mac={mac}"));
        net.interfaces.push(pb::Interface {
            name: veth.name.clone(),
            mac: mac.to_string(),
            addresses: addresses(handle, netns, veth.index).await?,
            mtu: veth.mtu,
            ..Default::default()
        });
        net.routes
            .extend(routes(handle, netns, veth.index, &veth.name).await?);
    }
    Ok(())
}

async fn add_ingress(handle: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
    handle.qdisc().add(index as i32).ingress().execute().await
}

async fn redirect(handle: &Handle, from: u32, to: u32) -> Result<(), rtnetlink::Error> {
    handle
        .traffic_filter(from as i32)
        .add()
        .ingress()
        .protocol(ETH_P_ALL_BE)
        .redirect(to)?
        .execute()
        .await
}

/// `struct ifreq` as TUNSETIFF reads it: name, flags, padding to the union's size.
#[repr(C)]
struct TunIfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates the persistent tap `name` in the calling thread's netns
/// (single queue, as moat-vmm opens it).
fn create_tap(netns: &Path, name: &str, notes: &HostFeatureNotes) -> Result<(), NetworkError> {
    let sys = |what: String| {
        let netns = netns.to_owned();
        move |source| NetworkError::Sys {
            netns,
            what,
            source,
        }
    };
    let tun = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| {
            let errno = nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
            if means_missing_feature(errno as i32) {
                host_feature_error(
                    netns,
                    &[TUN],
                    notes,
                    "opening /dev/net/tun".into(),
                    Box::new(errno),
                )
            } else {
                sys("opening /dev/net/tun".into())(errno)
            }
        })?;
    let mut req = TunIfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    for (d, s) in req
        .name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads and writes one ifreq-sized struct; `req` is one.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(sys(format!("creating tap {name} (TUNSETIFF)"))(
            nix::Error::last(),
        ));
    }
    // SAFETY: TUNSETPERSIST takes an integer argument by value.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(sys(format!("making tap {name} persistent"))(
            nix::Error::last(),
        ));
    }
    Ok(())
}

/// Undoes a record from inside its netns; errors are logged (and "already
/// gone" is success): teardown goes as far as it can.
async fn undo(handle: &Handle, record: &Record) {
    let Ok(all) = links(handle, &record.netns).await else {
        warn!(
            "pod network {}: cannot list interfaces for teardown",
            record.netns.display()
        );
        return;
    };
    for b in &record.links {
        if b.veth_qdisc {
            if let Some(v) = all.iter().find(|l| l.name == b.veth) {
                let mut req = handle.qdisc().del(v.index as i32);
                req.message_mut().header.parent = TcHandle::INGRESS;
                if let Err(e) = req.execute().await {
                    if ![libc::ENOENT, libc::EINVAL].contains(&errno_of(&e)) {
                        warn!(
                            "pod network {}: removing the ingress qdisc of {}: {e}",
                            record.netns.display(),
                            b.veth
                        );
                    }
                }
            }
        }
        if let Some(t) = all.iter().find(|l| l.name == b.tap) {
            if let Err(e) = handle.link().del(t.index).execute().await {
                if errno_of(&e) != libc::ENODEV {
                    warn!(
                        "pod network {}: deleting {}: {e}",
                        record.netns.display(),
                        b.tap
                    );
                }
            }
        }
    }
}

/// Undoes `record` (the VMM must be gone: it holds the taps open). A netns
/// that no longer exists has nothing to undo.
pub fn teardown(record: &Record) {
    if record.links.is_empty() {
        return;
    }
    let r = record.clone();
    match in_netns(&record.netns, move |handle| async move {
        undo(&handle, &r).await;
        Ok(())
    }) {
        Ok(()) => info!("pod network {}: torn down", record.netns.display()),
        Err(NetworkError::OpenNetns { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!("{e}"),
    }
}

/// Undoes what the record file in `state_dir` names, then removes the file.
pub fn teardown_recorded(state_dir: &Path) {
    let path = state_dir.join(RECORD_FILE);
    let Ok(bytes) = std::fs::read(&path) else {
        return;
    };
    match serde_json::from_slice::<Record>(&bytes) {
        Ok(record) => teardown(&record),
        Err(e) => warn!("{}: {e}; pod network not torn down", path.display()),
    }
    let _ = std::fs::remove_file(&path);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn netns_path_from_the_spec() {
        let spec = |ns: Value| json!({"linux": {"namespaces": ns}});
        assert_eq!(
            netns_path(&spec(json!([
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1234"}
            ])))
            .unwrap(),
            Some(PathBuf::from("/var/run/netns/cni-1234"))
        );
        assert_eq!(
            netns_path(&spec(json!([{"type": "network"}]))).unwrap(),
            None
        );
        assert_eq!(
            netns_path(&spec(json!([{"type": "network", "path": ""}]))).unwrap(),
            None
        );
        assert_eq!(netns_path(&spec(json!([{"type": "pid"}]))).unwrap(), None);
        assert_eq!(netns_path(&json!({})).unwrap(), None);
        assert!(matches!(
            netns_path(&spec(json!([{"type": "network", "path": "netns/x"}]))),
            Err(NetworkError::RelativePath(p)) if p == "netns/x"
        ));
    }

    #[test]
    fn vmm_args_name_the_netns_then_each_tap() {
        let mut net = PodNetwork::default();
        assert!(net.vmm_args().is_empty());
        net.record.netns = "/run/netns/p".into();
        net.vmm_nets = vec![
            "tap=tap0_moat,mac=02:00:00:00:00:01".into(),
            "tap=tap1_moat,mac=02:00:00:00:00:02".into(),
        ];
        assert_eq!(
            net.vmm_args(),
            [
                "--netns",
                "/run/netns/p",
                "--net",
                "tap=tap0_moat,mac=02:00:00:00:00:01",
                "--net",
                "tap=tap1_moat,mac=02:00:00:00:00:02"
            ]
            .map(OsString::from)
        );
    }

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
