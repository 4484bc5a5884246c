//! E2E trials of moat-vmm on a real KVM: a Linux guest (the project kernel) with a test
//! initramfs — busybox plus `moat-probe` (vmm/tests/guest/moat-probe.c, built static here) —
//! whose `/init` runs the scenario named by `moat.test=` on the kernel command line and prints
//! `MOAT-E2E ...` lines on the serial console, then reboots or powers off (which ends the VMM).
//!
//! Covered: boot to init with the boot marker and a clean exit that leaves no socket behind;
//! vsock in both directions (hybrid Unix sockets); virtio-blk write/read-back with checksums
//! and a read-only disk; virtio-fs read/write seen on the host; virtio-net on taps in a network
//! namespace (ping, TCP both ways with offloads); ACPI power-off ending the VMM with
//! `guest-poweroff`, and the same kernel with `acpi=off` booting from the MP table and the
//! command-line virtio devices; and boot-to-init time of
//! moat-vmm vs `qemu-system-x86_64 -M microvm` for the same kernel and initramfs (reported,
//! not asserted).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
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
echo "MOAT-E2E virtio $(ls -d /sys/bus/virtio/devices/* | wc -l) $(ls -d /sys/bus/virtio/devices/*/driver | wc -l)"
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
*" moat.test=poweroff "*)
    # ACPI S5: the VMM exits with guest-poweroff. If the power-off does not reach the VMM the
    # kernel halts instead and the VMM never exits (the trial times out).
    echo "MOAT-E2E done"
    poweroff -f
    ;;
*" moat.test=net "*)
    # eth0 on the host's tap (10.0.2.1/30), eth1 on a second tap with a random MAC.
    ip link set lo up
    ip link set eth0 up && ip addr add 10.0.2.2/30 dev eth0
    echo "MOAT-E2E macs $(cat /sys/class/net/eth0/address) $(cat /sys/class/net/eth1/address)"
    if ping -c 3 -w 60 10.0.2.1 >/dev/null; then echo "MOAT-E2E ping ok"; fi
    wget -q -O /tmp/down http://10.0.2.1:8080/down &&
        echo "MOAT-E2E down $(sha256sum /tmp/down | cut -d' ' -f1)"
    # Text: busybox wget sends --post-file data as a C string (it would stop at a NUL byte).
    head -c 786432 /dev/urandom | base64 >/tmp/up
    # The checksum travels with the request, so the host compares without reading the console
    # (kernel messages may cut a console line under load).
    up=$(sha256sum /tmp/up | cut -d' ' -f1)
    echo "MOAT-E2E up $up"
    wget -q -O /tmp/reply --post-file /tmp/up "http://10.0.2.1:8080/up?sha=$up" &&
        echo "MOAT-E2E up-reply $(cat /tmp/reply)"
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
        trial("vmm::virtio_net_ping_and_tcp_both_ways", net_round_trip),
        trial("vmm::control_socket_on_a_linux_guest", control_socket),
        trial("vmm::sigterm_stops_a_linux_guest", sigterm),
        trial("vmm::boot_to_init_vs_qemu_microvm", boot_time_vs_qemu),
        trial("vmm::guest_poweroff_exits_cleanly", poweroff_and_exit),
        trial("vmm::acpi_off_guest_boots_from_the_mp_table", acpi_off_boot),
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

/// The guest powers off (ACPI S5, `poweroff -f`): exit status 0, reason `guest-poweroff`, both
/// vCPUs up (MADT), nothing left behind.
fn poweroff_and_exit() -> Check {
    boot_until_guest_exit("poweroff", "guest-poweroff")
}

/// The same kernel with `acpi=off` ignores the ACPI tables: it finds both vCPUs in the MP table
/// and binds drivers to its virtio devices from the command line (a driver binds only once it
/// has its interrupt), and ends the VM with a reboot.
fn acpi_off_boot() -> Check {
    boot_until_guest_exit_with("boot", "acpi=off", "guest-reset")
}

/// [`boot_until_guest_exit_with`] without extra command-line options.
fn boot_until_guest_exit(test: &str, reason: &str) -> Check {
    boot_until_guest_exit_with(test, "", reason)
}

/// Boots with 2 vCPUs, vsock and the control socket, lets the guest run scenario `test` (which
/// ends with a reboot or power-off) with `extra` on the kernel command line, and expects exit
/// status 0 with `reason` on stderr, the boot marker seen, and nothing left behind.
fn boot_until_guest_exit_with(test: &str, extra: &str, reason: &str) -> Check {
    let dir = Scratch::new(&format!("vmm-{test}"))?;
    let initrd = test_initrd(dir.path())?;
    let vsock = dir.path().join("vsock.sock");
    let api = dir.path().join("api.sock");
    let mut cmd = moat_vmm(&initrd, test)?;
    if !extra.is_empty() {
        // A later --cmdline replaces the one moat_vmm set.
        cmd.arg("--cmdline")
            .arg(format!("quiet moat.test={test} {extra}"));
    }
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
    // vsock and the default entropy device, each with its driver bound (which needs its IRQ).
    ensure(
        line_value(&console, "virtio").is_some_and(|v| {
            let n: Vec<&str> = v.split_whitespace().collect();
            n.len() == 2 && n[0] == n[1] && n[0].parse::<u32>().is_ok_and(|n| n >= 2)
        }),
        format!("not every virtio device has its driver; console:\n{console}"),
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

/// `ip` (iproute2), which is in /usr/sbin, outside the software-KVM host's PATH.
fn ip(args: &[&str]) -> Check {
    let prog = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("ip");
    let out = Command::new(prog)
        .args(args)
        .output()
        .context(format!("run {prog} (apt-get install iproute2)"))?;
    ensure(
        out.status.success(),
        format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Bytes the host serves at `/down`.
fn net_download() -> Vec<u8> {
    (0..(1u32 << 20))
        .map(|i| (i * 7 + i / 4093) as u8)
        .collect()
}

/// Reads an HTTP request head; returns (request line, content length, body bytes read).
fn http_head(s: &mut std::net::TcpStream) -> std::io::Result<(String, usize, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 || buf.len() > 64 << 10 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let first = head.lines().next().unwrap_or_default().to_string();
    Ok((first, len, buf[end + 4..].to_vec()))
}

/// The host side of the net trial, on a thread of its own network namespace: taps `mtap0`
/// (10.0.2.1/30, up) and `mtap1`, and an HTTP server on 10.0.2.1:8080 serving `GET /down` and
/// `POST /up` (the body is stored in `upload`). Sends the thread's namespace path (or why it
/// could not make it), then serves until two requests are done or the listener is shut down.
fn net_host(
    upload: PathBuf,
    ready: mpsc::Sender<Result<(String, std::net::TcpListener), String>>,
) -> std::io::Result<usize> {
    let setup = || -> Result<std::net::TcpListener, String> {
        // SAFETY: unshare changes only this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!("unshare: {}", std::io::Error::last_os_error()));
        }
        for args in [
            &["tuntap", "add", "mtap0", "mode", "tap"][..],
            &["tuntap", "add", "mtap1", "mode", "tap"],
            &["addr", "add", "10.0.2.1/30", "dev", "mtap0"],
            &["link", "set", "mtap0", "up"],
            &["link", "set", "lo", "up"],
        ] {
            ip(args).map_err(|e| e.message().unwrap_or_default().to_string())?;
        }
        std::net::TcpListener::bind("10.0.2.1:8080").map_err(|e| format!("bind: {e}"))
    };
    let listener = match setup() {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e));
            return Ok(0);
        }
    };
    // SAFETY: gettid has no arguments.
    let tid = unsafe { libc::gettid() };
    let ns = format!("/proc/{}/task/{tid}/ns/net", std::process::id());
    let _ = ready.send(Ok((ns, listener.try_clone()?)));
    let mut served = 0;
    while served < 2 {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(RUN_TIMEOUT))?;
        let (line, len, mut body) = http_head(&mut s)?;
        if line.starts_with("GET /down ") {
            let data = net_download();
            write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
                data.len()
            )?;
            s.write_all(&data)?;
        } else if let Some(query) = line.strip_prefix("POST /up?sha=") {
            let sent_sha = query.split_whitespace().next().unwrap_or_default();
            fs::write(upload.with_extension("sha"), sent_sha)?;
            while body.len() < len {
                let mut chunk = vec![0u8; 64 << 10];
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            fs::write(&upload, &body)?;
            write!(s, "HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\nstored\n")?;
        } else {
            s.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
        }
        served += 1;
    }
    Ok(served)
}

/// virtio-net on taps in a network namespace the VMM joins with `--netns`: the guest pings the
/// host, downloads 1 MiB and uploads 1 MiB (base64 text) over TCP (checksums compared on both
/// sides), with the offloads Linux negotiates (checksum, TSO, mergeable buffers) and seccomp
/// on; eth0 has the MAC given, eth1 (second `--net`) a random locally administered one.
fn net_round_trip() -> Check {
    let dir = Scratch::new("vmm-net")?;
    let initrd = test_initrd(dir.path())?;
    let upload = dir.path().join("upload.bin");
    let (tx, rx) = mpsc::channel();
    let up = upload.clone();
    let host = std::thread::spawn(move || net_host(up, tx));
    let (netns, listener) = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Err(format!("cannot set up the host side: {e}").into()),
        Err(_) => return Err("the host side did not start".into()),
    };
    let mut cmd = moat_vmm(&initrd, "net")?;
    cmd.env("MOAT_VMM_LOG", "info")
        .arg("--netns")
        .arg(&netns)
        .args([
            "--net",
            "tap=mtap0,mac=02:00:0a:00:02:02",
            "--net",
            "tap=mtap1",
        ]);
    let vm = Vm::spawn(&mut cmd)?;
    let finished = vm.finish();
    // Unblock the server if the guest never came: a shut-down listener fails its accept.
    // SAFETY: shutdown on a socket we own.
    unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
    let served = host.join().map_err(|_| "the host side panicked")?;
    let (status, console, stderr) = finished?;
    expect_clean_exit(status, &console, &stderr)?;
    let served = served.context("host side")?;
    ensure(served == 2, format!("the host served {served} requests"))?;
    let macs = line_value(&console, "macs").unwrap_or_default().to_string();
    let (eth0, eth1) = macs.split_once(' ').unwrap_or_default();
    ensure(
        eth0 == "02:00:0a:00:02:02",
        format!("eth0 has MAC {eth0:?}; console:\n{console}"),
    )?;
    ensure(
        u8::from_str_radix(eth1.get(..2).unwrap_or("x"), 16).is_ok_and(|b| b & 3 == 2),
        format!("eth1's MAC {eth1:?} is not a random local unicast one"),
    )?;
    ensure(
        line_value(&console, "ping") == Some("ok"),
        format!("the guest could not ping the host; console:\n{console}\nstderr:\n{stderr}"),
    )?;
    let down = dir.path().join("down.bin");
    fs::write(&down, net_download()).context("write down.bin")?;
    ensure(
        line_value(&console, "down") == Some(sha256(&down)?.as_str()),
        format!("the guest downloaded different bytes; console:\n{console}"),
    )?;
    let sent_sha = fs::read_to_string(upload.with_extension("sha")).unwrap_or_default();
    let received = fs::read(&upload).map(|b| b.len()).unwrap_or(0);
    ensure(
        !sent_sha.is_empty() && sent_sha == sha256(&upload)?,
        format!(
            "the host received different bytes ({received} bytes) than the guest sent \
             (sha256 {sent_sha:?}); console:\n{console}"
        ),
    )?;
    // What the guest negotiated: checksum + TSO4/6 offloads on the tap, mergeable buffers.
    ensure(
        stderr.contains("virtio-net mtap0 (02:00:0a:00:02:02)")
            && stderr.contains("tap offloads 0x7, mergeable receive buffers true"),
        format!("unexpected virtio-net negotiation; stderr:\n{stderr}"),
    )
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
