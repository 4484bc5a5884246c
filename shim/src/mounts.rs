//! Mount-table helpers shared by the pod state directory ([`crate::sandbox`]) and the container
//! files below it ([`crate::rootfs`]):
//!
//! - the pod's shared directory itself: a small `nodev,nosuid` tmpfs of its own ([`make_share`]);
//! - host-side restriction of everything mounted below the pod's shared directory: binds made
//!   `nodev,nosuid` (and read-only when the spec says `ro`) *before* they are attached, so every
//!   propagated copy (the VMM jail's) has the same flags, then checked in `/proc/self/mountinfo`;
//! - finding what is mounted below a directory and unmounting it, so the directory can be removed
//!   without reaching through a bind mount into host files.
//!
//! Why before attaching: the share is a shared mount whose slave copy lives in moat-vmm's mount
//! namespace (its jail). Mount propagation copies a mount with the flags it has when it is
//! attached; a later remount (`MS_REMOUNT|MS_RDONLY`, `mount_setattr`) changes only the shim's
//! copy, and the VMM — the process that writes on the guest's behalf — would keep a writable,
//! `dev`, `suid` one. So binds are cloned detached (`open_tree(OPEN_TREE_CLONE)`), restricted
//! recursively there (`mount_setattr(AT_RECURSIVE)`, propagation private: host mounts appearing
//! later below the source do not follow; `ro` of the bind itself, or of the whole tree for
//! `rro`), and only then attached (`move_mount`).

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};
use tracing::warn;

// linux/mount.h; libc has the system call numbers but not these for glibc targets.
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;

/// `struct mount_attr` (version 0, 32 bytes).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// What a mount below the pod's shared directory must be on the host: always `nodev,nosuid`
/// (the whole tree), and read-only for binds the spec marks `ro` — the bind itself, as runc's
/// `rbind,ro` makes it (a host mount below the source keeps its own flags: Kubernetes'
/// non-recursive read-only volumes) — or the whole tree for `rro` (recursive read-only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restriction {
    /// The bind's top mount is read-only.
    pub read_only: bool,
    /// Every mount of the tree is read-only.
    pub read_only_submounts: bool,
}

impl Restriction {
    /// `nodev,nosuid`.
    pub const WRITABLE: Self = Self {
        read_only: false,
        read_only_submounts: false,
    };
    /// `ro` on the top, `nodev,nosuid` everywhere.
    pub const READ_ONLY: Self = Self {
        read_only: true,
        read_only_submounts: false,
    };
    /// `ro,nodev,nosuid` everywhere.
    pub const READ_ONLY_RECURSIVE: Self = Self {
        read_only: true,
        read_only_submounts: true,
    };

    /// The attributes set on every mount of the tree.
    fn attrs(self) -> u64 {
        let base = MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID;
        if self.read_only_submounts {
            base | MOUNT_ATTR_RDONLY
        } else {
            base
        }
    }

    /// The mountinfo per-mount options a mount of the tree must show (`top`: the bind itself).
    fn required(self, top: bool) -> &'static [&'static str] {
        if self.read_only_submounts || (top && self.read_only) {
            &["ro", "nodev", "nosuid"]
        } else {
            &["nodev", "nosuid"]
        }
    }

    fn shown(self, top: bool) -> &'static str {
        if self.read_only_submounts || (top && self.read_only) {
            "ro,nodev,nosuid"
        } else {
            "nodev,nosuid"
        }
    }
}

/// Errors restricting or checking a mount below the shared directory.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A step of the restricted bind failed; nothing was attached.
    #[error("{step} for the bind of {source_path} on {target}: {errno}")]
    Bind {
        /// The system call that failed.
        step: &'static str,
        /// The host path being bound.
        source_path: PathBuf,
        /// Where it was to be bound (below the shared directory).
        target: PathBuf,
        /// The kernel's answer.
        #[source]
        errno: Errno,
    },
    /// The kernel has no new mount API (`open_tree`, `mount_setattr`, `move_mount`).
    #[error("bind of {source_path} on {target}: this kernel lacks mount_setattr(2) (Linux 5.12 or later is needed to make binds shared with the guest read-only/nodev/nosuid before they are attached)")]
    Unsupported {
        /// The host path being bound.
        source_path: PathBuf,
        /// Where it was to be bound.
        target: PathBuf,
    },
    /// A mount is not restricted as required after mounting it (it has been unmounted again).
    #[error("{mount_point} is mounted without {missing} on the host (options {options}; required {required}); refusing to share it with the guest")]
    NotRestricted {
        /// The offending mount point.
        mount_point: PathBuf,
        /// The missing option.
        missing: &'static str,
        /// Its per-mount options in /proc/self/mountinfo.
        options: String,
        /// What was required.
        required: &'static str,
    },
    /// Nothing is mounted where a mount was just made (the entry was replaced meanwhile).
    #[error("nothing is mounted at {0} after mounting it")]
    NotMounted(PathBuf),
    /// A file operation needed for the check failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Binds host path `src` onto `target` (an open directory or file below the shared directory,
/// `shown` its path for messages), restricted as `restriction` says before it is attached, and
/// checks the result in the mount table. `recursive`: submounts of `src` come along (`rbind`),
/// restricted the same way. On any error nothing stays mounted on `target`. Returns the mount
/// id of the bind (as in `/proc/self/mountinfo`).
pub fn bind_restricted(
    src: &Path,
    recursive: bool,
    target: BorrowedFd<'_>,
    shown: &Path,
    restriction: Restriction,
) -> Result<u64, MountError> {
    bind_with_attrs(
        src,
        recursive,
        target,
        shown,
        restriction.attrs(),
        restriction,
    )
}

/// [`bind_restricted`] with the raw `MOUNT_ATTR_*` set to apply (tests pass invalid bits to make
/// the kernel refuse the step).
fn bind_with_attrs(
    src: &Path,
    recursive: bool,
    target: BorrowedFd<'_>,
    shown: &Path,
    attr_set: u64,
    restriction: Restriction,
) -> Result<u64, MountError> {
    let fail = |step: &'static str| {
        let source_path = src.to_owned();
        let target = shown.to_owned();
        move |errno: Errno| {
            if errno == Errno::ENOSYS {
                MountError::Unsupported {
                    source_path,
                    target,
                }
            } else {
                MountError::Bind {
                    step,
                    source_path,
                    target,
                    errno,
                }
            }
        }
    };
    let c_src = CString::new(src.as_os_str().as_bytes()).map_err(|_| MountError::Bind {
        step: "open_tree",
        source_path: src.to_owned(),
        target: shown.to_owned(),
        errno: Errno::EINVAL,
    })?;
    let mut flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: open_tree reads the NUL-terminated path and returns a new fd or -1; no memory of
    // ours is written.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c_src.as_ptr(), flags) };
    if fd < 0 {
        return Err(fail("open_tree")(Errno::last()));
    }
    // SAFETY: `fd` is a fresh descriptor (of a detached mount tree) owned by nobody else. Dropping
    // it before it is attached frees the whole detached tree.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };

    let mut setattr_flags = libc::AT_EMPTY_PATH;
    if recursive {
        setattr_flags |= libc::AT_RECURSIVE;
    }
    let attr = MountAttr {
        attr_set,
        attr_clr: 0,
        // Cut the clone off the source's peer group: host mounts made later below the source
        // must not arrive in the share (they would not be nodev/nosuid).
        propagation: libc::MS_PRIVATE,
        userns_fd: 0,
    };
    mount_setattr(tree.as_fd(), setattr_flags, &attr).map_err(fail("mount_setattr"))?;
    if restriction.read_only && !restriction.read_only_submounts {
        // `ro` of the bind itself, not of the host mounts below it.
        let top = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        mount_setattr(tree.as_fd(), libc::AT_EMPTY_PATH, &top).map_err(fail("mount_setattr"))?;
    }
    // SAFETY: move_mount reads the two empty NUL-terminated paths and uses two fds we hold; it
    // writes no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(fail("move_mount")(Errno::last()));
    }
    // `tree` now names the root of the attached mount: check it (and its submounts) by mount
    // id, whatever the path is called by now, and unmount it through the same fd on failure.
    let checked =
        mount_id(tree.as_fd(), shown).and_then(|id| check_tree(id, restriction).map(|()| id));
    match checked {
        Ok(id) => Ok(id),
        Err(e) => {
            detach(&tree, shown);
            Err(e)
        }
    }
}

/// The mounts below mount `id` (its source's host submounts, come along with an `rbind`), parents
/// first: each one's path relative to mount `id`'s root and whether it is read-only.
pub fn submounts(id: u64) -> Result<Vec<(PathBuf, bool)>, MountError> {
    let table = mount_table()?;
    let Some(top) = table.iter().find(|m| m.id == id) else {
        return Err(MountError::NotMounted(PathBuf::from(format!("mount {id}"))));
    };
    let tree = tree_below(&table, top);
    Ok(tree
        .into_iter()
        .skip(1)
        .filter_map(|m| {
            let rel = m.mount_point.strip_prefix(&top.mount_point).ok()?;
            let ro = m.options.split(',').any(|o| o == "ro");
            Some((rel.to_path_buf(), ro))
        })
        .collect())
}

/// `mount_setattr(2)` of the mount tree `fd` names (`flags`: `AT_EMPTY_PATH`, `AT_RECURSIVE`).
fn mount_setattr(fd: BorrowedFd<'_>, flags: libc::c_int, attr: &MountAttr) -> Result<(), Errno> {
    // SAFETY: mount_setattr reads `size_of::<MountAttr>()` bytes of `attr`, which outlives the
    // call, and the empty NUL-terminated path; it writes no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            flags as libc::c_uint,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// Lazily unmounts the mount whose root `fd` names.
fn detach(fd: &OwnedFd, shown: &Path) {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    if let Err(e) = umount2(path.as_str(), MntFlags::MNT_DETACH) {
        warn!("unmount {} again: {e}", shown.display());
    }
}

/// The id (as in /proc/self/mountinfo) of the mount `fd` is on.
pub fn mount_id(fd: BorrowedFd<'_>, shown: &Path) -> Result<u64, MountError> {
    // SAFETY: statx is plain old data; all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx reads the empty NUL-terminated path and writes one `struct statx` into `stx`,
    // which lives across the call.
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if rc < 0 || stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(MountError::Io {
            what: "statx (mount id of)",
            path: shown.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(stx.stx_mnt_id)
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
struct MountLine {
    id: u64,
    parent: u64,
    mount_point: PathBuf,
    options: String,
}

fn mount_table() -> Result<Vec<MountLine>, MountError> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(|source| MountError::Io {
        what: "read",
        path: PathBuf::from("/proc/self/mountinfo"),
        source,
    })?;
    Ok(parse_mountinfo(&text))
}

fn parse_mountinfo(text: &str) -> Vec<MountLine> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let id = f.next()?.parse().ok()?;
            let parent = f.next()?.parse().ok()?;
            let _dev = f.next()?;
            let _root = f.next()?;
            let mount_point = PathBuf::from(unescape_mountinfo(f.next()?));
            let options = f.next()?.to_owned();
            Some(MountLine {
                id,
                parent,
                mount_point,
                options,
            })
        })
        .collect()
}

/// `top` and every mount below it in `table`, parents first.
fn tree_below<'a>(table: &'a [MountLine], top: &'a MountLine) -> Vec<&'a MountLine> {
    let mut tree = vec![top];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i].id;
        tree.extend(
            table
                .iter()
                .filter(|m| m.parent == parent && m.id != parent),
        );
        i += 1;
    }
    tree
}

/// Checks that the mount `id` and every mount below it in the table are restricted as required.
pub fn check_tree(id: u64, restriction: Restriction) -> Result<(), MountError> {
    let table = mount_table()?;
    let Some(top) = table.iter().find(|m| m.id == id) else {
        return Err(MountError::NotMounted(PathBuf::from(format!("mount {id}"))));
    };
    let tree = tree_below(&table, top);
    for m in tree {
        let top = m.id == id;
        let opts: Vec<&str> = m.options.split(',').collect();
        if let Some(missing) = restriction.required(top).iter().find(|o| !opts.contains(o)) {
            return Err(MountError::NotRestricted {
                mount_point: m.mount_point.clone(),
                missing,
                options: m.options.clone(),
                required: restriction.shown(top),
            });
        }
    }
    Ok(())
}

/// Checks what is mounted on the entry `name` of the directory `parent` (whose own mount is
/// below it): there must be a mount, restricted as required with all its submounts. Used after
/// a mount made by path (containerd's snapshot mounts).
pub fn check_mounted_at(
    parent: BorrowedFd<'_>,
    name: &str,
    shown: &Path,
    restriction: Restriction,
) -> Result<(), MountError> {
    let c_name = CString::new(name).map_err(|_| MountError::NotMounted(shown.to_owned()))?;
    // SAFETY: openat reads the NUL-terminated name and returns a new fd or -1.
    let fd = unsafe {
        libc::openat(
            parent.as_raw_fd(),
            c_name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(MountError::Io {
            what: "open",
            path: shown.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let id = mount_id(fd.as_fd(), shown)?;
    if id == mount_id(parent, shown)? {
        return Err(MountError::NotMounted(shown.to_owned()));
    }
    check_tree(id, restriction)
}

/// Options of the tmpfs that is the pod's shared directory: it holds only the directories the
/// shim mounts on (each container's `rootfs` and `mounts/<n>`), so 1 MiB of data and 4096 inodes
/// are plenty, and a guest writing into the share itself (not into a volume or a rootfs) gets
/// `ENOSPC` instead of filling the host's state directory.
pub const SHARE_TMPFS_OPTIONS: &str = "size=1m,nr_inodes=4096,mode=0755";

/// Makes the pod's shared directory `dir` a mount of its own on the host: a small `nodev,nosuid`
/// tmpfs ([`SHARE_TMPFS_OPTIONS`]), private first (out of the peer group of the mount it lives
/// on, so host mounts do not arrive in it), then shared in a peer group of its own — moat-vmm's
/// jail holds a slave copy of it, and the container files the shim mounts below it later reach
/// the guest through that propagation. Checked in the mount table; undone (unmounted) on error.
pub fn make_share(dir: &Path) -> Result<(), MountError> {
    use nix::mount::{mount, MsFlags};
    let step = |step: &'static str| {
        let dir = dir.to_owned();
        move |errno| MountError::Bind {
            step,
            source_path: PathBuf::from("tmpfs"),
            target: dir,
            errno,
        }
    };
    mount(
        Some("moat-share"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some(SHARE_TMPFS_OPTIONS),
    )
    .map_err(step("mount"))?;
    let res = (|| {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(step("make private"))?;
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(step("make shared"))?;
        let file = fs::File::open(dir).map_err(|source| MountError::Io {
            what: "open",
            path: dir.to_owned(),
            source,
        })?;
        let id = mount_id(file.as_fd(), dir)?;
        check_tree(id, Restriction::WRITABLE)
    })();
    if res.is_err() {
        if let Err(e) = umount2(dir, MntFlags::MNT_DETACH) {
            warn!("unmount {} again: {e}", dir.display());
        }
    }
    res
}

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
#[path = "mounts_tests.rs"]
pub(crate) mod tests;
