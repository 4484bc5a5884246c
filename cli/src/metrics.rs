//! `moat metrics serve` and `moat metrics dump`: a node-level Prometheus exporter (as
//! kata-monitor is for Kata). Every scrape walks the shim's state directory (as `moat ps` does,
//! [`crate::ps::list`]) and, for each pod whose VMM runs, reads:
//!
//! - from `/proc`: CPU time, RSS and PSS (`smaps_rollup`) of the moat-vmm process tree (the
//!   supervisor and the jailed VMM) and of the pod's shim (`containerd-shim-moat-v2 … -id POD`);
//! - from the VMM's control socket (`<pod dir>/api.sock`, docs/vmm.md): `status` (boot time) and
//!   `metrics` (vCPUs, boot memory, per-device virtio counters).
//!
//! The answer is the Prometheus text format 0.0.4, written by hand ([`Registry`]). A pod whose
//! VMM is gone or whose socket does not answer within the timeout is left out and counted in
//! `moat_scrape_errors_total`; a scrape never fails because of one pod. The HTTP server is a
//! small blocking HTTP/1.1 server on `std::net`, one thread per connection: `GET /metrics`
//! answers the scrape, anything else 404.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::procfs;
use crate::ps::{self, PodState};

/// Where `moat metrics serve` listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9474";
/// How long one pod's control socket may take to answer.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(2);
/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Usage of `moat metrics`.
pub const USAGE: &str =
    "moat metrics serve [--listen ADDR:PORT] [--config PATH]\n       moat metrics dump [--config PATH]";

/// Errors of `moat metrics`.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The command line is wrong.
    #[error("{0}")]
    Usage(String),
    /// The listening address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state directory cannot be read.
    #[error(transparent)]
    Ps(#[from] ps::PsError),
}

/// What `moat metrics` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Serve `/metrics` on this address.
    Serve {
        /// `ADDR:PORT`.
        listen: String,
    },
    /// Print one scrape.
    Dump,
}

/// Parsed `moat metrics` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Serve or dump.
    pub action: Action,
    /// `--config PATH`: the shim config to take the state directory from.
    pub config: Option<PathBuf>,
}

/// Parses the arguments after `moat metrics`.
pub fn parse_args(args: &[String]) -> Result<Options, MetricsError> {
    let usage = |why: &str| MetricsError::Usage(format!("{why}\nusage: {USAGE}"));
    let (serve, rest) = match args.split_first() {
        Some((a, rest)) if a == "serve" => (true, rest),
        Some((a, rest)) if a == "dump" => (false, rest),
        _ => return Err(usage("serve or dump?")),
    };
    let mut listen = DEFAULT_LISTEN.to_owned();
    let mut config = None;
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--listen" if serve => {
                listen = it
                    .next()
                    .ok_or_else(|| usage("--listen needs ADDR:PORT"))?
                    .clone()
            }
            "--config" => {
                config = Some(PathBuf::from(
                    it.next().ok_or_else(|| usage("--config needs a path"))?,
                ))
            }
            other => return Err(usage(&format!("unexpected argument {other:?}"))),
        }
    }
    let action = if serve {
        Action::Serve { listen }
    } else {
        Action::Dump
    };
    Ok(Options { action, config })
}

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only grows (names end in `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

struct Family {
    name: String,
    help: String,
    kind: Kind,
    samples: Vec<(Vec<(String, String)>, f64)>,
}

/// Metric families being gathered, rendered in the order they were first added.
#[derive(Default)]
pub struct Registry {
    families: Vec<Family>,
}

/// `name` with every character outside `[a-zA-Z0-9_:]` replaced by `_` (and a leading digit
/// prefixed), so a counter name from a newer VMM still makes a valid metric name.
pub fn sanitize_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) || out.is_empty() {
        out.insert(0, '_');
    }
    out
}

/// A label value escaped for the text format: `\` → `\\`, `"` → `\"`, newline → `\n`.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A HELP text escaped for the text format: `\` → `\\`, newline → `\n`.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

impl Registry {
    /// Adds one sample to family `name` (created with `kind` and `help` on first use).
    pub fn add(&mut self, name: &str, kind: Kind, help: &str, labels: &[(&str, &str)], v: f64) {
        let name = sanitize_name(name);
        let labels = labels
            .iter()
            .map(|(k, v)| (sanitize_name(k), (*v).to_owned()))
            .collect();
        match self.families.iter_mut().find(|f| f.name == name) {
            Some(f) => f.samples.push((labels, v)),
            None => self.families.push(Family {
                name,
                help: help.to_owned(),
                kind,
                samples: vec![(labels, v)],
            }),
        }
    }

    /// The text format 0.0.4: `# HELP`, `# TYPE` and the samples of each family.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            out.push_str(&format!("# HELP {} {}\n", f.name, escape_help(&f.help)));
            out.push_str(&format!("# TYPE {} {}\n", f.name, f.kind.name()));
            for (labels, v) in &f.samples {
                out.push_str(&f.name);
                if !labels.is_empty() {
                    let l: Vec<String> = labels
                        .iter()
                        .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                        .collect();
                    out.push_str(&format!("{{{}}}", l.join(",")));
                }
                out.push(' ');
                out.push_str(&format_value(*v));
                out.push('\n');
            }
        }
        out
    }
}

/// The VMM's answer (the parts read here; see moat-vmm's `api::Response`).
#[derive(Debug, Default, Deserialize)]
struct VmmAnswer {
    #[serde(default)]
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    boot_ms: Option<u64>,
    #[serde(default)]
    metrics: Option<VmMetrics>,
}

/// moat-vmm's `metrics` answer (see moat-vmm's `metrics::VmMetrics`).
#[derive(Debug, Default, Deserialize)]
struct VmMetrics {
    #[serde(default)]
    vcpus: u64,
    #[serde(default)]
    mem_bytes: u64,
    #[serde(default)]
    boot_ms: Option<u64>,
    #[serde(default)]
    devices: Vec<DeviceMetrics>,
}

#[derive(Debug, Deserialize)]
struct DeviceMetrics {
    device: String,
    kind: String,
    #[serde(default)]
    counters: BTreeMap<String, u64>,
}

/// Asks the control socket at `sock` each of `requests` in turn on one connection.
fn ask_vmm(sock: &Path, requests: &[&str], timeout: Duration) -> Result<Vec<VmmAnswer>, String> {
    let stream = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    let io_err = |e: std::io::Error| format!("{}: {e}", sock.display());
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let mut w = stream.try_clone().map_err(io_err)?;
    let mut r = BufReader::new(stream);
    let mut out = Vec::new();
    for req in requests {
        w.write_all(format!("{{\"cmd\":\"{req}\"}}\n").as_bytes())
            .map_err(io_err)?;
        let mut line = String::new();
        // At most 1 MiB per answer: a VMM never sends that much.
        (&mut r)
            .take(1 << 20)
            .read_line(&mut line)
            .map_err(io_err)?;
        let answer: VmmAnswer = serde_json::from_str(&line)
            .map_err(|e| format!("{}: bad answer to {req}: {e}", sock.display()))?;
        if !answer.ok {
            return Err(format!(
                "{}: {req}: {}",
                sock.display(),
                answer.error.unwrap_or_default()
            ));
        }
        out.push(answer);
    }
    Ok(out)
}

/// CPU time (`utime` + `stime`, fields 14 and 15 of `/proc/PID/stat`) in clock ticks.
fn cpu_ticks(proc: &Path, pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a constant of the C library; no memory is passed.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Proportional set size of `pid` in KiB (`Pss:` of `/proc/PID/smaps_rollup`).
fn pss_kib(proc: &Path, pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(proc.join(pid.to_string()).join("smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// CPU seconds, RSS and PSS bytes of a set of processes (summed; PSS only when readable for
/// every process that has memory, as reading another user's `smaps_rollup` needs privilege).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcUsage {
    /// `utime + stime`, seconds.
    pub cpu_seconds: f64,
    /// Resident set, bytes.
    pub rss_bytes: u64,
    /// Proportional set, bytes.
    pub pss_bytes: Option<u64>,
}

/// The usage of `pids` read below `proc`.
pub fn usage(proc: &Path, pids: &[u32]) -> ProcUsage {
    let hz = clock_ticks();
    let mut u = ProcUsage {
        pss_bytes: Some(0),
        ..Default::default()
    };
    for &pid in pids {
        u.cpu_seconds += cpu_ticks(proc, pid).unwrap_or(0) as f64 / hz;
        let Some(rss) = procfs::rss_kib(proc, pid) else {
            continue;
        };
        u.rss_bytes += rss * 1024;
        u.pss_bytes = match (u.pss_bytes, pss_kib(proc, pid)) {
            (Some(sum), Some(p)) => Some(sum + p * 1024),
            _ => None,
        };
    }
    u
}

/// Whether `args` is the command line of the shim that serves pod `id`
/// (`containerd-shim-moat-v2 … -id ID …`).
pub fn is_shim_for(args: &[String], id: &str) -> bool {
    let Some(argv0) = args.first() else {
        return false;
    };
    argv0.rsplit('/').next() == Some("containerd-shim-moat-v2")
        && args.windows(2).any(|w| w[0] == "-id" && w[1] == id)
}

/// The shim of the pod whose VMM is `vmm_pid`: the VMM's parent when that is a moat shim,
/// else any process that is the shim for `id`.
pub fn find_shim(proc: &Path, vmm_pid: u32, id: &str) -> Option<u32> {
    let is_shim = |pid: u32| {
        procfs::cmdline(proc, pid).is_some_and(|a| {
            a.first()
                .is_some_and(|a0| a0.ends_with("containerd-shim-moat-v2"))
        })
    };
    if let Some(parent) = procfs::ppid(proc, vmm_pid).filter(|p| is_shim(*p)) {
        return Some(parent);
    }
    procfs::pids(proc)
        .into_iter()
        .find(|p| procfs::cmdline(proc, *p).is_some_and(|a| is_shim_for(&a, id)))
}

/// Help text and type of the metric a device counter becomes.
fn device_metric(kind: &str, counter: &str) -> (String, Kind, String) {
    let kind_s = sanitize_name(kind);
    let counter_s = sanitize_name(counter);
    if kind == "mem" {
        let help = match counter {
            "region_bytes" => "Size of the virtio-mem hotplug region.",
            "requested_bytes" => "Hotplug memory the host asked the guest to plug.",
            "plugged_bytes" => "Hotplug memory the guest has plugged.",
            _ => "virtio-mem size.",
        };
        return (
            format!("moat_mem_hotplug_{counter_s}"),
            Kind::Gauge,
            help.to_owned(),
        );
    }
    let help = match (kind, counter) {
        ("net", "rx_bytes") => "Frame bytes delivered to the guest (virtio-net header excluded).",
        ("net", "rx_packets") => "Frames delivered to the guest.",
        ("net", "rx_dropped") => "Frames from the tap that were dropped.",
        ("net", "tx_bytes") => {
            "Frame bytes the guest sent to the tap (virtio-net header excluded)."
        }
        ("net", "tx_packets") => "Frames the guest sent to the tap.",
        ("net", "tx_dropped") => "Guest frames that were dropped.",
        ("blk", "read_bytes") => "Bytes read from the disk for the guest.",
        ("blk", "read_requests") => "Read requests served.",
        ("blk", "write_bytes") => "Bytes written to the disk for the guest.",
        ("blk", "write_requests") => "Write requests served.",
        ("blk", "flush_requests") => "Flush requests served.",
        ("blk", "errors") => "Requests answered with an error (I/O error, unsupported, malformed).",
        ("fs", "requests") => "virtio-fs (FUSE) requests served.",
        ("fs", "errors") => "virtio-fs requests that failed or were malformed.",
        ("fs", "reply_bytes") => "Bytes of virtio-fs replies written to the guest.",
        ("vsock", "rx_bytes") => "vsock payload bytes delivered to the guest.",
        ("vsock", "rx_packets") => "vsock packets delivered to the guest.",
        ("vsock", "tx_bytes") => "vsock payload bytes the guest sent.",
        ("vsock", "tx_packets") => "vsock packets the guest sent.",
        ("balloon", "reported_bytes") => {
            "Guest memory handed back to the host by free page reporting."
        }
        ("balloon", "reported_ranges") => "Free page reports honoured.",
        ("balloon", "refused_ranges") => "Free page reports refused.",
        _ => "",
    };
    let help = if help.is_empty() {
        format!("virtio-{kind} counter {counter}.")
    } else {
        help.to_owned()
    };
    (
        format!("moat_{kind_s}_{counter_s}_total"),
        Kind::Counter,
        help,
    )
}

/// Gathers the metrics of the pods below a state directory; counts failed pods across scrapes.
pub struct Exporter {
    state_dir: PathBuf,
    proc: PathBuf,
    timeout: Duration,
    errors: AtomicU64,
}

impl Exporter {
    /// An exporter for the pods below `state_dir`, reading processes below `proc` (`/proc`).
    pub fn new(state_dir: PathBuf, proc: PathBuf, timeout: Duration) -> Self {
        Self {
            state_dir,
            proc,
            timeout,
            errors: AtomicU64::new(0),
        }
    }

    /// One scrape, in the text format.
    pub fn scrape(&self) -> String {
        let start = Instant::now();
        let mut reg = Registry::default();
        let mut counts: BTreeMap<&'static str, u64> =
            BTreeMap::from([("running", 0), ("vmm-gone", 0), ("no-vmm", 0)]);
        match ps::list(&self.state_dir, &self.proc) {
            Ok(pods) => {
                for pod in &pods {
                    let state = match pod.state {
                        PodState::Running => "running",
                        PodState::VmmGone => "vmm-gone",
                        PodState::NoVmm => "no-vmm",
                    };
                    *counts.entry(state).or_default() += 1;
                    match pod.state {
                        PodState::Running => {
                            if let Err(e) = self.gather_pod(&mut reg, pod) {
                                self.errors.fetch_add(1, Ordering::Relaxed);
                                eprintln!("moat metrics: pod {}/{}: {e}", pod.namespace, pod.id);
                            }
                        }
                        // Its VMM died under the shim: nothing to read, worth noticing.
                        PodState::VmmGone => {
                            self.errors.fetch_add(1, Ordering::Relaxed);
                        }
                        // Starting: not an error.
                        PodState::NoVmm => {}
                    }
                }
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("moat metrics: {e}");
            }
        }
        for (state, n) in counts {
            reg.add(
                "moat_pods",
                Kind::Gauge,
                "Pods in the shim's state directory, by VMM state.",
                &[("state", state)],
                n as f64,
            );
        }
        reg.add(
            "moat_scrape_errors_total",
            Kind::Counter,
            "Pods left out of a scrape because their VMM was gone or its control socket did not answer.",
            &[],
            self.errors.load(Ordering::Relaxed) as f64,
        );
        reg.add(
            "moat_scrape_duration_seconds",
            Kind::Gauge,
            "How long gathering this scrape took.",
            &[],
            start.elapsed().as_secs_f64(),
        );
        reg.render()
    }

    /// Adds one running pod's metrics to `reg`, or nothing when its VMM does not answer.
    fn gather_pod(&self, reg: &mut Registry, pod: &ps::Pod) -> Result<(), String> {
        let pid = pod.vmm_pid.ok_or("no VMM pid")?;
        let answers = ask_vmm(
            &pod.dir.join("api.sock"),
            &["status", "metrics"],
            self.timeout,
        )?;
        let (status, metrics) = match answers.as_slice() {
            [s, m] => (s, m.metrics.as_ref().ok_or("no metrics in the answer")?),
            _ => return Err("short answer".into()),
        };
        let base = [
            ("namespace", pod.namespace.as_str()),
            ("sandbox_id", pod.id.as_str()),
            ("pod", pod.id.as_str()),
        ];
        let proc = &self.proc;
        let vmm = usage(proc, &procfs::tree(proc, pid));
        let shim = find_shim(proc, pid, &pod.id).map(|p| usage(proc, &[p]));
        for (who, u) in [("vmm", Some(vmm)), ("shim", shim)] {
            let Some(u) = u else { continue };
            let what = if who == "vmm" {
                "the moat-vmm process tree"
            } else {
                "the pod's shim"
            };
            reg.add(
                &format!("moat_{who}_cpu_seconds_total"),
                Kind::Counter,
                &format!("User and system CPU time of {what}."),
                &base,
                u.cpu_seconds,
            );
            reg.add(
                &format!("moat_{who}_rss_bytes"),
                Kind::Gauge,
                &format!("Resident memory of {what}."),
                &base,
                u.rss_bytes as f64,
            );
            if let Some(pss) = u.pss_bytes {
                reg.add(
                    &format!("moat_{who}_pss_bytes"),
                    Kind::Gauge,
                    &format!(
                        "Proportional set size of {what} (shared pages split among their users)."
                    ),
                    &base,
                    pss as f64,
                );
            }
        }
        reg.add(
            "moat_vm_vcpus",
            Kind::Gauge,
            "vCPUs of the pod's VM.",
            &base,
            metrics.vcpus as f64,
        );
        reg.add(
            "moat_vm_memory_bytes",
            Kind::Gauge,
            "Boot memory of the pod's VM (hotplug memory not included).",
            &base,
            metrics.mem_bytes as f64,
        );
        if let Some(ms) = status.boot_ms.or(metrics.boot_ms) {
            reg.add(
                "moat_vm_boot_seconds",
                Kind::Gauge,
                "Time from the VMM's start to the guest's boot marker.",
                &base,
                ms as f64 / 1000.0,
            );
        }
        for dev in &metrics.devices {
            let mut labels = base.to_vec();
            labels.push(("device", dev.device.as_str()));
            for (counter, v) in &dev.counters {
                let (name, kind, help) = device_metric(&dev.kind, counter);
                reg.add(&name, kind, &help, &labels, *v as f64);
            }
        }
        Ok(())
    }
}

/// The response to one HTTP request head (`GET /metrics` → the scrape).
fn respond(head: &str, exporter: &Exporter) -> (u16, &'static str, String) {
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => (200, CONTENT_TYPE, exporter.scrape()),
        (_, "/metrics") => (405, "text/plain", "only GET\n".into()),
        _ => (404, "text/plain", "not found: try /metrics\n".into()),
    }
}

fn serve_connection(mut stream: TcpStream, exporter: &Exporter) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    // The request head, up to the blank line (at most 16 KiB).
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 << 10 {
            return;
        }
    }
    let (code, ctype, body) = respond(&String::from_utf8_lossy(&head), exporter);
    let reason = match code {
        200 => "OK",
        405 => "Method Not Allowed",
        _ => "Not Found",
    };
    let reply = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes());
    let _ = stream.flush();
}

/// Binds `addr` for [`serve`].
pub fn listen(addr: &str) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr).map_err(|source| MetricsError::Listen {
        addr: addr.to_owned(),
        source,
    })
}

/// Serves `GET /metrics` on `listener` forever, one thread per connection.
pub fn serve(listener: TcpListener, exporter: Arc<Exporter>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let exporter = exporter.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-conn".into())
            .spawn(move || serve_connection(stream, &exporter));
        if let Err(e) = spawned {
            eprintln!("moat metrics: cannot start a connection thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let mut r = Registry::default();
        r.add(
            "moat_vm_vcpus",
            Kind::Gauge,
            "vCPUs.\nTwo lines \\ here",
            &[("pod", "a\"b\\c\nd"), ("namespace", "k8s.io")],
            2.0,
        );
        r.add(
            "moat_vm_vcpus",
            Kind::Gauge,
            "ignored",
            &[("pod", "x")],
            1.5,
        );
        r.add("moat_x-y", Kind::Counter, "c", &[], f64::INFINITY);
        assert_eq!(
            r.render(),
            "# HELP moat_vm_vcpus vCPUs.\\nTwo lines \\\\ here\n\
             # TYPE moat_vm_vcpus gauge\n\
             moat_vm_vcpus{pod=\"a\\\"b\\\\c\\nd\",namespace=\"k8s.io\"} 2\n\
             moat_vm_vcpus{pod=\"x\"} 1.5\n\
             # HELP moat_x_y c\n\
             # TYPE moat_x_y counter\n\
             moat_x_y +Inf\n"
        );
        assert_eq!(sanitize_name("9a.b"), "_9a_b");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(1e20), "100000000000000000000");
    }

    #[test]
    fn device_counters_map_to_metric_names() {
        assert_eq!(
            device_metric("net", "rx_bytes").0,
            "moat_net_rx_bytes_total"
        );
        assert_eq!(
            device_metric("mem", "plugged_bytes"),
            (
                "moat_mem_hotplug_plugged_bytes".into(),
                Kind::Gauge,
                "Hotplug memory the guest has plugged.".into()
            )
        );
        let (name, kind, help) = device_metric("gpu", "odd-name");
        assert_eq!(
            (name.as_str(), kind),
            ("moat_gpu_odd_name_total", Kind::Counter)
        );
        assert_eq!(help, "virtio-gpu counter odd-name.");
    }

    #[test]
    fn arguments() {
        let a = |v: &[&str]| parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            a(&["serve"]).unwrap(),
            Options {
                action: Action::Serve {
                    listen: DEFAULT_LISTEN.into()
                },
                config: None
            }
        );
        assert_eq!(
            a(&["serve", "--listen", "0.0.0.0:1", "--config", "/c"]).unwrap(),
            Options {
                action: Action::Serve {
                    listen: "0.0.0.0:1".into()
                },
                config: Some("/c".into())
            }
        );
        assert_eq!(a(&["dump"]).unwrap().action, Action::Dump);
        assert!(a(&["dump", "--listen", "x"]).is_err());
        assert!(a(&["serve", "--listen"]).is_err());
        assert!(a(&[]).is_err());
    }

    #[test]
    fn shim_command_lines() {
        let v = |s: &[&str]| s.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let shim = v(&[
            "/usr/local/bin/containerd-shim-moat-v2",
            "-namespace",
            "k8s.io",
            "-id",
            "abc",
            "-address",
            "/run/containerd/containerd.sock",
        ]);
        assert!(is_shim_for(&shim, "abc"));
        assert!(!is_shim_for(&shim, "ab"));
        assert!(!is_shim_for(
            &v(&["containerd-shim-runc-v2", "-id", "abc"]),
            "abc"
        ));
        assert!(!is_shim_for(&[], "abc"));
    }

    #[test]
    fn usage_of_this_process() {
        let proc = Path::new("/proc");
        let u = usage(proc, &[std::process::id()]);
        assert!(u.rss_bytes > 0);
        assert!(u.cpu_seconds >= 0.0);
        if let Some(pss) = u.pss_bytes {
            assert!(pss > 0);
        }
        assert_eq!(usage(proc, &[]).rss_bytes, 0);
    }
}
