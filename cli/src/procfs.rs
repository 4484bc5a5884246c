//! The few `/proc` readings the `moat` command makes about other processes: a process's
//! command line, when it started, its resident memory and its children. Every function reads
//! below a `proc` directory it is given (`/proc` normally), so callers can be tested on a
//! fabricated tree; a process that is gone or unreadable gives `None`, never an error.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The command line of process `pid` (`/proc/PID/cmdline`), one string per argument; `None` when
/// the process is gone or is a kernel thread (empty command line).
pub fn cmdline(proc: &Path, pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(proc.join(pid.to_string()).join("cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    let raw = raw.strip_suffix(b"\0").unwrap_or(&raw);
    Some(
        raw.split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// The pids of all processes (the numeric entries of `proc`), ascending.
pub fn pids(proc: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir(proc)
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    pids
}

/// The fields of `/proc/PID/stat` after the command name (which may hold spaces and
/// parentheses): element 0 is field 3 (`state`) of proc(5).
fn stat_fields(proc: &Path, pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The parent pid of `pid`.
pub fn ppid(proc: &Path, pid: u32) -> Option<u32> {
    stat_fields(proc, pid)?.get(1)?.parse().ok()
}

/// The state letter of `pid` (field 3 of `/proc/PID/stat`: `R`, `S`, `Z` for a zombie…).
pub fn state(proc: &Path, pid: u32) -> Option<char> {
    stat_fields(proc, pid)?.first()?.chars().next()
}

/// Clock ticks per second of `/proc/PID/stat` times.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a constant of the C library; no memory is passed.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// When process `pid` started (wall clock): the boot time of `proc/stat` (`btime`) plus the
/// process's `starttime` (field 22 of `/proc/PID/stat`, in clock ticks since boot). Precise to
/// about a second (`btime` is whole seconds).
pub fn start_time(proc: &Path, pid: u32) -> Option<SystemTime> {
    let ticks: u64 = stat_fields(proc, pid)?.get(19)?.parse().ok()?;
    let stat = std::fs::read_to_string(proc.join("stat")).ok()?;
    let btime: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let hz = clock_ticks();
    let since_boot =
        Duration::from_secs(ticks / hz) + Duration::from_millis(ticks % hz * 1000 / hz);
    Some(UNIX_EPOCH + Duration::from_secs(btime) + since_boot)
}

/// Resident memory of `pid` in KiB (`VmRSS` of `/proc/PID/status`); `None` for a process
/// without (a kernel thread, a zombie) or one that is gone.
pub fn rss_kib(proc: &Path, pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(proc.join(pid.to_string()).join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The children of `pid` (`/proc/PID/task/PID/children`).
pub fn children(proc: &Path, pid: u32) -> Vec<u32> {
    std::fs::read_to_string(
        proc.join(pid.to_string())
            .join("task")
            .join(pid.to_string())
            .join("children"),
    )
    .map(|t| {
        t.split_whitespace()
            .filter_map(|c| c.parse().ok())
            .collect()
    })
    .unwrap_or_default()
}

/// `pid` and all its descendants, `pid` first (depth-first; at most 1024 processes, so a
/// pid reused while walking cannot loop).
pub fn tree(proc: &Path, pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        if out.len() >= 1024 || out.contains(&p) {
            continue;
        }
        out.push(p);
        todo.extend(children(proc, p).into_iter().rev());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC: &str = "/proc";

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let proc = Path::new(PROC);
        let args = cmdline(proc, me).expect("own cmdline");
        assert!(!args.is_empty());
        assert!(pids(proc).contains(&me));
        assert_eq!(ppid(proc, me), Some(std::os::unix::process::parent_id()));
        let started = start_time(proc, me).expect("own start time");
        let age = SystemTime::now()
            .duration_since(started)
            .unwrap_or_default();
        assert!(age < Duration::from_secs(3600), "started {age:?} ago");
        assert!(rss_kib(proc, me).is_some_and(|kib| kib > 0));
        assert_eq!(tree(proc, me)[0], me);
    }

    #[test]
    fn stat_with_odd_command_names_and_gone_processes() {
        let d = std::env::temp_dir().join(format!("moat-procfs-{}", std::process::id()));
        std::fs::create_dir_all(d.join("42")).unwrap();
        std::fs::write(
            d.join("42/stat"),
            "42 (a) b (c) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 250 1000 10\n",
        )
        .unwrap();
        std::fs::write(d.join("stat"), "cpu 1 2 3\nbtime 1700000000\n").unwrap();
        assert_eq!(ppid(&d, 42), Some(7));
        let hz = clock_ticks();
        let expect = UNIX_EPOCH
            + Duration::from_secs(1_700_000_000)
            + Duration::from_millis(250 * 1000 / hz);
        assert_eq!(start_time(&d, 42), Some(expect));
        assert_eq!(cmdline(&d, 42), None);
        assert_eq!(rss_kib(&d, 43), None);
        assert!(children(&d, 43).is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
