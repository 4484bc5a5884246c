//! Host tests of the shim's pod networking (`moat_shim::network`) against
//! real network namespaces: a netns made like CNI's bridge plugin makes it
//! (a veth whose peer is in the root namespace, addresses, a default route)
//! is bridged to a tap with tc redirects, and teardown leaves it exactly as
//! it was. Needs root and iproute2 (skipped with a message otherwise).

use std::path::PathBuf;
use std::process::Command;

use moat_shim::network::{self, NetworkError, RECORD_FILE};

fn usable() -> bool {
    // SAFETY: trivial libc call.
    let root = unsafe { libc::geteuid() == 0 };
    let tools = ["ip", "tc"].iter().all(|t| {
        Command::new(t)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !(root && tools) {
        moat_test_support::skip("needs root, ip and tc");
    }
    root && tools
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CNI-like pod netns: `eth0` (MTU 1400, 10.77.N.2/24, fd00:77:N::2/64,
/// default route via 10.77.N.1) whose peer `mvN` is in the root namespace.
struct PodNs {
    name: String,
    path: PathBuf,
    peer: String,
    state: PathBuf,
}

impl PodNs {
    fn new(tag: &str, n: u8) -> Self {
        let name = format!("moat-shimnet-{tag}-{}", std::process::id());
        let peer = format!("mv{n}-{}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &peer]).output();
        run("ip", &["netns", "add", &name]);
        let state = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&state).unwrap();
        let ns = Self {
            path: PathBuf::from(format!("/run/netns/{name}")),
            name,
            peer,
            state,
        };
        let (v4, v6, gw) = (
            format!("10.77.{n}.2/24"),
            format!("fd00:77:{n}::2/64"),
            format!("10.77.{n}.1"),
        );
        run(
            "ip",
            &[
                "link", "add", &ns.peer, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ],
        );
        ns.ip(&["link", "set", "eth0", "mtu", "1400"]);
        ns.ip(&["addr", "add", &v4, "dev", "eth0"]);
        ns.ip(&["addr", "add", &v6, "dev", "eth0", "nodad"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&[
            "route", "add", "default", "via", &gw, "dev", "eth0", "onlink",
        ]);
        ns
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    fn tc(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("tc", &all)
    }

    /// Everything teardown must restore.
    fn snapshot(&self) -> String {
        let mut s = self.ip(&["-o", "-d", "link"]);
        s += &self.ip(&["-o", "addr"]);
        s += &self.ip(&["route", "show", "table", "all"]);
        for dev in ["eth0", "lo"] {
            s += &self.tc(&["qdisc", "show", "dev", dev]);
            s += &self.tc(&["filter", "show", "dev", dev, "ingress"]);
        }
        s
    }
}

impl Drop for PodNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.peer])
            .status();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

#[tokio::test]
async fn veth_is_bridged_to_a_tap_and_teardown_restores_the_netns() {
    if !usable() {
        return;
    }
    let ns = PodNs::new("ok", 1);
    let before = ns.snapshot();
    let mac = ns
        .ip(&["-o", "link", "show", "eth0"])
        .split("link/ether ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned();

    let net = network::setup(&ns.path, &ns.state).await.unwrap();
    assert!(ns.state.join(RECORD_FILE).exists());

    // The tap: created, up, with the veth's MTU; both redirects in place.
    let tap = ns.ip(&["-o", "-d", "link", "show", "tap0_moat"]);
    assert!(tap.contains("mtu 1400"), "{tap}");
    assert!(tap.contains(",UP"), "{tap}");
    assert!(tap.contains("tun type tap"), "{tap}");
    let f = ns.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert!(f.contains("protocol all"), "{f}");
    assert!(
        f.contains("mirred (Egress Redirect to device tap0_moat)"),
        "{f}"
    );
    let f = ns.tc(&["filter", "show", "dev", "tap0_moat", "ingress"]);
    assert!(f.contains("mirred (Egress Redirect to device eth0)"), "{f}");

    // What the VMM and the agent get.
    let args: Vec<String> = net
        .vmm_args()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        args,
        [
            "--netns".to_owned(),
            ns.path.display().to_string(),
            "--net".to_owned(),
            format!("tap=tap0_moat,mac={mac}")
        ]
    );
    assert_eq!(net.interfaces.len(), 1);
    let i = &net.interfaces[0];
    assert_eq!(
        (i.name.as_str(), i.mac.as_str(), i.mtu),
        ("eth0", mac.as_str(), 1400)
    );
    let addrs: Vec<String> = i
        .addresses
        .iter()
        .map(|a| format!("{}/{}", a.address, a.prefix_length))
        .collect();
    assert_eq!(addrs, ["10.77.1.2/24", "fd00:77:1::2/64"]);
    let routes: Vec<(&str, &str, &str)> = net
        .routes
        .iter()
        .map(|r| {
            (
                r.destination.as_str(),
                r.gateway.as_str(),
                r.device.as_str(),
            )
        })
        .collect();
    assert_eq!(routes, [("", "10.77.1.1", "eth0")]);

    network::teardown_recorded(&ns.state);
    assert!(!ns.state.join(RECORD_FILE).exists());
    assert_eq!(before, ns.snapshot());
}

#[tokio::test]
async fn failures_leave_the_netns_as_it_was() {
    if !usable() {
        return;
    }
    let ns = PodNs::new("busy", 2);
    // Another tool's ingress qdisc on the veth: setup must refuse and undo
    // the tap it already made.
    ns.tc(&["qdisc", "add", "dev", "eth0", "ingress"]);
    let before = ns.snapshot();
    let err = network::setup(&ns.path, &ns.state).await.unwrap_err();
    assert!(
        matches!(&err, NetworkError::IngressTaken { veth, .. } if veth == "eth0"),
        "{err}"
    );
    assert!(
        err.to_string().contains("already has an ingress qdisc"),
        "{err}"
    );
    assert_eq!(before, ns.snapshot());
    assert!(!ns.state.join(RECORD_FILE).exists());

    let missing = PathBuf::from("/run/netns/moat-no-such-netns");
    let err = network::setup(&missing, &ns.state).await.unwrap_err();
    assert!(err.to_string().contains("moat-no-such-netns"), "{err}");
}

#[tokio::test]
async fn netns_with_only_loopback_gives_no_nic() {
    if !usable() {
        return;
    }
    let name = format!("moat-shimnet-lo-{}", std::process::id());
    let _ = Command::new("ip").args(["netns", "del", &name]).output();
    run("ip", &["netns", "add", &name]);
    let state = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&state).unwrap();
    let res = network::setup(&PathBuf::from(format!("/run/netns/{name}")), &state).await;
    let _ = Command::new("ip").args(["netns", "del", &name]).output();
    let net = res.unwrap();
    assert!(net.vmm_args().is_empty());
    assert!(net.interfaces.is_empty() && net.routes.is_empty());
    network::teardown_recorded(&state);
    let _ = std::fs::remove_dir_all(&state);
}
