//! `moat ps`: the pods the shim runs on this host and their VMs, read from the shim's state
//! directory (`<state_dir>/<namespace>/<pod id>/`, laid out by the shim's `sandbox` module:
//! `vmm.pid`, `vmm.log`, `console.log`, …) and from `/proc`. This module owns that reading:
//! listing the pods ([`list`]), finding one by id or id prefix ([`find_pod`], also used by
//! `moat logs`), and the table `moat ps` prints ([`table`]).
//!
//! Per pod: the moat-vmm pid (`vmm.pid`), whether that process is still the pod's VMM, the
//! vCPUs and boot memory it was started with (its `--vcpus`/`--mem-mib` arguments), the resident
//! memory of the VMM and its children (the jailed VMM holds the guest RAM) and its uptime.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::procfs;

/// Errors reading the state directory.
#[derive(Debug, thiserror::Error)]
pub enum PsError {
    /// A directory could not be listed.
    #[error("cannot read the moat state directory {path}: {source} (run as root?)")]
    Read {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No pod has that id (or id prefix).
    #[error("no pod {pod} in {state_dir}{namespace} (moat ps lists them; a pod's directory goes when the pod is removed)")]
    NotFound {
        /// What was asked for.
        pod: String,
        /// The state directory.
        state_dir: PathBuf,
        /// " (namespace NS)" when one was given.
        namespace: String,
    },
    /// Several pods match.
    #[error("{pod} matches several pods: {matches}; give more of the id or --namespace")]
    Ambiguous {
        /// What was asked for.
        pod: String,
        /// `namespace/id` of each.
        matches: String,
    },
}

/// Whether the pod's VMM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PodState {
    /// `vmm.pid` names a live process that started before the file was written.
    Running,
    /// The process `vmm.pid` names is gone (or its pid now belongs to another process).
    VmmGone,
    /// No `vmm.pid` (yet): the pod is starting, or its VMM never started.
    NoVmm,
}

impl PodState {
    fn label(self) -> &'static str {
        match self {
            PodState::Running => "running",
            PodState::VmmGone => "VMM gone",
            PodState::NoVmm => "no VMM",
        }
    }
}

/// One pod's line of `moat ps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pod {
    /// The containerd namespace (`k8s.io` for Kubernetes pods).
    pub namespace: String,
    /// The pod (sandbox) id.
    pub id: String,
    /// Its state directory.
    pub dir: PathBuf,
    /// Whether its VMM runs.
    pub state: PodState,
    /// moat-vmm's pid, from `vmm.pid`.
    pub vmm_pid: Option<u32>,
    /// vCPUs the VM booted with.
    pub vcpus: Option<u32>,
    /// Memory the VM booted with, MiB.
    pub memory_mib: Option<u64>,
    /// Resident memory of moat-vmm and its children, KiB.
    pub rss_kib: Option<u64>,
    /// Seconds since moat-vmm started.
    pub uptime_secs: Option<u64>,
}

fn subdirs(dir: &Path) -> Result<Vec<(String, PathBuf)>, PsError> {
    let entries = std::fs::read_dir(dir).map_err(|source| PsError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut out: Vec<(String, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect();
    out.sort();
    Ok(out)
}

/// The value after `flag` in `args`.
fn arg_after(args: &[String], flag: &str) -> Option<String> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).cloned()
}

/// Reads one pod's directory.
pub fn pod(proc: &Path, namespace: &str, id: &str, dir: &Path) -> Pod {
    let pid_file = dir.join("vmm.pid");
    let vmm_pid: Option<u32> = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .filter(|p| *p > 0);
    let mut pod = Pod {
        namespace: namespace.to_owned(),
        id: id.to_owned(),
        dir: dir.to_owned(),
        state: PodState::NoVmm,
        vmm_pid,
        vcpus: None,
        memory_mib: None,
        rss_kib: None,
        uptime_secs: None,
    };
    let Some(pid) = vmm_pid else {
        return pod;
    };
    let started = procfs::start_time(proc, pid);
    let written = std::fs::metadata(&pid_file).and_then(|m| m.modified()).ok();
    let alive = started.is_some() && procfs::state(proc, pid) != Some('Z');
    // The shim writes vmm.pid right after starting moat-vmm: a process that started later
    // only has the same pid.
    let reused = matches!((started, written), (Some(s), Some(w)) if s > w + Duration::from_secs(2));
    if !alive || reused {
        pod.state = PodState::VmmGone;
        return pod;
    }
    pod.state = PodState::Running;
    if let Some(args) = procfs::cmdline(proc, pid) {
        pod.vcpus = arg_after(&args, "--vcpus").and_then(|v| v.parse().ok());
        pod.memory_mib = arg_after(&args, "--mem-mib").and_then(|v| v.parse().ok());
    }
    let rss: Vec<u64> = procfs::tree(proc, pid)
        .into_iter()
        .filter_map(|p| procfs::rss_kib(proc, p))
        .collect();
    pod.rss_kib = (!rss.is_empty()).then(|| rss.iter().sum());
    pod.uptime_secs = started
        .and_then(|s| SystemTime::now().duration_since(s).ok())
        .map(|d| d.as_secs());
    pod
}

/// Every pod below `state_dir` (`<namespace>/<pod id>/`), sorted by namespace and id; none when
/// the directory does not exist (no pod has run since boot).
pub fn list(state_dir: &Path, proc: &Path) -> Result<Vec<Pod>, PsError> {
    if !state_dir.exists() {
        return Ok(Vec::new());
    }
    let mut pods = Vec::new();
    for (namespace, ns_dir) in subdirs(state_dir)? {
        for (id, dir) in subdirs(&ns_dir)? {
            pods.push(pod(proc, &namespace, &id, &dir));
        }
    }
    Ok(pods)
}

/// The directory of pod `id` (the full id, else a unique prefix of it), in `namespace` if
/// given: `(namespace, full id, directory)`.
pub fn find_pod(
    state_dir: &Path,
    id: &str,
    namespace: Option<&str>,
) -> Result<(String, String, PathBuf), PsError> {
    let not_found = || PsError::NotFound {
        pod: id.to_owned(),
        state_dir: state_dir.to_owned(),
        namespace: namespace
            .map(|n| format!(" (namespace {n})"))
            .unwrap_or_default(),
    };
    if id.is_empty() || id.contains('/') || id == "." || id == ".." {
        return Err(not_found());
    }
    if !state_dir.exists() {
        return Err(not_found());
    }
    let mut exact = Vec::new();
    let mut prefixed = Vec::new();
    for (ns, ns_dir) in subdirs(state_dir)? {
        if namespace.is_some_and(|n| n != ns) {
            continue;
        }
        for (pod, dir) in subdirs(&ns_dir)? {
            if pod == id {
                exact.push((ns.clone(), pod, dir));
            } else if pod.starts_with(id) {
                prefixed.push((ns.clone(), pod, dir));
            }
        }
    }
    let found = if exact.is_empty() { prefixed } else { exact };
    match found.len() {
        0 => Err(not_found()),
        1 => Ok(found.into_iter().next().ok_or_else(not_found)?),
        _ => Err(PsError::Ambiguous {
            pod: id.to_owned(),
            matches: found
                .iter()
                .map(|(ns, pod, _)| format!("{ns}/{pod}"))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

fn human_kib(kib: u64) -> String {
    if kib >= 1024 * 1024 {
        format!("{:.1} GiB", kib as f64 / (1024.0 * 1024.0))
    } else {
        format!("{:.1} MiB", kib as f64 / 1024.0)
    }
}

fn human_secs(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Long ids (Kubernetes' 64 hex digits) are shown by their first 13 characters, as crictl does;
/// `moat logs` takes such a prefix.
fn short_id(id: &str) -> &str {
    if id.len() > 20 && id.is_ascii() {
        &id[..13]
    } else {
        id
    }
}

/// The table `moat ps` prints: a header and one line per pod.
pub fn table(pods: &[Pod]) -> String {
    let dash = || "-".to_owned();
    let rows: Vec<[String; 8]> = pods
        .iter()
        .map(|p| {
            [
                p.namespace.clone(),
                short_id(&p.id).to_owned(),
                p.state.label().to_owned(),
                p.vmm_pid.map_or_else(dash, |v| v.to_string()),
                p.vcpus.map_or_else(dash, |v| v.to_string()),
                p.memory_mib.map_or_else(dash, |m| format!("{m} MiB")),
                p.rss_kib.map_or_else(dash, human_kib),
                p.uptime_secs.map_or_else(dash, human_secs),
            ]
        })
        .collect();
    let header = [
        "NAMESPACE",
        "POD",
        "STATE",
        "VMM PID",
        "VCPUS",
        "MEMORY",
        "VMM RSS",
        "UPTIME",
    ];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    use moat_test_support::TempDir as Dir;

    fn make_pod(state: &Path, ns: &str, id: &str, pid: Option<u32>) -> PathBuf {
        let dir = state.join(ns).join(id);
        fs::create_dir_all(dir.join("shared")).unwrap();
        if let Some(pid) = pid {
            fs::write(dir.join("vmm.pid"), pid.to_string()).unwrap();
        }
        dir
    }

    /// A pid that is certainly not running: above the kernel's maximum.
    fn dead_pid() -> u32 {
        fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .unwrap_or(4_194_304)
            + 1
    }

    #[test]
    fn lists_pods_with_their_vmm_state() {
        let d = Dir::new("list");
        let me = std::process::id();
        make_pod(&d.0, "k8s.io", &"a".repeat(64), Some(me));
        make_pod(&d.0, "default", "gone", Some(dead_pid()));
        make_pod(&d.0, "default", "starting", None);
        let pods = list(&d.0, Path::new("/proc")).unwrap();
        let ids: Vec<(&str, &str)> = pods
            .iter()
            .map(|p| (p.namespace.as_str(), p.id.as_str()))
            .collect();
        let long = "a".repeat(64);
        assert_eq!(
            ids,
            [
                ("default", "gone"),
                ("default", "starting"),
                ("k8s.io", long.as_str())
            ]
        );
        assert_eq!(pods[0].state, PodState::VmmGone);
        assert_eq!(pods[0].rss_kib, None);
        assert_eq!(pods[1].state, PodState::NoVmm);
        assert_eq!(pods[1].vmm_pid, None);
        let running = &pods[2];
        assert_eq!(running.state, PodState::Running, "{running:?}");
        assert_eq!(running.vmm_pid, Some(me));
        assert!(running.rss_kib.is_some_and(|k| k > 0), "{running:?}");
        assert!(running.uptime_secs.is_some_and(|s| s < 3600), "{running:?}");
        // The test binary has no --vcpus/--mem-mib: not recorded.
        assert_eq!((running.vcpus, running.memory_mib), (None, None));

        let text = table(&pods);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE  POD"), "{text}");
        assert!(lines[1].contains("VMM gone"), "{text}");
        assert!(lines[2].contains("no VMM"), "{text}");
        assert!(
            lines[3].contains("aaaaaaaaaaaaa ") && lines[3].contains("running"),
            "{text}"
        );
        assert!(lines[3].contains("MiB"), "{text}");

        let json = serde_json::to_value(&pods).unwrap();
        assert_eq!(json[2]["state"], "running");
        assert_eq!(json[0]["state"], "vmm-gone");
        assert_eq!(json[1]["state"], "no-vmm");
        assert_eq!(json[2]["vmm_pid"], me);
    }

    #[test]
    fn a_reused_pid_is_not_the_vmm() {
        let d = Dir::new("reused");
        let dir = make_pod(&d.0, "default", "old", Some(std::process::id()));
        // vmm.pid written long before this process started.
        let old = SystemTime::now() - Duration::from_secs(86400 * 365);
        fs::File::options()
            .write(true)
            .open(dir.join("vmm.pid"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let p = pod(Path::new("/proc"), "default", "old", &dir);
        assert_eq!(p.state, PodState::VmmGone);
    }

    #[test]
    fn vm_size_comes_from_the_vmm_command_line() {
        let d = Dir::new("size");
        let proc = d.0.join("proc");
        fs::create_dir_all(proc.join("77/task/77")).unwrap();
        fs::write(
            proc.join("77/cmdline"),
            "/usr/local/bin/moat-vmm\x00--kernel\x00k\x00--vcpus\x002\x00--mem-mib\x001280\x00",
        )
        .unwrap();
        fs::write(
            proc.join("77/stat"),
            "77 (moat-vmm) S 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0\n",
        )
        .unwrap();
        fs::write(
            proc.join("77/status"),
            "Name:\tmoat-vmm\nVmRSS:\t  2048 kB\n",
        )
        .unwrap();
        fs::write(proc.join("77/task/77/children"), "78 ").unwrap();
        fs::create_dir_all(proc.join("78")).unwrap();
        fs::write(
            proc.join("78/stat"),
            "78 (moat-vmm) S 77 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 101 0 0\n",
        )
        .unwrap();
        fs::write(proc.join("78/status"), "VmRSS:\t 102400 kB\n").unwrap();
        // Booted at the epoch + 1 s of uptime: long before vmm.pid, so not "reused".
        fs::write(proc.join("stat"), "btime 0\n").unwrap();
        let dir = make_pod(&d.0.join("state"), "default", "p", Some(77));
        fs::File::options()
            .write(true)
            .open(dir.join("vmm.pid"))
            .unwrap()
            .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(10))
            .unwrap();
        let p = pod(&proc, "default", "p", &dir);
        assert_eq!(p.state, PodState::Running, "{p:?}");
        assert_eq!(p.vcpus, Some(2));
        assert_eq!(p.memory_mib, Some(1280));
        assert_eq!(p.rss_kib, Some(2048 + 102400));
    }

    #[test]
    fn pods_are_found_by_id_or_unique_prefix() {
        let d = Dir::new("find");
        make_pod(&d.0, "k8s.io", "abc123", None);
        make_pod(&d.0, "k8s.io", "abd456", None);
        make_pod(&d.0, "default", "abc123", None);
        let (ns, id, dir) = find_pod(&d.0, "abd", None).unwrap();
        assert_eq!((ns.as_str(), id.as_str()), ("k8s.io", "abd456"));
        assert_eq!(dir, d.0.join("k8s.io/abd456"));
        let err = find_pod(&d.0, "abc123", None).unwrap_err().to_string();
        assert!(err.contains("default/abc123, k8s.io/abc123"), "{err}");
        let (ns, _, _) = find_pod(&d.0, "abc123", Some("k8s.io")).unwrap();
        assert_eq!(ns, "k8s.io");
        let err = find_pod(&d.0, "ab", Some("k8s.io"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("several"), "{err}");
        let err = find_pod(&d.0, "zzz", None).unwrap_err().to_string();
        assert!(err.contains("no pod zzz"), "{err}");
        assert!(find_pod(&d.0, "../k8s.io", None).is_err());
        assert!(list(&d.0.join("missing"), Path::new("/proc"))
            .unwrap()
            .is_empty());
    }
}
