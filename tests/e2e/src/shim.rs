//! E2E trials of `containerd-shim-moat-v2` driven by a real containerd and `ctr`: every container
//! runs in its own microVM booted by moat-vmm, with the agent inside.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use crate::faults::ensure_nothing_left;
use moat_e2e::containerd::{check, Containerd, CTR_LIMIT, IMAGE, RUNTIME};
use moat_e2e::{ensure, trial, Check, Context, Failed, Trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial("shim::ctr_run_echo_prints_hello", echo_hello),
        trial("shim::exit_status_propagates", exit_status),
        trial("shim::container_runs_in_the_vm_kernel", runs_in_vm),
        trial("shim::stdin_is_piped_through", stdin_piped),
        trial("shim::tty_mode", tty_mode),
        trial("shim::exec_ps_metrics_pause_resume_kill", task_lifecycle),
        trial("shim::nothing_left_after_rm", nothing_left),
    ]
}

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).replace('\r', "")
}

/// `ctr run --rm --runtime io.containerd.moat.v2 IMAGE ID ARGS...`
fn ctr_run(c: &Containerd, id: &str, args: &[&str]) -> Result<std::process::Output, Failed> {
    let mut full = vec!["run", "--rm", "--runtime", RUNTIME, IMAGE, id];
    full.extend_from_slice(args);
    c.run_ctr(&full)
}

fn echo_hello() -> Check {
    let c = Containerd::shared()?;
    let out = ctr_run(c, "e2e-echo", &["echo", "hello"])?;
    check(&out, "ctr run echo hello").map_err(|e| {
        format!(
            "{}\ncontainerd log:\n{}",
            e.message().unwrap_or_default(),
            c.log_tail()
        )
    })?;
    ensure(
        stdout_of(&out).lines().any(|l| l == "hello"),
        format!("expected a line `hello`, got {:?}", stdout_of(&out)),
    )
}

fn exit_status() -> Check {
    let c = Containerd::shared()?;
    let out = ctr_run(c, "e2e-exit", &["sh", "-c", "exit 3"])?;
    ensure(
        out.status.code() == Some(3),
        format!(
            "ctr run sh -c 'exit 3' ended with {}, expected 3",
            out.status
        ),
    )
}

fn runs_in_vm() -> Check {
    let c = Containerd::shared()?;
    let out = ctr_run(c, "e2e-uname", &["uname", "-r"])?;
    check(&out, "ctr run uname -r")?;
    let inside = stdout_of(&out).trim().to_owned();
    let host = Command::new("uname")
        .arg("-r")
        .output()
        .context("uname -r")?;
    let host = String::from_utf8_lossy(&host.stdout).trim().to_owned();
    ensure(
        !inside.is_empty(),
        "uname -r printed nothing in the container",
    )?;
    ensure(
        inside != host,
        format!("the container saw the host's kernel {host}: it did not run in the VM"),
    )
}

fn stdin_piped() -> Check {
    let c = Containerd::shared()?;
    let mut child = Command::new("timeout")
        .arg(CTR_LIMIT.to_string())
        .arg("ctr")
        .arg("--address")
        .arg(&c.socket)
        .args([
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "e2e-stdin",
            "cat",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn ctr run cat")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(b"data through stdin\n")
            .context("write stdin")?;
    }
    let out = child.wait_with_output().context("wait for ctr run cat")?;
    check(&out, "echo data | ctr run cat")?;
    ensure(
        stdout_of(&out).contains("data through stdin"),
        format!("cat did not echo stdin back: {:?}", stdout_of(&out)),
    )
}

fn tty_mode() -> Check {
    let c = Containerd::shared()?;
    // `ctr run -t` needs a terminal: util-linux `script` gives it one.
    let inner = format!(
        "ctr --address {} run --rm -t --runtime {RUNTIME} {IMAGE} e2e-tty sh -c 'test -t 0 && test -t 1 && echo on-a-tty'",
        c.socket.display()
    );
    let out = moat_e2e::run_bounded(
        Command::new("script").args(["-qec", &inner, "/dev/null"]),
        CTR_LIMIT,
    )?;
    check(&out, "ctr run -t")?;
    ensure(
        stdout_of(&out).contains("on-a-tty"),
        format!(
            "the container's stdio was not a terminal: {:?}",
            stdout_of(&out)
        ),
    )
}

fn task_lifecycle() -> Check {
    let c = Containerd::shared()?;
    let id = "e2e-life";
    // Attached `ctr run`: it returns when the task exits, with its status (our `wait`).
    let mut run = Command::new("timeout")
        .arg(CTR_LIMIT.to_string())
        .arg("ctr")
        .arg("--address")
        .arg(&c.socket)
        .args(["run", "--rm", "--runtime", RUNTIME, IMAGE, id])
        .args(["sh", "-c", "echo ready; exec sleep 100000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn ctr run")?;
    let stdout = run.stdout.take().ok_or("no stdout pipe")?;
    let mut lines = BufReader::new(stdout).lines();
    let result = (|| -> Check {
        // The task is running once it printed `ready`.
        let first = lines.next().transpose().context("read ctr run output")?;
        ensure(
            first.as_deref().map(str::trim) == Some("ready"),
            format!("expected `ready`, got {first:?}"),
        )?;
        let exec = |exec_id: &str, script: &str| {
            c.run_ctr(&["task", "exec", "--exec-id", exec_id, id, "sh", "-c", script])
        };
        let out = exec("x1", "echo persisted > /tmp/file")?;
        check(&out, "ctr task exec (write)")?;
        let out = exec("x2", "cat /tmp/file")?;
        check(&out, "ctr task exec (read)")?;
        ensure(
            stdout_of(&out).contains("persisted"),
            format!("a later exec did not see the file: {:?}", stdout_of(&out)),
        )?;

        let out = c.run_ctr(&["task", "ps", id])?;
        check(&out, "ctr task ps")?;
        ensure(
            stdout_of(&out)
                .lines()
                .skip(1)
                .any(|l| !l.trim().is_empty()),
            format!("ctr task ps listed no process: {:?}", stdout_of(&out)),
        )?;

        let out = c.run_ctr(&["task", "metrics", id])?;
        check(&out, "ctr task metrics")?;
        ensure(
            stdout_of(&out).to_lowercase().contains("memory"),
            format!(
                "ctr task metrics has no memory figures: {:?}",
                stdout_of(&out)
            ),
        )?;

        check(&c.run_ctr(&["task", "pause", id])?, "ctr task pause")?;
        let out = c.run_ctr(&["task", "ls"])?;
        ensure(
            stdout_of(&out)
                .lines()
                .any(|l| l.starts_with(id) && l.contains("PAUSED")),
            format!("task not PAUSED after pause: {:?}", stdout_of(&out)),
        )?;
        check(&c.run_ctr(&["task", "resume", id])?, "ctr task resume")?;
        let out = c.run_ctr(&["task", "ls"])?;
        ensure(
            stdout_of(&out)
                .lines()
                .any(|l| l.starts_with(id) && l.contains("RUNNING")),
            format!("task not RUNNING after resume: {:?}", stdout_of(&out)),
        )?;

        check(
            &c.run_ctr(&["task", "kill", "-s", "SIGKILL", id])?,
            "ctr task kill",
        )?;
        Ok(())
    })();
    if result.is_err() {
        let _ = c.run_ctr(&["task", "kill", "-s", "SIGKILL", id]);
    }
    let out = run.wait_with_output().context("wait for ctr run")?;
    result?;
    ensure(
        out.status.code() == Some(137),
        format!(
            "killed task should exit 137 (SIGKILL), ctr run ended with {}",
            out.status
        ),
    )
}

fn nothing_left() -> Check {
    let c = Containerd::shared()?;
    // A task that exits by itself (`ctr task start` waits for it and deletes it) ...
    let id = "e2e-clean";
    check(
        &c.run_ctr(&[
            "container",
            "create",
            "--runtime",
            RUNTIME,
            IMAGE,
            id,
            "true",
        ])?,
        "ctr c create",
    )?;
    check(&c.run_ctr(&["task", "start", id])?, "ctr task start")?;
    check(&c.run_ctr(&["container", "rm", id])?, "ctr c rm")?;
    ensure_nothing_left(c, id)?;
    // ... and a running one removed by force.
    let id = "e2e-clean-force";
    c.run_sleeper(id, 100_000)?;
    check(&c.run_ctr(&["task", "rm", "-f", id])?, "ctr task rm -f")?;
    check(&c.run_ctr(&["container", "rm", id])?, "ctr c rm")?;
    ensure_nothing_left(c, id)
}
