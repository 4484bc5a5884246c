//! The shim's Task service against a real `moat-agent` running on the host (no VM): the pod VM is
//! replaced by a host-agent backend ([`PodLauncher`] / [`PodVm`]) that serves the agent on a Unix
//! socket and sends each rootfs as a host path; events go to a recording sink behind the shim's
//! own forwarder. The Task methods are called directly, as containerd's ttrpc calls would.
//!
//! Checks state transitions (CREATED → RUNNING → STOPPED), exit codes, exec, kill, delete, the
//! events containerd gets (content and order), and that nothing is left afterwards: no process,
//! no mount below the test directory, no cgroup, no state directory. Needs root (namespaces,
//! mounts, cgroups) and `/bin/busybox` (busybox-static); skipped with a message otherwise.
//!
//! The agent binary: `MOAT_AGENT_BIN`, else `moat-agent` next to this test's target directory
//! (built by `cargo build --workspace`, which scripts/test runs); the test fails naming it when it
//! is missing.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{Code, Error as RpcError};
use moat_protocol::agent as pb;
use moat_protocol::agent_ttrpc_async::AgentClient;
use moat_protocol::connect::{connect, AgentAddress};
use moat_protocol::ttrpc::context;
use moat_shim::error::LaunchError;
use moat_shim::events::{forwarder, Event, Publish};
use moat_shim::pod::{PodLauncher, PodSpec, PodVm};
use moat_shim::task::TaskService;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch};

const NS: &str = "moat-test";
/// Bound on any single wait in this test (a failure bound, not a synchronisation).
const LIMIT: Duration = Duration::from_secs(60);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

const CAPS: &[&str] = &["CAP_CHOWN", "CAP_KILL", "CAP_SETUID", "CAP_SETGID"];

/// An OCI process.
fn process(args: &[&str]) -> Value {
    json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin"],
        "cwd": "/",
        "capabilities": {"bounding": CAPS, "effective": CAPS, "permitted": CAPS},
        "noNewPrivileges": true
    })
}

/// An OCI bundle `dir` with a busybox rootfs whose init runs `args`.
fn bundle(dir: &Path, args: &[&str]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    moat_test_support::busybox_rootfs(dir);
    let spec = json!({
        "ociVersion": "1.0.2",
        "process": process(args),
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "task-host",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
        }
    });
    std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
    dir.to_owned()
}

/// What the host-agent pod left behind when it stopped, for the final checks.
#[derive(Default, Debug)]
struct StopReport {
    stopped: bool,
    children_at_stop: String,
    agent_status: Option<std::process::ExitStatus>,
}

/// Runs the agent on the host, one per pod, below `root`.
struct HostLauncher {
    root: PathBuf,
    report: Arc<Mutex<StopReport>>,
}

/// A pod whose "VM" is a moat-agent process on the host.
struct HostVm {
    id: String,
    dir: PathBuf,
    agent: AgentClient,
    pid: u32,
    exit: watch::Receiver<Option<std::process::ExitStatus>>,
    report: Arc<Mutex<StopReport>>,
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
            .arg("--state-dir")
            .arg(dir.join("agent-state"))
            .env("MOAT_AGENT_LOG", "debug")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(e.into()))?;
        let pid = child.id().unwrap_or(0);
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| fail("no stderr".into()))?;
        let mut lines = BufReader::new(stderr).lines();
        // Wait for the agent to serve, then keep echoing its log.
        loop {
            match lines.next_line().await.map_err(|e| fail(e.into()))? {
                Some(line) => {
                    eprintln!("{line}");
                    if line.contains("serving protocol") {
                        break;
                    }
                }
                None => return Err(fail("the agent exited before serving".into())),
            }
        }
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                eprintln!("{l}");
            }
        });
        let (tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            let _ = tx.send(status);
        });
        let agent = connect(&AgentAddress::Unix(sock), LIMIT)
            .await
            .map_err(|e| fail(e.into()))?;
        let version = agent
            .version(context::Context::default(), &pb::VersionRequest::new())
            .await
            .map_err(|e| fail(e.into()))?;
        moat_protocol::ensure_compatible(&version).map_err(|e| fail(e.into()))?;
        let req = pb::CreateSandboxRequest {
            sandbox_id: spec.id.clone(),
            hostname: spec.hostname.clone(),
            // On the host the pod must not share the host's network.
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
            report: self.report.clone(),
        }))
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
        self.exit.borrow().is_some()
    }
    async fn wait_exited(&self) {
        let _ = self.exit.clone().wait_for(Option::is_some).await;
    }
    async fn stop(&self) {
        let req = pb::DestroySandboxRequest::new();
        if let Err(e) = self
            .agent
            .destroy_sandbox(context::Context::default(), &req)
            .await
        {
            eprintln!("DestroySandbox: {e}");
        }
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.pid))
            .unwrap_or_default();
        // SAFETY: kill(2) of the agent, our own child, which has not been waited for yet.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let status = *self
            .exit
            .clone()
            .wait_for(Option::is_some)
            .await
            .expect("the agent's exit watcher");
        let mut report = self.report.lock().unwrap();
        report.stopped = true;
        report.children_at_stop = children;
        report.agent_status = status;
        // Remove the pod directory only when nothing is mounted below it (a bind mount would
        // lead the removal into the bundle).
        if mounts_below(&self.dir).is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn mounts_below(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&dir))
        .map(str::to_owned)
        .collect()
}

/// The event sink: every published event, in order.
struct Recorder(mpsc::UnboundedSender<Event>);

#[async_trait]
impl Publish for Recorder {
    async fn publish(&self, _ns: &str, event: Event, _deadline: Duration) -> Result<(), BoxError> {
        self.0.send(event).map_err(|_| "test ended".into())
    }
}

fn ctx() -> TtrpcContext {
    TtrpcContext {
        mh: Default::default(),
        metadata: Default::default(),
        timeout_nano: 0,
    }
}

fn code(e: RpcError) -> Code {
    match e {
        RpcError::RpcStatus(s) => s.code.enum_value_or(Code::UNKNOWN),
        e => panic!("not a status: {e}"),
    }
}

fn status_of(r: &api::StateResponse) -> api::Status {
    r.status.enum_value_or(api::Status::UNKNOWN)
}

async fn state(task: &TaskService, id: &str, exec_id: &str) -> api::StateResponse {
    let req = api::StateRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    };
    task.state(&ctx(), req).await.unwrap()
}

async fn wait(task: &TaskService, id: &str, exec_id: &str) -> u32 {
    let req = api::WaitRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    };
    tokio::time::timeout(LIMIT, task.wait(&ctx(), req))
        .await
        .expect("process exits")
        .unwrap()
        .exit_status
}

fn out_file(dir: &Path, name: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, b"").unwrap();
    p.display().to_string()
}

/// The next event, decoded as `M` from `topic`.
async fn next<M: containerd_shim_protos::protobuf::MessageFull + Clone>(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    topic: &str,
) -> M {
    let e = tokio::time::timeout(LIMIT, rx.recv())
        .await
        .expect("event within the limit")
        .expect("event channel open");
    assert_eq!(e.topic, topic);
    let m: &dyn MessageDyn = e.message.as_ref();
    m.downcast_ref::<M>()
        .unwrap_or_else(|| panic!("{topic}: unexpected message {m:?}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_start_exec_kill_delete_against_a_host_agent() {
    if !is_root() {
        moat_test_support::skip("needs root (namespaces, mounts, cgroups)");
        return;
    }
    if !Path::new("/bin/busybox").exists() {
        moat_test_support::skip("needs busybox-static at /bin/busybox");
        return;
    }
    let root = std::env::temp_dir().join(format!("moat-shim-task-host-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let bundle = bundle(
        &root.join("bundle-c1"),
        &["sh", "-c", "echo hello from init; exec sleep 1000"],
    );

    let report = Arc::new(Mutex::new(StopReport::default()));
    let (tx, mut events) = mpsc::unbounded_channel();
    let exit = Arc::new(ExitSignal::default());
    let task = TaskService::with_backend(
        NS,
        Box::new(HostLauncher {
            root: root.clone(),
            report: report.clone(),
        }),
        forwarder(NS, Recorder(tx)),
        exit.clone(),
    );

    // Create: CREATED, one TaskCreate.
    let init_out = out_file(&root, "c1.out");
    let create = api::CreateTaskRequest {
        id: "c1".into(),
        bundle: bundle.display().to_string(),
        stdout: init_out.clone(),
        ..Default::default()
    };
    let pid = task.create(&ctx(), create.clone()).await.unwrap().pid;
    assert!(pid > 0);
    let s = state(&task, "c1", "").await;
    assert_eq!(status_of(&s), api::Status::CREATED);
    assert_eq!(s.bundle, bundle.display().to_string());
    assert_eq!(s.pid, pid);
    assert_eq!(
        code(task.create(&ctx(), create).await.unwrap_err()),
        Code::ALREADY_EXISTS
    );
    let e: ev::TaskCreate = next(&mut events, topics::TASK_CREATE_EVENT_TOPIC).await;
    assert_eq!((e.container_id.as_str(), e.pid), ("c1", pid));
    assert_eq!(e.io.stdout, init_out);

    // Start: RUNNING, TaskStart.
    let start = |exec_id: &str| api::StartRequest {
        id: "c1".into(),
        exec_id: exec_id.into(),
        ..Default::default()
    };
    assert_eq!(task.start(&ctx(), start("")).await.unwrap().pid, pid);
    assert_eq!(
        status_of(&state(&task, "c1", "").await),
        api::Status::RUNNING
    );
    assert_eq!(
        code(task.start(&ctx(), start("")).await.unwrap_err()),
        Code::FAILED_PRECONDITION
    );
    let e: ev::TaskStart = next(&mut events, topics::TASK_START_EVENT_TOPIC).await;
    assert_eq!((e.container_id.as_str(), e.pid), ("c1", pid));

    // Exec: CREATED → STOPPED with its exit code, its output relayed.
    let exec_out = out_file(&root, "e1.out");
    let exec = api::ExecProcessRequest {
        id: "c1".into(),
        exec_id: "e1".into(),
        stdout: exec_out.clone(),
        spec: MessageField::some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: process(&["sh", "-c", "echo from exec; exit 3"])
                .to_string()
                .into_bytes(),
            ..Default::default()
        }),
        ..Default::default()
    };
    task.exec(&ctx(), exec.clone()).await.unwrap();
    assert_eq!(
        code(task.exec(&ctx(), exec).await.unwrap_err()),
        Code::ALREADY_EXISTS
    );
    assert_eq!(
        status_of(&state(&task, "c1", "e1").await),
        api::Status::CREATED
    );
    task.start(&ctx(), start("e1")).await.unwrap();
    assert_eq!(wait(&task, "c1", "e1").await, 3);
    let s = state(&task, "c1", "e1").await;
    assert_eq!((status_of(&s), s.exit_status), (api::Status::STOPPED, 3));
    assert_eq!(std::fs::read_to_string(&exec_out).unwrap(), "from exec\n");
    let e: ev::TaskExecAdded = next(&mut events, topics::TASK_EXEC_ADDED_EVENT_TOPIC).await;
    assert_eq!((e.container_id.as_str(), e.exec_id.as_str()), ("c1", "e1"));
    let e: ev::TaskExecStarted = next(&mut events, topics::TASK_EXEC_STARTED_EVENT_TOPIC).await;
    assert_eq!((e.container_id.as_str(), e.exec_id.as_str()), ("c1", "e1"));
    let e: ev::TaskExit = next(&mut events, topics::TASK_EXIT_EVENT_TOPIC).await;
    assert_eq!(
        (e.container_id.as_str(), e.id.as_str(), e.exit_status),
        ("c1", "e1", 3)
    );
    let del = |exec_id: &str| api::DeleteRequest {
        id: "c1".into(),
        exec_id: exec_id.into(),
        ..Default::default()
    };
    assert_eq!(task.delete(&ctx(), del("e1")).await.unwrap().exit_status, 3);
    assert_eq!(
        code(
            task.state(
                &ctx(),
                api::StateRequest {
                    id: "c1".into(),
                    exec_id: "e1".into(),
                    ..Default::default()
                }
            )
            .await
            .unwrap_err()
        ),
        Code::NOT_FOUND
    );

    // A running container cannot be deleted; kill it: STOPPED, 128 + SIGKILL.
    assert_eq!(
        code(task.delete(&ctx(), del("")).await.unwrap_err()),
        Code::FAILED_PRECONDITION
    );
    let kill = api::KillRequest {
        id: "c1".into(),
        signal: libc::SIGKILL as u32,
        ..Default::default()
    };
    task.kill(&ctx(), kill.clone()).await.unwrap();
    assert_eq!(wait(&task, "c1", "").await, 137);
    let s = state(&task, "c1", "").await;
    assert_eq!((status_of(&s), s.exit_status), (api::Status::STOPPED, 137));
    assert!(s.exited_at.is_some());
    assert_eq!(
        std::fs::read_to_string(&init_out).unwrap(),
        "hello from init\n"
    );
    assert_eq!(
        code(task.kill(&ctx(), kill).await.unwrap_err()),
        Code::NOT_FOUND
    );
    let e: ev::TaskExit = next(&mut events, topics::TASK_EXIT_EVENT_TOPIC).await;
    assert_eq!(
        (e.container_id.as_str(), e.id.as_str(), e.exit_status, e.pid),
        ("c1", "c1", 137, pid)
    );

    // Delete: the container is gone, TaskDelete carries the exit.
    let d = task.delete(&ctx(), del("")).await.unwrap();
    assert_eq!((d.exit_status, d.pid), (137, pid));
    let e: ev::TaskDelete = next(&mut events, topics::TASK_DELETE_EVENT_TOPIC).await;
    assert_eq!((e.container_id.as_str(), e.exit_status), ("c1", 137));
    assert_eq!(
        code(task.start(&ctx(), start("")).await.unwrap_err()),
        Code::NOT_FOUND
    );

    // Shutdown after the last delete stops the pod and ends the shim.
    task.shutdown(&ctx(), api::ShutdownRequest::default())
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, exit.wait())
        .await
        .expect("the shim exits after Shutdown");

    // Nothing is left: no further event, no process, no mount, no cgroup, no pod directory.
    drop(task);
    assert!(
        tokio::time::timeout(LIMIT, events.recv())
            .await
            .expect("forwarder ends")
            .is_none(),
        "no event after TaskDelete"
    );
    let report = report.lock().unwrap();
    assert!(report.stopped, "the pod was stopped");
    assert_eq!(
        report.children_at_stop.trim(),
        "",
        "agent still had children"
    );
    assert!(
        report.agent_status.is_some_and(|s| s.success()),
        "agent exit: {:?}",
        report.agent_status
    );
    assert_eq!(mounts_below(&root), Vec::<String>::new());
    assert!(!root.join("pods").join("c1").exists(), "pod directory left");
    if let Some(cg) = cgroup2_root() {
        let sb = cg.join("moat").join("c1");
        assert!(!sb.exists(), "cgroup {} left behind", sb.display());
    }
    assert!(bundle.join("rootfs/bin/busybox").exists(), "bundle intact");
    std::fs::remove_dir_all(&root).unwrap();
}

fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| PathBuf::from(pre.split_whitespace().nth(4).unwrap_or("/")))
    })
}

/// A CRI-style bundle: `kind` (`sandbox` or `container`) of pod `pod`, with these namespaces and
/// extra mounts.
fn cri_bundle(
    dir: &Path,
    args: &[&str],
    kind: &str,
    pod: &str,
    namespaces: Value,
    extra_mounts: &[Value],
) -> PathBuf {
    bundle(dir, args);
    let path = dir.join("config.json");
    let mut spec: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    spec["annotations"] = json!({
        "io.kubernetes.cri.container-type": kind,
        "io.kubernetes.cri.sandbox-id": pod,
    });
    spec["linux"]["namespaces"] = namespaces;
    for m in extra_mounts {
        spec["mounts"].as_array_mut().unwrap().push(m.clone());
    }
    std::fs::write(&path, spec.to_string()).unwrap();
    dir.to_owned()
}

/// CRI pods: what a VM cannot do (the host's PID/IPC/network namespace, Bidirectional mount
/// propagation) is refused at create with INVALID_ARGUMENT before anything is made; a pod that
/// shares its PID namespace (`/proc/<sandbox pid>/ns/pid` in the container's spec) runs its
/// containers in the sandbox container's PID namespace in the guest, and a container without
/// it keeps its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pods_share_the_pid_namespace_and_refuse_host_namespaces() {
    if !is_root() || !Path::new("/bin/busybox").exists() {
        moat_test_support::skip("needs root and busybox-static at /bin/busybox");
        return;
    }
    let root = std::env::temp_dir().join(format!("moat-shim-cri-pod-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let report = Arc::new(Mutex::new(StopReport::default()));
    let (tx, _events) = mpsc::unbounded_channel();
    let exit = Arc::new(ExitSignal::default());
    let task = TaskService::with_backend(
        NS,
        Box::new(HostLauncher {
            root: root.clone(),
            report: report.clone(),
        }),
        forwarder(NS, Recorder(tx)),
        exit.clone(),
    );
    let pod_ns = || {
        json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
               {"type": "network"}])
    };
    let create = |id: &str, bundle: &Path, stdout: String| api::CreateTaskRequest {
        id: id.into(),
        bundle: bundle.display().to_string(),
        stdout,
        ..Default::default()
    };
    let refused = |e: RpcError| match e {
        RpcError::RpcStatus(s) => {
            assert_eq!(s.code.enum_value_or(Code::UNKNOWN), Code::INVALID_ARGUMENT);
            s.message
        }
        e => panic!("not a status: {e}"),
    };

    // hostPID / hostNetwork sandboxes and a Bidirectional mount: refused, no VM booted.
    for (typ, setting) in [("pid", "hostPID"), ("network", "hostNetwork")] {
        let mut ns = pod_ns();
        ns.as_array_mut().unwrap().retain(|n| n["type"] != typ);
        let b = cri_bundle(
            &root.join(format!("host-{typ}")),
            &["true"],
            "sandbox",
            "pod1",
            ns,
            &[],
        );
        let m = refused(
            task.create(&ctx(), create("pod1", &b, String::new()))
                .await
                .unwrap_err(),
        );
        assert!(m.starts_with(setting) && m.contains("own VM"), "{m}");
    }
    let b = cri_bundle(
        &root.join("bidi"),
        &["true"],
        "sandbox",
        "pod1",
        pod_ns(),
        &[
            json!({"destination": "/data", "type": "bind", "source": "/tmp",
                 "options": ["rbind", "rshared"]}),
        ],
    );
    let m = refused(
        task.create(&ctx(), create("pod1", &b, String::new()))
            .await
            .unwrap_err(),
    );
    assert!(m.contains("(/data)") && m.contains("Bidirectional"), "{m}");
    assert!(!root.join("pods").exists(), "a refused pod booted a VM");
    let state_req = api::StateRequest {
        id: "pod1".into(),
        ..Default::default()
    };
    assert_eq!(
        code(task.state(&ctx(), state_req).await.unwrap_err()),
        Code::NOT_FOUND
    );

    // The pod: its sandbox ("pause": sleep), then a container sharing its pid namespace and
    // one with its own.
    let b = cri_bundle(
        &root.join("pause"),
        &["sleep", "1000"],
        "sandbox",
        "pod1",
        pod_ns(),
        &[],
    );
    let pid = task
        .create(&ctx(), create("pod1", &b, String::new()))
        .await
        .unwrap()
        .pid;
    let start = |id: &str| api::StartRequest {
        id: id.into(),
        ..Default::default()
    };
    task.start(&ctx(), start("pod1")).await.unwrap();
    // As containerd writes them: /proc/<sandbox task pid>/ns/<file>.
    let joined = |t: &str, f: &str| json!({"type": t, "path": format!("/proc/{pid}/ns/{f}")});
    let shared_ns = json!([joined("pid", "pid"), joined("ipc", "ipc"), joined("uts", "uts"),
                           joined("network", "net"), {"type": "mount"}]);
    let own_ns = json!([{"type": "pid"}, joined("ipc", "ipc"), joined("uts", "uts"),
                        joined("network", "net"), {"type": "mount"}]);
    for (id, ns, want) in [("shared", shared_ns, "sleep\n"), ("own", own_ns, "cat\n")] {
        let b = cri_bundle(
            &root.join(id),
            &["cat", "/proc/1/comm"],
            "container",
            "pod1",
            ns,
            &[],
        );
        let out = out_file(&root, &format!("{id}.out"));
        task.create(&ctx(), create(id, &b, out.clone()))
            .await
            .unwrap();
        task.start(&ctx(), start(id)).await.unwrap();
        assert_eq!(wait(&task, id, "").await, 0);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), want, "{id}");
    }
    // A pid namespace path that is not the pod's is refused.
    let b = cri_bundle(
        &root.join("foreign"),
        &["true"],
        "container",
        "pod1",
        json!([{"type": "pid", "path": "/proc/1/ns/pid"}, {"type": "mount"}]),
        &[],
    );
    let m = refused(
        task.create(&ctx(), create("foreign", &b, String::new()))
            .await
            .unwrap_err(),
    );
    assert!(m.contains("/proc/1/ns/pid"), "{m}");

    // Tear the pod down: nothing is left.
    let kill = api::KillRequest {
        id: "pod1".into(),
        signal: libc::SIGKILL as u32,
        ..Default::default()
    };
    task.kill(&ctx(), kill).await.unwrap();
    assert_eq!(wait(&task, "pod1", "").await, 137);
    for id in ["shared", "own", "pod1"] {
        let del = api::DeleteRequest {
            id: id.into(),
            ..Default::default()
        };
        task.delete(&ctx(), del).await.unwrap();
    }
    task.shutdown(&ctx(), api::ShutdownRequest::default())
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, exit.wait())
        .await
        .expect("the shim exits after Shutdown");
    drop(task);
    let report = report.lock().unwrap();
    assert!(report.stopped, "the pod was stopped");
    assert_eq!(
        report.children_at_stop.trim(),
        "",
        "agent still had children"
    );
    assert_eq!(mounts_below(&root), Vec::<String>::new());
    assert!(
        !root.join("pods").join("pod1").exists(),
        "pod directory left"
    );
    std::fs::remove_dir_all(&root).unwrap();
}
