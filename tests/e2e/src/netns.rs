//! A pod network namespace made the way CNI's bridge plugin makes one, for the trials and
//! benchmarks that give containers a network: a named netns with `eth0` (10.88.0.2/24, default
//! route via 10.88.0.1) whose veth peer (10.88.0.1/24) stays in the root namespace. It is handed to
//! a container with `ctr run --with-ns network:PATH` and removed when dropped.

use std::process::Command;

use crate::containerd::check;
use crate::{run_bounded, Failed};

/// The address of the veth end in the root namespace (the pod's default gateway).
pub const HOST_IP: &str = "10.88.0.1";
/// The pod's address (`eth0` inside the namespace).
pub const POD_IP: &str = "10.88.0.2";

/// Runs `cmd args...` (bounded), failing with its output unless it succeeds; returns its stdout.
fn run(cmd: &str, args: &[&str]) -> Result<String, Failed> {
    let out = run_bounded(Command::new(cmd).args(args), 60)?;
    check(&out, &format!("{cmd} {}", args.join(" ")))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The pod netns `name` with `eth0` whose peer `host_if` is in the root namespace; removed (with
/// the veth pair) on drop.
pub struct PodNetns {
    name: String,
    host_if: String,
}

impl PodNetns {
    /// Creates the namespace and the veth pair, replacing leftovers of an earlier run with the
    /// same names.
    pub fn create(name: &str, host_if: &str) -> Result<Self, Failed> {
        let ns = Self {
            name: name.to_owned(),
            host_if: host_if.to_owned(),
        };
        ns.remove();
        run("ip", &["netns", "add", &ns.name])?;
        run(
            "ip",
            &[
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns.name,
            ],
        )?;
        run(
            "ip",
            &["addr", "add", &format!("{HOST_IP}/24"), "dev", &ns.host_if],
        )?;
        run("ip", &["link", "set", &ns.host_if, "up"])?;
        // No IPv6 on the pod side: its link-local address would finish duplicate address
        // detection (and gain a local route) at some moment after `up`, changing the netns under
        // a before/after snapshot. The runtimes ignore link-local addresses anyway.
        run(
            "ip",
            &[
                "netns",
                "exec",
                &ns.name,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6",
            ],
        )?;
        ns.ip(&["addr", "add", &format!("{POD_IP}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.ip(&["route", "add", "default", "via", HOST_IP])?;
        Ok(ns)
    }

    /// The namespace's path, as `ctr run --with-ns network:PATH` takes it.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// `ip -n NAME args...`; its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, Failed> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// What a runtime must leave as it found it: links, addresses, routes, qdiscs and the
    /// ingress filters of `eth0`.
    pub fn snapshot(&self) -> Result<String, Failed> {
        let mut s = self.ip(&["-o", "link"])?;
        s += &self.ip(&["-o", "addr"])?;
        s += &self.ip(&["route", "show", "table", "all"])?;
        s += &run("tc", &["-n", &self.name, "qdisc", "show"])?;
        s += &run(
            "tc",
            &["-n", &self.name, "filter", "show", "dev", "eth0", "ingress"],
        )?;
        Ok(s)
    }

    fn remove(&self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        self.remove();
    }
}
