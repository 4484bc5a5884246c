//! Integration tests of the agent's network configuration on the host: the
//! real agent binary runs inside a fresh network namespace (`ip netns exec`)
//! that holds a veth pair, exactly as the guest's root namespace holds the
//! virtio-net devices; CreateSandbox (with `new_network_namespace = false`,
//! as the shim sends it) must find one end by its MAC, rename it, set its
//! MTU, addresses and routes. Checked from outside with iproute2. Needs root
//! and iproute2 (skipped with a message otherwise).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use moat_agent::netconf::testing::{address, interface, route};
use moat_protocol::agent as pb;
use moat_protocol::agent_ttrpc::AgentClient;
use moat_protocol::connect::{connect_sync, AgentAddress};
use moat_protocol::ttrpc::{self, context};

const MAC: &str = "02:00:5e:10:00:01";

fn usable() -> bool {
    // SAFETY: trivial libc call.
    let root = unsafe { libc::geteuid() == 0 };
    let ip = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !(root && ip) {
        moat_test_support::skip("needs root and iproute2");
    }
    root && ip
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace with a veth pair `va` (MAC [`MAC`]) / `vb`, and an
/// agent serving a Unix socket inside it. Dropping it stops the agent and
/// deletes the namespace.
struct NetnsAgent {
    ns: String,
    dir: PathBuf,
    child: Child,
    client: AgentClient,
}

impl NetnsAgent {
    fn start(name: &str) -> Self {
        let ns = format!("moat-agt-{name}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        ip(&["netns", "add", &ns]);
        let dir = std::env::temp_dir().join(&ns);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let spawned = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(env!("CARGO_BIN_EXE_moat-agent"))
            .arg("--listen")
            .arg(format!("unix://{}", sock.display()))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("MOAT_AGENT_LOG", "debug")
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = Command::new("ip").args(["netns", "del", &ns]).status();
                panic!("starting the agent: {e}");
            }
        };
        let serving = moat_test_support::wait_serving(child.stderr.take().unwrap());
        if !serving {
            let _ = child.kill();
            let _ = child.wait();
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            panic!("agent exited before serving");
        }
        let client = connect_sync(&AgentAddress::Unix(sock), Duration::from_secs(5)).unwrap();
        let agent = Self {
            ns,
            dir,
            child,
            client,
        };
        ip(&[
            "-n", &agent.ns, "link", "add", "va", "address", MAC, "type", "veth", "peer", "name",
            "vb",
        ]);
        agent
    }

    /// CreateSandbox; an error is returned as the RPC status message.
    fn create(&self, req: &pb::CreateSandboxRequest) -> Result<(), String> {
        let ctx = context::with_timeout(Duration::from_secs(30).as_nanos() as i64);
        match self.client.create_sandbox(ctx, req) {
            Ok(_) => Ok(()),
            Err(ttrpc::Error::RpcStatus(s)) => Err(s.message),
            Err(e) => Err(e.to_string()),
        }
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.ns.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Drop for NetnsAgent {
    fn drop(&mut self) {
        // SAFETY: plain kill of our own child (`ip netns exec` execs the agent).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn request(
    name: &str,
    interfaces: Vec<pb::Interface>,
    routes: Vec<pb::Route>,
) -> pb::CreateSandboxRequest {
    pb::CreateSandboxRequest {
        sandbox_id: format!("sb-{name}"),
        interfaces,
        routes,
        ..Default::default()
    }
}

/// The interface every test configures: `eth7` with MAC `mac`, MTU 1400, one v4 and one v6
/// address.
fn eth(mac: &str) -> pb::Interface {
    interface("eth7", mac, &[("10.99.0.2", 24), ("fd00:99::2", 64)], 1400)
}

#[test]
fn interface_found_by_mac_gets_name_mtu_addresses_and_routes() {
    if !usable() {
        return;
    }
    let a = NetnsAgent::start("apply");
    a.create(&request(
        "apply",
        // The MAC in upper case: matching is case-insensitive.
        vec![eth(&MAC.to_uppercase())],
        vec![
            route("", "10.99.0.1", "", 0),
            route("192.168.50.0/24", "", "eth7", 253),
            route("default", "fd00:99::1", "eth7", 0),
        ],
    ))
    .unwrap();

    let link = a.ip(&["-o", "link", "show", "dev", "eth7"]);
    assert!(link.contains("mtu 1400"), "{link}");
    assert!(link.contains(",UP"), "{link}");
    assert!(link.contains(MAC), "{link}");
    assert!(
        !a.ip(&["-o", "link"]).contains(" va@"),
        "va was not renamed"
    );
    let addrs = a.ip(&["-o", "addr", "show", "dev", "eth7"]);
    assert!(addrs.contains("inet 10.99.0.2/24"), "{addrs}");
    assert!(addrs.contains("inet6 fd00:99::2/64"), "{addrs}");
    let v4 = a.ip(&["-4", "route", "show", "table", "main"]);
    assert!(v4.contains("default via 10.99.0.1 dev eth7"), "{v4}");
    assert!(
        v4.contains("192.168.50.0/24 dev eth7 proto static scope link"),
        "{v4}"
    );
    let v6 = a.ip(&["-6", "route", "show", "table", "main"]);
    assert!(v6.contains("default via fd00:99::1 dev eth7"), "{v6}");
}

#[test]
fn unknown_mac_bad_address_and_new_netns_are_refused() {
    if !usable() {
        return;
    }
    let a = NetnsAgent::start("refuse");
    let before = a.ip(&["-o", "addr"]);

    let err = a
        .create(&request("refuse", vec![eth("02:00:5e:10:00:99")], vec![]))
        .unwrap_err();
    assert!(
        err.contains("no network interface with MAC 02:00:5e:10:00:99"),
        "{err}"
    );
    assert!(
        err.contains(&format!("va={MAC}")),
        "lists what exists: {err}"
    );

    let mut bad = eth(MAC);
    bad.addresses = vec![address("10.99.0.256", 24)];
    let err = a.create(&request("refuse", vec![bad], vec![])).unwrap_err();
    assert!(
        err.contains("\"10.99.0.256\" is not an IPv4 or IPv6 address"),
        "{err}"
    );

    let err = a
        .create(&request(
            "refuse",
            vec![eth(MAC)],
            vec![route("10.0.0.0/8", "", "nosuchdev", 0)],
        ))
        .unwrap_err();
    assert!(err.contains("no interface named \"nosuchdev\""), "{err}");

    let mut req = request("refuse", vec![eth(MAC)], vec![]);
    req.new_network_namespace = true;
    let err = a.create(&req).unwrap_err();
    assert!(err.contains("new_network_namespace"), "{err}");

    // None of the refused requests touched the namespace.
    assert_eq!(before, a.ip(&["-o", "addr"]));
    assert!(a.ip(&["-o", "link"]).contains(" va@"));
    // No sandbox was registered by any of them: a good request still works.
    assert_eq!(a.create(&request("refuse", vec![], vec![])), Ok(()));
}
