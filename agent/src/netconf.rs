//! Guest network configuration from `CreateSandboxRequest.interfaces` and
//! `.routes`: validates the request ([`NetConfig::from_request`]), then, in
//! the agent's own network namespace, finds each interface by MAC, renames
//! it, sets its MTU and addresses, brings it up and adds the routes
//! ([`NetConfig::apply`]).
//!
//! Everything goes over rtnetlink with the `rtnetlink` crate (tokio; the
//! agent's RPC handlers already run on a tokio runtime). The connection is
//! opened per call and closed when the call returns, so its socket belongs to
//! the caller's network namespace.

use std::collections::HashMap;
use std::net::IpAddr;

use futures_util::TryStreamExt;
use moat_protocol::agent as pb;
use moat_protocol::net::{parse_ip, Mac, NetParseError, Prefix};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// Errors configuring the sandbox's network.
#[derive(Debug, thiserror::Error)]
pub enum NetConfError {
    /// A value in the request is malformed.
    #[error("interface/route in CreateSandbox: {0}")]
    Parse(#[from] NetParseError),
    /// The request is inconsistent.
    #[error("network configuration: {0}")]
    Invalid(String),
    /// No device has the MAC address of a requested interface.
    #[error("no network interface with MAC {mac} (for {name:?}); present: {present}")]
    MacNotFound {
        /// The MAC asked for.
        mac: Mac,
        /// The interface's requested name.
        name: String,
        /// The devices that exist, `name=mac`.
        present: String,
    },
    /// A route names a device that does not exist.
    #[error("route to {dest}: no interface named {device:?}")]
    DeviceNotFound {
        /// The route's destination.
        dest: String,
        /// The device name.
        device: String,
    },
    /// rtnetlink cannot express a route (e.g. its gateway is of another family).
    #[error("network configuration: route to {dest}: {source}")]
    Route {
        /// The route's destination.
        dest: String,
        /// rtnetlink's complaint (its type is not exported by the crate).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Opening the rtnetlink socket failed.
    #[error("opening an rtnetlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
}

impl NetConfError {
    /// Whether the request itself is at fault (a malformed or inconsistent value), rather
    /// than the VM (a device the shim announced is missing) or the kernel (netlink failed).
    pub fn is_request_error(&self) -> bool {
        matches!(
            self,
            NetConfError::Parse(_) | NetConfError::Invalid(_) | NetConfError::Route { .. }
        )
    }
}

/// One interface to configure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// New name; `None` keeps the kernel's.
    pub name: Option<String>,
    /// The device's MAC address.
    pub mac: Mac,
    /// Addresses to add.
    pub addresses: Vec<Prefix>,
    /// MTU; `None` keeps the default.
    pub mtu: Option<u32>,
}

/// One route to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Destination; `None` is the default route.
    pub destination: Option<Prefix>,
    /// Next hop.
    pub gateway: Option<IpAddr>,
    /// Output device name.
    pub device: Option<String>,
    /// rtnetlink scope.
    pub scope: u8,
}

impl RouteConfig {
    fn describe(&self) -> String {
        self.destination
            .map_or_else(|| "default".to_owned(), |p| p.to_string())
    }
}

/// The validated network part of a `CreateSandboxRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// Interfaces, in request order.
    pub interfaces: Vec<InterfaceConfig>,
    /// Routes, in request order.
    pub routes: Vec<RouteConfig>,
}

/// An interface name the kernel accepts: 1-15 bytes, no `/`, `:`, blank or NUL.
fn check_ifname(name: &str) -> Result<(), NetConfError> {
    if name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name.contains(['/', ':', '\0'])
        || name.contains(char::is_whitespace)
    {
        return Err(NetConfError::Invalid(format!(
            "{name:?} is not a valid interface name (1-15 bytes, no '/', ':' or blanks)"
        )));
    }
    Ok(())
}

impl NetConfig {
    /// Validates the request's interfaces and routes.
    pub fn from_request(
        interfaces: &[pb::Interface],
        routes: &[pb::Route],
    ) -> Result<Self, NetConfError> {
        let mut out = Self::default();
        for i in interfaces {
            let mac = Mac::parse(&i.mac)?;
            if out.interfaces.iter().any(|o| o.mac == mac) {
                return Err(NetConfError::Invalid(format!("MAC {mac} given twice")));
            }
            let name = (!i.name.is_empty()).then(|| i.name.clone());
            if let Some(n) = &name {
                check_ifname(n)?;
                if out.interfaces.iter().any(|o| o.name.as_ref() == Some(n)) {
                    return Err(NetConfError::Invalid(format!(
                        "interface name {n:?} given twice"
                    )));
                }
            }
            let addresses = i
                .addresses
                .iter()
                .map(|a| Prefix::from_parts(&a.address, a.prefix_length))
                .collect::<Result<Vec<_>, _>>()?;
            let mtu = match i.mtu {
                0 => None,
                68..=65535 => Some(i.mtu),
                m => {
                    return Err(NetConfError::Invalid(format!(
                        "MTU {m} of {mac} is outside 68-65535"
                    )))
                }
            };
            out.interfaces.push(InterfaceConfig {
                name,
                mac,
                addresses,
                mtu,
            });
        }
        for r in routes {
            let destination = match r.destination.as_str() {
                "" | "default" => None,
                d => Some(Prefix::parse(d)?),
            };
            let gateway = match r.gateway.as_str() {
                "" => None,
                g => Some(parse_ip(g)?),
            };
            if let (Some(d), Some(g)) = (destination, gateway) {
                if d.addr.is_ipv4() != g.is_ipv4() {
                    return Err(NetConfError::Invalid(format!(
                        "route to {d}: gateway {g} is of another address family"
                    )));
                }
            }
            let device = (!r.device.is_empty()).then(|| r.device.clone());
            if let Some(d) = &device {
                check_ifname(d)?;
            }
            if gateway.is_none() && device.is_none() {
                return Err(NetConfError::Invalid(format!(
                    "route to {}: needs a gateway or a device",
                    r.destination
                )));
            }
            let scope = u8::try_from(r.scope)
                .map_err(|_| NetConfError::Invalid(format!("route scope {}", r.scope)))?;
            out.routes.push(RouteConfig {
                destination,
                gateway,
                device,
                scope,
            });
        }
        Ok(out)
    }

    /// True when there is nothing to configure.
    pub fn is_empty(&self) -> bool {
        self.interfaces.is_empty() && self.routes.is_empty()
    }

    /// Applies the configuration in the caller's network namespace.
    pub async fn apply(&self) -> Result<(), NetConfError> {
        if self.is_empty() {
            return Ok(());
        }
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetConfError::Socket)?;
        let conn = tokio::spawn(conn);
        let res = self.apply_with(&handle).await;
        conn.abort();
        res
    }

    /// Resolves every interface and route device first, so that a request
    /// naming a missing device changes nothing; then configures.
    async fn apply_with(&self, handle: &Handle) -> Result<(), NetConfError> {
        let links = list_links(handle).await?;
        let mut indices = Vec::with_capacity(self.interfaces.len());
        for i in &self.interfaces {
            let Some((index, _)) = links.iter().find(|(_, (_, m))| *m == Some(i.mac)) else {
                let mut present: Vec<String> = links
                    .values()
                    .map(|(n, m)| match m {
                        Some(m) => format!("{n}={m}"),
                        None => n.clone(),
                    })
                    .collect();
                present.sort();
                return Err(NetConfError::MacNotFound {
                    mac: i.mac,
                    name: i.name.clone().unwrap_or_default(),
                    present: present.join(", "),
                });
            };
            indices.push(*index);
        }
        // Device names as they will be once the interfaces are renamed.
        let mut by_name: HashMap<String, u32> = links
            .iter()
            .filter(|(idx, _)| !indices.contains(idx))
            .map(|(idx, (name, _))| (name.clone(), *idx))
            .collect();
        for (i, idx) in self.interfaces.iter().zip(&indices) {
            let name = i.name.clone().unwrap_or_else(|| links[idx].0.clone());
            if by_name.insert(name.clone(), *idx).is_some() {
                return Err(NetConfError::Invalid(format!(
                    "interface name {name:?} is taken by another device"
                )));
            }
        }
        for r in &self.routes {
            if let Some(d) = &r.device {
                if !by_name.contains_key(d) {
                    return Err(NetConfError::DeviceNotFound {
                        dest: r.describe(),
                        device: d.clone(),
                    });
                }
            }
        }
        for (i, idx) in self.interfaces.iter().zip(&indices) {
            configure_link(handle, *idx, i).await?;
        }
        for r in &self.routes {
            add_route(handle, &by_name, r).await?;
        }
        Ok(())
    }
}

/// index → (name, MAC) of every link.
async fn list_links(handle: &Handle) -> Result<HashMap<u32, (String, Option<Mac>)>, NetConfError> {
    let msgs: Vec<LinkMessage> =
        handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetConfError::Netlink {
                what: "listing network interfaces".into(),
                source,
            })?;
    Ok(msgs
        .into_iter()
        .map(|m| {
            let mut name = String::new();
            let mut mac = None;
            for a in &m.attributes {
                match a {
                    LinkAttribute::IfName(n) => name = n.clone(),
                    LinkAttribute::Address(b) => mac = Mac::from_bytes(b),
                    _ => {}
                }
            }
            (m.header.index, (name, mac))
        })
        .collect())
}

async fn configure_link(
    handle: &Handle,
    index: u32,
    i: &InterfaceConfig,
) -> Result<(), NetConfError> {
    let what = |w: &str| format!("{w} of the interface with MAC {}", i.mac);
    let nl = |w: String| move |source| NetConfError::Netlink { what: w, source };
    // A link must be down to be renamed.
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).down().build())
        .execute()
        .await
        .map_err(nl(what("setting down")))?;
    let mut msg = LinkUnspec::new_with_index(index);
    if let Some(n) = &i.name {
        msg = msg.name(n.clone());
    }
    if let Some(mtu) = i.mtu {
        msg = msg.mtu(mtu);
    }
    handle
        .link()
        .set(msg.build())
        .execute()
        .await
        .map_err(nl(what("setting name and MTU")))?;
    for a in &i.addresses {
        handle
            .address()
            .add(index, a.addr, a.len)
            .execute()
            .await
            .map_err(nl(what(&format!("adding address {a} to"))))?;
    }
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(what("bringing up")))?;
    Ok(())
}

/// Wraps rtnetlink's refusal to build route `r` (its error type is not exported).
fn route_error<E: std::error::Error + Send + Sync + 'static>(
    r: &RouteConfig,
) -> impl Fn(E) -> NetConfError + '_ {
    move |e| NetConfError::Route {
        dest: r.describe(),
        source: Box::new(e),
    }
}

async fn add_route(
    handle: &Handle,
    by_name: &HashMap<String, u32>,
    r: &RouteConfig,
) -> Result<(), NetConfError> {
    let invalid = route_error(r);
    let mut b = RouteMessageBuilder::<IpAddr>::new();
    // The destination fixes the family; a default route takes the gateway's.
    let dest = r.destination.unwrap_or(Prefix {
        addr: match r.gateway {
            Some(IpAddr::V6(_)) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        },
        len: 0,
    });
    b = b
        .destination_prefix(dest.addr, dest.len)
        .map_err(&invalid)?;
    if let Some(g) = r.gateway {
        b = b.gateway(g).map_err(&invalid)?;
    }
    if let Some(d) = &r.device {
        let idx = by_name.get(d).ok_or_else(|| NetConfError::DeviceNotFound {
            dest: r.describe(),
            device: d.clone(),
        })?;
        b = b.output_interface(*idx);
    }
    b = b.scope(RouteScope::from(r.scope));
    handle
        .route()
        .add(b.build())
        .execute()
        .await
        .map_err(|source| NetConfError::Netlink {
            what: format!("adding the route to {}", r.describe()),
            source,
        })
}

#[doc(hidden)]
pub mod testing {
    //! Builders of the request messages [`NetConfig::from_request`] reads, for the agent's
    //! unit tests and its integration tests (`agent/tests/net_host.rs`); not part of the API.
    //!
    //! [`NetConfig::from_request`]: super::NetConfig::from_request

    use moat_protocol::agent as pb;

    /// An address `address/prefix_length` of an interface.
    pub fn address(address: &str, prefix_length: u32) -> pb::IpAddress {
        pb::IpAddress {
            address: address.into(),
            prefix_length,
            ..Default::default()
        }
    }

    /// An interface `name` with MAC `mac`, the addresses `(address, prefix length)` and `mtu`
    /// (0: unset).
    pub fn interface(name: &str, mac: &str, addrs: &[(&str, u32)], mtu: u32) -> pb::Interface {
        pb::Interface {
            name: name.into(),
            mac: mac.into(),
            addresses: addrs.iter().map(|&(a, l)| address(a, l)).collect(),
            mtu,
            ..Default::default()
        }
    }

    /// A route to `dest` via `gw` on `dev` with `scope`; empty strings leave a field unset.
    pub fn route(dest: &str, gw: &str, dev: &str, scope: u32) -> pb::Route {
        pb::Route {
            destination: dest.into(),
            gateway: gw.into(),
            device: dev.into(),
            scope,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{interface as iface, route};
    use super::*;

    #[test]
    fn parses_a_cni_like_request() {
        let c = NetConfig::from_request(
            &[iface(
                "eth0",
                "0A:58:0a:58:00:02",
                &[("10.88.0.2", 24), ("fd00::2", 64)],
                1450,
            )],
            &[
                route("", "10.88.0.1", "", 0),
                route("default", "fd00::1", "eth0", 0),
                route("192.168.0.0/16", "", "eth0", 253),
            ],
        )
        .unwrap();
        let i = &c.interfaces[0];
        assert_eq!(i.name.as_deref(), Some("eth0"));
        assert_eq!(i.mac.to_string(), "0a:58:0a:58:00:02");
        assert_eq!(i.addresses[1].to_string(), "fd00::2/64");
        assert_eq!(i.mtu, Some(1450));
        assert_eq!(c.routes[0].destination, None);
        assert_eq!(c.routes[0].gateway, Some("10.88.0.1".parse().unwrap()));
        assert_eq!(
            c.routes[2].destination.unwrap().to_string(),
            "192.168.0.0/16"
        );
        assert_eq!(c.routes[2].scope, 253);
        assert!(!c.is_empty());
        assert!(NetConfig::from_request(&[], &[]).unwrap().is_empty());
    }

    #[test]
    fn rejects_bad_values_with_the_offending_text() {
        let e = |i: Vec<pb::Interface>, r: Vec<pb::Route>| {
            NetConfig::from_request(&i, &r).unwrap_err().to_string()
        };
        let ok = "02:00:00:00:00:01";
        assert!(e(vec![iface("eth0", "02:00:00:00:01", &[], 0)], vec![]).contains("02:00:00:00:01"));
        assert!(e(vec![iface("eth0", ok, &[("10.0.0.300", 24)], 0)], vec![]).contains("10.0.0.300"));
        assert!(e(vec![iface("eth0", ok, &[("10.0.0.3", 40)], 0)], vec![]).contains("40"));
        assert!(e(vec![iface("eth0", ok, &[], 20)], vec![]).contains("MTU 20"));
        assert!(e(vec![iface("a/b", ok, &[], 0)], vec![]).contains("a/b"));
        assert!(e(vec![iface("averyveryverylongname", ok, &[], 0)], vec![]).contains("longname"));
        assert!(e(vec![iface("a", ok, &[], 0), iface("b", ok, &[], 0)], vec![]).contains("twice"));
        assert!(e(
            vec![
                iface("a", ok, &[], 0),
                iface("a", "02:00:00:00:00:02", &[], 0)
            ],
            vec![]
        )
        .contains("twice"));
        assert!(e(vec![], vec![route("10.0.0.0/8", "fd00::1", "", 0)]).contains("family"));
        assert!(e(vec![], vec![route("10.0.0.0/8", "", "", 0)]).contains("gateway or a device"));
        assert!(e(vec![], vec![route("10.0.0.0", "10.0.0.1", "", 0)]).contains("ADDRESS/LENGTH"));
        assert!(e(vec![], vec![route("", "10.0.0.1", "", 300)]).contains("scope 300"));
    }
}
