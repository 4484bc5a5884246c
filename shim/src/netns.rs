//! Working inside a pod's network namespace: the worker thread that joins it (netlink sockets and
//! `/dev/net/tun` files belong to the netns of the thread that opens them, so the shim's tokio
//! workers never change namespace), and reading what CNI made there — links, their addresses and
//! routes — in the shape the agent takes. [`crate::network`] builds the tap/tc bridge on top.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use moat_protocol::agent as pb;
use moat_protocol::net::Mac;
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

/// Errors setting up or reading the pod network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The spec's network namespace entry is unusable.
    #[error("OCI spec: network namespace path {0:?} must be absolute")]
    RelativePath(String),
    /// The netns file cannot be opened.
    #[error("opening the pod network namespace {path}: {source}")]
    OpenNetns {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("pod network {netns}: {what}: {source}")]
    Sys {
        /// The netns.
        netns: PathBuf,
        /// What was being done.
        what: String,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// A netlink request failed.
    #[error("pod network {netns}: {what}: {source}")]
    Netlink {
        /// The netns.
        netns: PathBuf,
        /// What was being done.
        what: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// The veth already has an ingress qdisc (some other tool shapes it).
    #[error("pod network {netns}: {veth} already has an ingress qdisc; moat's tc redirect needs its own (remove it or drop the CNI plugin that adds it)")]
    IngressTaken {
        /// The netns.
        netns: PathBuf,
        /// The interface.
        veth: String,
    },
    /// The record file cannot be written.
    #[error("writing {path}: {source}")]
    Record {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The worker thread died.
    #[error("pod network {0}: the netns worker thread panicked")]
    Worker(PathBuf),
    /// The host kernel lacks (or has not loaded) a feature the tap/tc bridge needs.
    #[error(
        "pod network {netns}: {what} unavailable in the host kernel: {advice} ({step}: {source})"
    )]
    HostFeature {
        /// The netns.
        netns: PathBuf,
        /// The feature, e.g. `tc ingress qdisc`.
        what: String,
        /// What to do, e.g. `load sch_ingress (modprobe sch_ingress)`, with what the shim's own
        /// attempt to load it said.
        advice: String,
        /// The step that failed.
        step: String,
        /// The kernel's answer to it.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Runs `f` on a fresh thread inside the netns at `path`, with a
/// current-thread tokio runtime and an rtnetlink handle of that netns.
pub(crate) fn in_netns<T, F, Fut>(path: &Path, f: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, NetworkError>>,
{
    let file = File::open(path).map_err(|source| NetworkError::OpenNetns {
        path: path.to_owned(),
        source,
    })?;
    let netns = path.to_owned();
    let netns2 = netns.clone();
    let worker = std::thread::Builder::new()
        .name("moat-netns".into())
        .spawn(move || {
            let sys = |what: &str| {
                let netns = netns.clone();
                let what = what.to_owned();
                move |source| NetworkError::Sys {
                    netns,
                    what,
                    source,
                }
            };
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(sys("joining the netns"))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|e| {
                    sys("starting a runtime")(nix::Error::from_raw(
                        e.raw_os_error().unwrap_or(libc::EIO),
                    ))
                })?;
            rt.block_on(async move {
                let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| {
                    sys("opening an rtnetlink socket")(nix::Error::from_raw(
                        e.raw_os_error().unwrap_or(libc::EIO),
                    ))
                })?;
                let conn = tokio::spawn(conn);
                let res = f(handle).await;
                conn.abort();
                res
            })
        })
        .map_err(|e| NetworkError::Sys {
            netns: netns2.clone(),
            what: "spawning the netns worker thread".into(),
            source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)),
        })?;
    worker.join().map_err(|_| NetworkError::Worker(netns2))?
}

/// A link as listed.
pub(crate) struct Link {
    pub(crate) index: u32,
    pub(crate) name: String,
    pub(crate) mac: Option<Mac>,
    pub(crate) mtu: u32,
    pub(crate) kind: Option<InfoKind>,
    pub(crate) loopback: bool,
}

fn link_of(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        kind: None,
        loopback: m.header.flags.contains(LinkFlags::Loopback),
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Address(b) => l.mac = Mac::from_bytes(b),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = Some(k.clone());
                    }
                }
            }
            _ => {}
        }
    }
    l
}

pub(crate) async fn links(handle: &Handle, netns: &Path) -> Result<Vec<Link>, NetworkError> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl(netns, "listing interfaces"))?;
    let mut out: Vec<Link> = msgs.iter().map(link_of).collect();
    out.sort_by_key(|l| l.index);
    Ok(out)
}

pub(crate) fn nl(
    netns: &Path,
    what: impl Into<String>,
) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let netns = netns.to_owned();
    let what = what.into();
    move |source| NetworkError::Netlink {
        netns,
        what,
        source,
    }
}

pub(crate) fn errno_of(e: &rtnetlink::Error) -> i32 {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.raw_code().abs(),
        _ => 0,
    }
}

/// The veth's global addresses (link-local ones are the guest kernel's own
/// business: it derives them from the same MAC).
pub(crate) async fn addresses(
    handle: &Handle,
    netns: &Path,
    index: u32,
) -> Result<Vec<pb::IpAddress>, NetworkError> {
    let msgs: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(nl(netns, "listing addresses"))?;
    let mut out = Vec::new();
    for m in msgs {
        if m.header.index != index {
            continue;
        }
        // IFA_LOCAL is the interface's own address on point-to-point links;
        // IFA_ADDRESS elsewhere.
        let addr = m
            .attributes
            .iter()
            .find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            })
            .or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
        if let Some(ip) = addr.filter(|ip| !is_link_local(ip)) {
            out.push(pb::IpAddress {
                address: ip.to_string(),
                prefix_length: m.header.prefix_len.into(),
                ..Default::default()
            });
        }
    }
    Ok(out)
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// The veth's routes in the main table that CNI (or anyone but the kernel)
/// added: connected routes come back by themselves when the guest adds the
/// addresses.
pub(crate) async fn routes(
    handle: &Handle,
    netns: &Path,
    index: u32,
    device: &str,
) -> Result<Vec<pb::Route>, NetworkError> {
    let mut msgs: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl(netns, "listing IPv4 routes"))?;
    let v6: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl(netns, "listing IPv6 routes"))?;
    msgs.extend(v6);
    Ok(msgs
        .iter()
        .filter_map(|m| route_of(m, index, device))
        .collect())
}

/// The agent's view of one route through interface `index`, if it is one
/// to copy.
fn route_of(m: &RouteMessage, index: u32, device: &str) -> Option<pb::Route> {
    let h = &m.header;
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(h.table.into());
    if table != u32::from(rtnetlink::packet_route::route::RouteHeader::RT_TABLE_MAIN)
        || h.kind != RouteType::Unicast
        || h.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let mut oif = None;
    let mut dest = None;
    let mut gateway = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(d) => dest = ip_of(d),
            RouteAttribute::Gateway(g) => gateway = ip_of(g),
            _ => {}
        }
    }
    if oif != Some(index) {
        return None;
    }
    let destination = match dest {
        Some(d) if h.destination_prefix_length > 0 => {
            format!("{d}/{}", h.destination_prefix_length)
        }
        _ => String::new(),
    };
    if gateway.as_ref().is_some_and(is_link_local) && destination.is_empty() {
        // An IPv6 default route via the router's link-local address is
        // learnt from router advertisements; the guest learns it too.
        return None;
    }
    Some(pb::Route {
        destination,
        gateway: gateway.map(|g| g.to_string()).unwrap_or_default(),
        device: device.to_owned(),
        scope: u8::from(h.scope).into(),
        ..Default::default()
    })
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_copied_are_the_non_kernel_main_table_ones_of_the_device() {
        let msg = |dest: Option<(IpAddr, u8)>, gw: Option<IpAddr>, oif: u32, proto| {
            let mut m = RouteMessage::default();
            m.header.table = 254;
            m.header.kind = RouteType::Unicast;
            m.header.protocol = proto;
            if let Some((d, len)) = dest {
                m.header.destination_prefix_length = len;
                m.attributes.push(RouteAttribute::Destination(d.into()));
            }
            if let Some(g) = gw {
                m.attributes.push(RouteAttribute::Gateway(g.into()));
            }
            m.attributes.push(RouteAttribute::Oif(oif));
            m
        };
        let gw: IpAddr = "10.88.0.1".parse().unwrap();
        let r = route_of(&msg(None, Some(gw), 3, RouteProtocol::Static), 3, "eth0").unwrap();
        assert_eq!(
            (r.destination.as_str(), r.gateway.as_str()),
            ("", "10.88.0.1")
        );
        assert_eq!(r.device, "eth0");
        let net: IpAddr = "10.0.0.0".parse().unwrap();
        let r = route_of(
            &msg(Some((net, 8)), None, 3, RouteProtocol::Boot),
            3,
            "eth0",
        )
        .unwrap();
        assert_eq!(r.destination, "10.0.0.0/8");
        // Connected route, another device, another table, RA default route.
        assert!(route_of(&msg(Some((net, 8)), None, 3, RouteProtocol::Kernel), 3, "e").is_none());
        assert!(route_of(&msg(None, Some(gw), 4, RouteProtocol::Static), 3, "e").is_none());
        let mut local = msg(None, Some(gw), 3, RouteProtocol::Static);
        local.header.table = 255;
        assert!(route_of(&local, 3, "e").is_none());
        let ll: IpAddr = "fe80::1".parse().unwrap();
        assert!(route_of(&msg(None, Some(ll), 3, RouteProtocol::Ra), 3, "e").is_none());
    }
}
