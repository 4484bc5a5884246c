//! E2E trial of port-forward: a pod with a network namespace (made as CNI would, see
//! [`moat_e2e::netns`]) runs servers in its microVM; from the host, **inside that namespace**, the
//! trial dials `127.0.0.1:PORT` exactly as containerd's CRI port-forward does (it joins the pod's
//! netns and dials `localhost`, IPv4 first). The shim's loopback listeners there relay to the
//! guest. Checked: a download and an upload with SHA-256 checksums, 20 concurrent echo
//! connections, a port opened after the pod started, and a closed port refused.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moat_e2e::containerd::{check, Containerd, IMAGE, RUNTIME};
use moat_e2e::netns::PodNetns;
use moat_e2e::{ensure, run_bounded, trial, Check, Context, Failed, Trial};

pub fn trials() -> Vec<Trial> {
    vec![trial(
        "portforward::loopback_ports_reach_the_vm",
        loopback_ports,
    )]
}

/// httpd with the download blob.
const HTTP_PORT: u16 = 18090;
/// `sha256sum` of what is sent (upload).
const SUM_PORT: u16 = 18091;
/// `cat` (echo).
const ECHO_PORT: u16 = 18092;
/// Opened by an exec after the pod runs, closed again.
const LATE_PORT: u16 = 18093;
/// How long the VM gets to boot and its servers to show up on the host (TCG is slow).
const REACH_LIMIT: Duration = Duration::from_secs(280);
/// How long a port change takes to show (the shim polls every second).
const CHANGE_LIMIT: Duration = Duration::from_secs(60);
const IO_LIMIT: Duration = Duration::from_secs(120);

/// Connects to `127.0.0.1:port` from inside the netns at `path`: a thread joins it and makes the
/// connection (a socket stays in the namespace it was made in).
fn connect_in(path: &str, port: u16) -> Result<TcpStream, Failed> {
    let ns = std::fs::File::open(path).context(format!("open {path}"))?;
    let joined = std::thread::spawn(move || -> std::io::Result<TcpStream> {
        // SAFETY: setns(2) on a valid fd this thread owns; it changes only this thread's network
        // namespace, and the thread ends right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        TcpStream::connect_timeout(&addr, Duration::from_secs(30))
    })
    .join()
    .map_err(|_| "the netns thread panicked")?;
    let s = joined.context(format!("connect to 127.0.0.1:{port} in {path}"))?;
    s.set_read_timeout(Some(IO_LIMIT)).context("read timeout")?;
    s.set_write_timeout(Some(IO_LIMIT))
        .context("write timeout")?;
    Ok(s)
}

/// Waits (bounded) until `port` accepts a connection in the netns; returns it.
fn wait_open(path: &str, port: u16, limit: Duration) -> Result<TcpStream, Failed> {
    let start = Instant::now();
    loop {
        match connect_in(path, port) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() > limit => {
                return Err(format!(
                    "port {port} never opened: {}",
                    e.message().unwrap_or_default()
                )
                .into())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// Sends `data`, half-closes, and returns everything the server sent back.
fn exchange(mut s: TcpStream, data: &[u8]) -> Result<Vec<u8>, Failed> {
    let mut reader = s.try_clone().context("clone")?;
    let back = std::thread::spawn(move || {
        let mut got = Vec::new();
        reader.read_to_end(&mut got).map(|_| got)
    });
    s.write_all(data).context("send")?;
    s.shutdown(Shutdown::Write).context("half-close")?;
    back.join()
        .map_err(|_| "reader panicked")?
        .context("receive")
}

/// SHA-256 of `data` (coreutils `sha256sum`), in hex.
fn sha256(data: &[u8]) -> Result<String, Failed> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("sha256sum")?;
    let mut stdin = child.stdin.take().ok_or("sha256sum stdin")?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().context("sha256sum")?;
    writer
        .join()
        .map_err(|_| "writer panicked")?
        .context("feed sha256sum")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Deterministic pseudo-random bytes (xorshift).
fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The body of an HTTP/1.0 response.
fn http_get(path: &str, port: u16, file: &str) -> Result<Vec<u8>, Failed> {
    let resp = exchange(
        connect_in(path, port)?,
        format!("GET /{file} HTTP/1.0\r\n\r\n").as_bytes(),
    )?;
    let at = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header end in {:?}", String::from_utf8_lossy(&resp)))?;
    ensure(
        resp.starts_with(b"HTTP/1.") && resp[..at].windows(4).any(|w| w == b" 200"),
        format!("GET /{file}: {:?}", String::from_utf8_lossy(&resp[..at])),
    )?;
    Ok(resp[at + 4..].to_vec())
}

fn remove_container(c: &Containerd, id: &str) -> Result<(), Failed> {
    let _ = c.run_ctr(&["task", "kill", "-s", "SIGKILL", id]);
    let rm = c.run_ctr(&["task", "rm", "-f", id])?;
    let crm = c.run_ctr(&["container", "rm", id])?;
    check(&rm, "ctr task rm -f")?;
    check(&crm, "ctr container rm")?;
    let pattern = format!("[c]ontainerd-shim-moat-v2.*-id {id}( |$)");
    let gone = run_bounded(
        Command::new("sh").arg("-c").arg(format!(
            "while pgrep -f '{pattern}' >/dev/null; do sleep 0.2; done"
        )),
        120,
    )?;
    check(&gone, "waiting for the pod's shim to exit")
}

fn loopback_ports() -> Check {
    let c = Containerd::shared()?;
    let ns = PodNetns::create("moat-e2e-pf", "moate2epf0")?;
    let path = ns.path();
    let id = "e2e-pf";
    let script = format!(
        "mkdir -p /www && dd if=/dev/urandom of=/www/blob bs=1024 count=3072 2>/dev/null && \
         sha256sum /www/blob > /www/blob.sha && \
         httpd -p {HTTP_PORT} -h /www && \
         (nc -ll -p {SUM_PORT} -e sha256sum &) && \
         (nc -ll -p {ECHO_PORT} -e cat &) && exec sleep 3600"
    );
    let with_ns = format!("network:{path}");
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
        // Nothing of the guest's is open in the netns before the VM's servers run; wait for
        // the last one the script starts.
        drop(wait_open(&path, ECHO_PORT, REACH_LIMIT)?);

        // Download: 3 MiB made in the guest, checked against the guest's own checksum.
        let blob = http_get(&path, HTTP_PORT, "blob")?;
        let want = String::from_utf8_lossy(&http_get(&path, HTTP_PORT, "blob.sha")?)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        ensure(
            blob.len() == 3 << 20,
            format!("downloaded {} bytes", blob.len()),
        )?;
        ensure(sha256(&blob)? == want, "download checksum differs")?;

        // Upload: 4 MiB, the guest's checksum of what it received must be ours.
        let up = data(7, 4 << 20);
        let reply = exchange(connect_in(&path, SUM_PORT)?, &up)?;
        let got = String::from_utf8_lossy(&reply)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        ensure(
            got == sha256(&up)?,
            format!("upload checksum: guest saw {got}"),
        )?;

        // 20 open at once, each its own data: every one is proven served (a byte echoed)
        // before the next is opened — busybox nc drops connections that arrive in a burst —
        // then all transfer at the same time.
        let mut conns = Vec::new();
        for i in 0..20 {
            let mut s = connect_in(&path, ECHO_PORT)?;
            s.write_all(b"!").context("first byte")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)
                .context(format!("echo connection {i}: first byte back"))?;
            conns.push(s);
        }
        let workers: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                std::thread::spawn(move || -> Check {
                    let d = data(100 + i as u64, 128 * 1024 + i * 17);
                    let back = exchange(s, &d)?;
                    ensure(
                        back == d,
                        format!("connection {i}: echo differs ({} bytes back)", back.len()),
                    )
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| "echo worker panicked")??;
        }

        // A port opened after the pod started shows up...
        let exec = c.run_ctr(&[
            "task",
            "exec",
            "-d",
            "--exec-id",
            "late",
            id,
            "nc",
            "-ll",
            "-p",
            &LATE_PORT.to_string(),
            "-e",
            "echo",
            "late-server",
        ])?;
        check(&exec, "ctr task exec -d nc -ll")?;
        let s = wait_open(&path, LATE_PORT, CHANGE_LIMIT)?;
        let reply = exchange(s, b"")?;
        ensure(
            reply == b"late-server\n",
            format!("late port said {:?}", String::from_utf8_lossy(&reply)),
        )?;
        // ...and once closed, is refused, like runc's.
        let kill = c.run_ctr(&["task", "kill", "--exec-id", "late", "-s", "SIGKILL", id])?;
        check(&kill, "ctr task kill --exec-id late")?;
        let start = Instant::now();
        loop {
            match connect_in(&path, LATE_PORT) {
                Err(e) if e.message().unwrap_or_default().contains("refused") => break,
                _ if start.elapsed() > CHANGE_LIMIT => {
                    return Err(format!(
                        "port {LATE_PORT} still open {CHANGE_LIMIT:?} after its server was killed"
                    )
                    .into())
                }
                _ => std::thread::sleep(Duration::from_millis(250)),
            }
        }
        // The others are still served.
        let d = data(9, 1000);
        ensure(
            exchange(connect_in(&path, ECHO_PORT)?, &d)? == d,
            "echo after the late port closed",
        )
    })();
    let removed = remove_container(c, id);
    result?;
    removed?;
    // Nothing is left listening in the netns once the pod is gone.
    match connect_in(&path, HTTP_PORT) {
        Ok(_) => Err(format!("port {HTTP_PORT} still open after the pod was removed").into()),
        Err(_) => Ok(()),
    }
}
