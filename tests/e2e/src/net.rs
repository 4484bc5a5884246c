//! E2E trials of pod networking: a network namespace made the way CNI's bridge plugin makes one
//! (a veth pair between it and the host's root namespace, addresses, a default route) is handed
//! to a moat container with `ctr run --with-ns network:PATH`; traffic must flow both ways through
//! the tap + tc redirect into the microVM, and removing the container must leave the namespace as
//! it was. A container without a namespace path must still run, with no NIC.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::Duration;

use moat_e2e::containerd::{check, Containerd, IMAGE, RUNTIME};
use moat_e2e::netns::{PodNetns, HOST_IP, POD_IP};
use moat_e2e::{ensure, run_bounded, trial, Check, Context, Failed, Trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial("net::traffic_both_ways_and_netns_restored", both_ways),
        trial("net::no_netns_path_means_no_nic", no_nic),
    ]
}

const HOST_PORT: u16 = 18081;
const POD_PORT: u16 = 18080;
/// How long the VM gets to boot and the container to reach the host (TCG is slow).
const REACH_LIMIT: Duration = Duration::from_secs(280);

/// Kills and removes container `id` (best effort; errors are reported by the caller's checks).
fn remove_container(c: &Containerd, id: &str) -> Result<(), Failed> {
    let _ = c.run_ctr(&["task", "kill", "-s", "SIGKILL", id]);
    let rm = c.run_ctr(&["task", "rm", "-f", id])?;
    let crm = c.run_ctr(&["container", "rm", id])?;
    check(&rm, "ctr task rm -f")?;
    check(&crm, "ctr container rm")?;
    // The shim tears the pod down (VM, then network) after answering containerd's Shutdown and
    // exits when done: wait (bounded) for it to be gone. `[c]` keeps pgrep off this shell.
    let pattern = format!("[c]ontainerd-shim-moat-v2.*-id {id}( |$)");
    let gone = run_bounded(
        Command::new("sh").arg("-c").arg(format!(
            "while pgrep -f '{pattern}' >/dev/null; do sleep 0.2; done"
        )),
        120,
    )?;
    check(&gone, "waiting for the pod's shim to exit")
}

/// One TCP connection accepted by a host server: the line the client sent.
fn serve_one(listener: TcpListener, tx: mpsc::Sender<std::io::Result<String>>) {
    let res = (|| {
        let (stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        (&stream).write_all(b"pong-from-host\n")?;
        Ok(line.trim().to_owned())
    })();
    let _ = tx.send(res);
}

/// `GET /index` from the container's httpd.
fn fetch_from_pod() -> Result<String, Failed> {
    let addr: SocketAddr = format!("{POD_IP}:{POD_PORT}")
        .parse()
        .context("pod address")?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(60))
        .context(format!("connect from the host to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .context("set timeout")?;
    s.write_all(b"GET /index HTTP/1.0\r\n\r\n")
        .context("send GET")?;
    let mut body = String::new();
    s.read_to_string(&mut body).context("read the reply")?;
    Ok(body)
}

fn both_ways() -> Check {
    let c = Containerd::shared()?;
    let ns = PodNetns::create("moat-e2e-net", "moate2e0")?;
    let before = ns.snapshot()?;
    let listener = TcpListener::bind((HOST_IP, HOST_PORT)).context("listen on the host side")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || serve_one(listener, tx));

    let id = "e2e-net";
    // httpd binds its port before it daemonizes, so once the host server hears from the
    // container, the container's server listens.
    let script = format!(
        "mkdir -p /www && echo hello-from-pod > /www/index && httpd -p {POD_PORT} -h /www && \
         echo ping-from-vm | nc {HOST_IP} {HOST_PORT} && exec sleep 3600"
    );
    let with_ns = format!("network:{}", ns.path());
    let out = c.run_ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--with-ns",
        &with_ns,
        IMAGE,
        id,
        "sh",
        "-c",
        &script,
    ])?;
    let result = (|| -> Check {
        check(&out, "ctr run -d --with-ns network:...").map_err(|e| {
            format!(
                "{}\ncontainerd log:\n{}",
                e.message().unwrap_or_default(),
                c.log_tail()
            )
        })?;
        // (a) the container reaches a server in the host's root namespace.
        let got = rx
            .recv_timeout(REACH_LIMIT)
            .map_err(|_| format!("the container did not connect to {HOST_IP}:{HOST_PORT}"))?
            .context("host server")?;
        ensure(got == "ping-from-vm", format!("host server got {got:?}"))?;
        // (b) the host reaches a server in the container.
        let body = fetch_from_pod()?;
        ensure(
            body.contains("hello-from-pod"),
            format!("GET /reply from the pod returned {body:?}"),
        )
    })();
    let removed = remove_container(c, id);
    result?;
    removed?;
    // (c) the netns is as CNI made it: no tap, no qdisc, no filter left.
    let after = ns.snapshot()?;
    ensure(
        !after.contains("_moat") && !after.contains("ingress"),
        format!("moat left something in the pod netns:\n{after}"),
    )?;
    ensure(
        before == after,
        format!("pod netns changed:\nbefore:\n{before}\nafter:\n{after}"),
    )
}

fn no_nic() -> Check {
    let c = Containerd::shared()?;
    let out: Output = c.run_ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        "e2e-nonet",
        "ls",
        "/sys/class/net",
    ])?;
    check(&out, "ctr run ls /sys/class/net")?;
    let devs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    ensure(
        devs == ["lo"],
        format!("expected only lo in a VM without a pod netns, got {devs:?}"),
    )
}
