//! The guest side of a VM that follows its pod: CPUs the VM has but booted offline
//! (`maxcpus=` on the kernel command line) are brought online when the shim grows the pod, and
//! memory blocks virtio-mem plugged but the kernel left offline are onlined. Everything here is
//! sysfs (`/sys/devices/system/{cpu,memory}`), read relative to a root so tests use a fake tree.
//!
//! The guest is not trusted with the limit: a hostile guest can online every CPU the VM has;
//! the pod's host cgroup (`cpu.max`) is what bounds the CPU time its vCPU threads get.

use std::io;
use std::path::{Path, PathBuf};

/// Why resources could not be brought online.
#[derive(Debug, thiserror::Error)]
pub enum ResourcesError {
    /// A sysfs file could not be read or written.
    #[error("{path}: {source}")]
    Sysfs {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn sysfs_err(path: &Path) -> impl FnOnce(io::Error) -> ResourcesError + '_ {
    move |source| ResourcesError::Sysfs {
        path: path.to_owned(),
        source,
    }
}

/// Parses a CPU list (`0-2,4`) into CPU numbers.
pub fn parse_cpu_list(s: &str) -> Vec<u32> {
    let mut cpus = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
            if b >= a && b - a < 4096 {
                cpus.extend(a..=b);
            }
        }
    }
    cpus
}

/// Brings the number of online CPUs to `want` (at least 1, at most what the VM has), onlining
/// the lowest offline ones or offlining the highest online ones (CPU 0 stays). Returns the CPUs
/// online afterwards.
pub fn set_online_cpus(root: &Path, want: u32) -> Result<u32, ResourcesError> {
    let dir = root.join("sys/devices/system/cpu");
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read_to_string(&p).map_err(sysfs_err(&p))
    };
    let present = parse_cpu_list(&read("present")?);
    let mut online = parse_cpu_list(&read("online")?);
    let want = want.max(1) as usize;
    let offline: Vec<u32> = present
        .into_iter()
        .filter(|c| !online.contains(c))
        .collect();
    for cpu in &offline {
        if online.len() >= want {
            break;
        }
        let p = dir.join(format!("cpu{cpu}/online"));
        std::fs::write(&p, "1").map_err(sysfs_err(&p))?;
        online.push(*cpu);
    }
    online.sort_unstable();
    while online.len() > want {
        let Some(&cpu) = online.last().filter(|c| **c != 0) else {
            break;
        };
        let p = dir.join(format!("cpu{cpu}/online"));
        std::fs::write(&p, "0").map_err(sysfs_err(&p))?;
        online.pop();
    }
    Ok(parse_cpu_list(&read("online")?).len() as u32)
}

/// Onlines every memory block that is offline (virtio-mem's, when the kernel did not online
/// them itself). Best effort: virtio-mem onlines its blocks on its own and refuses a block it is
/// still working on (`EINVAL`), so a refused block is left to it. Returns how many it onlined.
pub fn online_memory(root: &Path) -> Result<u32, ResourcesError> {
    let dir = root.join("sys/devices/system/memory");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        // No memory hotplug in this kernel: nothing to online.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(sysfs_err(&dir)(e)),
    };
    let mut n = 0;
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with("memory") {
            continue;
        }
        let state = e.path().join("state");
        match std::fs::read_to_string(&state) {
            Ok(s) if s.trim() == "offline" => match std::fs::write(&state, "online") {
                Ok(()) => n += 1,
                Err(e) => tracing::debug!("{}: left to the kernel: {e}", state.display()),
            },
            _ => {}
        }
    }
    Ok(n)
}

/// MemTotal from `<root>/proc/meminfo`, bytes (0 when unreadable).
pub fn mem_total_bytes(root: &Path) -> u64 {
    std::fs::read_to_string(root.join("proc/meminfo"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_test_support::TempDir;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-2,4\n"), vec![0, 1, 2, 4]);
        assert_eq!(parse_cpu_list("0"), vec![0]);
        assert_eq!(parse_cpu_list(""), Vec::<u32>::new());
        assert_eq!(parse_cpu_list("3-1,x,0-999999"), Vec::<u32>::new());
    }

    /// A fake sysfs: writes to `cpuN/online` are recorded, `online` is kept in step by the test.
    fn tree(present: &str, online: &str) -> TempDir {
        let d = TempDir::new("agent-resources");
        let cpu = d.0.join("sys/devices/system/cpu");
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::write(cpu.join("present"), present).unwrap();
        std::fs::write(cpu.join("online"), online).unwrap();
        for c in parse_cpu_list(present) {
            std::fs::create_dir_all(cpu.join(format!("cpu{c}"))).unwrap();
        }
        d
    }

    #[test]
    fn onlines_the_lowest_offline_cpus_and_offlines_the_highest() {
        let d = tree("0-3", "0");
        let cpu = d.0.join("sys/devices/system/cpu");
        // The fake `online` file does not follow the writes: the count read back stays 1, but
        // the writes made are what the kernel would be asked.
        set_online_cpus(&d.0, 3).unwrap();
        let written = |c: u32| std::fs::read_to_string(cpu.join(format!("cpu{c}/online"))).ok();
        assert_eq!(
            (written(1), written(2), written(3)),
            (Some("1".into()), Some("1".into()), None)
        );
        let d = tree("0-3", "0-3");
        let cpu = d.0.join("sys/devices/system/cpu");
        set_online_cpus(&d.0, 0).unwrap();
        let written = |c: u32| std::fs::read_to_string(cpu.join(format!("cpu{c}/online"))).ok();
        assert_eq!(written(3), Some("0".into()));
        assert_eq!(written(1), Some("0".into()));
        assert_eq!(written(0), None, "CPU 0 stays");
        assert!(set_online_cpus(Path::new("/nonexistent-moat"), 1).is_err());
    }

    #[test]
    fn onlines_offline_memory_blocks() {
        let d = TempDir::new("agent-resources");
        let mem = d.0.join("sys/devices/system/memory");
        for (name, state) in [("memory32", "offline\n"), ("memory33", "online\n")] {
            std::fs::create_dir_all(mem.join(name)).unwrap();
            std::fs::write(mem.join(name).join("state"), state).unwrap();
        }
        assert_eq!(online_memory(&d.0).unwrap(), 1);
        assert_eq!(
            std::fs::read_to_string(mem.join("memory32/state")).unwrap(),
            "online"
        );
        assert_eq!(online_memory(Path::new("/nonexistent-moat")).unwrap(), 0);
    }
}
