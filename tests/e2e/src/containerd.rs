//! A private containerd for E2E trials: its own root, state and socket under a scratch directory
//! (its config from [`moat_cli::containerd::private_config`]),
//! `containerd-shim-moat-v2` (and `moat-vmm` next to it) on its PATH, a moat config pointing at the
//! repo's guest images, and a busybox image built locally from busybox-static and imported — no
//! registry involved.
//!
//! One instance is shared by all trials of a run ([`Containerd::shared`]); [`shutdown`] stops it
//! and removes its files (the harness calls it after the last trial).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::{bin_dir, guest_initrd, guest_kernel, run_bounded, Check, Context, Failed};

/// The name the test image is imported under.
pub const IMAGE: &str = "docker.io/library/moat-busybox:e2e";
/// The runtime type containerd resolves to `containerd-shim-moat-v2`.
pub const RUNTIME: &str = "io.containerd.moat.v2";
/// Time limit of one `ctr` call (the software-KVM host is ~30x slower than hardware).
pub const CTR_LIMIT: u32 = 300;

/// A running private containerd.
pub struct Containerd {
    /// Its private root: config, root, state and logs live below it.
    pub dir: PathBuf,
    /// Its gRPC socket (`ctr --address`).
    pub socket: PathBuf,
    /// The moat shim's state directory (`state_dir` of the moat config it uses).
    pub moat_state: PathBuf,
    child: Mutex<Option<Child>>,
}

static SHARED: OnceLock<Result<Containerd, String>> = OnceLock::new();

impl Containerd {
    /// The run's containerd, started (and the test image imported) on first use.
    pub fn shared() -> Result<&'static Containerd, Failed> {
        SHARED
            .get_or_init(|| {
                Self::start()
                    .map_err(|e| e.message().unwrap_or("containerd setup failed").to_owned())
            })
            .as_ref()
            .map_err(|e| Failed::from(e.clone()))
    }

    fn start() -> Result<Containerd, Failed> {
        let dir = std::env::temp_dir().join(format!("moat-e2e-containerd-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).context("create containerd dir")?;
        let socket = dir.join("containerd.sock");
        let moat_state = dir.join("moat");
        let config = moat_cli::containerd::private_config(
            &dir.join("root"),
            &dir.join("state"),
            &socket.to_string_lossy(),
        );
        fs::write(dir.join("containerd.toml"), config).context("write containerd.toml")?;
        let moat_config = format!(
            "kernel = \"{}\"\ninitrd = \"{}\"\nvmm = \"{}\"\nstate_dir = \"{}\"\n\
             memory_mib = 256\nlog_level = \"debug\"\nboot_timeout_secs = 240\n",
            guest_kernel()?.display(),
            guest_initrd()?.display(),
            crate::bin("moat-vmm")?.display(),
            moat_state.display(),
        );
        fs::write(dir.join("moat.toml"), moat_config).context("write moat.toml")?;
        crate::bin("containerd-shim-moat-v2")?;

        let path = format!(
            "{}:{}",
            bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = fs::File::create(dir.join("containerd.log")).context("create containerd.log")?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("containerd.toml"))
            .env("PATH", path)
            .env("MOAT_CONFIG", dir.join("moat.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("dup log")?)
            .stderr(log)
            .spawn()
            .context("start containerd (apt-get install containerd)")?;
        let c = Containerd {
            dir,
            socket,
            moat_state,
            child: Mutex::new(Some(child)),
        };
        c.wait_ready()?;
        c.import_image()?;
        Ok(c)
    }

    fn wait_ready(&self) -> Result<(), Failed> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = run_bounded(self.ctr().arg("version"), 30)?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "containerd did not come up in 120 s; its log:\n{}",
                    fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
                )
                .into());
            }
            // Poll the socket: containerd has no readiness notification for a plain child.
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn import_image(&self) -> Result<(), Failed> {
        let tar = build_busybox_image(&self.dir.join("image"))?;
        let out = run_bounded(self.ctr().args(["image", "import"]).arg(&tar), CTR_LIMIT)?;
        check(&out, "ctr image import")?;
        Ok(())
    }

    /// A `ctr` command aimed at this containerd (namespace `default`).
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.socket);
        cmd
    }

    /// Runs `ctr ARGS` bounded by [`CTR_LIMIT`].
    pub fn run_ctr(&self, args: &[&str]) -> Result<Output, Failed> {
        run_bounded(self.ctr().args(args), CTR_LIMIT)
    }

    /// `ctr run -d --runtime RUNTIME IMAGE id sleep SECS`, checked: a container `id` that runs
    /// (detached) until it is killed or `secs` pass.
    pub fn run_sleeper(&self, id: &str, secs: u32) -> Check {
        let secs = secs.to_string();
        let out = self.run_ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", &secs])?;
        check(&out, "ctr run -d sleep")
    }

    /// The socket of the shim serving pod `id` in namespace `default`:
    /// `/run/containerd/s/<sha256 of "<containerd address>/default/<id>">`.
    pub fn shim_socket(&self, id: &str) -> Result<PathBuf, Failed> {
        let key = format!("{}/default/{id}", self.socket.display());
        let out = Command::new("sh")
            .arg("-c")
            .arg("printf %s \"$1\" | sha256sum")
            .arg("sh")
            .arg(&key)
            .output()
            .context("sha256sum")?;
        check(&out, "sha256sum")?;
        let hash = String::from_utf8_lossy(&out.stdout);
        Ok(Path::new("/run/containerd/s").join(hash.split_whitespace().next().unwrap_or("?")))
    }

    /// containerd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn stop(&self) {
        if let Ok(mut slot) = self.child.lock() {
            if let Some(mut child) = slot.take() {
                let _ = Command::new("kill").arg(child.id().to_string()).status();
                let _ = child.wait();
            }
        }
        // Whatever containerd left mounted below its root (snapshots) goes too.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {0}[^ ]*' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l",
                self.dir.display()
            ))
            .status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Pids of the shim server of pod `id`.
pub fn shim_pids(id: &str) -> Vec<u32> {
    let out = Command::new("pgrep")
        .arg("-f")
        .arg(format!("containerd-shim-moat-v2 .*-id {id}( |$)"))
        .output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    })
    .unwrap_or_default()
}

/// The shim of pod `id`: its mounts (the share, rootfs, volume binds) live in its own mount
/// namespace, seen from the host through `/proc/<pid>/root` and `/proc/<pid>/mountinfo`.
pub fn shim_pid(id: &str) -> Result<u32, Failed> {
    match shim_pids(id).as_slice() {
        [pid] => Ok(*pid),
        other => Err(format!("expected one shim server for {id}, found {other:?}").into()),
    }
}

/// `path` as the process `pid` sees it (through its mount namespace).
pub fn seen_by(pid: u32, path: &Path) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/root{}", path.display()))
}

/// Stops the shared containerd if it was started; with `MOAT_E2E_KEEP=1` it is left running and
/// its directory (logs, pod state) is kept for a look.
pub fn shutdown() {
    if let Some(Ok(c)) = SHARED.get() {
        if std::env::var_os("MOAT_E2E_KEEP").is_some() {
            eprintln!(
                "e2e: containerd kept running, its files in {}",
                c.dir.display()
            );
            return;
        }
        c.stop();
    }
}

/// Fails with the command's output unless it succeeded.
pub fn check(out: &Output, what: &str) -> Result<(), Failed> {
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({})\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into())
    }
}

/// Builds the E2E busybox image (named [`IMAGE`]) under `dir`; see [`moat_cli::image`].
/// Returns the OCI image-layout tarball's path.
pub fn build_busybox_image(dir: &Path) -> Result<PathBuf, Failed> {
    moat_cli::image::build_busybox_image(dir, IMAGE).map_err(|e| Failed::from(e.to_string()))
}
