//! Integration tests of moat-agent on the host: the real binary serves a
//! Unix socket, containers run from a busybox-static rootfs in real
//! namespaces. Needs root (skipped with a message otherwise).
//!
//! Each test starts its own agent and sandbox and checks afterwards that no
//! process, mount or cgroup is left behind.
//!
//! Remote mode runs the same tests against an agent that is already running
//! somewhere else, typically PID 1 of a microVM reached over the VMM's
//! hybrid vsock socket: set `MOAT_AGENT_TEST_ADDR` (e.g.
//! `hvsock:///run/vm/vsock.sock:1024`), `MOAT_AGENT_TEST_ROOTFS_TAG` (the
//! virtio-fs tag the VM got with `--fs TAG=DIR`) and
//! `MOAT_AGENT_TEST_ROOTFS_DIR` (that DIR; the busybox rootfs is built there)
//! and run with `--test-threads 1` (one sandbox per agent). Checks that need
//! to see the agent's machine (its children, mounts, cgroups) are skipped.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use moat_protocol::agent as pb;
use moat_protocol::agent_ttrpc::AgentClient;
use moat_protocol::connect::{connect_sync, AgentAddress};
use moat_protocol::ttrpc::context;

fn is_root() -> bool {
    // SAFETY: trivial libc call.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            moat_test_support::skip("needs root (namespaces, mounts)");
            return;
        }
    };
}

fn ctx() -> context::Context {
    context::with_timeout(Duration::from_secs(60).as_nanos() as i64)
}

/// The remote agent, if the environment names one.
struct Remote {
    addr: String,
    tag: String,
    dir: PathBuf,
}

fn remote() -> Option<Remote> {
    let addr = std::env::var("MOAT_AGENT_TEST_ADDR").ok()?;
    let tag = std::env::var("MOAT_AGENT_TEST_ROOTFS_TAG")
        .expect("MOAT_AGENT_TEST_ROOTFS_TAG with MOAT_AGENT_TEST_ADDR");
    let dir = std::env::var("MOAT_AGENT_TEST_ROOTFS_DIR")
        .expect("MOAT_AGENT_TEST_ROOTFS_DIR with MOAT_AGENT_TEST_ADDR");
    Some(Remote {
        addr,
        tag,
        dir: dir.into(),
    })
}

struct TestAgent {
    finished: bool,
    /// The local agent process (None in remote mode).
    child: Option<Child>,
    dir: PathBuf,
    client: AgentClient,
    sandbox: String,
}

impl TestAgent {
    fn start(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("moat-agent-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(r) = remote() {
            let addr = AgentAddress::parse(&r.addr).unwrap();
            let client = connect_sync(&addr, Duration::from_secs(60)).unwrap();
            return Self::with_sandbox(name, None, dir, client);
        }
        let sock = dir.join("agent.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_moat-agent"))
            .arg("--listen")
            .arg(format!("unix://{}", sock.display()))
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
        let client = connect_sync(&AgentAddress::Unix(sock), Duration::from_secs(5)).unwrap();
        Self::with_sandbox(name, Some(child), dir, client)
    }

    fn with_sandbox(name: &str, child: Option<Child>, dir: PathBuf, client: AgentClient) -> Self {
        let sandbox = format!("sb-{name}-{}", std::process::id());
        // Built before the first RPC so that Drop stops the agent on failure.
        let agent = Self {
            finished: false,
            child,
            dir,
            client,
            sandbox,
        };
        let mut req = pb::CreateSandboxRequest::new();
        req.sandbox_id = agent.sandbox.clone();
        req.hostname = "moat-test".into();
        req.new_network_namespace = true;
        req.dns_servers = vec!["192.0.2.53".into()];
        req.dns_searches = vec!["example.test".into()];
        let mut shared = pb::SharedMount::new();
        shared.name = "scratch".into();
        shared.source = "tmpfs".into();
        shared.fstype = "tmpfs".into();
        shared.options = vec!["size=4m".into(), "mode=0777".into()];
        req.shared_mounts = vec![shared];
        agent.client.create_sandbox(ctx(), &req).unwrap();
        agent
    }

    /// The sandbox's directory as the agent sees it.
    fn sandbox_dir(&self) -> PathBuf {
        let state = if remote().is_some() {
            PathBuf::from("/run/moat")
        } else {
            self.dir.join("state")
        };
        state.join("sandbox").join(&self.sandbox)
    }

    fn rootfs(&self) -> PathBuf {
        if let Some(r) = remote() {
            let root = r.dir.join("rootfs");
            if !root.join("bin/busybox").exists() {
                moat_test_support::busybox_rootfs(&r.dir);
            }
            return root;
        }
        let r = self.dir.join("rootfs");
        if r.exists() {
            r
        } else {
            moat_test_support::busybox_rootfs(&self.dir)
        }
    }

    fn create(&self, id: &str, spec: &serde_json::Value) -> Result<(), String> {
        self.create_sharing(id, spec, "")
    }

    /// Creates a container that joins the PID namespace of container `share_pid_with` (none
    /// when empty).
    fn create_sharing(
        &self,
        id: &str,
        spec: &serde_json::Value,
        share_pid_with: &str,
    ) -> Result<(), String> {
        let mut req = pb::CreateContainerRequest::new();
        req.container_id = id.into();
        req.share_pid_namespace_with = share_pid_with.into();
        req.oci_spec = serde_json::to_vec(spec).unwrap();
        let mut rootfs = pb::Rootfs::new();
        let path = self.rootfs();
        if let Some(r) = remote() {
            let mut v = pb::VirtioFsRootfs::new();
            v.tag = r.tag;
            v.path = "rootfs".into();
            rootfs.set_virtio_fs(v);
        } else {
            let mut hp = pb::HostPathRootfs::new();
            hp.path = path.to_string_lossy().into_owned();
            rootfs.set_host_path(hp);
        }
        req.rootfs = Some(rootfs).into();
        self.client
            .create_container(ctx(), &req)
            .map(|_| ())
            .map_err(msg)
    }

    fn start_c(&self, id: &str) {
        let mut r = pb::ContainerRequest::new();
        r.container_id = id.into();
        self.client.start_container(ctx(), &r).unwrap();
    }

    fn read_all(&self, id: &str, exec: &str, stderr: bool) -> String {
        let mut out = Vec::new();
        loop {
            let mut r = pb::ReadStreamRequest::new();
            r.process = Some(pref(id, exec)).into();
            r.max_len = 4096;
            let resp = if stderr {
                self.client.read_stderr(ctx(), &r)
            } else {
                self.client.read_stdout(ctx(), &r)
            }
            .unwrap();
            if resp.data.is_empty() {
                return String::from_utf8_lossy(&out).into_owned();
            }
            out.extend_from_slice(&resp.data);
        }
    }

    fn read_until(&self, id: &str, exec: &str, needle: &str) -> String {
        let mut out = String::new();
        while !out.contains(needle) {
            let mut r = pb::ReadStreamRequest::new();
            r.process = Some(pref(id, exec)).into();
            r.max_len = 4096;
            let resp = self.client.read_stdout(ctx(), &r).unwrap();
            assert!(!resp.data.is_empty(), "EOF before {needle:?}; got {out:?}");
            out.push_str(&String::from_utf8_lossy(&resp.data));
        }
        out
    }

    fn wait(&self, id: &str, exec: &str) -> i32 {
        let mut r = pb::WaitProcessRequest::new();
        r.process = Some(pref(id, exec)).into();
        self.client.wait_process(ctx(), &r).unwrap().exit_status
    }

    fn signal(&self, id: &str, exec: &str, sig: u32, all: bool) {
        self.try_signal(id, exec, sig, all).unwrap();
    }

    fn try_signal(
        &self,
        id: &str,
        exec: &str,
        sig: u32,
        all: bool,
    ) -> Result<(), moat_protocol::ttrpc::Error> {
        let mut r = pb::SignalProcessRequest::new();
        r.process = Some(pref(id, exec)).into();
        r.signal = sig;
        r.all = all;
        self.client.signal_process(ctx(), &r).map(|_| ())
    }

    fn write_stdin(&self, id: &str, exec: &str, data: &[u8]) {
        let mut r = pb::WriteStdinRequest::new();
        r.process = Some(pref(id, exec)).into();
        r.data = data.to_vec();
        assert_eq!(
            self.client.write_stdin(ctx(), &r).unwrap().written as usize,
            data.len()
        );
    }

    fn exec(&self, id: &str, exec: &str, args: &[&str], terminal: bool) -> Result<(), String> {
        let mut r = pb::ExecProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec.into();
        r.process = serde_json::to_vec(&process(args, terminal)).unwrap();
        self.client.exec_process(ctx(), &r).map(|_| ()).map_err(msg)
    }

    fn remove(&self, id: &str, force: bool) -> Result<(), String> {
        let mut r = pb::RemoveContainerRequest::new();
        r.container_id = id.into();
        r.force = force;
        self.client
            .remove_container(ctx(), &r)
            .map(|_| ())
            .map_err(msg)
    }

    /// Destroys the sandbox, stops the agent and checks nothing is left.
    fn finish(mut self) {
        self.finished = true;
        self.client
            .destroy_sandbox(ctx(), &pb::DestroySandboxRequest::new())
            .unwrap();
        let Some(mut child) = self.child.take() else {
            std::fs::remove_dir_all(&self.dir).unwrap();
            return;
        };
        let agent_pid = child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{agent_pid}/task/{agent_pid}/children"))
                .unwrap();
        assert_eq!(children.trim(), "", "agent still has children");
        let dir = self.dir.to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&dir), "mounts left under {dir}:\n{mounts}");
        if let Some(cg) = cgroup2_root() {
            let sb = cg.join("moat").join(&self.sandbox);
            assert!(!sb.exists(), "cgroup {} left behind", sb.display());
        }
        // SAFETY: plain kill of our own child.
        unsafe { libc::kill(agent_pid as i32, 15) };
        let status = child.wait().unwrap();
        assert!(status.success(), "agent exited with {status}");
        assert!(!self.dir.join("agent.sock").exists());
        std::fs::remove_dir_all(&self.dir).unwrap();
    }
}

impl Drop for TestAgent {
    /// On a failed test: stop the agent, which tears its containers down.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(child) = &mut self.child {
            // SAFETY: plain kill of our own child.
            unsafe { libc::kill(child.id() as i32, 15) };
            let _ = child.wait();
        } else {
            let _ = self
                .client
                .destroy_sandbox(ctx(), &pb::DestroySandboxRequest::new());
        }
    }
}

fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| PathBuf::from(pre.split_whitespace().nth(4).unwrap()))
    })
}

/// The status code of an RPC error.
fn code(e: moat_protocol::ttrpc::Error) -> moat_protocol::ttrpc::Code {
    match e {
        moat_protocol::ttrpc::Error::RpcStatus(s) => s.code(),
        other => panic!("not a status: {other}"),
    }
}

/// The message of an RPC error.
fn msg(e: moat_protocol::ttrpc::Error) -> String {
    match e {
        moat_protocol::ttrpc::Error::RpcStatus(s) => s.message().to_owned(),
        other => other.to_string(),
    }
}

fn pref(id: &str, exec: &str) -> pb::ProcessRef {
    let mut p = pb::ProcessRef::new();
    p.container_id = id.into();
    p.exec_id = exec.into();
    p
}

const CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

fn process(args: &[&str], terminal: bool) -> serde_json::Value {
    serde_json::json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin", "TERM=xterm"],
        "cwd": "/",
        "capabilities": {"bounding": CAPS, "effective": CAPS, "permitted": CAPS},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": true
    })
}

/// A spec shaped like `runc spec`'s default.
fn spec(args: &[&str], terminal: bool) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": process(args, terminal),
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "ignored",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/bus"]
        }
    })
}

#[test]
fn output_exit_code_and_isolation() {
    require_root!();
    let a = TestAgent::start("output");
    let v = a.client.version(ctx(), &pb::VersionRequest::new()).unwrap();
    moat_protocol::ensure_compatible(&v).unwrap();
    let h = a.client.health(ctx(), &pb::HealthRequest::new()).unwrap();
    assert_eq!(
        h.status.enum_value(),
        Ok(pb::health_response::Status::SERVING)
    );
    let script = "echo out; echo err >&2; hostname; echo pid=$$; id -u; \
                  test -c /dev/null && echo devnull; \
                  touch /proc/sys/x 2>/dev/null || echo ro-ok; exit 3";
    a.create("c1", &spec(&["sh", "-c", script], false)).unwrap();
    a.start_c("c1");
    let out = a.read_all("c1", "", false);
    assert_eq!(out, "out\nmoat-test\npid=1\n0\ndevnull\nro-ok\n");
    assert_eq!(a.read_all("c1", "", true), "err\n");
    assert_eq!(a.wait("c1", ""), 3);
    // waiting again returns the same status
    assert_eq!(a.wait("c1", ""), 3);
    a.remove("c1", false).unwrap();
    let e = a.remove("c1", false).unwrap_err();
    assert!(e.contains("not found"), "{e}");
    a.finish();
}

#[test]
fn stdin_exec_signals_and_pause() {
    require_root!();
    let a = TestAgent::start("exec");
    a.create("c1", &spec(&["cat"], false)).unwrap();
    // exec before start is refused
    assert!(a
        .exec("c1", "early", &["true"], false)
        .unwrap_err()
        .contains("not running"));
    a.start_c("c1");
    a.write_stdin("c1", "", b"hello\n");
    assert_eq!(a.read_until("c1", "", "hello\n"), "hello\n");

    // exec sees the container's PID namespace and filesystem
    a.exec(
        "c1",
        "e1",
        &["sh", "-c", "cat /proc/1/comm; ls /bin/busybox; exit 7"],
        false,
    )
    .unwrap();
    assert_eq!(a.read_all("c1", "e1", false), "cat\n/bin/busybox\n");
    assert_eq!(a.wait("c1", "e1"), 7);
    assert!(a
        .exec("c1", "e1", &["true"], false)
        .unwrap_err()
        .contains("already exists"));
    let e = a
        .exec("c1", "bad", &["/no/such/program"], false)
        .unwrap_err();
    assert!(e.contains("/no/such/program"), "{e}");

    // pause / resume (cgroup.freeze is a core cgroup v2 feature)
    let mut r = pb::ContainerRequest::new();
    r.container_id = "c1".into();
    if remote().is_some() || cgroup2_root().is_some() {
        a.client.pause_container(ctx(), &r).unwrap();
        // While frozen, stdin is buffered but nothing comes back yet;
        // locally the kernel's own view is checked too.
        if let (None, Some(cg)) = (remote(), cgroup2_root()) {
            let events =
                std::fs::read_to_string(cg.join("moat").join(&a.sandbox).join("c1/cgroup.events"))
                    .unwrap();
            assert!(events.contains("frozen 1"), "{events}");
        }
        let e = a.client.pause_container(ctx(), &r).unwrap_err();
        assert!(msg(e).contains("not running"));
        a.client.resume_container(ctx(), &r).unwrap();
        a.write_stdin("c1", "", b"again\n");
        assert_eq!(a.read_until("c1", "", "again\n"), "again\n");
    }

    // a long-running exec, then SIGKILL to everything
    a.exec("c1", "sleeper", &["sleep", "1000"], false).unwrap();
    let pids = a.client.list_processes(ctx(), &r).unwrap().pids;
    assert!(pids.len() >= 2, "{pids:?}");
    let e = a.remove("c1", false).unwrap_err();
    assert!(e.contains("running"), "{e}");
    a.signal("c1", "", 9, true);
    assert_eq!(a.wait("c1", ""), 137);
    assert_eq!(a.wait("c1", "sleeper"), 137);
    a.remove("c1", false).unwrap();

    // closing stdin ends `cat` normally
    a.create("c2", &spec(&["cat"], false)).unwrap();
    a.start_c("c2");
    a.write_stdin("c2", "", b"bye\n");
    let mut c = pb::CloseStdinRequest::new();
    c.process = Some(pref("c2", "")).into();
    a.client.close_stdin(ctx(), &c).unwrap();
    assert_eq!(a.read_all("c2", "", false), "bye\n");
    assert_eq!(a.wait("c2", ""), 0);
    a.remove("c2", false).unwrap();

    // a running container removed with force
    a.create("c3", &spec(&["sleep", "1000"], false)).unwrap();
    a.start_c("c3");
    a.signal("c3", "", 15, false); // PID 1 ignores SIGTERM without a handler
    a.remove("c3", true).unwrap();
    a.finish();
}

#[test]
fn terminal_and_resize() {
    require_root!();
    let a = TestAgent::start("tty");
    a.create(
        "t1",
        &spec(&["sh", "-c", "tty; stty size; read x; echo got-$x"], true),
    )
    .unwrap();
    let mut r = pb::TtyResizeRequest::new();
    r.process = Some(pref("t1", "")).into();
    r.rows = 40;
    r.cols = 100;
    a.client.tty_resize(ctx(), &r).unwrap();
    a.start_c("t1");
    let out = a.read_until("t1", "", "100");
    assert!(out.contains("40 100"), "{out:?}");
    // The terminal is the container's own (its devpts), as under runc: `tty` names it.
    assert!(out.contains("/dev/pts/"), "{out:?}");
    // So is an exec'd process's.
    a.exec("t1", "e1", &["sh", "-c", "tty; echo tty-exit-$?"], true)
        .unwrap();
    let out = a.read_until("t1", "e1", "tty-exit-");
    assert!(
        out.contains("/dev/pts/") && out.contains("tty-exit-0"),
        "{out:?}"
    );
    assert_eq!(a.wait("t1", "e1"), 0);
    a.write_stdin("t1", "", b"line\n");
    let out = a.read_all("t1", "", false);
    assert!(out.contains("got-line"), "{out:?}");
    assert_eq!(a.wait("t1", ""), 0);
    // stderr of a terminal process is empty
    assert_eq!(a.read_all("t1", "", true), "");
    // resizing a process without terminal is refused
    a.create("t2", &spec(&["true"], false)).unwrap();
    r.process = Some(pref("t2", "")).into();
    assert!(a.client.tty_resize(ctx(), &r).is_err());
    a.remove("t2", true).unwrap();
    a.remove("t1", false).unwrap();
    a.finish();
}

#[test]
fn hostile_specs_are_refused_without_leftovers() {
    require_root!();
    let a = TestAgent::start("hostile");
    let rootfs = a.rootfs();
    let _ = std::fs::remove_file(rootfs.join("escape"));
    symlink("../../../../../../etc", rootfs.join("escape")).unwrap();

    let mut cases: Vec<(serde_json::Value, &str)> = Vec::new();
    let mut s = spec(&["true"], false);
    s["mounts"].as_array_mut().unwrap().push(
        serde_json::json!({"destination": "/tmp/../../etc", "type": "tmpfs", "source": "tmpfs"}),
    );
    cases.push((s, "\"..\""));
    let mut s = spec(&["true"], false);
    s["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"destination": "/escape/x", "type": "tmpfs", "source": "tmpfs"}));
    cases.push((s, "escapes the container rootfs"));
    let mut s = spec(&["true"], false);
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "user"}));
    cases.push((s, "user namespaces"));
    let mut s = spec(&["true"], false);
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "bogus"}));
    cases.push((s, "unknown variant"));
    let mut s = spec(&["true"], false);
    s["process"]["args"] = serde_json::json!([]);
    cases.push((s, "args"));
    let mut s = spec(&["true"], false);
    s["mounts"].as_array_mut().unwrap().push(serde_json::json!({"destination": "/x", "type": "bind", "source": "/definitely/missing", "options": ["rbind"]}));
    cases.push((s, "/definitely/missing"));
    cases.push((serde_json::json!({"not": "a spec"}), "invalid OCI"));

    for (s, want) in cases {
        let e = a.create("bad", &s).unwrap_err();
        assert!(e.contains(want), "expected {want:?} in {e}");
        // nothing was kept: the id is free and no cgroup exists
        if let Some(cg) = cgroup2_root() {
            assert!(!cg.join("moat").join(&a.sandbox).join("bad").exists());
        }
    }
    // a bad rootfs source
    let mut req = pb::CreateContainerRequest::new();
    req.container_id = "bad".into();
    req.oci_spec = serde_json::to_vec(&spec(&["true"], false)).unwrap();
    let e = msg(a.client.create_container(ctx(), &req).unwrap_err());
    assert!(e.contains("rootfs source missing"), "{e}");
    // an invalid id
    let e = a.create("../x", &spec(&["true"], false)).unwrap_err();
    assert!(e.contains("container id"), "{e}");
    // the same id works once the spec is sane, and the host's /etc is untouched
    a.create("bad", &spec(&["true"], false)).unwrap();
    a.start_c("bad");
    assert_eq!(a.wait("bad", ""), 0);
    a.remove("bad", false).unwrap();
    a.finish();
}

#[test]
fn seccomp_user_and_capabilities() {
    require_root!();
    let a = TestAgent::start("seccomp");
    let mut s = spec(&["sh", "-c", "mkdir /tmp/x; echo rc=$?; id -u; id -g; id -G; grep -E 'CapEff|CapBnd|NoNewPrivs' /proc/self/status"], false);
    s["process"]["user"] =
        serde_json::json!({"uid": 65534, "gid": 65534, "additionalGids": [5, 6]});
    s["process"]["capabilities"] =
        serde_json::json!({"bounding": ["CAP_KILL"], "effective": [], "permitted": []});
    s["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    a.create("s1", &s).unwrap();
    a.start_c("s1");
    let out = a.read_all("s1", "", false);
    assert_eq!(
        out,
        "rc=1\n65534\n65534\n65534 5 6\nCapEff:\t0000000000000000\nCapBnd:\t0000000000000020\nNoNewPrivs:\t1\n"
    );
    assert!(a
        .read_all("s1", "", true)
        .contains("Operation not permitted"));
    assert_eq!(a.wait("s1", ""), 0);
    a.remove("s1", false).unwrap();
    a.finish();
}

#[test]
fn sigterm_tears_everything_down() {
    require_root!();
    if remote().is_some() {
        moat_test_support::skip("needs a local agent");
        return;
    }
    let mut a = TestAgent::start("sigterm");
    a.create("c1", &spec(&["sleep", "1000"], false)).unwrap();
    a.start_c("c1");
    a.exec("c1", "e1", &["sleep", "1000"], false).unwrap();
    let mut r = pb::ContainerRequest::new();
    r.container_id = "c1".into();
    let pids = a.client.list_processes(ctx(), &r).unwrap().pids;
    assert!(pids.len() >= 2, "{pids:?}");
    let mut child = a.child.take().unwrap();
    // SAFETY: plain kill of our own child (not yet waited for, so its PID is still its own).
    unsafe { libc::kill(child.id() as i32, 15) };
    assert!(child.wait().unwrap().success());
    a.finished = true;
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} survived the agent"
        );
    }
    if let Some(cg) = cgroup2_root() {
        assert!(!cg.join("moat").join(&a.sandbox).exists());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&*a.dir.to_string_lossy()));
    std::fs::remove_dir_all(&a.dir).unwrap();
}

/// Limits need cgroup v2 controllers: this runs fully inside the guest or
/// the software-KVM host, and is skipped where the controllers are absent
/// (this development machine's v2 hierarchy has none).
#[test]
fn cgroup_limits_oom_pids_stats_and_update() {
    require_root!();
    let a = TestAgent::start("cgroup");
    let details = a
        .client
        .get_guest_details(ctx(), &pb::GuestDetailsRequest::new())
        .unwrap();
    assert_eq!(details.protocol_version, moat_protocol::PROTOCOL_VERSION);
    let have = |c: &str| details.cgroup_controllers.iter().any(|x| x == c);
    if !(have("memory") && have("pids") && have("cpu")) {
        moat_test_support::skip(format!(
            "cgroup v2 controllers {:?} lack memory/pids/cpu",
            details.cgroup_controllers
        ));
        a.finish();
        return;
    }
    let req = |id: &str| {
        let mut r = pb::ContainerRequest::new();
        r.container_id = id.into();
        r
    };

    // memory limit → OOM kill → OOM event and counters
    let mut s = spec(&["tail", "/dev/zero"], false);
    s["linux"]["resources"] = serde_json::json!({"memory": {"limit": 16 << 20, "swap": 16 << 20}});
    a.create("m1", &s).unwrap();
    let oom_client = a.client.clone();
    let oom =
        std::thread::spawn(move || oom_client.get_oom_event(ctx(), &pb::GetOomEventRequest::new()));
    a.start_c("m1");
    assert_eq!(a.wait("m1", ""), 137);
    assert_eq!(oom.join().unwrap().unwrap().container_id, "m1");
    let st = a.client.stats_container(ctx(), &req("m1")).unwrap();
    assert!(st.memory.oom_kill_events >= 1, "{st:?}");
    assert_eq!(st.memory.limit_bytes, 16 << 20);
    a.remove("m1", false).unwrap();

    // pids limit, stats that move, update
    let mut s = spec(
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; echo busy-done; read x",
        ],
        false,
    );
    s["linux"]["resources"] = serde_json::json!({
        "pids": {"limit": 6},
        "cpu": {"shares": 512, "quota": 50000, "period": 100000}
    });
    a.create("p1", &s).unwrap();
    let before = a.client.stats_container(ctx(), &req("p1")).unwrap();
    a.start_c("p1");
    assert_eq!(a.read_until("p1", "", "busy-done"), "busy-done\n");
    let after = a.client.stats_container(ctx(), &req("p1")).unwrap();
    assert!(
        after.cpu.usage_usec > before.cpu.usage_usec,
        "cpu did not move: {before:?} -> {after:?}"
    );
    assert_eq!(after.pids.limit, 6);
    // Execs add processes until the limit refuses a fork.
    let mut refused = None;
    for n in 0..8 {
        match a.exec("p1", &format!("s{n}"), &["sleep", "1000"], false) {
            Ok(()) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("the pids limit never refused a process");
    assert!(refused.contains("fork"), "{refused}");
    let at_limit = a.client.stats_container(ctx(), &req("p1")).unwrap();
    assert!(
        at_limit.pids.current <= 6 && at_limit.pids.current >= 2,
        "{at_limit:?}"
    );
    let mut u = pb::UpdateContainerRequest::new();
    u.container_id = "p1".into();
    u.resources = br#"{"pids": {"limit": 64}, "memory": {"limit": 67108864}}"#.to_vec();
    a.client.update_container(ctx(), &u).unwrap();
    let updated = a.client.stats_container(ctx(), &req("p1")).unwrap();
    assert_eq!(updated.pids.limit, 64);
    assert_eq!(updated.memory.limit_bytes, 64 << 20);
    a.signal("p1", "", 9, true);
    assert_eq!(a.wait("p1", ""), 137);
    a.remove("p1", false).unwrap();
    a.finish();
}

/// Remote mode only, when `MOAT_AGENT_TEST_POWER_OFF=1`: DestroySandbox with
/// power_off must answer and then power the microVM off (the caller checks
/// that the VMM exits cleanly).
#[test]
fn remote_power_off() {
    if remote().is_none() || std::env::var("MOAT_AGENT_TEST_POWER_OFF").as_deref() != Ok("1") {
        moat_test_support::skip("needs a remote agent and MOAT_AGENT_TEST_POWER_OFF=1");
        return;
    }
    let mut a = TestAgent::start("poweroff");
    let mut req = pb::DestroySandboxRequest::new();
    req.power_off = true;
    a.client.destroy_sandbox(ctx(), &req).unwrap();
    a.finished = true;
    std::fs::remove_dir_all(&a.dir).unwrap();
}

#[test]
fn sandbox_dns_and_shared_mounts() {
    require_root!();
    let a = TestAgent::start("shared");
    let sb = a.sandbox_dir();
    let with_mounts = |args: &[&str]| {
        let mut s = spec(args, false);
        let mounts = s["mounts"].as_array_mut().unwrap();
        mounts.push(serde_json::json!({"destination": "/shared", "type": "bind",
            "source": sb.join("shared/scratch"), "options": ["rbind", "rw"]}));
        mounts.push(
            serde_json::json!({"destination": "/etc/resolv.conf", "type": "bind",
            "source": sb.join("resolv.conf"), "options": ["bind", "ro"]}),
        );
        s
    };
    a.create(
        "w",
        &with_mounts(&["sh", "-c", "echo from-w > /shared/note"]),
    )
    .unwrap();
    a.start_c("w");
    assert_eq!(a.wait("w", ""), 0);
    a.create(
        "r",
        &with_mounts(&[
            "sh",
            "-c",
            "cat /shared/note /etc/resolv.conf; echo x >> /etc/resolv.conf",
        ]),
    )
    .unwrap();
    a.start_c("r");
    assert_eq!(
        a.read_all("r", "", false),
        "from-w\nnameserver 192.0.2.53\nsearch example.test\n"
    );
    assert!(a.read_all("r", "", true).contains("Read-only file system"));
    assert_eq!(a.wait("r", ""), 1);
    a.remove("w", false).unwrap();
    a.remove("r", false).unwrap();
    a.finish();
}

#[test]
fn loopback_is_up_in_the_sandbox() {
    require_root!();
    let a = TestAgent::start("loopback");
    // A TCP round trip over 127.0.0.1: the listener's output proves the
    // connection. busybox `nc -l` cannot say when it listens, so the client
    // polls (bounded: 400 tries 50 ms apart) from when the listener started;
    // if every try fails the listener is killed, so the test fails instead of
    // waiting for it forever.
    let script = "mkfifo /tmp/ready; \
                  (nc -l -p 5555 127.0.0.1 > /tmp/got & echo $! > /tmp/ncpid; echo up > /tmp/ready; wait) & \
                  read x < /tmp/ready; \
                  i=0; until echo hello | nc 127.0.0.1 5555 2>/dev/null; do i=$((i+1)); \
                  [ $i -gt 400 ] && { kill $(cat /tmp/ncpid); break; }; sleep 0.05; done; \
                  wait; cat /tmp/got; ping -c1 -W5 127.0.0.1 >/dev/null && echo ping-ok";
    a.create("lo", &spec(&["sh", "-c", script], false)).unwrap();
    a.start_c("lo");
    let out = a.read_all("lo", "", false);
    assert_eq!(out, "hello\nping-ok\n");
    assert_eq!(a.wait("lo", ""), 0);
    a.remove("lo", false).unwrap();
    a.finish();
}

/// Every RPC that names a container or process refuses unknown ids with
/// NOT_FOUND; duplicates are refused; bad resources are refused; nothing is
/// left behind.
#[test]
fn unknown_duplicate_ids_and_bad_resources_are_refused() {
    require_root!();
    let a = TestAgent::start("ids");
    let c = &a.client;
    let cr = |id: &str| {
        let mut r = pb::ContainerRequest::new();
        r.container_id = id.into();
        r
    };
    let nf = |what: &str, r: Result<(), String>| {
        let e = r.expect_err(what);
        assert!(e.contains("not found"), "{what}: {e}");
    };
    for (id, exec) in [("nope", ""), ("nope", "e1")] {
        nf(
            "start",
            c.start_container(ctx(), &cr(id)).map(drop).map_err(msg),
        );
        nf(
            "stats",
            c.stats_container(ctx(), &cr(id)).map(drop).map_err(msg),
        );
        nf(
            "pause",
            c.pause_container(ctx(), &cr(id)).map(drop).map_err(msg),
        );
        nf(
            "resume",
            c.resume_container(ctx(), &cr(id)).map(drop).map_err(msg),
        );
        nf(
            "list",
            c.list_processes(ctx(), &cr(id)).map(drop).map_err(msg),
        );
        nf("remove", a.remove(id, true));
        let mut u = pb::UpdateContainerRequest::new();
        u.container_id = id.into();
        u.resources = b"{}".to_vec();
        nf(
            "update",
            c.update_container(ctx(), &u).map(drop).map_err(msg),
        );
        nf("exec", a.exec(id, "x", &["true"], false));
        let mut r = pb::SignalProcessRequest::new();
        r.process = Some(pref(id, exec)).into();
        r.signal = 9;
        nf("signal", c.signal_process(ctx(), &r).map(drop).map_err(msg));
        let mut r = pb::WaitProcessRequest::new();
        r.process = Some(pref(id, exec)).into();
        nf("wait", c.wait_process(ctx(), &r).map(drop).map_err(msg));
        let mut r = pb::WriteStdinRequest::new();
        r.process = Some(pref(id, exec)).into();
        nf("write", c.write_stdin(ctx(), &r).map(drop).map_err(msg));
        let mut r = pb::CloseStdinRequest::new();
        r.process = Some(pref(id, exec)).into();
        nf("close", c.close_stdin(ctx(), &r).map(drop).map_err(msg));
        let mut r = pb::ReadStreamRequest::new();
        r.process = Some(pref(id, exec)).into();
        nf("stdout", c.read_stdout(ctx(), &r).map(drop).map_err(msg));
        nf("stderr", c.read_stderr(ctx(), &r).map(drop).map_err(msg));
        let mut r = pb::TtyResizeRequest::new();
        r.process = Some(pref(id, exec)).into();
        nf("resize", c.tty_resize(ctx(), &r).map(drop).map_err(msg));
    }

    // a running container: unknown exec id, duplicate ids
    a.create("c1", &spec(&["sh", "-c", "read x; echo $x"], false))
        .unwrap();
    let e = a.create("c1", &spec(&["true"], false)).unwrap_err();
    assert!(e.contains("already exists"), "{e}");
    a.start_c("c1");
    let mut r = pb::WaitProcessRequest::new();
    r.process = Some(pref("c1", "nope")).into();
    let e = msg(c.wait_process(ctx(), &r).unwrap_err());
    assert!(e.contains("not found"), "{e}");
    a.exec("c1", "e1", &["true"], false).unwrap();
    let e = a.exec("c1", "e1", &["true"], false).unwrap_err();
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(a.wait("c1", "e1"), 0);

    // invalid resources, hostile rootfs paths, wrong-typed specs
    for (res, want) in [
        (r#"{"memory":{"limit":-5}}"#, "negative"),
        (r#"{"memory":{"limit":1}}"#, "below the minimum"),
        (r#"{"pids":{"limit":-2}}"#, "negative"),
        (r#"{"cpu":{"quota":-9,"period":0}}"#, "negative"),
        (r#"{"memory":{"limit":"lots"}}"#, "resources JSON"),
        ("not json", "resources JSON"),
    ] {
        let mut u = pb::UpdateContainerRequest::new();
        u.container_id = "c1".into();
        u.resources = res.as_bytes().to_vec();
        let e = msg(c.update_container(ctx(), &u).unwrap_err());
        assert!(e.contains(want), "{res}: expected {want:?} in {e}");
    }
    let mut s = spec(&["true"], false);
    s["process"]["args"] = serde_json::json!("sh -c true");
    let e = a.create("bad", &s).unwrap_err();
    assert!(
        e.contains("invalid OCI") || e.contains("invalid type"),
        "{e}"
    );
    let mut req = pb::CreateContainerRequest::new();
    req.container_id = "bad".into();
    req.oci_spec = b"{not json".to_vec();
    let e = msg(c.create_container(ctx(), &req).unwrap_err());
    assert!(e.contains("runtime spec"), "{e}");
    let mut rootfs = pb::Rootfs::new();
    let mut v = pb::VirtioFsRootfs::new();
    v.tag = "rootfs".into();
    v.path = "../../etc".into();
    rootfs.set_virtio_fs(v);
    req.oci_spec = serde_json::to_vec(&spec(&["true"], false)).unwrap();
    req.rootfs = Some(rootfs).into();
    let e = msg(c.create_container(ctx(), &req).unwrap_err());
    assert!(e.contains(".."), "{e}");
    if remote().is_none() {
        let mut rootfs = pb::Rootfs::new();
        let mut hp = pb::HostPathRootfs::new();
        hp.path = format!("{}/../../../etc", a.rootfs().display());
        rootfs.set_host_path(hp);
        req.rootfs = Some(rootfs).into();
        let e = msg(c.create_container(ctx(), &req).unwrap_err());
        assert!(e.contains("must not contain"), "{e}");
    }
    if let Some(cg) = cgroup2_root() {
        assert!(!cg.join("moat").join(&a.sandbox).join("bad").exists());
    }
    nf("bad left behind", a.remove("bad", true));

    a.write_stdin("c1", "", b"bye\n");
    assert_eq!(a.read_all("c1", "", false), "bye\n");
    assert_eq!(a.wait("c1", ""), 0);
    a.remove("c1", false).unwrap();
    a.finish();
}

/// Messages over the ttrpc frame limit (4 MiB) are refused without killing
/// the agent or creating anything.
#[test]
fn oversize_messages_are_refused() {
    require_root!();
    let a = TestAgent::start("oversize");
    a.create(
        "c1",
        &spec(&["sh", "-c", "cat >/dev/null; echo done"], false),
    )
    .unwrap();
    a.start_c("c1");
    let mut r = pb::WriteStdinRequest::new();
    r.process = Some(pref("c1", "")).into();
    r.data = vec![b'x'; 5 << 20];
    let e = msg(a.client.write_stdin(ctx(), &r).unwrap_err());
    eprintln!("oversize WriteStdin: {e}");
    assert!(
        e.to_lowercase().contains("length") || e.contains("size"),
        "{e}"
    );

    let mut s = spec(&["true"], false);
    s["process"]["env"] = serde_json::json!(vec!["X=".to_owned() + &"y".repeat(5 << 20)]);
    let e = a.create("huge", &s).unwrap_err();
    eprintln!("oversize spec: {e}");
    assert!(
        e.to_lowercase().contains("length") || e.contains("size"),
        "{e}"
    );
    if let Some(cg) = cgroup2_root() {
        assert!(!cg.join("moat").join(&a.sandbox).join("huge").exists());
    }
    let e = a.remove("huge", true).unwrap_err();
    assert!(e.contains("not found"), "{e}");

    // a raw frame over the limit, bypassing the client's own check: the
    // agent drops it (answers with an error or closes) and keeps serving
    if remote().is_none() {
        use std::io::{Read, Write};
        let mut raw = std::os::unix::net::UnixStream::connect(a.dir.join("agent.sock")).unwrap();
        let len: u32 = 5 << 20;
        let mut frame = Vec::with_capacity(len as usize + 10);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&1u32.to_be_bytes()); // stream id
        frame.extend_from_slice(&[1, 0]); // request, no flags
        frame.resize(len as usize + 10, 0);
        // The agent may close as soon as it saw the header.
        let _ = raw.write_all(&frame);
        let mut hdr = [0u8; 10];
        match raw.read_exact(&mut hdr) {
            // a response (type 2) on our stream
            Ok(()) => assert_eq!((&hdr[4..8], hdr[8]), (&[0u8, 0, 0, 1][..], 2), "{hdr:?}"),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ),
                "{e}"
            ),
        }
    }
    a.client.health(ctx(), &pb::HealthRequest::new()).unwrap();

    // the agent and the container are unharmed
    a.write_stdin("c1", "", b"small\n");
    let mut cl = pb::CloseStdinRequest::new();
    cl.process = Some(pref("c1", "")).into();
    a.client.close_stdin(ctx(), &cl).unwrap();
    assert_eq!(a.read_all("c1", "", false), "done\n");
    assert_eq!(a.wait("c1", ""), 0);
    a.remove("c1", false).unwrap();
    a.finish();
}

/// `linux.sysctl` is written after the mounts and before `/proc/sys` becomes read-only (runc's
/// order): a namespaced network sysctl (the sandbox's own netns here) and an IPC one (the
/// sandbox's IPC namespace) are set and visible inside, and `/proc/sys` is still read-only.
/// Also: the workload does not inherit the helper's ignored SIGPIPE.
#[test]
fn sysctls_are_applied_before_proc_sys_is_read_only() {
    require_root!();
    let a = TestAgent::start("sysctl");
    let mut s = spec(
        &[
            "sh",
            "-c",
            "cat /proc/sys/net/ipv4/ip_forward /proc/sys/kernel/shm_rmid_forced; \
             echo 0 > /proc/sys/net/ipv4/ip_forward 2>/dev/null || echo ro-ok; \
             grep SigIgn /proc/self/status",
        ],
        false,
    );
    s["linux"]["sysctl"] =
        serde_json::json!({"net.ipv4.ip_forward": "1", "kernel.shm_rmid_forced": "1"});
    a.create("c1", &s).unwrap();
    a.start_c("c1");
    let out = a.read_all("c1", "", false);
    let ignored = out
        .strip_prefix("1\n1\nro-ok\nSigIgn:\t")
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .unwrap_or_else(|| panic!("{out:?}"));
    // The test runner may pass ignored signals down; SIGPIPE must not be added to them.
    assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "{out:?}");
    assert_eq!(a.wait("c1", ""), 0);
    a.remove("c1", false).unwrap();

    // A sysctl the kernel refuses fails the create, naming it, and leaves nothing.
    let mut bad = spec(&["true"], false);
    bad["linux"]["sysctl"] = serde_json::json!({"net.ipv4.no_such_knob": "1"});
    let e = a.create("c2", &bad).unwrap_err();
    assert!(e.contains("sysctl net.ipv4.no_such_knob=1"), "{e}");
    let e = a.remove("c2", true).unwrap_err();
    assert!(e.contains("not found"), "{e}");
    a.finish();
}

/// A SIGTERM that reaches a container's PID 1 before it installed its handler is held by the
/// agent (the kernel would discard it: default disposition, init of a PID namespace) and
/// delivered once the handler is in place. The test orders the steps itself: the workload
/// blocks on stdin before its `trap`, the signal is sent while it blocks, and only then does
/// the test let it go on.
#[test]
fn sigterm_before_the_handler_is_held_until_the_handler_exists() {
    require_root!();
    let a = TestAgent::start("sigwindow");
    let script = "read x; trap 'echo got TERM; exit 42' TERM; echo trapped; sleep 1000 & wait $!";
    a.create("c1", &spec(&["sh", "-c", script], false)).unwrap();
    a.start_c("c1");
    // Before the trap: the shell's SIGTERM disposition is the default one.
    a.signal("c1", "", libc::SIGTERM as u32, false);
    // Let the shell install the trap; the held SIGTERM then reaches its handler.
    a.write_stdin("c1", "", b"go\n");
    assert_eq!(a.read_all("c1", "", false), "trapped\ngot TERM\n");
    assert_eq!(a.wait("c1", ""), 42);

    // A signal the workload ignores is dropped (as the kernel does), not held; SIGKILL
    // always goes straight through.
    let script = "trap '' USR1; echo ignoring; read x; echo still here; read y";
    a.create("c2", &spec(&["sh", "-c", script], false)).unwrap();
    a.start_c("c2");
    assert_eq!(a.read_until("c2", "", "ignoring\n"), "ignoring\n");
    a.signal("c2", "", libc::SIGUSR1 as u32, false);
    a.write_stdin("c2", "", b"go\n");
    assert_eq!(a.read_until("c2", "", "still here\n"), "still here\n");
    a.signal("c2", "", libc::SIGKILL as u32, false);
    assert_eq!(a.wait("c2", ""), 137);

    // Kill of a process that has exited: NOT_FOUND (containerd then treats the kill as done).
    for (id, exec) in [("c1", ""), ("c2", "")] {
        let e = a
            .try_signal(id, exec, libc::SIGTERM as u32, false)
            .unwrap_err();
        assert_eq!(code(e), moat_protocol::ttrpc::Code::NOT_FOUND);
    }
    a.remove("c1", false).unwrap();
    a.remove("c2", false).unwrap();
    a.finish();
}

/// `share_pid_namespace_with`: a container joins another's PID namespace (a pod with
/// shareProcessNamespace, whose containers join the pause container's) and sees its
/// processes; a container without it sees only its own.
#[test]
fn containers_share_a_pid_namespace_when_asked() {
    require_root!();
    let a = TestAgent::start("sharepid");
    a.create("pause", &spec(&["sleep", "1000"], false)).unwrap();
    a.start_c("pause");
    a.create_sharing(
        "app",
        &spec(&["sh", "-c", "cat /proc/1/comm; read x"], false),
        "pause",
    )
    .unwrap();
    a.start_c("app");
    assert_eq!(a.read_until("app", "", "\n"), "sleep\n");
    // An exec into the sharing container sees both containers' processes.
    a.exec("app", "ps", &["ps", "-o", "comm"], false).unwrap();
    let ps = a.read_all("app", "ps", false);
    assert!(ps.contains("sleep") && ps.contains("sh"), "{ps}");
    assert_eq!(a.wait("app", "ps"), 0);

    // Without it: a PID namespace of its own.
    a.create(
        "alone",
        &spec(&["sh", "-c", "cat /proc/1/comm; ps -o comm"], false),
    )
    .unwrap();
    a.start_c("alone");
    let out = a.read_all("alone", "", false);
    assert!(out.starts_with("sh\n") && !out.contains("sleep"), "{out}");
    assert_eq!(a.wait("alone", ""), 0);

    // Unknown or exited containers are refused, and nothing is left of the attempt.
    let e = a
        .create_sharing("bad1", &spec(&["true"], false), "nope")
        .unwrap_err();
    assert!(e.contains("\"nope\"") && e.contains("not found"), "{e}");
    let e = a
        .create_sharing("bad2", &spec(&["true"], false), "alone")
        .unwrap_err();
    assert!(e.contains("has exited"), "{e}");
    for id in ["bad1", "bad2"] {
        assert!(a.remove(id, true).unwrap_err().contains("not found"));
    }

    // The namespace ends with its init: killing the pause container ends the app too.
    a.signal("pause", "", libc::SIGKILL as u32, false);
    assert_eq!(a.wait("pause", ""), 137);
    assert_eq!(a.wait("app", ""), 137);
    for id in ["app", "alone", "pause"] {
        a.remove(id, false).unwrap();
    }
    a.finish();
}

/// MaskedPaths on a file (critest masks `/bin/ls`, a hard link of busybox in its image): the
/// file is covered by `/dev/null`, so running it by its path is refused, in the container's own
/// process and in an exec. (By name, busybox's shell runs its own `ls` applet without looking at
/// `/bin/ls`, under runc too: docs/cri.md.)
#[test]
fn a_masked_file_cannot_be_run() {
    require_root!();
    let a = TestAgent::start("masked");
    let ls = a.rootfs().join("bin/ls");
    let _ = std::fs::remove_file(&ls);
    std::fs::hard_link(a.rootfs().join("bin/busybox"), &ls).unwrap();
    let mut s = spec(
        &[
            "sh",
            "-c",
            "/bin/ls / >/dev/null; echo init-rc=$?; sleep 1000",
        ],
        false,
    );
    s["linux"]["maskedPaths"]
        .as_array_mut()
        .unwrap()
        .push("/bin/ls".into());
    a.create("m1", &s).unwrap();
    a.start_c("m1");
    let out = a.read_until("m1", "", "init-rc=");
    assert!(out.contains("init-rc=126"), "{out:?}");
    a.exec("m1", "e1", &["sh", "-c", "/bin/ls; echo exec-rc=$?"], false)
        .unwrap();
    let out = a.read_all("m1", "e1", false);
    let err = a.read_all("m1", "e1", true);
    assert!(out.contains("exec-rc=126"), "{out:?} {err:?}");
    assert!(err.contains("Permission denied"), "{err:?}");
    a.remove("m1", true).unwrap();
    a.finish();
}
