//! `moat-e2e`: what end-to-end tests share — where the repo's binaries and guest images are, whether
//! this process runs on a real KVM, and small helpers to turn checks into named trials.
//!
//! The trials themselves live in the `e2e` test target (`src/main.rs` and one module per area).
//! They run on a host with a real KVM: `tests/kvm-host/run` provides one (directly on hardware KVM,
//! or by booting a software-KVM host) and sets `MOAT_KVM_HOST` for the command it runs.

use std::env;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

pub use libtest_mimic::{Failed, Trial};

pub mod containerd;
pub mod netns;

/// What a check returns: `Ok(())`, or a message saying what went wrong.
pub type Check = Result<(), Failed>;

/// Makes a named trial from a check.
pub fn trial(name: &str, check: impl FnOnce() -> Check + Send + 'static) -> Trial {
    Trial::test(name, check)
}

/// Fails the check with a message unless `cond` holds.
pub fn ensure(cond: bool, msg: impl fmt::Display) -> Check {
    if cond {
        Ok(())
    } else {
        Err(msg.to_string().into())
    }
}

/// Converts any displayable error into a check failure with context.
pub trait Context<T> {
    /// Turns an error into a [`Failed`] whose message starts with `what`.
    fn context(self, what: impl fmt::Display) -> Result<T, Failed>;
}

impl<T, E: fmt::Display> Context<T> for Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T, Failed> {
        self.map_err(|e| format!("{what}: {e}").into())
    }
}

/// The kind of KVM host this process runs on, from `tests/kvm-host/run`:
/// `Some("software")` inside the software-KVM host, `Some("direct")` on hardware KVM, `None` when
/// not started through it.
pub fn kvm_host() -> Option<String> {
    env::var("MOAT_KVM_HOST").ok().filter(|v| !v.is_empty())
}

/// The workspace root (the repository checkout).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The directory with the workspace's host binaries (`moat-vmm`, `containerd-shim-moat-v2`, …):
/// `MOAT_BIN_DIR` if set, otherwise the profile directory this test binary was built into.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = env::var_os("MOAT_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/e2e-<hash> → target/<profile>
    env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| workspace_root().join("target/debug"))
}

/// The path of a workspace binary, or a failure that says how to build it.
pub fn bin(name: &str) -> Result<PathBuf, Failed> {
    let path = bin_dir().join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found: build it first (`cargo build --workspace`)",
            path.display()
        )
        .into())
    }
}

fn guest_artifact(var: &str, file: &str) -> Result<PathBuf, Failed> {
    let path = env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/guest").join(file));
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "guest image {} not found: run guest-kernel-config/build (or set {var})",
            path.display()
        )
        .into())
    }
}

/// The guest kernel (`MOAT_GUEST_KERNEL` or `target/guest/vmlinux`).
pub fn guest_kernel() -> Result<PathBuf, Failed> {
    guest_artifact("MOAT_GUEST_KERNEL", "vmlinux")
}

/// The guest initramfs with the agent as `/init` (`MOAT_GUEST_INITRD` or
/// `target/guest/initramfs.cpio`).
pub fn guest_initrd() -> Result<PathBuf, Failed> {
    guest_artifact("MOAT_GUEST_INITRD", "initramfs.cpio")
}

/// A fresh directory for one trial, removed (with everything in it) when dropped.
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// Creates `$TMPDIR/moat-e2e-LABEL-PID-SEQ`.
    pub fn new(label: &str) -> Result<Self, Failed> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let path = env::temp_dir().join(format!(
            "moat-e2e-{label}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).context(format!("create {}", path.display()))?;
        Ok(Self { path })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Runs `cmd` under coreutils `timeout` (killed after `secs`), returning its output. A time-out
/// is a failure that says so, never a hang.
pub fn run_bounded(cmd: &mut Command, secs: u32) -> Result<Output, Failed> {
    let shown = format!("{cmd:?}");
    let mut bounded = Command::new("timeout");
    bounded
        .arg("-k")
        .arg("5")
        .arg(secs.to_string())
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => bounded.env(k, v),
            None => bounded.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        bounded.current_dir(dir);
    }
    let out = bounded.output().context(format!("run {shown}"))?;
    if out.status.code() == Some(124) {
        return Err(format!(
            "{shown} timed out after {secs} s\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(out)
}
