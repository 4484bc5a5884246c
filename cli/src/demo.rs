//! `moat demo`: runs one container in a moat microVM through containerd and prints its output,
//! the last step of `scripts/setup` and the quickest proof that an installed moat works.
//!
//! It uses the containerd answering on `--address` (default the system one); when none answers
//! it starts a private `containerd` for the duration of the demo (its own root, state and
//! socket in a scratch directory, the CRI plugin off, so the system's containerd data is never
//! touched; see [`moat_cli::containerd`]) and stops it afterwards. The image is a local busybox
//! (see [`moat_cli::image`]) imported into the containerd namespace `moat-demo`, so nothing is
//! pulled and the default namespace is untouched.
//! The container is run with `ctr run --rm --runtime io.containerd.moat.v2`, i.e. through the
//! installed `containerd-shim-moat-v2` and `/etc/moat/config.toml`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use moat_cli::containerd::private_config;
use moat_cli::image::{build_busybox_image, ImageError};

/// containerd's default socket.
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
/// containerd namespace the demo works in.
const NAMESPACE: &str = "moat-demo";
/// The demo image's name.
const IMAGE: &str = "docker.io/moat/demo-busybox:latest";
/// What the container runs: a greeting and proof that it is another kernel.
const SCRIPT: &str = "echo 'Hello from a moat microVM!'; \
    echo \"guest kernel: $(uname -r), $(nproc) vCPU, $(sed -n 's/^MemTotal: *//p' /proc/meminfo) RAM\"";
/// How long containerd may take to answer after being started.
const CONTAINERD_START: Duration = Duration::from_secs(60);

/// Errors of the demo, each naming the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot run {what} (is it installed? scripts/deps installs containerd): {source}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the demo's containerd did not answer on {address} ({why}); its log:\n{log}")]
    ContainerdStart {
        address: String,
        why: String,
        log: String,
    },
    #[error("{0}")]
    Image(#[from] ImageError),
    #[error("demo scratch directory {path}: {source}")]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`ctr {step}` failed ({status}): {stderr}")]
    Ctr {
        step: String,
        status: ExitStatus,
        stderr: String,
    },
}

/// A containerd the demo started itself, stopped (SIGTERM, then waited for) when dropped.
struct OwnContainerd {
    child: Child,
}

impl Drop for OwnContainerd {
    fn drop(&mut self) {
        // Only a child that has not been waited for yet: its pid is still ours.
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                // SAFETY: kill(2) on our own unreaped child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let _ = self.child.wait();
        }
    }
}

/// Runs the demo against the containerd at `address`; returns the container's exit status.
pub fn run(address: &str) -> Result<ExitStatus, DemoError> {
    let scratch = std::env::temp_dir().join(format!("moat-demo-{}", std::process::id()));
    let result = run_in(address, &scratch);
    let _ = fs::remove_dir_all(&scratch);
    result
}

fn run_in(address: &str, scratch: &Path) -> Result<ExitStatus, DemoError> {
    fs::create_dir_all(scratch).map_err(|source| DemoError::Scratch {
        path: scratch.to_owned(),
        source,
    })?;
    let private = scratch
        .join("containerd.sock")
        .to_string_lossy()
        .into_owned();
    let (_own, address) = if ctr_answers(address) {
        println!("demo: using the containerd at {address}");
        (None, address)
    } else {
        println!("demo: no containerd answers at {address}; starting a private one for the demo");
        (Some(start_containerd(&private, scratch)?), private.as_str())
    };

    if ctr_output(address, &["image", "ls", "-q"])?
        .lines()
        .any(|l| l.trim() == IMAGE)
    {
        println!("demo: image {IMAGE} already imported");
    } else {
        println!("demo: building {IMAGE} from {}", moat_cli::image::BUSYBOX);
        let tar = build_busybox_image(&scratch.join("image"), IMAGE)?;
        ctr_output(address, &["image", "import", &tar.to_string_lossy()])?;
    }

    let id = format!("moat-demo-{}", std::process::id());
    println!("demo: ctr run --rm --runtime io.containerd.moat.v2 {IMAGE} {id} sh -c …");
    let started = Instant::now();
    let status = ctr(address)
        .args([
            "run",
            "--rm",
            "--runtime",
            "io.containerd.moat.v2",
            IMAGE,
            &id,
        ])
        .args(["sh", "-c", SCRIPT])
        .stdin(Stdio::null())
        .status()
        .map_err(|source| DemoError::Spawn {
            what: "ctr",
            source,
        })?;
    let host = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "demo: host kernel: {}; the container ran in its own microVM ({:.1} s, {status})",
        host.trim(),
        started.elapsed().as_secs_f64()
    );
    if !status.success() {
        println!(
            "demo: the container failed; `moat check` tells whether this host can run moat pods, \
             and the shim's log is in containerd's log (see docs/shim.md, Troubleshooting)"
        );
    }
    Ok(status)
}

fn ctr(address: &str) -> Command {
    let mut cmd = Command::new("ctr");
    cmd.args(["--address", address, "--namespace", NAMESPACE]);
    cmd
}

fn ctr_answers(address: &str) -> bool {
    Path::new(address).exists()
        && ctr(address)
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

fn ctr_output(address: &str, args: &[&str]) -> Result<String, DemoError> {
    let out = ctr(address)
        .args(args)
        .output()
        .map_err(|source| DemoError::Spawn {
            what: "ctr",
            source,
        })?;
    if !out.status.success() {
        return Err(DemoError::Ctr {
            step: args.join(" "),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn start_containerd(address: &str, scratch: &Path) -> Result<OwnContainerd, DemoError> {
    let scratch_err = |path: &Path| {
        let path = path.to_owned();
        move |source| DemoError::Scratch { path, source }
    };
    let config_path = scratch.join("containerd.toml");
    let config = private_config(&scratch.join("root"), &scratch.join("state"), address);
    fs::write(&config_path, config).map_err(scratch_err(&config_path))?;
    let log_path = scratch.join("containerd.log");
    let log = fs::File::create(&log_path).map_err(scratch_err(&log_path))?;
    let log_err = log.try_clone().map_err(scratch_err(&log_path))?;
    let child = Command::new("containerd")
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|source| DemoError::Spawn {
            what: "containerd",
            source,
        })?;
    let mut own = OwnContainerd { child };
    let deadline = Instant::now() + CONTAINERD_START;
    let failed = |why: String| {
        let mut text = String::new();
        let _ = fs::File::open(&log_path).and_then(|mut f| f.read_to_string(&mut text));
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        DemoError::ContainerdStart {
            address: address.to_owned(),
            why,
            log: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        }
    };
    // containerd has no readiness notification for a plain child: poll its API.
    while !ctr_answers(address) {
        if let Ok(Some(status)) = own.child.try_wait() {
            return Err(failed(format!("containerd exited: {status}")));
        }
        if Instant::now() > deadline {
            return Err(failed(format!(
                "no answer within {} s",
                CONTAINERD_START.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(own)
}
