//! E2E trials of moat-vmm on a real KVM: a Linux guest (the project kernel) with a test
//! initramfs — busybox plus `moat-probe` (vmm/tests/guest/moat-probe.c, built static here) —
//! whose `/init` runs the scenario named by `moat.test=` on the kernel command line and prints
//! `MOAT-E2E ...` lines on the serial console, then reboots (which ends the VMM).
//!
//! Covered: boot to init with the boot marker and a clean exit that leaves no socket behind;
//! vsock in both directions (hybrid Unix sockets); virtio-blk write/read-back with checksums
//! and a read-only disk; virtio-fs read/write seen on the host; and boot-to-init time of
//! moat-vmm vs `qemu-system-x86_64 -M microvm` for the same kernel and initramfs (reported,
//! not asserted).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use moat_e2e::{bin, ensure, guest_kernel, trial, Check, Context, Failed, Scratch, Trial};

/// Upper bound for one guest run, in seconds (the software-KVM host is ~30x slower).
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// Boot-time comparison runs per VMM.
const TIMING_RUNS: usize = 3;

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
/bin/moat-probe marker
echo "MOAT-E2E init"
echo "MOAT-E2E cpus $(grep -c ^processor /proc/cpuinfo)"
case " $(cat /proc/cmdline) " in
*" moat.test=vsock "*)
    /bin/moat-probe echo 5000 &
    echo "MOAT-E2E send-reply $(/bin/moat-probe send 6000 hello-from-guest)"
    wait
    echo "MOAT-E2E echo-done"
    ;;
*" moat.test=blk "*)
    echo "MOAT-E2E vda $(sha256sum /dev/vda | cut -d' ' -f1)"
    dd if=/dev/urandom of=/tmp/w bs=65536 count=4 2>/dev/null
    dd if=/tmp/w of=/dev/vda bs=65536 seek=1 conv=fsync 2>/dev/null &&
        echo "MOAT-E2E wrote $(sha256sum /tmp/w | cut -d' ' -f1)"
    if dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; then
        echo "MOAT-E2E vdb writable"
    else
        echo "MOAT-E2E vdb read-only"
    fi
    ;;
*" moat.test=idle "*)
    echo "MOAT-E2E idle"
    exec sleep 3600
    ;;
*" moat.test=fs "*)
    mkdir -p /mnt/share
    mount -t virtiofs share /mnt/share && echo "MOAT-E2E host-file $(cat /mnt/share/host.txt)"
    echo from-guest > /mnt/share/guest.txt && sync && echo "MOAT-E2E wrote-file"
    umount /mnt/share
    ;;
esac
echo "MOAT-E2E done"
reboot -f
"#;

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "vmm::boots_to_init_and_exits_cleanly_on_reboot",
            boot_and_exit,
        ),
        trial("vmm::vsock_round_trip_both_directions", vsock_round_trip),
        trial("vmm::blk_write_read_back_with_checksums", blk_checksums),
        trial("vmm::virtiofs_read_write_visible_to_host", virtiofs_share),
        trial("vmm::control_socket_on_a_linux_guest", control_socket),
        trial("vmm::sigterm_stops_a_linux_guest", sigterm),
        trial("vmm::boot_to_init_vs_qemu_microvm", boot_time_vs_qemu),
    ]
}

/// A cpio "newc" archive writer (uncompressed; the kernel unpacks it as the initramfs).
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn new() -> Self {
        Self {
            out: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

/// Builds the test initramfs in `dir` (busybox, moat-probe compiled here, the scenario /init).
fn test_initrd(dir: &Path) -> Result<PathBuf, Failed> {
    let src = moat_e2e::workspace_root().join("vmm/tests/guest/moat-probe.c");
    let probe = dir.join("moat-probe");
    let out = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&probe)
        .arg(&src)
        .output()
        .context("run gcc (needed to build the guest helper; apt-get install gcc)")?;
    ensure(
        out.status.success(),
        format!(
            "gcc {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
    )?;
    let busybox =
        fs::read("/bin/busybox").context("read /bin/busybox (apt-get install busybox-static)")?;
    let mut c = Cpio::new();
    for d in ["bin", "dev", "proc", "sys", "mnt", "tmp"] {
        c.entry(d, 0o040755, (0, 0), &[]);
    }
    c.entry("dev/console", 0o020600, (5, 1), &[]);
    c.entry("bin/busybox", 0o100755, (0, 0), &busybox);
    c.entry(
        "bin/moat-probe",
        0o100755,
        (0, 0),
        &fs::read(&probe).context("read moat-probe")?,
    );
    c.entry("init", 0o100755, (0, 0), INIT.as_bytes());
    let path = dir.join("initrd.cpio");
    fs::write(&path, c.finish()).context("write initrd")?;
    Ok(path)
}

/// A running VMM whose serial console (stdout) is read line by line with arrival times.
struct Vm {
    child: Child,
    started: Instant,
    lines: Receiver<(Instant, String)>,
    console: Vec<String>,
}

impl Vm {
    fn spawn(cmd: &mut Command) -> Result<Self, Failed> {
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context(format!("spawn {cmd:?}"))?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx
                    .send((Instant::now(), line.trim_end_matches('\r').to_string()))
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Self {
            child,
            started,
            lines,
            console: Vec::new(),
        })
    }

    /// Waits for a console line starting with `prefix`; returns it and its arrival time.
    fn wait_for(&mut self, prefix: &str) -> Result<(Instant, String), Failed> {
        let deadline = self.started + RUN_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((t, line)) => {
                    self.console.push(line.clone());
                    if line.starts_with(prefix) {
                        return Ok((t, line));
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    return Err(format!(
                        "no console line `{prefix}` (console so far:\n{})",
                        self.console.join("\n")
                    )
                    .into());
                }
            }
        }
    }

    /// Waits for the VMM to exit; returns its status, the whole console and stderr.
    fn finish(mut self) -> Result<(ExitStatus, String, String), Failed> {
        let deadline = self.started + RUN_TIMEOUT;
        let pid = self.child.id() as i32;
        let (tx, rx) = mpsc::channel();
        let mut stderr = self.child.stderr.take().ok_or("no stderr pipe")?;
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            let _ = tx.send(s);
        });
        let err = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| {
                // SAFETY: killing our own child, not yet reaped.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                format!(
                    "the VMM did not exit; console:\n{}",
                    self.console.join("\n")
                )
            })?;
        let status = self.child.wait().context("wait for the VMM")?;
        while let Ok((_, l)) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.console.push(l);
        }
        Ok((status, self.console.join("\n"), err))
    }
}

fn moat_vmm(initrd: &Path, test: &str) -> Result<Command, Failed> {
    let mut cmd = Command::new(bin("moat-vmm")?);
    cmd.arg("--kernel")
        .arg(guest_kernel()?)
        .arg("--initrd")
        .arg(initrd)
        .args(["--mem-mib", "256", "--cmdline"])
        .arg(format!("quiet moat.test={test}"));
    Ok(cmd)
}

fn line_value<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("MOAT-E2E {key} ");
    console
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(str::trim)
}

fn expect_clean_exit(status: ExitStatus, console: &str, stderr: &str) -> Check {
    ensure(
        status.code() == Some(0) && console.contains("MOAT-E2E done"),
        format!("VMM exited with {status}; console:\n{console}\nstderr:\n{stderr}"),
    )
}

fn boot_and_exit() -> Check {
    boot_until_guest_exit("boot", "guest-reset")
}

/// Boots with 2 vCPUs, vsock and the control socket, lets the guest run scenario `test` (which
/// ends with a reboot), and expects exit status 0 with `reason` on stderr, the
/// boot marker seen, and nothing left behind.
fn boot_until_guest_exit(test: &str, reason: &str) -> Check {
    let dir = Scratch::new(&format!("vmm-{test}"))?;
    let initrd = test_initrd(dir.path())?;
    let vsock = dir.path().join("vsock.sock");
    let api = dir.path().join("api.sock");
    let mut cmd = moat_vmm(&initrd, test)?;
    cmd.arg("--vsock-uds")
        .arg(&vsock)
        .arg("--api-sock")
        .arg(&api)
        .args(["--vcpus", "2"]);
    let mut vm = Vm::spawn(&mut cmd)?;
    vm.wait_for("MOAT-E2E init")?;
    let (status, console, stderr) = vm.finish()?;
    expect_clean_exit(status, &console, &stderr)?;
    ensure(
        stderr.contains("boot marker: ") && stderr.contains(&format!("VM stopped: {reason}")),
        format!("no boot marker / `{reason}` in stderr:\n{stderr}"),
    )?;
    ensure(
        line_value(&console, "cpus") == Some("2"),
        format!("the guest did not bring up 2 vCPUs; console:\n{console}"),
    )?;
    ensure(!vsock.exists(), "the vsock socket was left behind")?;
    ensure(!api.exists(), "the control socket was left behind")?;
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .context("list scratch dir")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "initrd.cpio" && n != "moat-probe")
        .collect();
    ensure(
        leftovers.is_empty(),
        format!("files left behind: {leftovers:?}"),
    )
}

fn vsock_round_trip() -> Check {
    let dir = Scratch::new("vmm-vsock")?;
    let initrd = test_initrd(dir.path())?;
    let uds = dir.path().join("vsock.sock");
    // Guest → host: the guest connects to host port 6000, i.e. the Unix socket `<uds>_6000`.
    let listener =
        UnixListener::bind(format!("{}_6000", uds.display())).context("bind uds_6000")?;
    let server = std::thread::spawn(move || -> std::io::Result<String> {
        let (mut s, _) = listener.accept()?;
        let mut got = String::new();
        s.read_to_string(&mut got)?;
        s.write_all(format!("host-saw:{got}").as_bytes())?;
        Ok(got)
    });
    let mut cmd = moat_vmm(&initrd, "vsock")?;
    cmd.arg("--vsock-uds").arg(&uds);
    let mut vm = Vm::spawn(&mut cmd)?;
    vm.wait_for("MOAT-PROBE listening 5000")?;
    // Host → guest: CONNECT to the guest's port 5000, where moat-probe echoes.
    let mut s = UnixStream::connect(&uds).context("connect to the vsock socket")?;
    s.write_all(b"CONNECT 5000\n").context("send CONNECT")?;
    let mut ok = BufReader::new(s.try_clone().context("clone")?);
    let mut line = String::new();
    ok.read_line(&mut line).context("read OK line")?;
    ensure(
        line.starts_with("OK "),
        format!("expected `OK <port>`, got {line:?}"),
    )?;
    // 1 MiB, several times the vsock buffers on both sides: exercises credit updates. A
    // separate writer, since the echo comes back while we are still sending.
    let payload: Vec<u8> = (0..(1u32 << 20)).map(|i| b'a' + (i % 26) as u8).collect();
    let mut w = s.try_clone().context("clone")?;
    let sent = payload.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        w.write_all(&sent)?;
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut echoed = Vec::new();
    ok.read_to_end(&mut echoed).context("read echo")?;
    writer
        .join()
        .map_err(|_| "writer panicked")?
        .context("send to guest")?;
    ensure(
        echoed == payload,
        format!(
            "echo mismatch: {} bytes back of {}",
            echoed.len(),
            payload.len()
        ),
    )?;
    let (status, console, stderr) = vm.finish()?;
    expect_clean_exit(status, &console, &stderr)?;
    let got = server
        .join()
        .map_err(|_| "host server panicked")?
        .context("host server")?;
    ensure(got == "hello-from-guest", format!("host received {got:?}"))?;
    ensure(
        line_value(&console, "send-reply") == Some("host-saw:hello-from-guest"),
        format!("guest did not get the host's reply; console:\n{console}"),
    )
}

fn sha256(path: &Path) -> Result<String, Failed> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("run sha256sum")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

fn blk_checksums() -> Check {
    let dir = Scratch::new("vmm-blk")?;
    let initrd = test_initrd(dir.path())?;
    let disk = dir.path().join("disk.img");
    let pattern: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    fs::write(&disk, &pattern).context("write disk")?;
    let ro = dir.path().join("ro.img");
    fs::write(&ro, vec![7u8; 64 << 10]).context("write ro disk")?;
    let before = sha256(&disk)?;
    let mut cmd = moat_vmm(&initrd, "blk")?;
    cmd.arg("--blk")
        .arg(&disk)
        .arg("--blk")
        .arg(format!("{}:ro", ro.display()));
    let vm = Vm::spawn(&mut cmd)?;
    let (status, console, stderr) = vm.finish()?;
    expect_clean_exit(status, &console, &stderr)?;
    ensure(
        line_value(&console, "vda") == Some(before.as_str()),
        format!("guest read a different disk (host {before}); console:\n{console}"),
    )?;
    let wrote =
        line_value(&console, "wrote").ok_or(format!("guest did not write; console:\n{console}"))?;
    let written = dir.path().join("written");
    let data = fs::read(&disk).context("read disk back")?;
    fs::write(&written, &data[65536..65536 + 4 * 65536]).context("write extract")?;
    ensure(
        sha256(&written)? == wrote,
        "the bytes on the host disk differ from what the guest wrote",
    )?;
    ensure(
        data[..65536] == pattern[..65536],
        "bytes before the written range changed",
    )?;
    ensure(
        line_value(&console, "vdb") == Some("read-only"),
        format!("the read-only disk accepted a write; console:\n{console}"),
    )?;
    ensure(
        fs::read(&ro).context("read ro disk")? == vec![7u8; 64 << 10],
        "the read-only disk changed",
    )
}

fn virtiofs_share() -> Check {
    let dir = Scratch::new("vmm-fs")?;
    let initrd = test_initrd(dir.path())?;
    let share = dir.path().join("share");
    fs::create_dir(&share).context("mkdir share")?;
    fs::set_permissions(&share, fs::Permissions::from_mode(0o755)).context("chmod share")?;
    fs::write(share.join("host.txt"), "from-host").context("write host.txt")?;
    let mut cmd = moat_vmm(&initrd, "fs")?;
    cmd.arg("--fs").arg(format!("share={}", share.display()));
    let vm = Vm::spawn(&mut cmd)?;
    let (status, console, stderr) = vm.finish()?;
    expect_clean_exit(status, &console, &stderr)?;
    ensure(
        line_value(&console, "host-file") == Some("from-host"),
        format!("guest did not read the host file; console:\n{console}\nstderr:\n{stderr}"),
    )?;
    let got = fs::read_to_string(share.join("guest.txt")).context("read guest.txt on the host")?;
    ensure(got == "from-guest\n", format!("host sees {got:?}"))
}

/// One request/response on the control socket.
fn api_call(
    conn: &mut (UnixStream, BufReader<UnixStream>),
    request: &str,
) -> Result<String, Failed> {
    conn.0
        .write_all(format!("{request}\n").as_bytes())
        .context("send control request")?;
    let mut line = String::new();
    conn.1.read_line(&mut line).context("read control answer")?;
    Ok(line.trim_end().to_string())
}

fn api_connect(path: &Path) -> Result<(UnixStream, BufReader<UnixStream>), Failed> {
    let s = UnixStream::connect(path).context("connect to the control socket")?;
    let r = BufReader::new(s.try_clone().context("clone")?);
    Ok((s, r))
}

fn control_socket() -> Check {
    let dir = Scratch::new("vmm-api")?;
    let initrd = test_initrd(dir.path())?;
    let api = dir.path().join("api.sock");
    let mut cmd = moat_vmm(&initrd, "idle")?;
    cmd.arg("--api-sock").arg(&api);
    let mut vm = Vm::spawn(&mut cmd)?;
    vm.wait_for("MOAT-E2E idle")?;
    let mut waiter = api_connect(&api)?;
    waiter
        .0
        .write_all(b"{\"cmd\":\"wait\"}\n")
        .context("send wait")?;
    let mut c = api_connect(&api)?;
    let status = api_call(&mut c, r#"{"cmd":"status"}"#)?;
    ensure(
        status.contains(r#""state":"running""#) && status.contains(r#""boot_ms":"#),
        format!("status after init: {status}"),
    )?;
    ensure(
        api_call(&mut c, r#"{"cmd":"pause"}"#)? == r#"{"ok":true}"#,
        "pause failed",
    )?;
    let paused = api_call(&mut c, r#"{"cmd":"status"}"#)?;
    ensure(
        paused.contains(r#""state":"paused""#),
        format!("status when paused: {paused}"),
    )?;
    ensure(
        api_call(&mut c, r#"{"cmd":"resume"}"#)? == r#"{"ok":true}"#,
        "resume failed",
    )?;
    ensure(
        api_call(&mut c, r#"{"cmd":"stop"}"#)? == r#"{"ok":true}"#,
        "stop failed",
    )?;
    let mut done = String::new();
    waiter.1.read_line(&mut done).context("read wait answer")?;
    ensure(
        done.contains(r#""exit_code":0"#) && done.contains(r#""reason":"stopped""#),
        format!("wait answered {done}"),
    )?;
    let (status, console, stderr) = vm.finish()?;
    ensure(
        status.code() == Some(0),
        format!("VMM exited with {status}; console:\n{console}\nstderr:\n{stderr}"),
    )?;
    ensure(!api.exists(), "the control socket was left behind")
}

fn sigterm() -> Check {
    let dir = Scratch::new("vmm-term")?;
    let initrd = test_initrd(dir.path())?;
    let mut cmd = moat_vmm(&initrd, "idle")?;
    cmd.args(["--vcpus", "2"]);
    let mut vm = Vm::spawn(&mut cmd)?;
    vm.wait_for("MOAT-E2E idle")?;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
    let (status, console, stderr) = vm.finish()?;
    ensure(
        status.code() == Some(128 + libc::SIGTERM),
        format!("VMM exited with {status} after SIGTERM; console:\n{console}\nstderr:\n{stderr}"),
    )
}

/// Median of launch → `MOAT-E2E init` on the console, in ms.
fn median(mut v: Vec<u128>) -> u128 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn boot_time_vs_qemu() -> Check {
    let dir = Scratch::new("vmm-time")?;
    let initrd = test_initrd(dir.path())?;
    let kernel = guest_kernel()?;
    let mut moat = Vec::new();
    let mut marker = Vec::new();
    let mut qemu = Vec::new();
    for _ in 0..TIMING_RUNS {
        let mut vm = Vm::spawn(&mut moat_vmm(&initrd, "boot")?)?;
        let (t, _) = vm.wait_for("MOAT-E2E init")?;
        moat.push((t - vm.started).as_millis());
        let (status, console, stderr) = vm.finish()?;
        expect_clean_exit(status, &console, &stderr)?;
        if let Some(ms) = stderr
            .lines()
            .find_map(|l| l.strip_prefix("boot marker: "))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<u128>().ok())
        {
            marker.push(ms);
        }

        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-M",
            "microvm",
            "-enable-kvm",
            "-cpu",
            "host",
            "-m",
            "256",
            "-smp",
            "1",
        ])
        .args([
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-nic",
            "none",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            "console=ttyS0 reboot=t panic=-1 quiet moat.test=boot",
        ]);
        let mut vm = Vm::spawn(&mut cmd)?;
        let (t, _) = vm.wait_for("MOAT-E2E init")?;
        qemu.push((t - vm.started).as_millis());
        let _ = vm.finish()?;
    }
    println!(
        "vmm::boot_to_init: launch -> /init console line, median of {TIMING_RUNS}: moat-vmm {} ms \
         (boot marker {} ms), qemu-system-x86_64 -M microvm {} ms; runs: moat {moat:?}, qemu {qemu:?}",
        median(moat.clone()),
        if marker.is_empty() { 0 } else { median(marker.clone()) },
        median(qemu.clone()),
    );
    Ok(())
}
