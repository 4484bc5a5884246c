//! Boots tiny hand-written 64-bit payloads (wrapped in a minimal ELF, so they go through the
//! real kernel loader and the 64-bit boot protocol) in the real `moat-vmm` binary on this
//! machine's /dev/kvm, and checks serial output, virtio-mmio probing, the boot marker, the
//! exit statuses, SIGTERM, the control socket and the jail (namespaces, mounts, rlimits,
//! capabilities of the confined VMM, read from /proc).
//!
//! These need /dev/kvm; without it they fail, unless MOAT_SKIP_KVM=1 is set.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Prints "moat payload\n", reads the virtio-mmio magic and version at 0xd0000000, prints
/// 'A' + device id and '\n' (or '!' on mismatch), writes 123 to port 0x3f0, then resets
/// through the i8042 (out 0xfe to port 0x64).
const PROBE: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0x48, 0x8d, 0x35, 0x48, 0x00, 0x00, 0x00, 0xac, 0x84, 0xc0, 0x74, 0x03,
    0xee, 0xeb, 0xf8, 0xa1, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0x3d, 0x76, 0x69, 0x72,
    0x74, 0x75, 0x2b, 0xa1, 0x04, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0x83, 0xf8, 0x02, 0x75,
    0x1d, 0xa1, 0x08, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0x04, 0x41, 0xee, 0xb0, 0x0a, 0xee,
    0x66, 0xba, 0xf0, 0x03, 0xb0, 0x7b, 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xf9, 0xb0, 0x21,
    0xee, 0xeb, 0xf4, b'm', b'o', b'a', b't', b' ', b'p', b'a', b'y', b'l', b'o', b'a', b'd',
    b'\n', 0x00,
];

/// Prints "ready\n" and spins (`pause; jmp`) forever.
const SPIN: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0x48, 0x8d, 0x35, 0x0c, 0x00, 0x00, 0x00, 0xac, 0x84, 0xc0, 0x74, 0x03,
    0xee, 0xeb, 0xf8, 0xf3, 0x90, 0xeb, 0xfc, b'r', b'e', b'a', b'd', b'y', b'\n', 0x00,
];

/// `ud2` with an empty IDT: #UD cannot be delivered, double fault, triple fault.
/// (`int3` would do on real KVM, but PVM's instruction emulator rejects it.)
const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b];

const LOAD_ADDR: u64 = 0x10_0000;

/// A minimal ELF64 executable with one PT_LOAD segment of `code` at 1 MiB.
fn elf(code: &[u8]) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    e.extend_from_slice(&120u64.to_le_bytes()); // offset
    e.extend_from_slice(&LOAD_ADDR.to_le_bytes());
    e.extend_from_slice(&LOAD_ADDR.to_le_bytes());
    e.extend_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(&0x1000u64.to_le_bytes());
    assert_eq!(e.len(), 120);
    e.extend_from_slice(code);
    e
}

fn need_kvm() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("MOAT_SKIP_KVM").as_deref() == Ok("1") {
        eprintln!("MOAT_SKIP_KVM=1: skipping a test that needs /dev/kvm");
        return false;
    }
    panic!("/dev/kvm is missing: this test needs KVM (set MOAT_SKIP_KVM=1 to skip it)");
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("moat-vmm-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
    fn kernel(&self, code: &[u8]) -> PathBuf {
        let p = self.path("payload.elf");
        std::fs::write(&p, elf(code)).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_moat-vmm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn moat-vmm")
}

/// Waits for `child`, killing it after 60 s so a broken VMM fails the test instead of hanging.
fn finish(child: Child) -> Output {
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: signalling the child we spawned and have not reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("moat-vmm did not exit within 60 s");
        }
    }
}

fn run(args: &[&str]) -> Output {
    finish(spawn(args))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn probe_payload_prints_probes_marks_boot_and_resets() {
    if !need_kvm() {
        return;
    }
    let dir = Scratch::new("probe");
    let kernel = dir.kernel(PROBE);
    let serial = dir.path("serial.log");
    let out = run(&[
        "--kernel",
        s(&kernel),
        "--serial",
        &format!("file:{}", s(&serial)),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    // The only virtio device is the rng (device id 4 -> 'E').
    assert_eq!(
        std::fs::read_to_string(&serial).unwrap(),
        "moat payload\nE\n"
    );
    assert!(stderr.contains("boot marker: "), "stderr: {stderr}");
    assert!(stderr.contains("guest-reset"), "stderr: {stderr}");
}

#[test]
fn vsock_device_is_first_and_its_socket_is_removed() {
    if !need_kvm() {
        return;
    }
    let dir = Scratch::new("vsock");
    let kernel = dir.kernel(PROBE);
    let uds = dir.path("vsock.sock");
    let out = run(&["--kernel", s(&kernel), "--vsock-uds", s(&uds), "--no-rng"]);
    assert_eq!(out.status.code(), Some(0));
    // Serial went to stdout; device id 19 -> 'T'.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "moat payload\nT\n");
    assert!(!uds.exists(), "the vsock socket is removed on exit");
}

#[test]
fn triple_fault_exits_with_status_3() {
    if !need_kvm() {
        return;
    }
    let dir = Scratch::new("triple");
    let kernel = dir.kernel(TRIPLE_FAULT);
    let out = run(&["--kernel", s(&kernel), "--serial", "none"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Opens the serial FIFO and blocks until the payload printed "ready".
fn wait_ready(fifo: &Path) -> BufReader<std::fs::File> {
    let mut r = BufReader::new(std::fs::File::open(fifo).unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    r
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(s(p)).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Starts moat-vmm on the SPIN payload with its serial console on a FIFO in `dir` (open to
/// every uid, for `--jail-uid`) and `extra` arguments; returns it and the serial reader once the
/// guest printed "ready".
fn spawn_spin(dir: &Scratch, extra: &[&str]) -> (Child, BufReader<std::fs::File>) {
    let kernel = dir.kernel(SPIN);
    let fifo = dir.path("serial");
    mkfifo(&fifo);
    std::fs::set_permissions(&fifo, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let serial = format!("file:{}", s(&fifo));
    let mut args = vec!["--kernel", s(&kernel), "--serial", &serial];
    args.extend_from_slice(extra);
    let child = spawn(&args);
    let reader = wait_ready(&fifo);
    (child, reader)
}

#[test]
fn sigterm_stops_the_guest() {
    if !need_kvm() {
        return;
    }
    let dir = Scratch::new("sigterm");
    let (child, _serial) = spawn_spin(&dir, &["--vcpus", "2"]);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = finish(child);
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn request(conn: &mut (UnixStream, BufReader<UnixStream>), line: &str) -> serde_json::Value {
    conn.0.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    conn.1.read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

fn connect(p: &Path) -> (UnixStream, BufReader<UnixStream>) {
    let s = UnixStream::connect(p).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

#[test]
fn control_socket_pause_resume_status_stop_and_wait() {
    if !need_kvm() {
        return;
    }
    let dir = Scratch::new("api");
    let api = dir.path("api.sock");
    let (child, _serial) = spawn_spin(&dir, &["--api-sock", s(&api)]);
    let mut c = connect(&api);
    let mut waiter = connect(&api);
    waiter.0.write_all(b"{\"cmd\":\"wait\"}\n").unwrap();
    let st = request(&mut c, r#"{"cmd":"status"}"#);
    assert_eq!(st["ok"], true);
    assert_eq!(st["state"], "running");
    assert_eq!(request(&mut c, r#"{"cmd":"pause"}"#)["ok"], true);
    assert_eq!(request(&mut c, r#"{"cmd":"status"}"#)["state"], "paused");
    assert_eq!(request(&mut c, r#"{"cmd":"resume"}"#)["ok"], true);
    let late = request(&mut c, r#"{"cmd":"add-fs","tag":"x","dir":"/tmp"}"#);
    assert_eq!(late["ok"], false);
    assert_eq!(request(&mut c, r#"{"cmd":"bogus"}"#)["ok"], false);
    assert_eq!(request(&mut c, r#"{"cmd":"stop"}"#)["ok"], true);
    let mut answer = String::new();
    waiter.1.read_line(&mut answer).unwrap();
    let w: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        (w["exit_code"].as_i64(), w["reason"].as_str()),
        (Some(0), Some("stopped"))
    );
    let out = finish(child);
    assert_eq!(out.status.code(), Some(0));
    assert!(!api.exists(), "control socket removed");
}

#[test]
fn deferred_start_adds_a_disk_before_boot() {
    if !need_kvm() {
        return;
    }
    let dir = Scratch::new("defer");
    let kernel = dir.kernel(PROBE);
    let api = dir.path("api.sock");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let child = spawn(&[
        "--kernel",
        s(&kernel),
        "--api-sock",
        s(&api),
        "--defer-start",
        "--no-rng",
    ]);
    let mut c = connect_when_ready(&api);
    assert_eq!(request(&mut c, r#"{"cmd":"status"}"#)["state"], "created");
    let bad = request(&mut c, r#"{"cmd":"add-blk","path":"/nonexistent"}"#);
    assert_eq!(bad["ok"], false);
    let add = format!(
        r#"{{"cmd":"add-blk","path":"{}","read_only":true}}"#,
        s(&disk)
    );
    assert_eq!(request(&mut c, &add)["ok"], true);
    assert_eq!(request(&mut c, r#"{"cmd":"start"}"#)["ok"], true);
    let out = finish(child);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // virtio-blk is device id 2 -> 'C'.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "moat payload\nC\n");
}

#[test]
fn bad_inputs_give_clear_errors() {
    let out = run(&["--vcpus", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kernel PATH is required"));
    let dir = Scratch::new("bad");
    let junk = dir.path("junk");
    std::fs::write(&junk, b"not a kernel at all, far too short").unwrap();
    if !need_kvm() {
        return;
    }
    let out = run(&["--kernel", s(&junk)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot load kernel"), "{err}");
    let out = run(&["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(out.status.code(), Some(1));
    let mut e = String::new();
    out.stderr.as_slice().read_to_string(&mut e).unwrap();
    assert!(e.contains("cannot open kernel /nonexistent/vmlinux"), "{e}");
}

fn connect_when_ready(p: &Path) -> (UnixStream, BufReader<UnixStream>) {
    // The socket appears once the VMM listens; connecting retries until then.
    loop {
        match UnixStream::connect(p) {
            Ok(st) => {
                let r = BufReader::new(st.try_clone().unwrap());
                return (st, r);
            }
            Err(_) => std::thread::yield_now(),
        }
    }
}

#[test]
fn failed_build_is_reported_to_waiters() {
    if !need_kvm() {
        return;
    }
    let dir = Scratch::new("buildfail");
    let junk = dir.path("junk");
    std::fs::write(&junk, b"definitely not a kernel image").unwrap();
    let api = dir.path("api.sock");
    let child = spawn(&["--kernel", s(&junk), "--api-sock", s(&api), "--defer-start"]);
    let mut c = connect_when_ready(&api);
    let mut waiter = connect(&api);
    waiter.0.write_all(b"{\"cmd\":\"wait\"}\n").unwrap();
    assert_eq!(request(&mut c, r#"{"cmd":"start"}"#)["ok"], true);
    let mut answer = String::new();
    waiter.1.read_line(&mut answer).unwrap();
    let w: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        (w["exit_code"].as_i64(), w["reason"].as_str()),
        (Some(1), Some("vmm-error"))
    );
    assert!(w["detail"].as_str().unwrap().contains("cannot load kernel"));
    let out = finish(child);
    assert_eq!(out.status.code(), Some(1));
    assert!(!api.exists());
}

#[test]
fn sigterm_before_start_exits_without_booting() {
    let dir = Scratch::new("defer-term");
    let api = dir.path("api.sock");
    // No KVM is touched before `start`, so this runs anywhere.
    let child = spawn(&[
        "--kernel",
        "/nonexistent",
        "--api-sock",
        s(&api),
        "--defer-start",
    ]);
    let mut c = connect_when_ready(&api);
    assert_eq!(request(&mut c, r#"{"cmd":"status"}"#)["state"], "created");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = finish(child);
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!api.exists());
}

/// `Seccomp:` mode (0 off, 2 filter) of every thread of `pid`, by thread name.
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap();
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap()
            .trim()
            .to_string();
        modes.push((name.trim().to_string(), mode));
    }
    modes.sort();
    modes
}

/// Runs a spinning guest with 2 vCPUs, a disk (worker thread) and the control socket; returns
/// every thread's seccomp mode once the guest runs and the event loop answered a request.
fn thread_seccomp_modes(extra: &[&str]) -> Vec<(String, String)> {
    let dir = Scratch::new(if extra.is_empty() {
        "seccomp-on"
    } else {
        "seccomp-off"
    });
    let api = dir.path("api.sock");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let mut args = vec!["--vcpus", "2", "--blk", s(&disk), "--api-sock", s(&api)];
    args.extend_from_slice(extra);
    let (child, _serial) = spawn_spin(&dir, &args);
    // The vCPUs filter themselves before entering the guest (which printed "ready"); the disk
    // thread did before the vCPUs were started; the event loop did before serving requests.
    let mut c = connect(&api);
    assert_eq!(request(&mut c, r#"{"cmd":"status"}"#)["state"], "running");
    let modes = seccomp_modes(vmm_pid(child.id()));
    assert_eq!(request(&mut c, r#"{"cmd":"stop"}"#)["ok"], true);
    assert_eq!(finish(child).status.code(), Some(0));
    modes
}

#[test]
fn every_thread_runs_under_seccomp_unless_disabled() {
    if !need_kvm() {
        return;
    }
    let on = thread_seccomp_modes(&[]);
    let names: Vec<&str> = on.iter().map(|(n, _)| n.as_str()).collect();
    for expected in ["vcpu0", "vcpu1", "blk0", "api", "moat-vmm"] {
        assert!(names.contains(&expected), "no thread {expected}: {on:?}");
    }
    assert!(on.iter().all(|(_, m)| m == "2"), "{on:?}");
    let off = thread_seccomp_modes(&["--no-seccomp"]);
    assert!(off.iter().all(|(_, m)| m == "0"), "{off:?}");
}

/// The pid of the process running the VM: the jailed child of the supervisor `pid` (the VMM
/// runs as `pid` itself with `--no-jail`).
fn vmm_pid(pid: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let children: Vec<u32> = children
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    assert!(children.len() <= 1, "{children:?}");
    children.first().copied().unwrap_or(pid)
}

/// `Key:` line of /proc/PID/status.
fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// (mount point, mount options) of every mount in /proc/PID/mountinfo.
fn mounts(pid: &str) -> Vec<(PathBuf, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (PathBuf::from(f[4]), f[5].to_string())
        })
        .collect()
}

/// `Max ...` soft limit in /proc/PID/limits.
fn limit(pid: u32, name: &str) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
    line[name.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn host_mounts_below(dir: &Path) -> Vec<PathBuf> {
    mounts("self")
        .into_iter()
        .map(|(m, _)| m)
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Boots SPIN with a serial FIFO, a control socket and `extra`; returns the supervisor, the
/// control connection and the serial reader once the guest runs.
fn boot_spin(
    dir: &Scratch,
    extra: &[&str],
) -> (
    Child,
    (UnixStream, BufReader<UnixStream>),
    BufReader<std::fs::File>,
) {
    let api = dir.path("api.sock");
    let mut args = vec!["--api-sock", s(&api)];
    args.extend_from_slice(extra);
    let (child, reader) = spawn_spin(dir, &args);
    let mut c = connect(&api);
    assert_eq!(request(&mut c, r#"{"cmd":"status"}"#)["state"], "running");
    (child, c, reader)
}

/// The VMM runs in a user namespace of its own, mapped to the host's ids one to one, with
/// `setgroups` denied; the namespaces the jail made stay owned by the host's (initial) user
/// namespace, so capabilities of its own namespace do not reach them.
fn assert_in_own_user_namespace(vmm: u32) {
    let user_ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/user")).unwrap();
    assert_ne!(user_ns(&vmm.to_string()), user_ns("self"), "user namespace");
    let identity = ["0", "0", "4294967295"];
    for map in ["uid_map", "gid_map"] {
        let text = std::fs::read_to_string(format!("/proc/{vmm}/{map}")).unwrap();
        assert_eq!(
            text.split_whitespace().collect::<Vec<_>>(),
            identity,
            "{map}"
        );
    }
    let setgroups = std::fs::read_to_string(format!("/proc/{vmm}/setgroups")).unwrap();
    assert_eq!(setgroups.trim(), "deny");
    // NS_GET_USERNS of its mount namespace: the owner is our (the host's) user namespace,
    // not the VMM's, so capabilities of the VMM's namespace do not reach its mounts.
    const NS_GET_USERNS: libc::c_ulong = 0xb701;
    let mnt = std::fs::File::open(format!("/proc/{vmm}/ns/mnt")).unwrap();
    // SAFETY: NS_GET_USERNS takes no argument and returns a new fd or -1.
    let owner = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&mnt), NS_GET_USERNS) };
    assert!(owner >= 0, "{}", std::io::Error::last_os_error());
    let owner_link = std::fs::read_link(format!("/proc/self/fd/{owner}")).unwrap();
    // SAFETY: closing the fd the ioctl returned.
    unsafe { libc::close(owner) };
    assert_eq!(
        owner_link,
        user_ns("self"),
        "owner of the VMM's mount namespace"
    );
    let vmm_user = std::fs::File::open(format!("/proc/{vmm}/ns/user")).unwrap();
    // NS_GET_PARENT of the VMM's user namespace is ours: it is one level down.
    const NS_GET_PARENT: libc::c_ulong = 0xb702;
    // SAFETY: NS_GET_PARENT takes no argument and returns a new fd or -1.
    let parent = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&vmm_user), NS_GET_PARENT) };
    assert!(parent >= 0, "{}", std::io::Error::last_os_error());
    let parent_link = std::fs::read_link(format!("/proc/self/fd/{parent}")).unwrap();
    // SAFETY: closing the fd the ioctl returned.
    unsafe { libc::close(parent) };
    assert_eq!(parent_link, user_ns("self"));
}

#[test]
fn jail_confines_the_vmm() {
    if !need_kvm() {
        return;
    }
    let dir = Scratch::new("jail");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let (child, mut c, _serial) = boot_spin(&dir, &["--blk", &format!("{}:ro", s(&disk))]);
    let vmm = vmm_pid(child.id());
    assert_ne!(vmm, child.id(), "the VM runs in a child of the supervisor");

    for ns in ["pid", "mnt", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{vmm}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace");
    }
    assert_eq!(status_field(vmm, "NSpid"), format!("{vmm}\t1"));
    assert_eq!(status_field(vmm, "Uid"), "0\t0\t0\t0");
    assert_in_own_user_namespace(vmm);
    assert_eq!(status_field(vmm, "CapEff"), "0000000000000000");
    assert_eq!(status_field(vmm, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(vmm, "CapBnd"), "0000000000000000");
    assert_eq!(status_field(vmm, "NoNewPrivs"), "1");

    // Only what the configuration names, at the same paths; what the VM only reads, read-only.
    let scratch = std::fs::canonicalize(&dir.0).unwrap();
    let seen = mounts(&vmm.to_string());
    let points: Vec<&Path> = seen.iter().map(|(m, _)| m.as_path()).collect();
    let mut want: Vec<PathBuf> = ["/", "/dev/kvm", "/dev/null", "/dev/urandom", "/proc"]
        .iter()
        .map(PathBuf::from)
        .collect();
    want.extend([
        scratch.clone(),
        scratch.join("payload.elf"),
        scratch.join("disk.img"),
    ]);
    for w in &want {
        assert!(points.contains(&w.as_path()), "{w:?} not in {points:?}");
    }
    assert_eq!(points.len(), want.len(), "{points:?}");
    let ro = |p: &Path| {
        seen.iter()
            .any(|(m, o)| m == p && o.split(',').any(|f| f == "ro"))
    };
    assert!(ro(Path::new("/")) && ro(&scratch.join("payload.elf")) && ro(&disk));
    assert!(!ro(&scratch));
    let top: Vec<String> = std::fs::read_dir(format!("/proc/{vmm}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let first = scratch.components().nth(1).unwrap();
    let mut top_want = vec!["dev", "proc", first.as_os_str().to_str().unwrap()];
    top_want.sort();
    let mut top = top;
    top.sort();
    assert_eq!(top, top_want);
    assert!(!Path::new(&format!("/proc/{vmm}/root/etc")).exists());

    assert_eq!(limit(vmm, "Max open files"), "4096");
    assert_eq!(limit(vmm, "Max core file size"), "0");
    assert_eq!(
        limit(vmm, "Max address space"),
        ((256u64 + 4096) << 20).to_string()
    );

    assert_eq!(request(&mut c, r#"{"cmd":"stop"}"#)["ok"], true);
    assert_eq!(finish(child).status.code(), Some(0));
    assert!(host_mounts_below(&scratch).is_empty());
}

#[test]
fn killing_the_supervisor_kills_the_jailed_vmm() {
    if !need_kvm() {
        return;
    }
    let dir = Scratch::new("jail-kill");
    let (child, _c, _serial) = boot_spin(&dir, &[]);
    let vmm = vmm_pid(child.id()) as libc::pid_t;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, vmm, 0) } as i32;
    assert!(pidfd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let out = finish(child);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(libc::SIGKILL)
    );
    // The pidfd turns readable when the jailed VMM has exited.
    let mut pfd = libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one initialised pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 60_000) };
    assert_eq!(n, 1, "the jailed VMM outlived its supervisor");
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(pidfd) };
}

#[test]
fn fs_share_keeps_the_ownership_caps_and_sees_later_host_mounts() {
    if !need_kvm() {
        return;
    }
    let dir = Scratch::new("jail-fs");
    let share = dir.path("share");
    std::fs::create_dir(&share).unwrap();
    let fs_arg = format!("t={}", s(&share));
    let (child, mut c, _serial) = boot_spin(&dir, &["--fs", &fs_arg]);
    let vmm = vmm_pid(child.id());
    // CHOWN DAC_OVERRIDE FOWNER FSETID SETGID SETUID SETFCAP, nothing else, and those only
    // in the VMM's own user namespace.
    assert_eq!(status_field(vmm, "CapEff"), "00000000800000db");
    assert_eq!(status_field(vmm, "CapBnd"), "0000000000000000");
    assert_eq!(status_field(vmm, "Uid"), "0\t0\t0\t0");
    assert_in_own_user_namespace(vmm);

    // What the shim does for each container: mount below the share after the VM started.
    let share = std::fs::canonicalize(&share).unwrap();
    let sub = share.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let c_sub = std::ffi::CString::new(s(&sub)).unwrap();
    // SAFETY: valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            c_sub.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    std::fs::write(sub.join("f"), b"late").unwrap();
    let inside = format!("/proc/{vmm}/root{}", s(&sub.join("f")));
    let seen = std::fs::read(&inside);
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::umount2(c_sub.as_ptr(), libc::MNT_DETACH) };
    assert_eq!(
        seen.unwrap(),
        b"late",
        "the jail does not see {}",
        sub.display()
    );

    assert_eq!(request(&mut c, r#"{"cmd":"stop"}"#)["ok"], true);
    assert_eq!(finish(child).status.code(), Some(0));
    assert!(
        host_mounts_below(&dir.0).is_empty(),
        "{:?}",
        host_mounts_below(&dir.0)
    );
}

#[test]
fn jail_uid_runs_the_vmm_unprivileged() {
    if !need_kvm() {
        return;
    }
    let dir = Scratch::new("jail-uid");
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let kvm = std::fs::metadata("/dev/kvm").unwrap();
    let nobody_can_use_kvm =
        std::os::unix::fs::PermissionsExt::mode(&kvm.permissions()) & 0o006 == 0o006;
    let kernel = dir.kernel(SPIN);
    if !nobody_can_use_kvm {
        // Here the caller must give the jail uid/gid access to /dev/kvm: the VMM says so.
        let out = run(&[
            "--kernel",
            s(&kernel),
            "--jail-uid",
            "65534",
            "--serial",
            "none",
        ]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("/dev/kvm"), "{err}");
        return;
    }
    let (child, _serial) = spawn_spin(&dir, &["--jail-uid", "65534"]);
    let vmm = vmm_pid(child.id());
    assert_eq!(status_field(vmm, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(vmm, "CapEff"), "0000000000000000");
    assert_in_own_user_namespace(vmm);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(finish(child).status.code(), Some(128 + libc::SIGTERM));
}

#[test]
fn no_userns_keeps_the_vmm_in_the_callers_user_namespace() {
    if !need_kvm() {
        return;
    }
    let dir = Scratch::new("jail-no-userns");
    let share = dir.path("share");
    std::fs::create_dir(&share).unwrap();
    let fs_arg = format!("t={}", s(&share));
    let (child, mut c, _serial) = boot_spin(&dir, &["--fs", &fs_arg, "--no-userns"]);
    let vmm = vmm_pid(child.id());
    let user_ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/user")).unwrap();
    assert_eq!(user_ns(&vmm.to_string()), user_ns("self"));
    assert_eq!(status_field(vmm, "CapEff"), "00000000800000db");
    assert_ne!(
        std::fs::read_link(format!("/proc/{vmm}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap()
    );
    assert_eq!(request(&mut c, r#"{"cmd":"stop"}"#)["ok"], true);
    assert_eq!(finish(child).status.code(), Some(0));
}

/// A tiny x86-64 assembler for the virtio-fs driver payload: absolute loads and stores
/// (`mov eax, imm32; mov [moffs64], eax`), polling, and serial output (DX = 0x3f8).
struct Asm(Vec<u8>);

impl Asm {
    fn new() -> Self {
        // mov dx, 0x3f8
        Asm(vec![0x66, 0xba, 0xf8, 0x03])
    }
    fn store32(&mut self, addr: u64, v: u32) {
        self.0.push(0xb8);
        self.0.extend_from_slice(&v.to_le_bytes());
        self.0.push(0xa3);
        self.0.extend_from_slice(&addr.to_le_bytes());
    }
    /// `mov rax, [from]; mov [to], rax`.
    fn copy64(&mut self, from: u64, to: u64) {
        self.0.extend_from_slice(&[0x48, 0xa1]);
        self.0.extend_from_slice(&from.to_le_bytes());
        self.0.extend_from_slice(&[0x48, 0xa3]);
        self.0.extend_from_slice(&to.to_le_bytes());
    }
    /// Spins until the 16-bit value at `addr` is `v`.
    fn wait16(&mut self, addr: u64, v: u16) {
        let start = self.0.len();
        self.0.extend_from_slice(&[0xf3, 0x90, 0xa1]);
        self.0.extend_from_slice(&addr.to_le_bytes());
        self.0.extend_from_slice(&[0x66, 0x3d]);
        self.0.extend_from_slice(&v.to_le_bytes());
        let back = start as isize - (self.0.len() as isize + 2);
        self.0.extend_from_slice(&[0x75, back as i8 as u8]);
    }
    /// Prints '@' + (-error) of the FUSE reply at `reply` ('@' success, 'A' EPERM, 'M' EACCES).
    fn out_errno(&mut self, reply: u64) {
        self.0.push(0xa1);
        self.0.extend_from_slice(&(reply + 4).to_le_bytes());
        // neg eax; add al, 0x40; out dx, al
        self.0.extend_from_slice(&[0xf7, 0xd8, 0x04, 0x40, 0xee]);
    }
    fn out_char(&mut self, c: u8) {
        self.0.extend_from_slice(&[0xb0, c, 0xee]);
    }
    /// i8042 reset, then halt.
    fn reset(&mut self) {
        self.0
            .extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]);
    }
}

/// A FUSE request: the 40-byte header (uid/gid of the guest caller) and its body.
fn fuse_request(opcode: u32, unique: u64, nodeid: u64, uid: u32, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&((40 + body.len()) as u32).to_le_bytes());
    r.extend_from_slice(&opcode.to_le_bytes());
    r.extend_from_slice(&unique.to_le_bytes());
    r.extend_from_slice(&nodeid.to_le_bytes());
    r.extend_from_slice(&uid.to_le_bytes());
    r.extend_from_slice(&uid.to_le_bytes()); // gid
    r.extend_from_slice(&1u32.to_le_bytes()); // pid
    r.extend_from_slice(&[0; 4]); // total_extlen, padding
    r.extend_from_slice(body);
    r
}

fn words(w: &[u32], name: &str) -> Vec<u8> {
    let mut b: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    b.extend_from_slice(name.as_bytes());
    if !name.is_empty() {
        b.push(0);
    }
    b
}

/// A payload that drives the virtio-fs device (the first virtio-mmio device when there is no
/// vsock) like a guest kernel would, without one: it sets the device up, sends `requests`
/// on the request queue in one batch, waits for them, then sends `late` (whose node id it
/// copies from the `EntryOut` of the last request of the batch, a `LOOKUP`), prints one
/// character per reply ('@' + errno) and a newline, and resets.
fn fs_driver_payload(requests: &[Vec<u8>], late: &[u8]) -> Vec<u8> {
    const MMIO: u64 = 0xd000_0000;
    const B: u64 = 0x10_0000; // LOAD_ADDR
    const DESC1: u64 = B + 0x1000;
    const AVAIL1: u64 = B + 0x1200;
    const USED1: u64 = B + 0x1400;
    const DESC0: u64 = B + 0x1800;
    const AVAIL0: u64 = B + 0x1a00;
    const USED0: u64 = B + 0x1c00;
    let req = |i: usize| B + 0x2000 + i as u64 * 0x100;
    let reply = |i: usize| B + 0x3000 + i as u64 * 0x200;
    let n = requests.len();
    assert!(n < 7);

    let mut a = Asm::new();
    for v in [0, 1, 3] {
        a.store32(MMIO + 0x70, v);
    }
    // VIRTIO_F_VERSION_1 (bit 32), nothing else.
    a.store32(MMIO + 0x24, 1);
    a.store32(MMIO + 0x20, 1);
    a.store32(MMIO + 0x24, 0);
    a.store32(MMIO + 0x20, 0);
    a.store32(MMIO + 0x70, 11);
    for (q, desc, avail, used) in [(0, DESC0, AVAIL0, USED0), (1, DESC1, AVAIL1, USED1)] {
        a.store32(MMIO + 0x30, q);
        a.store32(MMIO + 0x38, 16);
        for (reg, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
            a.store32(MMIO + reg, addr as u32);
            a.store32(MMIO + reg + 4, 0);
        }
        a.store32(MMIO + 0x44, 1);
    }
    a.store32(MMIO + 0x70, 15);
    a.store32(MMIO + 0x50, 1);
    a.wait16(USED1 + 2, n as u16);
    for i in 0..n {
        a.out_errno(reply(i));
    }
    a.copy64(reply(n - 1) + 16, req(n) + 16);
    a.store32(AVAIL1, ((n as u32) + 1) << 16);
    a.store32(MMIO + 0x50, 1);
    a.wait16(USED1 + 2, n as u16 + 1);
    a.out_errno(reply(n));
    a.out_char(b'\n');
    a.reset();
    assert!(a.0.len() < 0x1000, "code too long");

    let mut image = a.0;
    image.resize(0x4000, 0);
    let mut put = |addr: u64, bytes: &[u8]| {
        let off = (addr - B) as usize;
        image[off..off + bytes.len()].copy_from_slice(bytes);
    };
    for (i, r) in requests
        .iter()
        .chain(std::iter::once(&late.to_vec()))
        .enumerate()
    {
        assert!(r.len() <= 0x100);
        let mut d = Vec::new();
        d.extend_from_slice(&req(i).to_le_bytes());
        d.extend_from_slice(&(r.len() as u32).to_le_bytes());
        d.extend_from_slice(&1u16.to_le_bytes()); // NEXT
        d.extend_from_slice(&(2 * i as u16 + 1).to_le_bytes());
        d.extend_from_slice(&reply(i).to_le_bytes());
        d.extend_from_slice(&0x200u32.to_le_bytes());
        d.extend_from_slice(&2u16.to_le_bytes()); // WRITE
        d.extend_from_slice(&0u16.to_le_bytes());
        put(DESC1 + 32 * i as u64, &d);
        put(req(i), r);
        // avail.ring[i] = head 2i; the payload publishes the last one itself.
        put(AVAIL1 + 4 + 2 * i as u64, &(2 * i as u16).to_le_bytes());
    }
    put(AVAIL1 + 2, &(n as u16).to_le_bytes());
    image
}

#[test]
fn jailed_virtio_fs_creates_files_as_the_guest_uid_and_refuses_devices() {
    if !need_kvm() {
        return;
    }
    let dir = Scratch::new("jail-fs-uid");
    let share = dir.path("share");
    std::fs::create_dir(&share).unwrap();
    // An emptyDir: writable by every container user.
    std::fs::set_permissions(&share, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    // A device node already in the share (an image layer, the host): never to be opened.
    let devnull = std::ffi::CString::new(s(&share.join("devnull"))).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::mknod(devnull.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(
        rc,
        0,
        "mknod (this test needs root): {}",
        std::io::Error::last_os_error()
    );
    let devnull_mode =
        std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(share.join("devnull")).unwrap());

    const S_IFREG: u32 = libc::S_IFREG;
    let requests = vec![
        fuse_request(26, 1, 0, 0, &words(&[7, 31, 0, 0], "")), // INIT
        fuse_request(
            8,
            2,
            1,
            1000,
            &words(&[S_IFREG | 0o644, 0, 0o022, 0], "file"),
        ), // MKNOD
        fuse_request(9, 3, 1, 1000, &words(&[0o755, 0o022], "dir")), // MKDIR
        fuse_request(
            8,
            4,
            1,
            0,
            &words(&[libc::S_IFCHR | 0o666, (1 << 8) | 3, 0, 0], "null"),
        ),
        fuse_request(
            8,
            5,
            1,
            1000,
            &words(&[libc::S_IFIFO | 0o644, 0, 0o022, 0], "fifo"),
        ),
        fuse_request(1, 6, 1, 0, &words(&[], "devnull")), // LOOKUP
    ];
    let open = fuse_request(14, 7, 0, 0, &words(&[libc::O_RDWR as u32, 0], "")); // OPEN
    let kernel = dir.path("payload.elf");
    std::fs::write(&kernel, elf(&fs_driver_payload(&requests, &open))).unwrap();
    let serial = dir.path("serial.log");
    let child = spawn(&[
        "--kernel",
        s(&kernel),
        "--serial",
        &format!("file:{}", s(&serial)),
        "--fs",
        &format!("t={}", s(&share)),
    ]);
    let out = finish(child);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    // INIT, MKNOD file, MKDIR, MKNOD char 1:3 (EPERM), MKNOD fifo, LOOKUP, OPEN device (EACCES).
    assert_eq!(
        std::fs::read_to_string(&serial).unwrap(),
        "@@@A@@M\n",
        "stderr: {stderr}"
    );

    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    for (name, is) in [
        (
            "file",
            std::fs::FileType::is_file as fn(&std::fs::FileType) -> bool,
        ),
        ("dir", std::fs::FileType::is_dir),
        ("fifo", FileTypeExt::is_fifo),
    ] {
        let m = std::fs::symlink_metadata(share.join(name)).unwrap();
        assert!(is(&m.file_type()), "{name}: {:?}", m.file_type());
        assert_eq!(
            (m.uid(), m.gid()),
            (1000, 1000),
            "{name} is owned by the guest's uid"
        );
    }
    assert!(std::fs::symlink_metadata(share.join("null")).is_err());
    let m = std::fs::symlink_metadata(share.join("devnull")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(
        (m.uid(), m.mode()),
        (0, devnull_mode),
        "the node was not changed"
    );
}
