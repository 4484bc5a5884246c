//! Host memory of processes, from procfs: a process's proportional set size
//! (`/proc/PID/smaps_rollup`), the part of it that is guest RAM (the VMM's large anonymous
//! mappings in `/proc/PID/smaps`), and finding the pods' shim and VMM processes by executable.

use std::fs;
use std::path::Path;

/// Errors reading a process's memory figures.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("read {path}: {source} (did the process exit?)")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} has no `Pss:` line: is this kernel's procfs too old for smaps_rollup?")]
    NoPss { path: String },
}

/// Mappings at least this large (KiB) in a VMM are taken to be guest RAM; the VMM's own heap and
/// stacks are far smaller, and the benchmark's guests have 256 MiB.
pub const GUEST_RAM_MIN_KIB: u64 = 64 * 1024;

fn read(path: &str) -> Result<String, MemError> {
    fs::read_to_string(path).map_err(|source| MemError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The value in KiB of the first `Key:   N kB` line of an smaps-style text.
fn field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// PSS of a whole process in KiB.
pub fn pss_kib(pid: u32) -> Result<u64, MemError> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = read(&path)?;
    field_kib(&text, "Pss").ok_or(MemError::NoPss { path })
}

/// PSS in KiB of the mappings of an smaps text that are at least `min_kib` large.
pub fn large_mappings_pss_kib(smaps: &str, min_kib: u64) -> u64 {
    let mut total = 0;
    let mut in_large = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        // A mapping header starts with `start-end` in hex; field lines start with `Name:`.
        if first.contains('-') && !first.ends_with(':') {
            in_large = false;
        } else if let Some(size) = line.strip_prefix("Size:") {
            let kib: u64 = size
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            in_large = kib >= min_kib;
        } else if in_large {
            if let Some(pss) = line.strip_prefix("Pss:") {
                total += pss
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

/// PSS in KiB of a VMM's guest RAM (what the guest touched).
pub fn guest_ram_pss_kib(pid: u32) -> Result<u64, MemError> {
    let text = read(&format!("/proc/{pid}/smaps"))?;
    Ok(large_mappings_pss_kib(&text, GUEST_RAM_MIN_KIB))
}

/// PIDs of live processes whose executable's file name is `name` (from `/proc/PID/exe`, so
/// independent of the 15-byte `comm` limit).
pub fn pids_of(name: &str) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .and_then(|p| {
                    Path::new(p.to_str()?.trim_end_matches(" (deleted)"))
                        .file_name()
                        .map(|n| n == name)
                })
                .unwrap_or(false)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0100000 r-xp 00000000 08:01 123 /usr/bin/moat-vmm
Size:               1024 kB
Rss:                 800 kB
Pss:                 400 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:               20480 kB
Pss:               20480 kB
VmFlags: rd wr mr mw me ac
7f0020000000-7f0020021000 rw-p 00000000 00:00 0
Size:                132 kB
Pss:                  64 kB
";

    #[test]
    fn only_large_mappings_count_as_guest_ram() {
        assert_eq!(large_mappings_pss_kib(SMAPS, GUEST_RAM_MIN_KIB), 20480);
        assert_eq!(large_mappings_pss_kib(SMAPS, 1), 20480 + 400 + 64);
        assert_eq!(large_mappings_pss_kib("", 1), 0);
    }

    #[test]
    fn rollup_field() {
        let rollup = "00400000-7ffd [rollup]\nRss:   900 kB\nPss:   512 kB\nPss_Anon: 1 kB\n";
        assert_eq!(field_kib(rollup, "Pss"), Some(512));
        assert_eq!(field_kib(rollup, "Swap"), None);
    }

    #[test]
    fn own_process_is_found_and_measured() {
        let me = std::process::id();
        assert!(pss_kib(me).unwrap() > 0);
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_str().unwrap();
        assert!(pids_of(name).contains(&me));
    }

    #[test]
    fn missing_process_is_a_clear_error() {
        let err = pss_kib(u32::MAX).unwrap_err().to_string();
        assert!(err.contains("smaps_rollup"), "{err}");
    }
}
