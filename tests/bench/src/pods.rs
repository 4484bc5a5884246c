//! Items 2–4, containers through a private containerd (`moat_e2e::containerd`, with the locally
//! built busybox image): `ctr run` to the first output line with moat against runc, host memory
//! (PSS) of the shim and VMM per idle pod for 1, 5 and 10 pods, and the start latency of 10
//! pods started at once against a single start.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use moat_e2e::containerd::{Containerd, CTR_LIMIT, IMAGE, RUNTIME};

use crate::procmem;
use crate::stats::{list, median, percentile, ratio, show};
use crate::Report;

/// The runtime containerd uses for runc.
const RUNC: &str = "io.containerd.runc.v2";
/// The shim and VMM executables whose memory is counted per pod.
const SHIM_EXE: &str = "containerd-shim-moat-v2";
const VMM_EXE: &str = "moat-vmm";
/// A pod's long-running command: one output line, then idle.
const IDLE: &[&str] = &["sh", "-c", "echo ready; exec sleep 100000"];

/// Errors of the container benchmarks.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("{0}")]
    Setup(String),
    #[error("start ctr: {0}")]
    Spawn(std::io::Error),
    #[error("`ctr run` of {id} ({runtime}) printed nothing within {secs} s ({status}); stderr:\n{stderr}\ncontainerd log:\n{log}")]
    NoOutput {
        id: String,
        runtime: &'static str,
        secs: u32,
        status: String,
        stderr: String,
        log: String,
    },
    #[error("memory of pod processes: {0}")]
    Mem(#[from] procmem::MemError),
    #[error("expected {want} or twice as many {exe} processes for {want} pods (one, or a supervisor and a jailed VMM each), found {got}")]
    Count {
        exe: &'static str,
        want: usize,
        got: usize,
    },
}

impl From<moat_e2e::Failed> for PodError {
    fn from(f: moat_e2e::Failed) -> Self {
        PodError::Setup(f.message().unwrap_or("setup failed").to_owned())
    }
}

/// An attached `ctr run --rm` whose first stdout line has arrived.
struct Running {
    id: String,
    child: Child,
    first_line_ms: f64,
}

/// Starts `ctr run --rm [--runtime R] IMAGE id ARGS...` and waits for its first output line.
fn run_to_first_line(
    c: &Containerd,
    runtime: &'static str,
    id: &str,
    args: &[&str],
) -> Result<Running, PodError> {
    let t0 = Instant::now();
    let mut child = Command::new("timeout")
        .arg(CTR_LIMIT.to_string())
        .arg("ctr")
        .arg("--address")
        .arg(&c.socket)
        .args(["run", "--rm", "--runtime", runtime, IMAGE, id])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(PodError::Spawn)?;
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut first = String::new();
            let got = BufReader::new(out).read_line(&mut first).unwrap_or(0) > 0;
            let _ = tx.send((Instant::now(), got));
        });
    }
    let ok = matches!(
        rx.recv_timeout(Duration::from_secs(u64::from(CTR_LIMIT))),
        Ok((_, true))
    );
    if !ok {
        let _ = child.kill();
        let out = child.wait_with_output().ok();
        return Err(PodError::NoOutput {
            id: id.to_owned(),
            runtime,
            secs: CTR_LIMIT,
            status: out
                .as_ref()
                .map_or("?".to_owned(), |o| o.status.to_string()),
            stderr: out
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_default(),
            log: c.log_tail(),
        });
    }
    Ok(Running {
        id: id.to_owned(),
        child,
        first_line_ms: t0.elapsed().as_secs_f64() * 1000.0,
    })
}

/// Kills a running task; its attached `ctr run --rm` then exits and removes the container.
fn stop(c: &Containerd, mut r: Running) {
    let _ = c.run_ctr(&["task", "kill", "-s", "KILL", &r.id]);
    let _ = r.child.wait();
    // In case ctr did not get to remove it (it was killed itself, or the kill raced the start).
    let _ = c.run_ctr(&["task", "delete", "--force", &r.id]);
    let _ = c.run_ctr(&["container", "delete", &r.id]);
}

/// Item 2: `ctr run --rm IMAGE echo hello` to its first output line, moat against runc.
pub fn ctr(reps: usize, report: &mut Report) -> Result<(), PodError> {
    let c = Containerd::shared()?;
    let mut moat = Vec::new();
    let mut runc = Vec::new();
    for i in 0..reps {
        for (runtime, out) in [(RUNTIME, &mut moat), (RUNC, &mut runc)] {
            let r = run_to_first_line(c, runtime, &format!("bench-ctr-{i}"), &["echo", "hello"])?;
            eprintln!("bench: ctr {i}: {runtime} {:.0} ms", r.first_line_ms);
            out.push(r.first_line_ms);
            stop(c, r);
        }
    }
    let (m, r) = (median(&moat), median(&runc));
    report.section("2. `ctr run` of busybox `echo hello` to its first output line");
    report.row(
        "ctr run → first line (moat vs runc)",
        &show(m, "ms"),
        &show(r, "ms"),
        &ratio(m, r),
        "≤ 2.00×",
    );
    report.raw(format!(
        "ctr raw (ms): moat {} runc {}",
        list(&moat),
        list(&runc)
    ));
    Ok(())
}

/// Item 3: PSS of shim + VMM per idle pod with 1, 5 and 10 pods, guest RAM apart.
pub fn memory(report: &mut Report) -> Result<(), PodError> {
    let c = Containerd::shared()?;
    report.section("3. Host memory per idle pod (PSS of shim + moat-vmm, 256 MiB guests)");
    // Shims alive before the first pod (e.g. not yet exited after earlier items) are not counted.
    let stale = procmem::pids_of(SHIM_EXE);
    if !stale.is_empty() {
        report.raw(format!(
            "memory: {} containerd-shim-moat-v2 process(es) alive before the first pod (not counted): {stale:?}",
            stale.len()
        ));
    }
    // Pods are added up to each count (1, then 4 more, then 5 more) and measured at each step.
    let mut pods = Vec::new();
    let result = (|| -> Result<(), PodError> {
        for n in [1usize, 5, 10] {
            while pods.len() < n {
                let id = format!("bench-mem-{}", pods.len());
                pods.push(run_to_first_line(c, RUNTIME, &id, IDLE)?);
            }
            let (shim, vmm, guest) = measure(n, &stale, report)?;
            let per = |kib: u64| Some(kib as f64 / 1024.0 / n as f64);
            report.row(
                &format!("{n} pod(s): shim + VMM PSS per pod, guest RAM excluded"),
                &show(per(shim + vmm.saturating_sub(guest)), "MiB"),
                "",
                "",
                "≤ 10 MiB",
            );
            report.row(
                &format!("{n} pod(s): of which shim / VMM (without guest RAM)"),
                &format!(
                    "{} / {}",
                    show(per(shim), "MiB"),
                    show(per(vmm.saturating_sub(guest)), "MiB")
                ),
                "",
                "",
                "",
            );
            report.row(
                &format!("{n} pod(s): guest RAM touched per pod (VMM's guest mappings)"),
                &show(per(guest), "MiB"),
                "",
                "",
                "",
            );
        }
        Ok(())
    })();
    for p in pods {
        stop(c, p);
    }
    result
}

/// Sums PSS (KiB) of all shim and VMM processes: (shim, vmm total, vmm guest RAM part).
fn measure(n: usize, stale: &[u32], report: &mut Report) -> Result<(u64, u64, u64), PodError> {
    let mut shims = procmem::pids_of(SHIM_EXE);
    shims.retain(|p| !stale.contains(p));
    // With the jail (moat-vmm's default) each pod has two moat-vmm processes, the supervisor
    // and the confined VMM; without it, one. Both count: the supervisor is per-pod overhead.
    let vmms = procmem::pids_of(VMM_EXE);
    if vmms.len() != n && vmms.len() != 2 * n {
        return Err(PodError::Count {
            exe: VMM_EXE,
            want: n,
            got: vmms.len(),
        });
    }
    let mut shim = 0;
    for pid in &shims {
        shim += procmem::pss_kib(*pid)?;
    }
    let (mut vmm, mut guest) = (0, 0);
    for pid in &vmms {
        vmm += procmem::pss_kib(*pid)?;
        guest += procmem::guest_ram_pss_kib(*pid)?;
    }
    let line = format!(
        "memory {n} pods: {} shim processes, {} vmm processes: shim {shim} KiB, vmm {vmm} KiB (guest RAM {guest} KiB)",
        shims.len(),
        vmms.len()
    );
    eprintln!("bench: {line}");
    report.raw(line);
    Ok((shim, vmm, guest))
}

/// Item 4: 10 pods started at once, p50/p99 of their start → first line, against single starts.
pub fn density(reps: usize, report: &mut Report) -> Result<(), PodError> {
    const N: usize = 10;
    let c = Containerd::shared()?;
    let mut single = Vec::new();
    for i in 0..reps {
        let r = run_to_first_line(c, RUNTIME, &format!("bench-one-{i}"), IDLE)?;
        eprintln!("bench: density single {i}: {:.0} ms", r.first_line_ms);
        single.push(r.first_line_ms);
        stop(c, r);
    }
    let handles: Vec<_> = (0..N)
        .map(|i| {
            std::thread::spawn(move || {
                run_to_first_line(c, RUNTIME, &format!("bench-many-{i}"), IDLE)
            })
        })
        .collect();
    let mut started = Vec::new();
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => started.push(r),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(PodError::Setup("a start thread panicked".into()));
            }
        }
    }
    let many: Vec<f64> = started.iter().map(|r| r.first_line_ms).collect();
    for r in started {
        stop(c, r);
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let s = median(&single);
    let (p50, p99) = (percentile(&many, 50.0), percentile(&many, 99.0));
    report.section("4. Density: 10 pods started at once (start → first output line)");
    report.row("single start (median)", &show(s, "ms"), "", "", "");
    report.row(
        "10 concurrent: p50 (ratio to single)",
        &show(p50, "ms"),
        "",
        &ratio(p50, s),
        "",
    );
    report.row(
        "10 concurrent: p99 (ratio to single)",
        &show(p99, "ms"),
        "",
        &ratio(p99, s),
        "≤ 3.00×",
    );
    report.raw(format!(
        "density raw (ms): single {} concurrent {}",
        list(&single),
        list(&many)
    ));
    Ok(())
}
