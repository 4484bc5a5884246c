//! E2E trials of moat-agent as PID 1 of a moat-vmm microVM: the agent's own
//! integration suite (`agent/tests/agent_host.rs`) runs in remote mode
//! against the guest over the VMM's hybrid vsock socket, with the container
//! rootfs shared by virtio-fs. That covers, inside the guest, create/start,
//! output and exit codes, exec, signals, stdin, tty + resize, seccomp,
//! users and capabilities, hostile specs, pause/resume, and the cgroup v2
//! limits (memory limit → OOM kill + OOM event, pids limit, stats that move,
//! UpdateContainer). A second run asks DestroySandbox to power the VM off
//! and checks that the VMM then exits cleanly.
//!
//! The suite binary is `agent_host-<hash>` in this profile's `deps/`
//! directory, built by `cargo test -p moat-agent --no-run` (or any
//! `cargo test --workspace`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use moat_e2e::{
    bin, bin_dir, ensure, guest_initrd, guest_kernel, run_bounded, trial, Check, Context, Failed,
    Scratch, Trial,
};

/// Upper bound for the guest to boot to a serving agent (software KVM is ~30x slower).
const BOOT_LIMIT: Duration = Duration::from_secs(240);
/// Upper bound for the whole suite inside the guest.
const SUITE_LIMIT: u32 = 1200;

pub fn trials() -> Vec<Trial> {
    vec![trial(
        "agent::suite_in_guest_over_vsock_then_power_off",
        suite_in_guest,
    )]
}

/// The newest `agent_host-*` test executable next to this binary.
fn suite_binary() -> Result<PathBuf, Failed> {
    let deps = bin_dir().join("deps");
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&deps)
        .context(format!("read {}", deps.display()))?
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("agent_host-") && !name.contains('.')
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).ok_or_else(|| {
        format!(
            "no agent_host-* test binary in {}: run `cargo test -p moat-agent --no-run` first",
            deps.display()
        )
        .into()
    })
}

/// A microVM whose serial console is read line by line.
struct Vm {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    console: Vec<String>,
}

impl Vm {
    fn boot(dir: &Path, share: &Path) -> Result<Self, Failed> {
        let mut child = Command::new(bin("moat-vmm")?)
            .arg("--kernel")
            .arg(guest_kernel()?)
            .arg("--initrd")
            .arg(guest_initrd()?)
            .args(["--mem-mib", "512", "--vcpus", "2", "--serial", "stdout"])
            .arg("--vsock-uds")
            .arg(dir.join("vsock.sock"))
            .arg("--fs")
            .arg(format!("rootfs={}", share.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn moat-vmm")?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line.trim_end_matches('\r').to_owned()).is_err() {
                    return;
                }
            }
        });
        let mut vm = Self {
            child: Some(child),
            lines,
            console: Vec::new(),
        };
        vm.wait_for("serving protocol")?;
        Ok(vm)
    }

    fn wait_for(&mut self, needle: &str) -> Check {
        let deadline = std::time::Instant::now() + BOOT_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.console.push(line);
                    if hit {
                        return Ok(());
                    }
                }
                Err(_) => {
                    return Err(format!(
                        "no console line with {needle:?}; console:\n{}",
                        self.console.join("\n")
                    )
                    .into())
                }
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn run_suite(dir: &Path, share: &Path, power_off: bool) -> Result<String, Failed> {
    let mut cmd = Command::new(suite_binary()?);
    cmd.args(["--test-threads", "1", "--nocapture"])
        .env(
            "MOAT_AGENT_TEST_ADDR",
            format!("hvsock://{}:1024", dir.join("vsock.sock").display()),
        )
        .env("MOAT_AGENT_TEST_ROOTFS_TAG", "rootfs")
        .env("MOAT_AGENT_TEST_ROOTFS_DIR", share);
    if power_off {
        cmd.args(["--exact", "remote_power_off"])
            .env("MOAT_AGENT_TEST_POWER_OFF", "1");
    }
    let out = run_bounded(&mut cmd, SUITE_LIMIT)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure(
        out.status.success(),
        format!("agent suite failed ({}):\n{text}", out.status),
    )?;
    Ok(text)
}

fn suite_in_guest() -> Check {
    let dir = Scratch::new("agent")?;
    let share = dir.path().join("share");
    std::fs::create_dir_all(&share).context("create the virtio-fs share")?;
    let mut vm = Vm::boot(dir.path(), &share)?;

    let text = run_suite(dir.path(), &share, false)?;
    ensure(
        text.contains("test result: ok.") && !text.contains("0 passed"),
        format!("no passing result line:\n{text}"),
    )?;
    ensure(
        !text.contains("skipped: cgroup v2 controllers"),
        format!("the guest lacks cgroup controllers, limits went untested:\n{text}"),
    )?;

    let text = run_suite(dir.path(), &share, true)?;
    ensure(
        !text.contains("skipped"),
        format!("power-off test skipped:\n{text}"),
    )?;
    let (tx, rx) = mpsc::channel();
    let mut child = vm.child.take().ok_or("moat-vmm already reaped")?;
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(BOOT_LIMIT) {
        Ok(r) => r.context("wait for moat-vmm")?,
        Err(_) => {
            // SAFETY: killing the VMM we started, not yet reaped (its waiter thread holds it).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            return Err(
                format!("moat-vmm (pid {pid}) still runs after the power-off request").into(),
            );
        }
    };
    ensure(
        status.success(),
        format!("moat-vmm exited with {status} after power-off"),
    )
}
