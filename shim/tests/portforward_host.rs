//! Port-forward through the shim's Task service against a real `moat-agent` on the host (no VM):
//! a host network namespace stands in for the CRI pod netns, the container's spec names it, and
//! the agent (its sandbox in a namespace of its own, as a VM would be) serves its forward relay on
//! a Unix socket that the host-agent [`PodVm`] reports as its forward address. From a thread
//! inside the pod netns the test dials `127.0.0.1:PORT` as containerd does: the port appears,
//! carries data both ways with half-close, takes concurrent connections, is refused once the
//! server is gone, and nothing is left listening after Shutdown. Needs root, `ip` and
//! `/bin/busybox`; skipped otherwise. The agent binary: `MOAT_AGENT_BIN`, else `moat-agent` in
//! the target directory.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::api;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use moat_protocol::agent as pb;
use moat_protocol::agent_ttrpc_async::AgentClient;
use moat_protocol::connect::{connect, AgentAddress};
use moat_protocol::ttrpc::context;
use moat_shim::error::LaunchError;
use moat_shim::events::{forwarder, Event, Publish};
use moat_shim::pod::{PodLauncher, PodSpec, PodVm};
use moat_shim::task::TaskService;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;

const NS: &str = "moat-pf-test";
const PORT: u16 = 17100;
/// The container (and pod) id: not `c1`, which task_host uses, as cgroup names are global.
const ID: &str = "pf-shim-c1";
/// Bound on any single wait (a failure bound, not a synchronisation).
const LIMIT: Duration = Duration::from_secs(60);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A host netns named `name` with `lo` up; deleted on drop.
struct HostNetns(String);

impl HostNetns {
    fn create(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        for args in [
            vec!["netns", "add", name],
            vec!["-n", name, "link", "set", "lo", "up"],
        ] {
            let st = Command::new("ip").args(&args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        }
        Self(name.to_owned())
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
}

impl Drop for HostNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Connects to `127.0.0.1:port` from inside the netns at `path` (a thread joins it and makes the
/// socket, which stays in that namespace).
fn connect_in(path: &str, port: u16) -> std::io::Result<TcpStream> {
    let ns = std::fs::File::open(path)?;
    std::thread::spawn(move || {
        // SAFETY: setns(2) on an fd this thread owns; only this short-lived thread moves.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), LIMIT)
    })
    .join()
    .expect("netns thread")
}

fn echo(mut s: TcpStream, data: &[u8]) -> Vec<u8> {
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let mut r = s.try_clone().unwrap();
    let back = std::thread::spawn(move || {
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        got
    });
    s.write_all(data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    back.join().unwrap()
}

/// A connection to the echo server at `PORT` in `path`, proven served (one byte echoed).
fn open_echo(path: &str) -> TcpStream {
    let mut s = connect_in(path, PORT).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.write_all(b"!").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"!");
    s
}

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

/// An OCI bundle in `dir` whose init runs `args` in the pod netns `netns`.
fn bundle(dir: &Path, args: &[&str], netns: &str) -> PathBuf {
    moat_test_support::busybox_rootfs(dir);
    let spec = json!({
        "ociVersion": "1.0.2",
        "process": {"user": {"uid": 0, "gid": 0}, "args": args, "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network", "path": netns}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
        }
    });
    std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
    dir.to_owned()
}

struct HostLauncher {
    root: PathBuf,
}

struct HostVm {
    id: String,
    dir: PathBuf,
    agent: AgentClient,
    pid: u32,
    exit: watch::Receiver<bool>,
}

#[async_trait]
impl PodLauncher for HostLauncher {
    async fn launch(&self, spec: &PodSpec) -> Result<Arc<dyn PodVm>, LaunchError> {
        let fail = |e: BoxError| LaunchError::Other(e);
        let dir = self.root.join("pods").join(&spec.id);
        std::fs::create_dir_all(dir.join("shared")).map_err(|e| fail(e.into()))?;
        let sock = dir.join("agent.sock");
        let mut child = tokio::process::Command::new(moat_test_support::agent_binary())
            .arg("--listen")
            .arg(format!("unix://{}", sock.display()))
            .arg("--forward-listen")
            .arg(format!("unix://{}", dir.join("fwd.sock").display()))
            .arg("--state-dir")
            .arg(dir.join("agent-state"))
            .env("MOAT_AGENT_LOG", "debug")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(e.into()))?;
        let pid = child.id().unwrap_or(0);
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| fail("no stderr".into()))?;
        let mut lines = BufReader::new(stderr).lines();
        loop {
            match lines.next_line().await.map_err(|e| fail(e.into()))? {
                Some(l) if l.contains("serving protocol") => break,
                Some(l) => eprintln!("{l}"),
                None => return Err(fail("the agent exited before serving".into())),
            }
        }
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                eprintln!("{l}");
            }
        });
        let (tx, exit) = watch::channel(false);
        tokio::spawn(async move {
            let _ = child.wait().await;
            let _ = tx.send(true);
        });
        let agent = connect(&AgentAddress::Unix(sock), LIMIT)
            .await
            .map_err(|e| fail(e.into()))?;
        let req = pb::CreateSandboxRequest {
            sandbox_id: spec.id.clone(),
            new_network_namespace: true,
            ..Default::default()
        };
        agent
            .create_sandbox(context::Context::default(), &req)
            .await
            .map_err(|e| fail(e.into()))?;
        Ok(Arc::new(HostVm {
            id: spec.id.clone(),
            dir,
            agent,
            pid,
            exit,
        }))
    }
}

impl Drop for HostVm {
    /// After a failed test too: SIGTERM, on which the agent tears its containers down.
    fn drop(&mut self) {
        if !*self.exit.borrow() {
            // SAFETY: kill(2) of the agent, our own child, which has not been reaped.
            unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        }
    }
}

#[async_trait]
impl PodVm for HostVm {
    fn id(&self) -> &str {
        &self.id
    }
    fn agent(&self) -> &AgentClient {
        &self.agent
    }
    fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }
    fn agent_path(&self, rel: &str) -> String {
        self.shared_dir().join(rel).display().to_string()
    }
    fn rootfs(&self, rel: &str) -> pb::Rootfs {
        let mut r = pb::Rootfs::new();
        let mut hp = pb::HostPathRootfs::new();
        hp.path = self.agent_path(rel);
        r.set_host_path(hp);
        r
    }
    fn pid(&self) -> u32 {
        self.pid
    }
    fn exited(&self) -> bool {
        *self.exit.borrow()
    }
    async fn wait_exited(&self) {
        let _ = self.exit.clone().wait_for(|e| *e).await;
    }
    async fn stop(&self) {
        let _ = self
            .agent
            .destroy_sandbox(
                context::Context::default(),
                &pb::DestroySandboxRequest::new(),
            )
            .await;
        // SAFETY: kill(2) of the agent, our own child, not yet waited for.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let _ = self.exit.clone().wait_for(|e| *e).await;
    }
    fn forward_address(&self) -> Option<AgentAddress> {
        Some(AgentAddress::Unix(self.dir.join("fwd.sock")))
    }
}

struct Discard;

#[async_trait]
impl Publish for Discard {
    async fn publish(&self, _: &str, _: Event, _: Duration) -> Result<(), BoxError> {
        Ok(())
    }
}

fn ctx() -> TtrpcContext {
    TtrpcContext {
        mh: Default::default(),
        metadata: Default::default(),
        timeout_nano: 0,
    }
}

/// Waits (bounded) until connecting to `PORT` in `netns` gives `want` (open or refused).
async fn wait_for(netns: &str, open: bool) -> Option<TcpStream> {
    let start = Instant::now();
    loop {
        let netns2 = netns.to_owned();
        let r = tokio::task::spawn_blocking(move || connect_in(&netns2, PORT))
            .await
            .unwrap();
        match r {
            Ok(s) if open => return Some(s),
            Err(e) if !open && e.kind() == std::io::ErrorKind::ConnectionRefused => return None,
            other => assert!(
                start.elapsed() < LIMIT,
                "port {PORT} open={open} never seen: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_listeners_in_the_pod_netns_reach_the_agent() {
    if !is_root() || !Path::new("/bin/busybox").exists() {
        moat_test_support::skip("needs root and /bin/busybox");
        return;
    }
    let root = std::env::temp_dir().join(format!("moat-shim-pf-host-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let netns = HostNetns::create(&format!("moat-pf-{}", std::process::id()));
    let path = netns.path();
    let port = PORT.to_string();
    let b = bundle(
        &root.join("bundle"),
        &["nc", "-ll", "-p", &port, "-e", "cat"],
        &path,
    );
    let exit = Arc::new(ExitSignal::default());
    let task = TaskService::with_backend(
        NS,
        Box::new(HostLauncher { root: root.clone() }),
        forwarder(NS, Discard),
        exit.clone(),
    );
    let create = api::CreateTaskRequest {
        id: ID.into(),
        bundle: b.display().to_string(),
        ..Default::default()
    };
    task.create(&ctx(), create).await.unwrap();
    let start = api::StartRequest {
        id: ID.into(),
        ..Default::default()
    };
    task.start(&ctx(), start).await.unwrap();

    // The port shows up in the pod netns and carries data both ways, many at once.
    let s = wait_for(&path, true).await.expect("open");
    let d = data(1, 512 * 1024);
    let back = tokio::task::spawn_blocking({
        let d = d.clone();
        move || echo(s, &d)
    })
    .await
    .unwrap();
    assert!(back == d, "echo differs");
    // 20 open at once (each proven served before the next is opened: busybox nc drops
    // connections that arrive in a burst), then all transfer at the same time.
    let path2 = path.clone();
    let conns =
        tokio::task::spawn_blocking(move || (0..20).map(|_| open_echo(&path2)).collect::<Vec<_>>())
            .await
            .unwrap();
    let workers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            tokio::task::spawn_blocking(move || {
                let d = data(i as u64 + 10, 32 * 1024 + i);
                echo(s, &d) == d
            })
        })
        .collect();
    for (i, w) in workers.into_iter().enumerate() {
        assert!(w.await.unwrap(), "connection {i}");
    }

    // The server dies: the port is refused again.
    let kill = api::KillRequest {
        id: ID.into(),
        signal: libc::SIGKILL as u32,
        all: true,
        ..Default::default()
    };
    task.kill(&ctx(), kill).await.unwrap();
    assert!(wait_for(&path, false).await.is_none());

    let del = api::DeleteRequest {
        id: ID.into(),
        ..Default::default()
    };
    task.delete(&ctx(), del).await.unwrap();
    task.shutdown(&ctx(), api::ShutdownRequest::default())
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, exit.wait())
        .await
        .expect("the shim exits after Shutdown");
    drop(task);
    std::fs::remove_dir_all(&root).unwrap();
}
