//! Item 1, boot to agent-ready: moat-vmm against `qemu-system-x86_64 -M microvm` with the same
//! kernel, initramfs, kernel command line, vCPUs and memory, each with a vsock device for the
//! agent. Readiness is the same console line for both: the agent's `serving protocol` log line,
//! printed once its ttrpc server listens on vsock. Also taken from the same boots: the guest
//! kernel's own clock when it starts `/init` (printk timestamp of `Run /init as init process`),
//! and moat-vmm's `boot marker` (VMM start → the agent's first instruction as PID 1).
//! For moat-vmm also the guest RAM touched when the agent is ready (PSS of the VMM's guest
//! mappings) and, from the boot log, the kernel's `Memory: …K/…K available` line.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use moat_e2e::Scratch;

use crate::stats::{list, median, ratio, show};
use crate::Report;

/// Guest shape shared by both VMMs.
pub const VCPUS: u32 = 1;
pub const MEM_MIB: u32 = 256;
/// moat-vmm's built-in command line (vmm/src/config.rs `DEFAULT_CMDLINE`), given to QEMU
/// verbatim so both guests print the same boot log on the same serial console.
pub const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.nokbd";
/// The agent's log line once it serves (agent/src/main.rs).
pub const READY: &str = "serving protocol";
/// The kernel's console line when it starts `/init`.
const INIT_LINE: &str = "Run /init as init process";
/// Upper bound of one boot (the software-KVM host is ~30x slower than hardware).
const BOOT_LIMIT: Duration = Duration::from_secs(240);

/// Errors of one boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{0}")]
    Setup(String),
    #[error("start {what}: {source}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{what}: no `{READY}` line within {secs} s; last console lines:\n{tail}")]
    NotReady {
        what: &'static str,
        secs: u64,
        tail: String,
    },
}

impl From<moat_e2e::Failed> for BootError {
    fn from(f: moat_e2e::Failed) -> Self {
        BootError::Setup(f.message().unwrap_or("setup failed").to_owned())
    }
}

/// Reads one figure of a [`Boot`].
type Field = fn(&Boot) -> Option<f64>;

/// What one boot measured.
#[derive(Debug, Default)]
pub struct Boot {
    /// Launch of the VMM process → the agent's `serving` line on the console.
    pub ready_ms: f64,
    /// Guest kernel clock at `Run /init` (kernel start → init), if printed.
    pub kernel_to_init_ms: Option<f64>,
    /// moat-vmm's boot marker (VMM start → agent's first instruction), moat-vmm only.
    pub marker_ms: Option<f64>,
    /// Launch → the first console line (the kernel's first printk reaching the host).
    pub first_line_ms: Option<f64>,
    /// Launch → the `Run /init` console line, on the host's clock.
    pub init_line_ms: Option<f64>,
    /// Guest RAM the VMM's process tree has touched (PSS, KiB) when the agent is ready.
    pub guest_ram_kib: Option<f64>,
    /// The kernel's `Memory: NK/MK available` figure N (KiB; boots with the boot log only).
    pub mem_available_kib: Option<f64>,
}

/// N of the kernel's boot line `Memory: NK/MK available (… kernel code, …)`: what the kernel
/// leaves to everything else after its image, page tables and reservations.
pub fn mem_available_kib(console: &[String]) -> Option<f64> {
    console.iter().find_map(|l| {
        let rest = l.split("Memory: ").nth(1)?;
        let (avail, tail) = rest.split_once('/')?;
        tail.contains("available")
            .then(|| avail.strip_suffix('K')?.parse().ok())
            .flatten()
    })
}

/// PIDs of `pid` and all its descendants (moat-vmm's jail runs the VMM as a child).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        let children =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        out.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
        i += 1;
    }
    out
}

/// Guest RAM touched (KiB) by the VMM process tree rooted at `pid`; `None` if nothing is
/// readable (e.g. the process already exited).
fn guest_ram_of_tree(pid: u32) -> Option<f64> {
    let kib: Vec<u64> = process_tree(pid)
        .into_iter()
        .filter_map(|p| crate::procmem::guest_ram_pss_kib(p).ok())
        .collect();
    (!kib.is_empty()).then(|| kib.iter().sum::<u64>() as f64)
}

/// The printk timestamp in ms of the first console line containing `needle`
/// (`[    0.412345] Run /init as init process`).
pub fn printk_ms(console: &[String], needle: &str) -> Option<f64> {
    let line = console.iter().find(|l| l.contains(needle))?;
    let inner = line.trim_start().strip_prefix('[')?.split(']').next()?;
    inner.trim().parse::<f64>().ok().map(|s| s * 1000.0)
}

/// The `n` largest gaps between consecutive printk timestamps of a console log, as
/// `(gap ms, the line after the gap)`, largest first: where the kernel's boot time goes.
pub fn largest_gaps(console: &str, n: usize) -> Vec<(f64, String)> {
    let mut prev: Option<f64> = None;
    let mut gaps = Vec::new();
    for line in console.lines() {
        let Some(t) = printk_ms(&[line.to_owned()], "") else {
            continue;
        };
        if let Some(p) = prev {
            gaps.push((t - p, line.trim().to_owned()));
        }
        prev = Some(t);
    }
    gaps.sort_by(|a, b| b.0.total_cmp(&a.0));
    gaps.truncate(n);
    gaps
}

/// `N` of moat-vmm's `boot marker: N ms since moat-vmm start` stderr line.
pub fn marker_ms(stderr: &str) -> Option<f64> {
    stderr.lines().find_map(|l| {
        l.split("boot marker: ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// Runs `cmd` (stdout = guest console), waits for the ready line, then kills it.
fn time_boot(what: &'static str, cmd: &mut Command) -> Result<(Boot, String), BootError> {
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BootError::Spawn { what, source })?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take();
    std::thread::spawn(move || {
        if let Some(out) = stdout {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx
                    .send((Instant::now(), line.trim_end_matches('\r').to_owned()))
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    let stderr = child.stderr.take();
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let deadline = t0 + BOOT_LIMIT;
    let mut console = Vec::new();
    let mut first_line_ms = None;
    let mut init_line_ms = None;
    let since = |at: Instant| at.duration_since(t0).as_secs_f64() * 1000.0;
    let ready_at = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, line)) => {
                let hit = line.contains(READY);
                first_line_ms.get_or_insert(since(at));
                if init_line_ms.is_none() && line.contains(INIT_LINE) {
                    init_line_ms = Some(since(at));
                }
                console.push(line);
                if hit {
                    break Some(at);
                }
            }
            Err(_) => break None,
        }
    };
    // Before stopping it: what the guest touched by the time its agent serves.
    let guest_ram_kib = ready_at.and_then(|_| guest_ram_of_tree(child.id()));
    stop(&mut child);
    let stderr = err_thread.join().unwrap_or_default();
    let Some(ready_at) = ready_at else {
        let tail = console[console.len().saturating_sub(20)..].join("\n");
        return Err(BootError::NotReady {
            what,
            secs: BOOT_LIMIT.as_secs(),
            tail: format!("{tail}\nstderr:\n{stderr}"),
        });
    };
    Ok((
        Boot {
            ready_ms: since(ready_at),
            kernel_to_init_ms: printk_ms(&console, INIT_LINE),
            marker_ms: marker_ms(&stderr),
            first_line_ms,
            init_line_ms,
            guest_ram_kib,
            mem_available_kib: mem_available_kib(&console),
        },
        console.join("\n"),
    ))
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn moat_vmm(kernel: &Path, initrd: &Path, dir: &Path, quiet: bool) -> Result<Command, BootError> {
    Ok(moat_vmm_at(
        &moat_e2e::bin("moat-vmm")?,
        kernel,
        initrd,
        dir,
        quiet,
    ))
}

fn moat_vmm_at(vmm: &Path, kernel: &Path, initrd: &Path, dir: &Path, quiet: bool) -> Command {
    let mut cmd = Command::new(vmm);
    if quiet {
        cmd.args(["--cmdline", "quiet"]);
    }
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args([
            "--vcpus",
            &VCPUS.to_string(),
            "--mem-mib",
            &MEM_MIB.to_string(),
        ])
        .args(["--serial", "stdout", "--vsock-uds"])
        .arg(dir.join("vsock.sock"));
    cmd
}

/// A before/after comparison in the same run: `MOAT_BENCH_BASELINE_VMM` (a moat-vmm binary),
/// `MOAT_BENCH_BASELINE_KERNEL` (a `vmlinux`) and/or `MOAT_BENCH_BASELINE_INITRD` (an
/// initramfs) name the "before" (what is not named is this build's); each repetition then also
/// boots it with `quiet`, next to the current build's quiet boot, and once with the boot log
/// (kernel clock at `/init`, the kernel's `Memory:` line), next to the current build's.
struct Baseline {
    vmm: std::path::PathBuf,
    kernel: std::path::PathBuf,
    initrd: std::path::PathBuf,
}

impl Baseline {
    fn from_env(
        current_kernel: &Path,
        current_initrd: &Path,
        images: &Path,
    ) -> Result<Option<Self>, BootError> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let vmm = var("MOAT_BENCH_BASELINE_VMM");
        let kernel = var("MOAT_BENCH_BASELINE_KERNEL");
        let initrd = var("MOAT_BENCH_BASELINE_INITRD");
        if vmm.is_none() && kernel.is_none() && initrd.is_none() {
            return Ok(None);
        }
        let vmm = match vmm {
            Some(v) => v.into(),
            None => moat_e2e::bin("moat-vmm")?,
        };
        if !vmm.is_file() {
            return Err(BootError::Setup(format!(
                "MOAT_BENCH_BASELINE_VMM: {} is not a file",
                vmm.display()
            )));
        }
        // Private copies, as for the current images.
        let copy = |src: Option<std::ffi::OsString>, name: &str, current: &Path| match src {
            Some(src) => {
                let dst = images.join(name);
                std::fs::copy(&src, &dst).map(|_| dst).map_err(|e| {
                    BootError::Setup(format!("copy {}: {e}", Path::new(&src).display()))
                })
            }
            None => Ok(current.to_owned()),
        };
        Ok(Some(Baseline {
            vmm,
            kernel: copy(kernel, "baseline-vmlinux", current_kernel)?,
            initrd: copy(initrd, "baseline-initramfs", current_initrd)?,
        }))
    }
}

fn qemu_microvm(kernel: &Path, initrd: &Path, cid: u32, quiet: bool) -> Command {
    let append = if quiet {
        format!("{CMDLINE} quiet")
    } else {
        CMDLINE.to_owned()
    };
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm", "-enable-kvm", "-cpu", "host"])
        .args(["-smp", &VCPUS.to_string(), "-m", &MEM_MIB.to_string()])
        .args(["-nodefaults", "-no-reboot", "-no-user-config"])
        .args(["-display", "none", "-nic", "none", "-serial", "stdio"])
        .args(["-device", &format!("vhost-vsock-device,guest-cid={cid}")])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append]);
    cmd
}

/// Runs `reps` boots of each VMM, alternating, and adds the section to the report.
pub fn run(reps: usize, report: &mut Report) -> Result<(), BootError> {
    // Private copies: both VMMs boot the very same bytes even if the images are rebuilt meanwhile.
    let images = Scratch::new("bench-images")?;
    let copy = |src: std::path::PathBuf, name: &str| {
        let dst = images.path().join(name);
        std::fs::copy(&src, &dst)
            .map(|_| dst)
            .map_err(|e| BootError::Setup(format!("copy {}: {e}", src.display())))
    };
    let kernel = copy(moat_e2e::guest_kernel()?, "vmlinux")?;
    let initrd = copy(moat_e2e::guest_initrd()?, "initramfs.cpio")?;
    let baseline = Baseline::from_env(&kernel, &initrd, images.path())?;
    let mut before = Vec::new();
    let mut before_log = Vec::new();
    let mut moat = Vec::new();
    let mut qemu = Vec::new();
    let mut quiet = Vec::new();
    let mut qemu_quiet = Vec::new();
    for i in 0..reps {
        let scratch = Scratch::new("bench-boot")?;
        let (b, console) = time_boot(
            "moat-vmm",
            &mut moat_vmm(&kernel, &initrd, scratch.path(), false)?,
        )?;
        if i == 0 {
            let gaps: Vec<String> = largest_gaps(&console, 6)
                .into_iter()
                .map(|(ms, line)| format!("  +{ms:.0} ms before {line}"))
                .collect();
            report.raw(format!(
                "moat-vmm boot 0: largest gaps in the kernel log ({} console bytes):\n{}",
                console.len(),
                gaps.join("\n")
            ));
            report.keep("moat-vmm console (first boot)", &console);
        }
        eprintln!("bench: boot {i}: moat-vmm {b:?}");
        moat.push(b);
        // A fresh CID per boot: vhost-vsock releases a CID asynchronously after QEMU exits.
        let (b, console) = time_boot(
            "qemu microvm",
            &mut qemu_microvm(&kernel, &initrd, 100 + 2 * i as u32, false),
        )?;
        if i == 0 {
            report.keep("qemu microvm console (first boot)", &console);
        }
        eprintln!("bench: boot {i}: qemu microvm {b:?}");
        qemu.push(b);
        // The same moat-vmm boot without the kernel's boot log on the emulated UART.
        let scratch = Scratch::new("bench-boot")?;
        let (b, _) = time_boot(
            "moat-vmm quiet",
            &mut moat_vmm(&kernel, &initrd, scratch.path(), true)?,
        )?;
        eprintln!("bench: boot {i}: moat-vmm quiet {b:?}");
        quiet.push(b);
        let (b, _) = time_boot(
            "qemu microvm quiet",
            &mut qemu_microvm(&kernel, &initrd, 101 + 2 * i as u32, true),
        )?;
        eprintln!("bench: boot {i}: qemu microvm quiet {b:?}");
        qemu_quiet.push(b);
        if let Some(base) = &baseline {
            let scratch = Scratch::new("bench-boot")?;
            let (b, _) = time_boot(
                "baseline moat-vmm quiet",
                &mut moat_vmm_at(&base.vmm, &base.kernel, &base.initrd, scratch.path(), true),
            )?;
            eprintln!("bench: boot {i}: baseline moat-vmm quiet {b:?}");
            before.push(b);
            let scratch = Scratch::new("bench-boot")?;
            let (b, _) = time_boot(
                "baseline moat-vmm",
                &mut moat_vmm_at(&base.vmm, &base.kernel, &base.initrd, scratch.path(), false),
            )?;
            eprintln!("bench: boot {i}: baseline moat-vmm {b:?}");
            before_log.push(b);
        }
    }
    let col = |v: &[Boot], f: Field| v.iter().filter_map(f).collect::<Vec<_>>();
    let m_ready = col(&moat, |b| Some(b.ready_ms));
    let q_ready = col(&qemu, |b| Some(b.ready_ms));
    let (mr, qr) = (median(&m_ready), median(&q_ready));
    report.section("1. Boot to agent-ready (console line `serving protocol`)");
    report.row(
        "launch → agent ready",
        &show(mr, "ms"),
        &show(qr, "ms"),
        &ratio(mr, qr),
        "≤ 0.50×",
    );
    let rows: [(&str, Field); 5] = [
        (
            "launch → first console line (VMM setup + kernel start before its console)",
            |b| b.first_line_ms,
        ),
        ("launch → `Run /init` console line (host clock)", |b| {
            b.init_line_ms
        }),
        ("kernel clock at `Run /init` (kernel → init)", |b| {
            b.kernel_to_init_ms
        }),
        (
            "`Run /init` line → agent ready (init → agent serving)",
            |b| b.init_line_ms.map(|i| b.ready_ms - i),
        ),
        (
            "VMM start → boot marker (agent's first instruction)",
            |b| b.marker_ms,
        ),
    ];
    let mut raw = format!(
        "boot raw (ms): ready moat {} qemu {}",
        list(&m_ready),
        list(&q_ready)
    );
    for (name, f) in rows {
        let (m, q) = (col(&moat, f), col(&qemu, f));
        let (mm, qm) = (median(&m), median(&q));
        let peer = if q.is_empty() {
            "—".to_owned()
        } else {
            show(qm, "ms")
        };
        report.row(name, &show(mm, "ms"), &peer, &ratio(mm, qm), "");
        let _ = write!(raw, "; {name}: moat {} qemu {}", list(&m), list(&q));
    }
    let mq_ready = col(&quiet, |b| Some(b.ready_ms));
    let qq_ready = col(&qemu_quiet, |b| Some(b.ready_ms));
    let (mq, qq) = (median(&mq_ready), median(&qq_ready));
    report.row(
        "launch → agent ready, both with `quiet` (no kernel log on the UART)",
        &show(mq, "ms"),
        &show(qq, "ms"),
        &ratio(mq, qq),
        "≤ 0.50×",
    );
    report.row(
        "moat-vmm: VMM start → boot marker with `quiet`",
        &show(median(&col(&quiet, |b| b.marker_ms)), "ms"),
        "—",
        "",
        "",
    );
    let _ = write!(
        raw,
        "; quiet ready moat {} qemu {}",
        list(&mq_ready),
        list(&qq_ready)
    );
    let mq_ram = col(&quiet, |b| b.guest_ram_kib.map(|k| k / 1024.0));
    let q_ram = col(&qemu_quiet, |b| b.guest_ram_kib.map(|k| k / 1024.0));
    report.row(
        "guest RAM touched at agent-ready, with `quiet` (PSS of the VMM's guest mappings)",
        &show(median(&mq_ram), "MiB"),
        &show(median(&q_ram), "MiB"),
        &ratio(median(&mq_ram), median(&q_ram)),
        "",
    );
    let m_avail = col(&moat, |b| b.mem_available_kib);
    let _ = write!(
        raw,
        "; guest RAM KiB moat {} moat quiet {} qemu quiet {}; kernel `Memory:` available KiB {}",
        list(&col(&moat, |b| b.guest_ram_kib)),
        list(&col(&quiet, |b| b.guest_ram_kib)),
        list(&col(&qemu_quiet, |b| b.guest_ram_kib)),
        list(&m_avail)
    );
    if let Some(base) = &baseline {
        let b_ready = col(&before, |b| Some(b.ready_ms));
        let bm = median(&b_ready);
        let what = format!(
            "this build vs the baseline ({}, {}, {})",
            base.vmm.display(),
            base.kernel.display(),
            base.initrd.display()
        );
        report.row(
            &format!("before/after: launch → agent ready with `quiet`, {what}"),
            &show(mq, "ms"),
            &show(bm, "ms"),
            &ratio(mq, bm),
            "",
        );
        let after_log: [(&str, Field, &str); 3] = [
            (
                "kernel clock at `Run /init`, boot log on",
                |b| b.kernel_to_init_ms,
                "ms",
            ),
            (
                "launch → agent ready, boot log on",
                |b| Some(b.ready_ms),
                "ms",
            ),
            (
                "kernel `Memory:` available",
                |b| b.mem_available_kib.map(|k| k / 1024.0),
                "MiB",
            ),
        ];
        for (name, f, unit) in after_log {
            let (a, b) = (col(&moat, f), col(&before_log, f));
            let (am, bm) = (median(&a), median(&b));
            report.row(
                &format!("before/after: {name}"),
                &show(am, unit),
                &show(bm, unit),
                &ratio(am, bm),
                "",
            );
            let _ = write!(raw, "; {name}: this {} baseline {}", list(&a), list(&b));
        }
        let b_ram = col(&before, |b| b.guest_ram_kib.map(|k| k / 1024.0));
        report.row(
            "before/after: guest RAM touched at agent-ready with `quiet`",
            &show(median(&mq_ram), "MiB"),
            &show(median(&b_ram), "MiB"),
            &ratio(median(&mq_ram), median(&b_ram)),
            "",
        );
        let _ = write!(
            raw,
            "; quiet ready baseline {}; guest RAM KiB quiet baseline {}",
            list(&b_ready),
            list(&col(&before, |b| b.guest_ram_kib))
        );
    }
    report.raw(raw);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_printk_timestamp_and_marker() {
        let console = vec![
            "[    0.000000] Linux version 6.1".to_owned(),
            "[    1.234500] Run /init as init process".to_owned(),
        ];
        assert_eq!(printk_ms(&console, "Run /init"), Some(1234.5));
        assert_eq!(printk_ms(&console, "absent"), None);
        assert_eq!(
            printk_ms(&["no stamp Run /init".to_owned()], "Run /init"),
            None
        );
        assert_eq!(
            marker_ms("x\nboot marker: 812 ms since moat-vmm start\n"),
            Some(812.0)
        );
        assert_eq!(marker_ms("nothing"), None);
    }

    #[test]
    fn parses_the_kernels_memory_line() {
        let console = vec![
            "[    0.010000] Memory: 224744K/261624K available (10240K kernel code, 2048K rwdata, 36624K reserved)".to_owned(),
        ];
        assert_eq!(mem_available_kib(&console), Some(224744.0));
        assert_eq!(mem_available_kib(&["Memory: lots".to_owned()]), None);
        assert_eq!(mem_available_kib(&[]), None);
    }

    #[test]
    fn largest_gaps_first() {
        let console = "[    0.100000] a\nnot a kernel line\n[    0.150000] b\n[    1.150000] c\n";
        let gaps = largest_gaps(console, 1);
        assert_eq!(gaps.len(), 1);
        assert!((gaps[0].0 - 1000.0).abs() < 1e-6, "{gaps:?}");
        assert!(gaps[0].1.ends_with("] c"));
        assert!(largest_gaps("", 3).is_empty());
    }
}
