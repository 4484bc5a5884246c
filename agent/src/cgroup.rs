//! Cgroup v2 management: one cgroup per container under
//! `<cgroup2 root>/moat/<sandbox>/<container>`, limits from the OCI
//! resources (cpu, memory, pids, io weight), stats, freeze/thaw, kill,
//! and OOM event watching through `memory.events`.
//!
//! Degrades cleanly: with no cgroup2 mount, cgroups are off (logged once);
//! with a cgroup2 mount that lacks a controller, limits for that controller
//! are refused with a clear error only when the spec actually sets them,
//! while membership, freeze and kill (core v2 features) keep working.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

use moat_protocol::agent::{CpuStats, IoStats, MemoryStats, PidsStats, StatsContainerResponse};

/// Controllers the agent tries to enable.
const WANTED: [&str; 4] = ["cpu", "memory", "pids", "io"];

/// Errors of cgroup handling.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file could not be read or written.
    #[error("cgroup {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A limit needs a controller this kernel/hierarchy does not offer.
    #[error("cannot apply {what}: cgroup v2 controller {controller:?} is not available (available: {available})")]
    NoController {
        /// The limit.
        what: &'static str,
        /// The controller.
        controller: &'static str,
        /// What is available.
        available: String,
    },
    /// Cgroups are off entirely.
    #[error("no cgroup v2 hierarchy is mounted; {0} needs one")]
    Disabled(&'static str),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Finds the first cgroup2 mount point in /proc/self/mountinfo.
pub fn find_cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? == "cgroup2" {
            pre.split_whitespace().nth(4).map(PathBuf::from)
        } else {
            None
        }
    })
}

/// The agent's cgroup tree root and what it offers.
#[derive(Debug, Clone)]
pub struct Manager {
    base: PathBuf,
    controllers: HashSet<String>,
}

impl Manager {
    /// Sets up `<root>/moat`, enabling the wanted controllers where possible.
    pub fn new(root: &Path) -> Result<Self, CgroupError> {
        let base = root.join("moat");
        std::fs::create_dir_all(&base).map_err(io_err(&base))?;
        let available: HashSet<String> = std::fs::read_to_string(root.join("cgroup.controllers"))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let mut controllers = HashSet::new();
        for c in WANTED {
            if !available.contains(c) {
                continue;
            }
            // Enable in root's and moat's subtree so containers get the files.
            let ok = [root, base.as_path()]
                .iter()
                .all(|d| std::fs::write(d.join("cgroup.subtree_control"), format!("+{c}")).is_ok());
            if ok {
                controllers.insert(c.to_owned());
            }
        }
        let missing: Vec<&str> = WANTED
            .iter()
            .copied()
            .filter(|c| !controllers.contains(*c))
            .collect();
        if !missing.is_empty() {
            tracing::warn!(
                "cgroup v2 at {}: controllers {missing:?} unavailable; limits for them will be refused, stats will be partial",
                root.display()
            );
        }
        Ok(Self { base, controllers })
    }

    /// Available controllers.
    pub fn controllers(&self) -> Vec<String> {
        let mut v: Vec<String> = self.controllers.iter().cloned().collect();
        v.sort();
        v
    }

    /// Creates the sandbox level cgroup.
    pub fn create_sandbox(&self, sandbox: &str) -> Result<PathBuf, CgroupError> {
        let dir = self.base.join(sandbox);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        for c in &self.controllers {
            let f = dir.join("cgroup.subtree_control");
            std::fs::write(&f, format!("+{c}")).map_err(io_err(&f))?;
        }
        Ok(dir)
    }

    /// Creates a container cgroup and applies `resources`; removes it again on error.
    pub fn create(
        &self,
        sandbox: &str,
        id: &str,
        resources: Option<&LinuxResources>,
    ) -> Result<Cgroup, CgroupError> {
        let dir = self.base.join(sandbox).join(id);
        std::fs::create_dir(&dir).map_err(io_err(&dir))?;
        let cg = Cgroup {
            dir,
            controllers: self.controllers.clone(),
        };
        if let Some(r) = resources {
            if let Err(e) = cg.apply(r) {
                // Just created and never joined: empty, so rmdir suffices.
                let _ = std::fs::remove_dir(&cg.dir);
                return Err(e);
            }
        }
        Ok(cg)
    }

    /// Removes the sandbox level cgroup (must be empty).
    pub fn remove_sandbox(&self, sandbox: &str) {
        let dir = self.base.join(sandbox);
        if let Err(e) = std::fs::remove_dir(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing cgroup {}: {e}", dir.display());
            }
        }
    }
}

/// One container's cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    dir: PathBuf,
    controllers: HashSet<String>,
}

fn read_kv(path: &Path) -> Vec<(String, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
        })
        .collect()
}

fn get(kv: &[(String, u64)], key: &str) -> u64 {
    kv.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .unwrap_or(0)
}

fn read_u64(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Converts cgroup v1 cpu shares (2..262144) to a v2 weight (1..10000).
pub fn shares_to_weight(shares: u64) -> u64 {
    let s = shares.clamp(2, 262_144);
    1 + ((s - 2) * 9999) / 262_142
}

impl Cgroup {
    /// The `cgroup.procs` file.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    fn need(&self, controller: &'static str, what: &'static str) -> Result<(), CgroupError> {
        if self.controllers.contains(controller) {
            Ok(())
        } else {
            let mut v: Vec<&str> = self.controllers.iter().map(String::as_str).collect();
            v.sort();
            Err(CgroupError::NoController {
                what,
                controller,
                available: v.join(" "),
            })
        }
    }

    fn write(&self, file: &str, value: &str) -> Result<(), CgroupError> {
        let p = self.dir.join(file);
        std::fs::write(&p, value).map_err(io_err(&p))
    }

    /// Applies OCI resources.
    pub fn apply(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        if let Some(m) = r.memory() {
            // 0 means "not set" (as in runc), not "no memory at all".
            if let Some(limit) = m.limit().filter(|l| *l != 0) {
                self.need("memory", "memory.limit")?;
                self.write(
                    "memory.max",
                    &if limit < 0 {
                        "max".into()
                    } else {
                        limit.to_string()
                    },
                )?;
            }
            if let Some(res) = m.reservation() {
                self.need("memory", "memory.reservation")?;
                self.write(
                    "memory.low",
                    &if res < 0 {
                        "max".into()
                    } else {
                        res.to_string()
                    },
                )?;
            }
            if let Some(swap) = m.swap() {
                self.need("memory", "memory.swap")?;
                // OCI swap is memory+swap; v2 swap.max is swap alone.
                let v = match (swap, m.limit()) {
                    (s, _) if s < 0 => "max".to_owned(),
                    (s, Some(l)) if l >= 0 => s.saturating_sub(l).max(0).to_string(),
                    (s, _) => s.to_string(),
                };
                let _ = self.write("memory.swap.max", &v);
            }
        }
        if let Some(c) = r.cpu() {
            if let Some(quota) = c.quota() {
                self.need("cpu", "cpu.quota")?;
                let period = c.period().unwrap_or(100_000);
                let q = if quota <= 0 {
                    "max".into()
                } else {
                    quota.to_string()
                };
                self.write("cpu.max", &format!("{q} {period}"))?;
            }
            if let Some(shares) = c.shares() {
                self.need("cpu", "cpu.shares")?;
                self.write("cpu.weight", &shares_to_weight(shares).to_string())?;
            }
        }
        if let Some(p) = r.pids() {
            self.need("pids", "pids.limit")?;
            let l = p.limit();
            self.write(
                "pids.max",
                &if l <= 0 { "max".into() } else { l.to_string() },
            )?;
        }
        if let Some(b) = r.block_io() {
            if let Some(w) = b.weight() {
                self.need("io", "blockIO.weight")?;
                // v1 10..1000 → v2 1..10000
                let w = 1 + (u64::from(w).saturating_sub(10)) * 9999 / 990;
                self.write("io.weight", &format!("default {w}"))?;
            }
        }
        Ok(())
    }

    /// PIDs in the cgroup.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let p = self.procs_file();
        let s = std::fs::read_to_string(&p).map_err(io_err(&p))?;
        Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Freezes (`true`) or thaws the cgroup and waits until the kernel says so.
    pub async fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        self.write("cgroup.freeze", if frozen { "1" } else { "0" })?;
        let events = self.dir.join("cgroup.events");
        let want = if frozen { 1 } else { 0 };
        // The kernel updates cgroup.events asynchronously; watch it.
        let watcher = crate::cgroup::watch_file(&events).ok();
        loop {
            if get(&read_kv(&events), "frozen") == want {
                return Ok(());
            }
            match &watcher {
                Some(w) => w.changed().await,
                None => tokio::task::yield_now().await,
            }
        }
    }

    /// Kills every process (cgroup.kill, or SIGKILL to each listed PID).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        if self.write("cgroup.kill", "1").is_ok() {
            return Ok(());
        }
        for pid in self.pids()? {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        Ok(())
    }

    /// Whether any process is left (from cgroup.events).
    pub fn populated(&self) -> bool {
        get(&read_kv(&self.dir.join("cgroup.events")), "populated") != 0
    }

    /// Removes the cgroup once it is empty.
    pub async fn remove(&self) -> Result<(), CgroupError> {
        let events = self.dir.join("cgroup.events");
        if let Ok(w) = watch_file(&events) {
            while self.populated() {
                w.changed().await;
            }
        }
        match std::fs::remove_dir(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CgroupError::Io {
                path: self.dir.clone(),
                source: e,
            }),
        }
    }

    /// Reads statistics.
    pub fn stats(&self) -> StatsContainerResponse {
        let mut out = StatsContainerResponse::new();
        let cpu = read_kv(&self.dir.join("cpu.stat"));
        let mut c = CpuStats::new();
        c.usage_usec = get(&cpu, "usage_usec");
        c.user_usec = get(&cpu, "user_usec");
        c.system_usec = get(&cpu, "system_usec");
        c.nr_periods = get(&cpu, "nr_periods");
        c.nr_throttled = get(&cpu, "nr_throttled");
        c.throttled_usec = get(&cpu, "throttled_usec");
        out.cpu = Some(c).into();

        let mut m = MemoryStats::new();
        m.usage_bytes = read_u64(&self.dir.join("memory.current"));
        m.limit_bytes = read_u64(&self.dir.join("memory.max"));
        m.peak_bytes = read_u64(&self.dir.join("memory.peak"));
        let ms = read_kv(&self.dir.join("memory.stat"));
        m.anon_bytes = get(&ms, "anon");
        m.file_bytes = get(&ms, "file");
        m.stat = ms.iter().map(|(k, v)| (k.clone(), *v)).collect();
        m.swap_usage_bytes = read_u64(&self.dir.join("memory.swap.current"));
        m.swap_limit_bytes = read_u64(&self.dir.join("memory.swap.max"));
        let me = read_kv(&self.dir.join("memory.events"));
        m.oom_events = get(&me, "oom");
        m.oom_kill_events = get(&me, "oom_kill");
        out.memory = Some(m).into();

        let mut p = PidsStats::new();
        p.current = read_u64(&self.dir.join("pids.current"));
        p.limit = read_u64(&self.dir.join("pids.max"));
        out.pids = Some(p).into();

        let mut io = IoStats::new();
        for line in std::fs::read_to_string(self.dir.join("io.stat"))
            .unwrap_or_default()
            .lines()
        {
            for kv in line.split_whitespace().skip(1) {
                if let Some((k, v)) = kv.split_once('=') {
                    let v: u64 = v.parse().unwrap_or(0);
                    match k {
                        "rbytes" => io.read_bytes += v,
                        "wbytes" => io.write_bytes += v,
                        "rios" => io.read_ios += v,
                        "wios" => io.write_ios += v,
                        _ => {}
                    }
                }
            }
        }
        out.io = Some(io).into();
        out
    }

    /// Current `oom_kill` count.
    pub fn oom_kills(&self) -> u64 {
        get(&read_kv(&self.dir.join("memory.events")), "oom_kill")
    }

    /// `memory.events` path.
    pub fn memory_events(&self) -> PathBuf {
        self.dir.join("memory.events")
    }
}

/// An inotify watch on one cgroup file (cgroup v2 files signal changes
/// with IN_MODIFY).
pub struct FileWatch {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

/// Watches `path` for modification.
pub fn watch_file(path: &Path) -> Result<FileWatch, CgroupError> {
    use std::os::fd::FromRawFd;
    let err = |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    };
    // SAFETY: plain syscall; the result is checked.
    let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if raw < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: inotify_init1 returned a new descriptor that nothing else owns.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| err(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: valid descriptor and NUL-terminated path.
    if unsafe { libc::inotify_add_watch(owned.as_raw_fd(), cpath.as_ptr(), libc::IN_MODIFY) } < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `owned` is a valid descriptor this watch exclusively owns.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
    }
    .map_err(|e| CgroupError::Io {
        path: path.to_owned(),
        source: e.into_parts().1,
    })?;
    Ok(FileWatch { fd })
}

impl FileWatch {
    /// Waits for the next change (or a reactor error, which ends waiting).
    pub async fn changed(&self) {
        loop {
            let Ok(mut guard) = self.fd.readable().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), &mut buf).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) if n > 0 => return,
                Ok(Ok(_)) => continue,
                Ok(Err(_)) => return,
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_conversion_bounds() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1024), 39);
    }

    #[test]
    fn kv_parsing() {
        let d = std::env::temp_dir().join(format!("moat-cg-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("memory.events");
        std::fs::write(&f, "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n").unwrap();
        let kv = read_kv(&f);
        assert_eq!(get(&kv, "oom_kill"), 1);
        assert_eq!(get(&kv, "max"), 3);
        assert_eq!(get(&kv, "absent"), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
