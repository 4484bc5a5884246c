//! `moat-bench`: measures moat against its peers side by side in one run on a real KVM, N
//! repetitions each, and prints a markdown table of medians and ratios (also written to
//! `$MOAT_KVM_HOST_OUT/bench.md` when that is set). Run it through `tests/bench/run`, which builds
//! what it needs and starts this binary inside `tests/kvm-host/run`.
//!
//! ```text
//! moat-bench [--reps N] [--only boot|ctr|memory|density|net]... [--net-mib N]
//! ```
//!
//! No assertions on the figures: a benchmark reports, the targets are in the table.

mod boot;
mod net;
mod pods;
mod procmem;
mod stats;

use std::fmt::Write as _;
use std::process::{Command, ExitCode};

/// Errors of the command line and of writing the report.
#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error(
        "{0}\nusage: moat-bench [--reps N] [--only boot|ctr|memory|density|net]... [--net-mib N]"
    )]
    Usage(String),
    #[error("write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

const ITEMS: &[&str] = &["boot", "ctr", "memory", "density", "net"];
/// MiB sent each way per transfer of the `net` item.
const NET_MIB: u64 = 64;

struct Args {
    reps: usize,
    only: Vec<String>,
    net_mib: u64,
}

fn parse_args(args: &[String]) -> Result<Args, MainError> {
    let mut out = Args {
        reps: 3,
        only: Vec::new(),
        net_mib: NET_MIB,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--reps" => {
                let v = it
                    .next()
                    .ok_or_else(|| MainError::Usage("--reps needs a number".into()))?;
                out.reps = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    MainError::Usage(format!("--reps {v}: not a positive number"))
                })?;
            }
            "--net-mib" => {
                let v = it
                    .next()
                    .ok_or_else(|| MainError::Usage("--net-mib needs a number".into()))?;
                out.net_mib = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    MainError::Usage(format!("--net-mib {v}: not a positive number"))
                })?;
            }
            "--only" => {
                let v = it
                    .next()
                    .ok_or_else(|| MainError::Usage("--only needs an item".into()))?;
                if !ITEMS.contains(&v.as_str()) {
                    return Err(MainError::Usage(format!("--only {v}: unknown item")));
                }
                out.only.push(v.clone());
            }
            other => return Err(MainError::Usage(format!("unknown argument {other:?}"))),
        }
    }
    if out.only.is_empty() {
        out.only = ITEMS.iter().map(|s| s.to_string()).collect();
    }
    Ok(out)
}

/// The markdown report being assembled.
#[derive(Default)]
pub struct Report {
    body: String,
    raw: Vec<String>,
    kept: Vec<(String, String)>,
}

impl Report {
    /// Starts a table titled `title`.
    pub fn section(&mut self, title: &str) {
        let _ = write!(
            self.body,
            "\n### {title}\n\n| metric | moat | peer | ratio | target |\n|---|---|---|---|---|\n"
        );
    }

    /// Adds one row to the current table.
    pub fn row(&mut self, metric: &str, moat: &str, peer: &str, ratio: &str, target: &str) {
        let _ = writeln!(
            self.body,
            "| {metric} | {moat} | {peer} | {ratio} | {target} |"
        );
    }

    /// Keeps a raw measurement line for the appendix.
    pub fn raw(&mut self, line: String) {
        self.raw.push(line);
    }

    /// Records that an item failed, with its error.
    pub fn fail(&mut self, item: &str, err: &dyn std::fmt::Display) {
        let _ = write!(self.body, "\n### {item}: FAILED\n\n```\n{err}\n```\n");
    }

    /// Keeps a console log for `bench-consoles.txt` next to the report.
    pub fn keep(&mut self, what: &str, text: &str) {
        self.kept.push((what.to_owned(), text.to_owned()));
    }
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn environment(args: &Args) -> String {
    let host = match moat_e2e::kvm_host().as_deref() {
        Some("software") => {
            "software-KVM host (QEMU TCG, nested kvm_amd; ~30x slower than hardware)"
        }
        Some("direct") => "hardware KVM",
        _ => "not started through tests/kvm-host/run",
    };
    format!(
        "- date: {}\n- command: `tests/bench/run {}`\n- environment: {host}; CPU: {}; {} CPUs; MemTotal {}; kernel {}\n- load (1/5/15 min) at start: {}\n- guests: {} vCPU, {} MiB; kernel {}, initramfs {}\n",
        sh("date -u '+%Y-%m-%d %H:%M UTC'"),
        std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'"),
        sh("nproc"),
        sh("grep MemTotal /proc/meminfo | awk '{print $2\" kB\"}'"),
        sh("uname -r"),
        sh("cut -d' ' -f1-3 /proc/loadavg"),
        boot::VCPUS,
        boot::MEM_MIB,
        moat_e2e::guest_kernel().map(|p| p.display().to_string()).unwrap_or_default(),
        moat_e2e::guest_initrd().map(|p| p.display().to_string()).unwrap_or_default(),
    ) + &format!("- repetitions: {}\n", args.reps)
        + &std::env::var("MOAT_BENCH_MACHINE")
            .map(|m| format!("- machine running tests/kvm-host/run: {m} (1/5/15 min)\n"))
            .unwrap_or_default()
}

fn run(args: &Args) -> Result<bool, MainError> {
    let mut report = Report::default();
    let mut ok = true;
    let env = environment(args);
    eprint!("{env}");
    for item in &args.only {
        eprintln!("bench: running {item}");
        let res = match item.as_str() {
            "boot" => boot::run(args.reps, &mut report).map_err(|e| e.to_string()),
            "ctr" => pods::ctr(args.reps, &mut report).map_err(|e| e.to_string()),
            "memory" => pods::memory(&mut report).map_err(|e| e.to_string()),
            "density" => pods::density(args.reps, &mut report).map_err(|e| e.to_string()),
            "net" => net::run(args.reps, args.net_mib, &mut report).map_err(|e| e.to_string()),
            _ => Ok(()),
        };
        if let Err(e) = res {
            eprintln!("bench: {item} failed: {e}");
            report.fail(item, &e);
            ok = false;
        }
    }
    moat_e2e::containerd::shutdown();
    let mut md = format!("## moat benchmarks\n\n{env}{}", report.body);
    if !report.raw.is_empty() {
        md += &format!("\n```\n{}\n```\n", report.raw.join("\n"));
    }
    println!("{md}");
    if let Some(dir) = std::env::var_os("MOAT_KVM_HOST_OUT").filter(|v| !v.is_empty()) {
        let dir = std::path::PathBuf::from(dir);
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|source| MainError::Write {
                path: path.display().to_string(),
                source,
            })
        };
        write("bench.md", &md)?;
        let consoles: String = report
            .kept
            .iter()
            .map(|(w, t)| format!("==== {w}\n{t}\n"))
            .collect();
        write("bench-consoles.txt", &consoles)?;
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let result = parse_args(&argv).and_then(|a| run(&a));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("moat-bench: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments() {
        let a = parse_args(&v(&[])).unwrap();
        assert_eq!((a.reps, a.only.len(), a.net_mib), (3, 5, NET_MIB));
        let a = parse_args(&v(&["--reps", "5", "--only", "boot"])).unwrap();
        assert_eq!((a.reps, a.only), (5, v(&["boot"])));
        let a = parse_args(&v(&["--only", "net", "--net-mib", "16"])).unwrap();
        assert_eq!((a.only, a.net_mib), (v(&["net"]), 16));
        for bad in [
            &["--reps", "0"][..],
            &["--reps"],
            &["--only", "x"],
            &["-x"],
            &["--net-mib", "0"],
            &["--net-mib"],
        ] {
            let err = parse_args(&v(bad)).err().unwrap().to_string();
            assert!(err.contains("usage:"), "{err}");
        }
    }
}
