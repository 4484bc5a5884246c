//! `FUSE_LINK` without `CAP_DAC_READ_SEARCH`: hard links made through the magic link
//! `/proc/self/fd/N` of an `O_PATH` descriptor the VMM has verified.
//!
//! fuse-backend-rs links with `linkat(fd, "", newdir, name, AT_EMPTY_PATH)`. The kernel allows
//! `AT_EMPTY_PATH` there only to a caller with `CAP_DAC_READ_SEARCH` in the *initial* user
//! namespace (Linux 6.1 `do_linkat`), which the jailed VMM, in a user namespace of its own, never
//! has: every hard link in a share failed with `ENOENT`, inside one volume too. The documented
//! alternative is `linkat(AT_FDCWD, "/proc/self/fd/N", newdir, name, AT_SYMLINK_FOLLOW)`, which
//! needs no capability.
//!
//! The passthrough server does not hand out its descriptors, only the path its descriptor of an
//! inode shows in `/proc/self/fd` ([`HostPath`]). A path can be raced by the guest (it renames and
//! replaces entries of its share at will), so the path is only a hint: the VMM opens it
//! `O_PATH | O_NOFOLLOW` and keeps the descriptor only if it is the same file (device and inode
//! number) as the server's own descriptor of the inode, stat'ed through the server. The link is
//! then made from that verified descriptor, so it names exactly the inode the guest named, or
//! nothing (`ENOENT`, as if the guest had raced itself). A symbolic link is linked as itself:
//! a magic link is not followed further (the kernel stops at the file it jumps to).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use fuse_backend_rs::api::filesystem::{Context, Entry, FileSystem};
use fuse_backend_rs::passthrough::PassthroughFs;

/// What a server can tell about the host file behind one of its inodes.
pub trait HostPath {
    /// The host path of `inode` as the server's own descriptor shows it in `/proc/self/fd`.
    fn host_path(&self, inode: u64) -> io::Result<PathBuf>;
}

impl HostPath for PassthroughFs {
    fn host_path(&self, inode: u64) -> io::Result<PathBuf> {
        self.readlinkat_proc_file(inode)
    }
}

/// Whether `name` is one path component the guest may create: not empty, not `.` or `..`, no
/// `/` (the passthrough server checks the same for the requests it serves itself).
fn valid_component(name: &CStr) -> bool {
    let b = name.to_bytes();
    !b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/')
}

/// Opens `inode`'s host file `O_PATH | O_NOFOLLOW` and returns the descriptor if it is the file
/// `fs` serves as `inode` (same device and inode number), else `ENOENT`.
fn pinned<F>(fs: &F, ctx: &Context, inode: u64) -> io::Result<OwnedFd>
where
    F: FileSystem + HostPath,
{
    let path = fs.host_path(inode)?;
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::ENOENT))?;
    // SAFETY: `path` is a valid NUL-terminated string; the result is checked.
    let fd = unsafe {
        libc::openat(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut st = std::mem::MaybeUninit::<libc::stat64>::uninit();
    let empty = c"";
    // SAFETY: `fd` is open, `empty` is a valid C string and `st` is large enough for a stat64.
    let r = unsafe {
        libc::fstatat64(
            fd.as_raw_fd(),
            empty.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat64 succeeded and filled `st`.
    let ours = unsafe { st.assume_init() };
    let (theirs, _) = fs.getattr(ctx, inode.into(), None)?;
    if (ours.st_dev, ours.st_ino) != (theirs.st_dev, theirs.st_ino) {
        guest_warn!("virtio-fs: link: inode {inode} moved while it was being linked");
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    Ok(fd)
}

/// Makes `newparent/newname` a hard link to `inode` and looks it up (the reply `FUSE_LINK`
/// expects).
pub fn link<F>(
    fs: &F,
    ctx: &Context,
    inode: u64,
    newparent: u64,
    newname: &CStr,
) -> io::Result<Entry>
where
    F: FileSystem + HostPath,
{
    if !valid_component(newname) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let file = pinned(fs, ctx, inode)?;
    let dir = pinned(fs, ctx, newparent)?;
    let magic = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: both strings are valid and NUL-terminated, `dir` is open; the result is checked.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            magic.as_ptr(),
            dir.as_raw_fd(),
            newname.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    fs.lookup(ctx, newparent.into(), newname)
}

#[cfg(test)]
mod tests {
    use super::valid_component;

    #[test]
    fn only_single_components_are_valid_names() {
        for ok in [c"a", c"...", c"a b", c".hidden"] {
            assert!(valid_component(ok), "{ok:?}");
        }
        for bad in [c"", c".", c"..", c"a/b", c"/etc"] {
            assert!(!valid_component(bad), "{bad:?}");
        }
    }
}
