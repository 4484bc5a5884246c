//! What the crates' host tests share: reporting a test that cannot run on this machine as
//! **skipped** (so that the closing `N passed, N failed, N skipped` line of `scripts/test` never
//! counts it as passed), a busybox-static rootfs for real containers, starting a real
//! `moat-agent` on the host, and scratch directories ([`TempDir`]).
//!
//! libtest has no way for a running test to say "skipped": a test that returns early passes. So a
//! test that cannot run calls [`skip`] and returns; `scripts/test` names a file in
//! `MOAT_TEST_SKIP_LOG`, [`skip`] appends the test's name to it, and the summary moves each named
//! test from passed to skipped.

use std::fmt::Display;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{ChildStderr, Command};

/// The environment variable naming the file skipped tests are recorded in.
pub const SKIP_LOG_ENV: &str = "MOAT_TEST_SKIP_LOG";

/// Reports the calling test as skipped for `reason`: prints `skipped: REASON` and, when
/// [`SKIP_LOG_ENV`] names a file, appends `TEST-NAME<TAB>REASON` to it. The caller returns right
/// after.
pub fn skip(reason: impl Display) {
    let name = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_owned();
    eprintln!("skipped: {reason}");
    let Some(path) = std::env::var_os(SKIP_LOG_ENV) else {
        return;
    };
    let line = format!("{name}\t{}\n", reason.to_string().replace('\n', " "));
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        // The summary would count this test as passed: make that impossible to miss.
        panic!(
            "cannot record the skip of {name} in {}: {e}",
            path.to_string_lossy()
        );
    }
}

/// The log line with which `moat-agent` says it serves.
pub const AGENT_SERVING: &str = "serving protocol";

/// Builds a busybox-static rootfs (`/bin/busybox`, from Debian's busybox-static) at
/// `dir/rootfs` and returns its path: every applet linked in `/bin`, the usual mount points, and
/// `/etc/passwd` with root and nobody.
///
/// # Panics
/// When busybox-static is missing or the directory cannot be written (test set-up).
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).expect("create the rootfs directories");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static installed at /bin/busybox");
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            symlink("busybox", root.join("bin").join(applet)).expect("link a busybox applet");
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
    )
    .expect("write /etc/passwd");
    root
}

/// The `moat-agent` binary for tests of crates other than the agent's: `MOAT_AGENT_BIN`, else
/// `moat-agent` in the calling test's target profile directory (`<target>/<profile>/deps/<test>`
/// runs; `cargo build --workspace`, which scripts/test runs, puts it there).
///
/// # Panics
/// When the binary is missing, naming how to build it.
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MOAT_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary below <target>/<profile>/deps")
        .join("moat-agent");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p moat-agent; scripts/test does) or set \
         MOAT_AGENT_BIN",
        bin.display()
    );
    bin
}

/// Reads an agent's log (its standard error) until it says it serves ([`AGENT_SERVING`]),
/// echoing every line, then keeps echoing the rest on a thread. Returns false when the log
/// ended first (the agent exited before serving).
pub fn wait_serving(stderr: ChildStderr) -> bool {
    let mut lines = BufReader::new(stderr).lines();
    let mut serving = false;
    for line in lines.by_ref() {
        let Ok(line) = line else { break };
        eprintln!("{line}");
        if line.contains(AGENT_SERVING) {
            serving = true;
            break;
        }
    }
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            eprintln!("{l}");
        }
    });
    serving
}

/// A scratch directory `$TMPDIR/moat-TAG-PID-N` (made empty, unique within the process),
/// removed with everything in it on drop. The path is the public field.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Makes the directory for `tag` (a word naming the test or module).
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("moat-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)
            .unwrap_or_else(|e| panic!("cannot make scratch directory {}: {e}", p.display()));
        TempDir(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_is_recorded_under_the_test_name() {
        let dir = std::env::temp_dir().join(format!("moat-skip-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips");
        // The variable is read by this thread only; the other test in this binary does not skip.
        std::env::set_var(SKIP_LOG_ENV, &log);
        skip("needs\na thing");
        std::env::remove_var(SKIP_LOG_ENV);
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            text,
            "tests::a_skip_is_recorded_under_the_test_name\tneeds a thing\n"
        );
    }

    #[test]
    fn serving_is_seen_and_an_early_exit_is_not() {
        let spawn = |script: &str| {
            std::process::Command::new("/bin/sh")
                .args(["-c", script])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut ok =
            spawn("echo starting >&2; echo 'agent: serving protocol 1' >&2; echo after >&2");
        assert!(wait_serving(ok.stderr.take().unwrap()));
        ok.wait().unwrap();
        let mut early = spawn("echo 'cannot bind' >&2; exit 1");
        assert!(!wait_serving(early.stderr.take().unwrap()));
        early.wait().unwrap();
    }
}
