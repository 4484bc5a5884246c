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
//! ([`crate::host_features::HOST_FEATURES`]). Before touching the netns, setup makes sure each is built in or loaded,
//! running `modprobe` for the ones that are not ([`crate::host_features`]); a netlink or
//! `/dev/net/tun` failure that means "no such kernel feature" (`ENOENT`, `EOPNOTSUPP`, `ENODEV`)
//! becomes [`NetworkError::HostFeature`], naming the module and how to load it, instead of a
//! bare "No such file or directory". `moat check` reports the same features.
//!
//! Netlink goes through the `rtnetlink` crate. Every operation runs on a
//! dedicated thread that has joined the pod's netns ([`crate::netns`], which
//! also reads the links, addresses and routes CNI made); this module owns the
//! tap/tc bridge, its record and its teardown.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use moat_protocol::agent as pb;
use rtnetlink::packet_route::link::InfoKind;
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{info, warn};

use crate::host_features::{
    ensure_host_features, host_feature_error, means_missing_feature, HostFeature, HostFeatureNotes,
    TC_INGRESS, TC_MIRRED, TC_U32, TUN,
};
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
}
