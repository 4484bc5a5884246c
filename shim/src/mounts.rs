//! Mount-table helpers shared by the pod state directory ([`crate::sandbox`]) and the container
//! files below it ([`crate::rootfs`]): finding what is mounted below a directory and unmounting
//! it, so the directory can be removed without reaching through a bind mount into host files.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{umount2, MntFlags};
use tracing::warn;

/// Mount points at or below `dir`, deepest first.
fn mounts_below(dir: &Path) -> Option<Vec<PathBuf>> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut targets: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    targets.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    targets.dedup();
    Some(targets)
}

/// Unmounts everything mounted at or below `dir` (deepest first, lazily) — container rootfs,
/// bind sources — so the directory can be removed. Returns false if something is still mounted
/// there afterwards (or the mount table is unreadable): removing the directory would then reach
/// into the host files behind a bind mount, so callers must leave it.
pub fn unmount_below(dir: &Path) -> bool {
    let Some(targets) = mounts_below(dir) else {
        warn!(
            "cannot read /proc/self/mountinfo; leaving {}",
            dir.display()
        );
        return false;
    };
    for t in targets {
        if let Err(e) = umount2(&t, MntFlags::MNT_DETACH) {
            if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                warn!("unmount {}: {e}", t.display());
            }
        }
    }
    match mounts_below(dir) {
        Some(left) if left.is_empty() => true,
        left => {
            warn!(
                "still mounted below {}: {:?}; leaving it in place",
                dir.display(),
                left.unwrap_or_default()
            );
            false
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(v as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
