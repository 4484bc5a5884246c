//! Fault and hostile-input trials of the shim, driven by the shared private containerd and `ctr`:
//! a VMM or shim killed under a running container, a guest kernel panic, many create/delete
//! cycles, and bad input at the shim (unknown ids, bad mounts, broken moat configs, absurd
//! resources, oversize stdin). Each one checks that containerd is told what happened and that
//! nothing is left behind: no shim, no moat-vmm, no mount, no shim socket, no state directory.
//!
//! The trials of this module run one at a time (they take [`SERIAL`]) so the before/after counts of
//! the cycle trial see only their own work.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use moat_e2e::containerd::{check, shim_pids, Containerd, CTR_LIMIT, IMAGE, RUNTIME};
use moat_e2e::{ensure, trial, Check, Context, Failed, Scratch, Trial};

/// Cycles of the leak trial unless `MOAT_E2E_CYCLES` says otherwise (each costs one VM boot:
/// 10-40 s in the software-KVM host, depending on the load of the machine).
const DEFAULT_CYCLES: usize = 5;
/// containerd fds that may come and go between two quiet moments (gRPC connections of `ctr`).
const FD_SLACK: usize = 8;
/// How long a cleanup that happens in the background (shim exit, dead-shim cleanup) may take.
const SETTLE_SECS: u64 = 60;

static SERIAL: Mutex<()> = Mutex::new(());

/// Serializes trials that count processes and mounts (also taken by `escape`).
pub(crate) fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "faults::vmm_killed_reports_exit_and_leaves_nothing",
            vmm_killed,
        ),
        trial("faults::shim_killed_is_cleaned_up_by_delete", shim_killed),
        trial("faults::guest_panic_reports_exit", guest_panic),
        trial("faults::create_delete_cycles_leak_nothing", cycles),
        trial("faults::unknown_and_duplicate_ids", unknown_ids),
        trial(
            "faults::mount_destination_traversal_is_rejected",
            mount_traversal,
        ),
        trial(
            "faults::bind_source_symlink_is_resolved_on_the_host",
            bind_symlink,
        ),
        trial("faults::broken_moat_config_is_a_clear_error", broken_config),
        trial("faults::one_byte_memory_limit", tiny_memory),
        trial("faults::oversize_stdin", oversize_stdin),
    ]
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).replace('\r', "")
}

fn both(out: &Output) -> String {
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

/// The pod state directory of a single-container pod.
fn state_of(c: &Containerd, id: &str) -> PathBuf {
    c.moat_state.join("default").join(id)
}

/// containerd's bundle directory of a task (its rootfs mount lives there).
fn bundle_of(c: &Containerd, id: &str) -> PathBuf {
    c.dir
        .join("state/io.containerd.runtime.v2.task/default")
        .join(id)
}

/// Polls `cond` every 100 ms for up to `secs`; fails with `what` if it never holds.
fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) -> Check {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        if Instant::now() > deadline {
            return Err(format!("{what}: still not so after {secs} s").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// True while `pid` names a live (not zombie) process.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S ...`: the state follows the last `)`.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

fn vmm_pid(c: &Containerd, id: &str) -> Result<u32, Failed> {
    let path = state_of(c, id).join("vmm.pid");
    std::fs::read_to_string(&path)
        .context(format!("read {}", path.display()))?
        .trim()
        .parse()
        .context("parse vmm.pid")
}

/// Lines of the `ctr task ls` table for `id`.
fn task_line(c: &Containerd, id: &str) -> Result<Option<String>, Failed> {
    let out = c.run_ctr(&["task", "ls"])?;
    check(&out, "ctr task ls")?;
    Ok(text(&out.stdout)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .map(str::to_owned))
}

fn containers(c: &Containerd) -> Result<Vec<String>, Failed> {
    let out = c.run_ctr(&["container", "ls", "-q"])?;
    check(&out, "ctr c ls")?;
    Ok(text(&out.stdout).lines().map(str::to_owned).collect())
}

/// Nothing of the single-container pod `id` is left: no container record, no state directory, no
/// mount below it or below the task's bundle, no shim (process or socket), no moat-vmm.
pub(crate) fn ensure_nothing_left(c: &Containerd, id: &str) -> Check {
    ensure(
        !containers(c)?.iter().any(|x| x == id),
        format!("container {id} still listed by ctr c ls"),
    )?;
    let state = state_of(c, id);
    let bundle = bundle_of(c, id);
    // The shim exits right after answering containerd's Shutdown: give it a bounded moment.
    wait_until(&format!("the shim of {id} exits"), SETTLE_SECS, || {
        shim_pids(id).is_empty()
    })?;
    ensure(
        !state.exists(),
        format!("state directory {} left behind", state.display()),
    )?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").context("mountinfo")?;
    let left: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&*state.to_string_lossy()) || l.contains(&*bundle.to_string_lossy()))
        .collect();
    ensure(left.is_empty(), format!("mounts left behind: {left:?}"))?;
    let socket = c.shim_socket(id)?;
    ensure(
        !socket.exists(),
        format!("shim socket {} left behind", socket.display()),
    )?;
    let procs = Command::new("pgrep")
        .args(["-af", "moat-vmm|containerd-shim-moat-v2"])
        .output()
        .context("pgrep")?;
    let left: Vec<String> = text(&procs.stdout)
        .lines()
        .filter(|l| {
            l.contains(&format!("-id {id} "))
                || l.ends_with(&format!("-id {id}"))
                || l.contains(&*state.to_string_lossy())
        })
        .map(str::to_owned)
        .collect();
    ensure(left.is_empty(), format!("processes left behind: {left:?}"))
}

/// How long the sleeper containers of these trials would run if nothing killed them.
const SLEEPER_SECS: u32 = 1000;

/// Best-effort removal after a failed check, so later trials start clean.
fn force_remove(c: &Containerd, id: &str) {
    let _ = c.run_ctr(&["task", "rm", "-f", id]);
    let _ = c.run_ctr(&["container", "rm", id]);
}

fn with_cleanup(c: &Containerd, id: &str, body: impl FnOnce() -> Check) -> Check {
    let res = body();
    if res.is_err() {
        force_remove(c, id);
    }
    res
}

// --- 1. moat-vmm killed ---------------------------------------------------------------------

fn vmm_killed() -> Check {
    let _g = serial();
    let c = Containerd::shared()?;
    let id = "f-vmmkill";
    c.run_sleeper(id, SLEEPER_SECS)?;
    with_cleanup(c, id, || {
        let pid = vmm_pid(c, id)?;
        ensure(alive(pid), format!("moat-vmm {pid} is not running"))?;
        kill_9(pid)?;
        // containerd learns of the exit from the shim's /tasks/exit event.
        wait_until("ctr task ls shows the task STOPPED", SETTLE_SECS, || {
            task_line(c, id)
                .ok()
                .flatten()
                .is_some_and(|l| l.contains("STOPPED"))
        })?;
        // `ctr task rm` shows the exit status the shim reported (a warning when non-zero).
        let out = c.run_ctr(&["task", "rm", id])?;
        check(&out, "ctr task rm after the VMM died")?;
        ensure(
            both(&out).contains("exit code 255"),
            format!(
                "ctr task rm after the VMM died: expected exit code 255 (VM gone): {}",
                both(&out)
            ),
        )?;
        ensure(
            task_line(c, id)?.is_none(),
            "task still listed after ctr task rm",
        )?;
        check(&c.run_ctr(&["container", "rm", id])?, "ctr c rm")?;
        ensure(!alive(pid), format!("moat-vmm {pid} still alive"))?;
        ensure_nothing_left(c, id)
    })
}

/// `kill -9 PID`, checked.
fn kill_9(pid: u32) -> Check {
    let out = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .output()
        .context("kill -9")?;
    check(&out, &format!("kill -9 {pid}"))
}

// --- 2. shim killed ---------------------------------------------------------------------------

fn shim_killed() -> Check {
    let _g = serial();
    let c = Containerd::shared()?;
    let id = "f-shimkill";
    c.run_sleeper(id, SLEEPER_SECS)?;
    with_cleanup(c, id, || {
        let vmm = vmm_pid(c, id)?;
        let shims = shim_pids(id);
        ensure(
            shims.len() == 1,
            format!("expected one shim server for {id}, found {shims:?}"),
        )?;
        kill_9(shims[0])?;
        // containerd sees the shim's connection drop and runs `containerd-shim-moat-v2 delete`,
        // which must kill the pod's moat-vmm and remove its state.
        wait_until("moat-vmm of the dead shim is gone", SETTLE_SECS, || {
            !alive(vmm)
        })?;
        wait_until("the dead shim's state is removed", SETTLE_SECS, || {
            !state_of(c, id).exists()
        })?;
        wait_until("containerd drops the task", SETTLE_SECS, || {
            task_line(c, id).ok().is_some_and(|l| l.is_none())
        })?;
        check(&c.run_ctr(&["container", "rm", id])?, "ctr c rm")?;
        ensure_nothing_left(c, id)
    })
}

// --- 3. guest kernel panic --------------------------------------------------------------------

/// A privileged container may write the guest's sysctls (it is root of the VM, not of the host):
/// `vm.panic_on_oom = 2` turns the next memory-cgroup OOM into a kernel panic; the default
/// command line's `panic=1` turns that into a reset, and moat-vmm exits 0 on a guest reset.
fn guest_panic() -> Check {
    let _g = serial();
    let c = Containerd::shared()?;
    let id = "f-panic";
    let out = c.run_ctr(&[
        "run",
        "--rm",
        "--privileged",
        "--memory-limit",
        "33554432",
        "--runtime",
        RUNTIME,
        IMAGE,
        id,
        "sh",
        "-c",
        "echo 2 > /proc/sys/vm/panic_on_oom && echo armed && exec dd if=/dev/zero of=/dev/null bs=64M",
    ])?;
    with_cleanup(c, id, || {
        ensure(
            text(&out.stdout).contains("armed"),
            format!("the container could not arm panic_on_oom: {}", both(&out)),
        )?;
        ensure(
            out.status.code() == Some(255),
            format!(
                "a guest panic should end the task with 255 (VM gone), ctr run ended with {}: {}",
                out.status,
                both(&out)
            ),
        )?;
        // The shim logs how moat-vmm ended: status 0 is a guest reset (not a kill or a crash).
        let log = std::fs::read_to_string(c.dir.join("containerd.log")).unwrap_or_default();
        let pod: Vec<&str> = log.lines().filter(|l| l.contains(id)).collect();
        let exit = pod
            .iter()
            .find(|l| l.contains("moat-vmm exited"))
            .ok_or_else(|| {
                format!(
                    "the shim did not log moat-vmm's exit; its lines for {id}:\n{}",
                    pod[pod.len().saturating_sub(30)..].join("\n")
                )
            })?;
        eprintln!("faults: {exit}");
        ensure(
            exit.contains("moat-vmm exited: exit status: 0"),
            format!("moat-vmm did not end with a guest reset (status 0): {exit}"),
        )?;
        ensure_nothing_left(c, id)
    })
}

// --- 5. create/delete cycles -------------------------------------------------------------------

#[derive(Debug, PartialEq)]
struct Footprint {
    processes: usize,
    mounts: usize,
    containerd_fds: usize,
    shim_sockets: usize,
    pod_dirs: usize,
}

fn count_lines(cmd: &mut Command) -> usize {
    cmd.output()
        .map(|o| text(&o.stdout).lines().count())
        .unwrap_or(0)
}

fn dir_len(p: &Path) -> usize {
    std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0)
}

fn footprint(c: &Containerd) -> Result<Footprint, Failed> {
    let config = c.dir.join("containerd.toml");
    let out = Command::new("pgrep")
        .arg("-f")
        .arg(format!("^containerd --config {}", config.display()))
        .output()
        .context("pgrep containerd")?;
    let pid = text(&out.stdout)
        .lines()
        .next()
        .map(str::to_owned)
        .ok_or("containerd's pid not found")?;
    Ok(Footprint {
        processes: count_lines(
            Command::new("pgrep").args(["-f", "moat-vmm|containerd-shim-moat-v2"]),
        ),
        mounts: std::fs::read_to_string("/proc/self/mountinfo")
            .context("mountinfo")?
            .lines()
            .count(),
        containerd_fds: dir_len(&PathBuf::from(format!("/proc/{pid}/fd"))),
        shim_sockets: dir_len(Path::new("/run/containerd/s")),
        pod_dirs: dir_len(&c.moat_state.join("default")),
    })
}

fn one_cycle(c: &Containerd, id: &str) -> Check {
    let out = c.run_ctr(&["run", "--rm", "--runtime", RUNTIME, IMAGE, id, "echo", id])?;
    check(&out, &format!("ctr run --rm {id}"))?;
    ensure(
        text(&out.stdout).lines().any(|l| l == id),
        format!("{id}: expected its id echoed, got {:?}", text(&out.stdout)),
    )
}

fn cycles() -> Check {
    let _g = serial();
    let c = Containerd::shared()?;
    let n: usize = match std::env::var("MOAT_E2E_CYCLES") {
        Ok(v) => v.parse().context("MOAT_E2E_CYCLES")?,
        Err(_) => DEFAULT_CYCLES,
    };
    // One cycle first: containerd opens some things lazily on its first task.
    one_cycle(c, "f-cyc-warm")?;
    ensure_nothing_left(c, "f-cyc-warm")?;
    let before = footprint(c)?;
    let started = Instant::now();
    for i in 0..n {
        one_cycle(c, &format!("f-cyc-{i}"))?;
    }
    let took = started.elapsed();
    for i in 0..n {
        ensure_nothing_left(c, &format!("f-cyc-{i}"))?;
    }
    // Processes, mounts, sockets and state directories come back exactly; containerd's fd count
    // may differ by a few transient connections, but must not grow with the number of cycles.
    let mut after = footprint(c)?;
    let settled = wait_until("containerd's fds settle", SETTLE_SECS, || {
        match footprint(c) {
            Ok(f) => {
                let ok = f.containerd_fds <= before.containerd_fds + FD_SLACK
                    && f.processes == before.processes
                    && f.mounts == before.mounts
                    && f.shim_sockets == before.shim_sockets
                    && f.pod_dirs == before.pod_dirs;
                after = f;
                ok
            }
            Err(_) => false,
        }
    });
    eprintln!(
        "faults: {n} cycles in {:.1} s ({:.1} s each); before {before:?}, after {after:?}",
        took.as_secs_f64(),
        took.as_secs_f64() / n.max(1) as f64
    );
    settled.map_err(|e| {
        Failed::from(format!(
            "{}: before {before:?}, after {n} cycles {after:?}",
            e.message().unwrap_or_default()
        ))
    })
}

// --- 6. hostile input -------------------------------------------------------------------------

fn expect_failure(out: &Output, what: &str, needle: &str) -> Check {
    let all = both(out);
    ensure(
        !out.status.success(),
        format!("{what} succeeded, expected an error: {all}"),
    )?;
    ensure(
        all.to_lowercase().contains(&needle.to_lowercase()),
        format!("{what}: the error does not say `{needle}`: {all}"),
    )
}

fn unknown_ids() -> Check {
    let _g = serial();
    let c = Containerd::shared()?;
    let id = "f-ids";
    c.run_sleeper(id, SLEEPER_SECS)?;
    with_cleanup(c, id, || {
        let out = c.run_ctr(&["task", "exec", "--exec-id", "x1", "f-no-such", "true"])?;
        expect_failure(&out, "exec in a missing container", "not found")?;
        // containerd asks the shim for the state of the exec: the shim's NOT_FOUND comes back.
        let out = c.run_ctr(&["task", "kill", "--exec-id", "no-such-exec", id])?;
        expect_failure(&out, "kill of an unknown exec id", "not found")?;
        let out = c.run_ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, id, "true"])?;
        expect_failure(
            &out,
            "a second container with the same id",
            "already exists",
        )?;
        ensure(
            task_line(c, id)?.is_some_and(|l| l.contains("RUNNING")),
            "the first container stopped running after the duplicate create",
        )?;
        // An exec id that is not a plain name is refused before it reaches the guest.
        let out = c.run_ctr(&["task", "exec", "--exec-id", "../x", id, "true"])?;
        expect_failure(&out, "exec id ../x", "")?;
        check(&c.run_ctr(&["task", "rm", "-f", id])?, "ctr task rm -f")?;
        check(&c.run_ctr(&["container", "rm", id])?, "ctr c rm")?;
        ensure_nothing_left(c, id)
    })
}

fn mount_traversal() -> Check {
    let _g = serial();
    let c = Containerd::shared()?;
    let scratch = Scratch::new("faults-mnt")?;
    let id = "f-mnt-dotdot";
    let mount = format!(
        "type=bind,src={},dst=/mnt/../../../escape,options=rbind:ro",
        scratch.path().display()
    );
    let out = c.run_ctr(&[
        "run",
        "--rm",
        "--mount",
        &mount,
        "--runtime",
        RUNTIME,
        IMAGE,
        id,
        "true",
    ])?;
    with_cleanup(c, id, || {
        expect_failure(&out, "a mount destination with `..`", "..")
            .and_then(|()| ensure_nothing_left(c, id))
    })
}

fn bind_symlink() -> Check {
    let _g = serial();
    let c = Containerd::shared()?;
    let scratch = Scratch::new("faults-link")?;
    let real = scratch.path().join("real");
    std::fs::create_dir_all(&real).context("mkdir real")?;
    std::fs::write(real.join("file"), "through the link\n").context("write file")?;
    let link = scratch.path().join("link");
    std::os::unix::fs::symlink(&real, &link).context("symlink")?;
    let id = "f-mnt-link";
    let mount = format!(
        "type=bind,src={},dst=/mnt/shared,options=rbind:ro",
        link.display()
    );
    let out = c.run_ctr(&[
        "run",
        "--rm",
        "--mount",
        &mount,
        "--runtime",
        RUNTIME,
        IMAGE,
        id,
        "cat",
        "/mnt/shared/file",
    ])?;
    with_cleanup(c, id, || {
        check(&out, "ctr run with a symlinked bind source")?;
        ensure(
            text(&out.stdout).contains("through the link"),
            format!("the bound file was not readable: {}", both(&out)),
        )?;
        ensure_nothing_left(c, id)?;
        // Cleanup unmounted the bind before removing the container's files: the host files
        // behind it are untouched.
        ensure(
            real.join("file").is_file() && link.exists(),
            "cleanup removed the host files behind a bind mount",
        )
    })
}

/// `ctr run --rm --runtime-config-path CONFIG ... true` must fail naming `needle`, and leave
/// nothing.
fn bad_config_run(c: &Containerd, config: &Path, id: &str, what: &str, needle: &str) -> Check {
    let out = c.run_ctr(&[
        "run",
        "--rm",
        "--runtime-config-path",
        &config.to_string_lossy(),
        "--runtime",
        RUNTIME,
        IMAGE,
        id,
        "true",
    ])?;
    with_cleanup(c, id, || {
        expect_failure(&out, what, needle)?;
        ensure_nothing_left(c, id)
    })
}

fn broken_config() -> Check {
    let _g = serial();
    let c = Containerd::shared()?;
    let scratch = Scratch::new("faults-config")?;
    let base = std::fs::read_to_string(c.dir.join("moat.toml")).context("read moat.toml")?;
    let with = |key: &str, value: &Path| -> String {
        let mut out: String = base
            .lines()
            .filter(|l| !l.starts_with(&format!("{key} ")))
            .map(|l| format!("{l}\n"))
            .collect();
        out.push_str(&format!("{key} = \"{}\"\n", value.display()));
        out
    };
    let write = |name: &str, content: &str| -> Result<PathBuf, Failed> {
        let p = scratch.path().join(name);
        std::fs::write(&p, content).context(format!("write {}", p.display()))?;
        Ok(p)
    };
    let garbage = write("garbage.bin", &"not a kernel\n".repeat(512))?;
    let missing = scratch.path().join("missing-file");

    // Not valid TOML / an unknown key: named in the error.
    let cfg = write("unknown-key.toml", &format!("{base}vcpu = 2\n"))?;
    bad_config_run(c, &cfg, "f-cfg-key", "an unknown config key", "vcpu")?;
    // Missing kernel, initramfs, VMM binary: the error names the file.
    for (key, id) in [
        ("kernel", "f-cfg-kernel"),
        ("initrd", "f-cfg-initrd"),
        ("vmm", "f-cfg-vmm"),
    ] {
        let cfg = write(&format!("missing-{key}.toml"), &with(key, &missing))?;
        bad_config_run(
            c,
            &cfg,
            id,
            &format!("a missing {key}"),
            &missing.to_string_lossy(),
        )?;
    }
    // A kernel that is not one: moat-vmm refuses it; the error names the kernel.
    let cfg = write("garbage-kernel.toml", &with("kernel", &garbage))?;
    bad_config_run(
        c,
        &cfg,
        "f-cfg-badkernel",
        "a corrupt kernel",
        &garbage.to_string_lossy(),
    )?;
    // An initramfs that is not one: the guest kernel panics (no init), the VM resets before the
    // agent answers; the error names the initramfs.
    let cfg = write("garbage-initrd.toml", &with("initrd", &garbage))?;
    bad_config_run(
        c,
        &cfg,
        "f-cfg-badinitrd",
        "a corrupt initramfs",
        &garbage.to_string_lossy(),
    )?;
    // /dev/kvm unusable: moat-vmm run in a mount namespace where /dev/kvm is /dev/null.
    let vmm = moat_e2e::bin("moat-vmm")?;
    let wrapper = write(
        "vmm-without-kvm",
        &format!(
            "#!/bin/sh\nexec unshare -m sh -c 'mount --bind /dev/null /dev/kvm && exec \"$0\" \"$@\"' {} \"$@\"\n",
            vmm.display()
        ),
    )?;
    let chmod = Command::new("chmod")
        .arg("+x")
        .arg(&wrapper)
        .output()
        .context("chmod")?;
    check(&chmod, "chmod")?;
    let cfg = write("no-kvm.toml", &with("vmm", &wrapper))?;
    bad_config_run(c, &cfg, "f-cfg-nokvm", "an unusable /dev/kvm", "kvm")
}

fn tiny_memory() -> Check {
    let _g = serial();
    let c = Containerd::shared()?;
    let id = "f-mem1";
    let out = c.run_ctr(&[
        "run",
        "--rm",
        "--memory-limit",
        "1",
        "--runtime",
        RUNTIME,
        IMAGE,
        id,
        "echo",
        "ran",
    ])?;
    with_cleanup(c, id, || {
        // The agent refuses limits below what a process can start in (CreateContainer fails),
        // and the pod goes with the failed create.
        expect_failure(&out, "a 1-byte memory limit", "minimum")?;
        ensure_nothing_left(c, id)
    })
}

/// Pipes `len` bytes into `ctr run --rm IMAGE id ARGS...`.
fn run_with_stdin(c: &Containerd, id: &str, args: &[&str], len: usize) -> Result<Output, Failed> {
    let mut child = Command::new("timeout")
        .arg(CTR_LIMIT.to_string())
        .arg("ctr")
        .arg("--address")
        .arg(&c.socket)
        .args(["run", "--rm", "--runtime", RUNTIME, IMAGE, id])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn ctr run")?;
    let stdin = child.stdin.take().ok_or("no stdin pipe")?;
    // Write from a thread: the container may stop reading (and ctr with it) at any point.
    let writer = std::thread::spawn(move || {
        let mut stdin = stdin;
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len());
            if stdin.write_all(&chunk[..n]).is_err() {
                break;
            }
            left -= n;
        }
    });
    let out = child.wait_with_output().context("wait for ctr run")?;
    let _ = writer.join();
    ensure(
        out.status.code() != Some(124),
        format!("ctr run {id} timed out after {CTR_LIMIT} s"),
    )?;
    Ok(out)
}

fn oversize_stdin() -> Check {
    let _g = serial();
    let c = Containerd::shared()?;
    const LEN: usize = 16 << 20;
    let id = "f-stdin-all";
    let out = run_with_stdin(c, id, &["wc", "-c"], LEN)?;
    with_cleanup(c, id, || {
        check(&out, "16 MiB into wc -c")?;
        ensure(
            text(&out.stdout).trim() == LEN.to_string(),
            format!(
                "wc -c counted {:?}, expected {LEN}",
                text(&out.stdout).trim()
            ),
        )?;
        ensure_nothing_left(c, id)
    })?;
    // A container that stops reading after one byte: the task still ends and nothing is left.
    let id = "f-stdin-head";
    let out = run_with_stdin(c, id, &["head", "-c", "1"], LEN)?;
    with_cleanup(c, id, || {
        check(&out, "16 MiB into head -c 1")?;
        ensure(
            text(&out.stdout) == "x",
            format!("head -c 1 printed {:?}", text(&out.stdout)),
        )?;
        ensure_nothing_left(c, id)
    })
}
