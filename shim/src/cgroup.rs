//! The pod's host cgroup: moat-vmm (its supervisor, the jailed VMM, every vCPU and device
//! thread, and so the guest's RAM as it is touched) runs in the cgroup containerd names for the
//! pod's sandbox (`linux.cgroupsPath` of the pause container), where runc would run the pause
//! process. Its parent is the pod cgroup the kubelet bounds with the pod's limits plus the
//! RuntimeClass overhead, so those bound the VM on the host (Kata's `sandbox_cgroup_only`).
//!
//! Paths: cgroupfs (`/kubepods/burstable/pod<uid>/<id>`, ctr's `/<namespace>/<id>`) under
//! `/sys/fs/cgroup`; systemd (`kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`) as the
//! slice's directory (each `-` a level) and `<prefix>-<name>.scope` in it, made directly in
//! cgroupfs (no systemd unit). Missing directories are made, with the memory, cpu and pids
//! controllers enabled on the way down where the host has them (as runc does), and recorded in
//! the pod's state directory; teardown removes exactly those once the VMM is gone. No limit is
//! written: the limits are the pod cgroup's.
//!
//! The VMM enters the cgroup between `fork` and `exec` (a write of `0` to `cgroup.procs` on a
//! descriptor opened beforehand), so nothing of it ever runs outside.

use std::fs::File;
use std::path::{Component, Path, PathBuf};

/// Where cgroup v2 is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The record of the directories this shim made, in the pod's state directory.
const RECORD: &str = "cgroup.created";
/// Controllers enabled for the pod's cgroup where the host has them.
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Errors placing the VMM in the pod's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The path is not one moat understands or leaves the cgroup tree.
    #[error("cgroupsPath {0:?} is neither an absolute cgroupfs path nor slice:prefix:name")]
    BadPath(String),
    /// A directory or file of the cgroup tree could not be made or opened.
    #[error("pod cgroup {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// `slice:prefix:name` as systemd's cgroup driver spells it → the path below the root.
fn systemd_path(spec: &str) -> Option<PathBuf> {
    let mut parts = spec.split(':');
    let (slice, prefix, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !slice.ends_with(".slice") || name.is_empty() {
        return None;
    }
    let mut path = PathBuf::new();
    // kubepods-burstable-pod1.slice → kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice
    let stem = slice.trim_end_matches(".slice");
    if stem != "-" && !stem.is_empty() {
        let mut acc = String::new();
        for word in stem.split('-') {
            if word.is_empty() {
                return None;
            }
            if !acc.is_empty() {
                acc.push('-');
            }
            acc.push_str(word);
            path.push(format!("{acc}.slice"));
        }
    }
    let leaf = if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    };
    path.push(leaf);
    Some(path)
}

/// The cgroup directory `cgroups_path` names under `root`, refusing anything that would leave
/// it (`..`, a path that is neither form).
pub fn resolve(root: &Path, cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let bad = || CgroupError::BadPath(cgroups_path.to_owned());
    let rel = if let Some(abs) = cgroups_path.strip_prefix('/') {
        PathBuf::from(abs)
    } else {
        systemd_path(cgroups_path).ok_or_else(bad)?
    };
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad());
    }
    Ok(root.join(rel))
}

/// The pod's cgroup, made (where missing) and ready to be entered.
#[derive(Debug)]
pub struct PodCgroup {
    /// The cgroup's directory.
    pub dir: PathBuf,
    /// `cgroup.procs`, open for writing (close-on-exec).
    procs: File,
}

impl PodCgroup {
    /// Makes `dir` (and missing ancestors below `root`), enabling the controllers on the way,
    /// and records what it made in `state_dir`.
    pub fn create(root: &Path, dir: PathBuf, state_dir: &Path) -> Result<Self, CgroupError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CgroupError::Io { path, source }
        };
        let rel = dir
            .strip_prefix(root)
            .map_err(|_| CgroupError::BadPath(dir.display().to_string()))?;
        let mut made = Vec::new();
        let mut cur = root.to_path_buf();
        for c in rel.components() {
            enable_controllers(&cur);
            cur.push(c);
            match std::fs::create_dir(&cur) {
                Ok(()) => made.push(cur.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    remove_made(&made);
                    return Err(io(&cur)(e));
                }
            }
        }
        let record: String = made.iter().map(|p| format!("{}\n", p.display())).collect();
        if let Err(e) = std::fs::write(state_dir.join(RECORD), record) {
            remove_made(&made);
            return Err(io(&state_dir.join(RECORD))(e));
        }
        let procs_path = dir.join("cgroup.procs");
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .map_err(|e| {
                remove_recorded(root, state_dir);
                io(&procs_path)(e)
            })?;
        Ok(Self { dir, procs })
    }

    /// The descriptor of `cgroup.procs`, for the child between `fork` and `exec`.
    pub fn procs_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.procs)
    }
}

/// Writes `+memory +cpu +pids` (those the host has) to `dir`'s `cgroup.subtree_control`;
/// best effort: a controller the parent does not pass down is simply not there.
fn enable_controllers(dir: &Path) {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for c in CONTROLLERS {
        let has = |text: &str| text.split_whitespace().any(|w| w == c);
        if has(&available) && !has(&enabled) {
            let _ = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
        }
    }
}

fn remove_made(made: &[PathBuf]) {
    for dir in made.iter().rev() {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Removes the cgroup directories recorded in `state_dir` (deepest first, only below `root`).
/// Whatever still runs in the deepest one (a VMM being killed) is killed through `cgroup.kill`
/// and awaited (bounded) first; a directory still busy after that is left and logged.
pub fn remove_recorded(root: &Path, state_dir: &Path) {
    let Ok(text) = std::fs::read_to_string(state_dir.join(RECORD)) else {
        return;
    };
    let made: Vec<PathBuf> = text
        .lines()
        .map(PathBuf::from)
        .filter(|p| p.starts_with(root) && p != root)
        .collect();
    if let Some(leaf) = made.last() {
        drain(leaf);
    }
    remove_made(&made);
    for dir in &made {
        if dir.exists() {
            tracing::warn!("pod cgroup {} could not be removed", dir.display());
        }
    }
    let _ = std::fs::remove_file(state_dir.join(RECORD));
}

/// Kills every process of cgroup `dir` and waits (at most 5 s) until the kernel says it is
/// empty (`populated 0` in `cgroup.events`).
fn drain(dir: &Path) {
    let populated = || {
        std::fs::read_to_string(dir.join("cgroup.events"))
            .map(|t| t.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    };
    if !populated() {
        return;
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while populated() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_and_systemd_paths_resolve_below_the_root() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            resolve(root, "/kubepods/burstable/pod1/abc").unwrap(),
            root.join("kubepods/burstable/pod1/abc")
        );
        assert_eq!(
            resolve(root, "kubepods-burstable-pod1.slice:cri-containerd:abc").unwrap(),
            root.join(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            resolve(root, "system.slice:docker:x").unwrap(),
            root.join("system.slice/docker-x.scope")
        );
        for bad in [
            "",
            "/",
            "/a/../../etc",
            "relative/path",
            "a.slice:b",
            "x:y:z",
        ] {
            assert!(resolve(root, bad).is_err(), "{bad:?}");
        }
    }

    /// On a scratch directory standing in for the cgroup root (no `cgroup.procs` there, so
    /// entering fails): the failure leaves neither the directories it made nor its record, and
    /// a directory that was there before stays.
    #[test]
    fn a_failed_creation_removes_what_it_made() {
        let base = std::env::temp_dir().join(format!("moat-cgroup-test-{}", std::process::id()));
        let root = base.join("root");
        let state = base.join("state");
        std::fs::create_dir_all(root.join("existing")).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        let err = PodCgroup::create(&root, root.join("existing/pod/leaf"), &state).unwrap_err();
        assert!(matches!(err, CgroupError::Io { .. }), "{err}");
        assert!(root.join("existing").is_dir());
        assert!(!root.join("existing/pod").exists());
        assert!(!state.join(RECORD).exists());
        let _ = std::fs::remove_dir_all(&base);
    }
}
