//! Port-forward against a real moat-agent on the host: the agent serves its API and its forward
//! relay (`--forward-listen`) on Unix sockets, the sandbox has its own network namespace, and
//! busybox servers run in a container there. Checks `ListListeningPorts` (a port appears when a
//! server starts and disappears when it ends), data both ways through the relay with
//! half-close, many concurrent connections, a refused port, hostile headers and the bound on
//! concurrent connections. Needs root and `/bin/busybox` (busybox-static); skipped otherwise.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moat_protocol::agent as pb;
use moat_protocol::agent_ttrpc::AgentClient;
use moat_protocol::connect::{connect_sync, AgentAddress};
use moat_protocol::ttrpc::context;

/// Bound on any wait for the agent's view to change (a failure bound, not a synchronisation).
const LIMIT: Duration = Duration::from_secs(30);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn ctx() -> context::Context {
    context::with_timeout(LIMIT.as_nanos() as i64)
}

fn spec(args: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]}
    })
}

struct Agent {
    child: Child,
    dir: PathBuf,
    client: AgentClient,
    fwd: PathBuf,
}

impl Agent {
    fn start(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("moat-portfwd-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let fwd = dir.join("fwd.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_moat-agent"))
            .arg("--listen")
            .arg(format!("unix://{}", sock.display()))
            .arg("--forward-listen")
            .arg(format!("unix://{}", fwd.display()))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("MOAT_AGENT_LOG", "debug")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(
            moat_test_support::wait_serving(child.stderr.take().unwrap()),
            "agent exited before serving"
        );
        let client = connect_sync(&AgentAddress::Unix(sock), LIMIT).unwrap();
        let a = Self {
            child,
            dir,
            client,
            fwd,
        };
        let req = pb::CreateSandboxRequest {
            sandbox_id: format!("pf-{name}-{}", std::process::id()),
            new_network_namespace: true,
            ..Default::default()
        };
        a.client.create_sandbox(ctx(), &req).unwrap();
        a
    }

    fn run(&self, id: &str, args: &[&str]) {
        let root = self.dir.join("rootfs");
        if !root.exists() {
            moat_test_support::busybox_rootfs(&self.dir);
            std::fs::create_dir_all(root.join("www")).unwrap();
            std::fs::write(root.join("www/index.html"), "hello from the sandbox\n").unwrap();
        }
        let mut rootfs = pb::Rootfs::new();
        let mut hp = pb::HostPathRootfs::new();
        hp.path = root.display().to_string();
        rootfs.set_host_path(hp);
        let req = pb::CreateContainerRequest {
            container_id: id.into(),
            oci_spec: serde_json::to_vec(&spec(args)).unwrap(),
            rootfs: Some(rootfs).into(),
            ..Default::default()
        };
        self.client.create_container(ctx(), &req).unwrap();
        let r = pb::ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.client.start_container(ctx(), &r).unwrap();
    }

    fn kill(&self, id: &str) {
        let p = pb::ProcessRef {
            container_id: id.into(),
            ..Default::default()
        };
        let r = pb::SignalProcessRequest {
            process: Some(p.clone()).into(),
            signal: 9,
            all: true,
            ..Default::default()
        };
        self.client.signal_process(ctx(), &r).unwrap();
        let w = pb::WaitProcessRequest {
            process: Some(p).into(),
            ..Default::default()
        };
        self.client.wait_process(ctx(), &w).unwrap();
    }

    fn ports(&self) -> Vec<u32> {
        self.client
            .list_listening_ports(ctx(), &pb::ListListeningPortsRequest::new())
            .unwrap()
            .ports
    }

    /// Waits until `ListListeningPorts` does (`present`) or does not list `port`.
    fn wait_port(&self, port: u32, present: bool) {
        let start = Instant::now();
        loop {
            let ports = self.ports();
            if ports.contains(&port) == present {
                return;
            }
            assert!(
                start.elapsed() < LIMIT,
                "port {port} present={present} never seen; ports {ports:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Opens a forwarded connection to `port`: the relay's reply line and the stream.
    fn forward(&self, header: &[u8]) -> (String, UnixStream) {
        let mut s = UnixStream::connect(&self.fwd).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        s.write_all(header).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(_) if b[0] == b'\n' => break,
                Ok(_) => line.push(b[0]),
            }
        }
        (String::from_utf8_lossy(&line).into_owned(), s)
    }

    fn connect(&self, port: u16) -> UnixStream {
        let (reply, s) = self.forward(format!("PORT {port}\n").as_bytes());
        assert_eq!(reply, "OK", "forwarding to {port}");
        s
    }

    fn finish(mut self) {
        self.client
            .destroy_sandbox(ctx(), &pb::DestroySandboxRequest::new())
            .unwrap();
        // SAFETY: kill(2) of our own child, not yet waited for.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert!(self.child.wait().unwrap().success());
        assert!(!self.fwd.exists(), "forward socket left behind");
        std::fs::remove_dir_all(&self.dir).unwrap();
    }
}

impl Drop for Agent {
    /// On a failed test: SIGTERM, on which the agent tears its containers down.
    fn drop(&mut self) {
        // SAFETY: kill(2) of our own child (reaped below, so its pid is still ours).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
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

/// Sends `payload` through an echo connection, half-closes, and reads everything back.
fn echo(mut s: UnixStream, payload: &[u8]) -> Vec<u8> {
    let mut reader = s.try_clone().unwrap();
    let back = std::thread::spawn(move || {
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        got
    });
    s.write_all(payload).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    back.join().unwrap()
}

#[test]
fn ports_are_listed_and_forwarded() {
    if !is_root() || !Path::new("/bin/busybox").exists() {
        moat_test_support::skip("needs root and /bin/busybox");
        return;
    }
    let a = Agent::start("list");
    assert!(!a.ports().contains(&7000));

    // An echo server on every address (each connection its own `cat`), and httpd on 127.0.0.1.
    a.run(
        "srv",
        &[
            "sh",
            "-c",
            "nc -ll -p 7000 -e cat & httpd -f -p 127.0.0.1:8080 -h /www & wait",
        ],
    );
    a.wait_port(7000, true);
    a.wait_port(8080, true);

    // Data both ways, with the client's half-close passed on (cat ends on it).
    let payload = data(1, 1 << 20);
    assert!(echo(a.connect(7000), &payload) == payload, "1 MiB echo");

    // A request/response protocol on a 127.0.0.1-only listener.
    let mut s = a.connect(8080);
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.") && resp.contains(" 200 OK"),
        "{resp}"
    );
    assert!(resp.ends_with("hello from the sandbox\n"), "{resp}");

    // Many at once: each proven served before the next is opened (busybox nc drops
    // connections that arrive in a burst), then all transfer at the same time.
    let conns: Vec<_> = (0..40u64)
        .map(|i| {
            let mut s = a.connect(7000);
            s.write_all(b"!").unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"!");
            std::thread::spawn(move || {
                let p = data(i + 2, 64 * 1024 + i as usize);
                echo(s, &p) == p
            })
        })
        .collect();
    for (i, c) in conns.into_iter().enumerate() {
        assert!(c.join().unwrap(), "concurrent connection {i}");
    }

    // Nothing there: refused, named.
    let (reply, _) = a.forward(b"PORT 7999\n");
    assert!(
        reply.starts_with("ERR ") && reply.contains("7999"),
        "{reply}"
    );

    // Hostile headers: an answer, a closed stream, and the agent goes on.
    for bad in [
        &b"PORT 0\n"[..],
        b"PORT 65536\n",
        b"PORT 80x\n",
        b"GET / HTTP/1.0\n",
    ] {
        let (reply, _) = a.forward(bad);
        assert!(reply.starts_with("ERR bad header"), "{bad:?}: {reply}");
    }
    let (reply, _) = a.forward(&[b'9'; 4096]);
    assert!(reply.contains("longer than"), "{reply}");
    a.client.version(ctx(), &pb::VersionRequest::new()).unwrap();

    // The server ends: its ports leave the list, and forwarding to them is refused.
    a.kill("srv");
    a.wait_port(7000, false);
    a.wait_port(8080, false);
    let (reply, _) = a.forward(b"PORT 7000\n");
    assert!(reply.starts_with("ERR "), "{reply}");
    a.finish();
}

#[test]
fn concurrent_connections_are_bounded() {
    if !is_root() {
        moat_test_support::skip("needs root");
        return;
    }
    let a = Agent::start("bound");
    // Connections that never send their header hold a slot each (until the header timeout).
    let held: Vec<UnixStream> = (0..moat_agent::portforward::MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&a.fwd).unwrap())
        .collect();
    // One of them may still be on its way in: the next refusal is what counts.
    let start = Instant::now();
    loop {
        let (reply, _) = a.forward(b"PORT 1\n");
        if reply == "ERR busy" {
            break;
        }
        assert!(start.elapsed() < LIMIT, "never busy: {reply}");
    }
    drop(held);
    // Slots come back once the agent sees the held streams close.
    let start = Instant::now();
    loop {
        let (reply, _) = a.forward(b"PORT 1\n");
        if reply != "ERR busy" {
            assert!(reply.starts_with("ERR connecting"), "{reply}");
            break;
        }
        assert!(start.elapsed() < LIMIT, "slots never freed");
    }
    a.finish();
}
