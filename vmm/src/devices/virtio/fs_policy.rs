//! The virtio-fs file-type policy: a [`FileSystem`] layer in front of fuse-backend-rs's
//! passthrough server that keeps the guest away from host devices.
//!
//! The guest kernel never sends `FUSE_OPEN` for a device node (it opens special files with its
//! own drivers), so every request below comes from a guest kernel that is attacking the host.
//! fuse-backend-rs has no option for any of this (its `Config` has none; `mknod` passes mode
//! and rdev to `mknodat` as they come, and only its internal `open_inode` happens to refuse
//! non-regular, non-directory inodes). The layer refuses:
//!
//! - `FUSE_MKNOD` of a character or block device (`EPERM`, what the kernel answers a caller
//!   without `CAP_MKNOD`). Regular files, FIFOs and sockets stay allowed (containers use them),
//!   and so does the overlayfs whiteout (character device 0:0, which no driver backs);
//! - `FUSE_OPEN`, `FUSE_CREATE` (of a name that exists) and `FUSE_SETUPMAPPING` on an inode that
//!   is a character or block device (`EACCES`, what a `nodev` mount answers): a device node
//!   already in the share (from an image layer, or put there by the host) is never opened;
//! - `FUSE_SETATTR` changing the mode, owner or size of a device node (`EPERM`), so the guest
//!   cannot make such a node usable by other host users.
//!
//! `link` and `rename` of existing device nodes stay allowed: they create no new device and
//! give no access to one. `link` is served by [`super::fs_link`], not by the server.
//!
//! It also keeps the guest from leaving privilege behind on the host. A writable volume is an
//! ordinary host directory outside the share (an emptyDir, a hostPath): the share's copy of it
//! is `nosuid`, the directory itself is not, and a file the guest makes setuid-root there runs
//! as root for any host user who can reach it. So, for non-directories:
//!
//! - the setuid bit, and the setgid bit with group execute, are stripped from the mode of
//!   `FUSE_SETATTR`, `FUSE_CREATE` and `FUSE_MKNOD` (silently, as the kernel strips them where
//!   the caller may not set them: `chmod u+s` succeeds and does not stick, so package installs
//!   in a container still work; setuid binaries from image layers are unpacked on the host and
//!   keep their bits);
//! - opening for writing (or truncating) a file that has those bits clears them first, as the
//!   kernel does on a write by a caller without `CAP_FSETID`, which the server has;
//! - `FUSE_SETXATTR` of `security.capability` (file capabilities) is refused (`EPERM`).
//!
//! Directories keep setgid (group inheritance, no privilege on exec).
//!
//! This is one of three layers: with the jail on, the VMM's user namespace makes the kernel
//! refuse device creation anyway (`CAP_MKNOD` is checked in the initial user namespace), and
//! its binds of the shares are `nodev`. The layer is what still holds with `--no-jail`.

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::transport::FsCacheReqHandler;

use super::fs_link::{self, HostPath};

/// Attribute changes refused on a device node: mode, owner, group and size.
const SETATTR_GUARDED: SetattrValid = SetattrValid::MODE
    .union(SetattrValid::UID)
    .union(SetattrValid::GID)
    .union(SetattrValid::SIZE);

/// Whether `mode` is a character or block device.
pub fn is_device(mode: u32) -> bool {
    matches!(mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK)
}

/// Whether `FUSE_MKNOD` may create a node of `mode`/`rdev`: regular files (also file type 0,
/// which `mknod` treats as regular), FIFOs, sockets and the whiteout (character device 0:0).
pub fn mknod_allowed(mode: u32, rdev: u32) -> bool {
    match mode & libc::S_IFMT {
        0 | libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => true,
        libc::S_IFCHR => rdev == 0,
        _ => false,
    }
}

/// Mode bits that grant privilege when a host user runs the file: setuid, and setgid with group
/// execute (setgid without it marks mandatory locking and grants nothing).
pub fn privilege_bits(mode: u32) -> u32 {
    let mut bits = mode & libc::S_ISUID;
    if mode & libc::S_ISGID != 0 && mode & libc::S_IXGRP != 0 {
        bits |= libc::S_ISGID;
    }
    bits
}

/// The extended attribute that holds file capabilities.
const CAPABILITY_XATTR: &[u8] = b"security.capability";

/// Logs a refusal (rate-limited: the guest chooses how often) and returns `errno`.
fn refused(op: &str, inode: u64, errno: i32) -> io::Error {
    guest_warn!("virtio-fs: refused {op} of a device node (inode {inode})");
    io::Error::from_raw_os_error(errno)
}

/// A [`FileSystem`] that forwards everything to `inner` except what the module doc lists.
pub struct PolicyFs<F> {
    inner: F,
}

impl<F: FileSystem> PolicyFs<F> {
    /// Puts the policy in front of `inner`.
    pub fn new(inner: F) -> Self {
        Self { inner }
    }

    /// The wrapped file system.
    pub fn inner(&self) -> &F {
        &self.inner
    }

    /// Whether `inode` is a device node (its type never changes, so one `getattr`, which
    /// stats the server's `O_PATH` fd and opens nothing, decides).
    fn is_device(&self, ctx: &Context, inode: u64) -> io::Result<bool> {
        let (st, _) = self.inner.getattr(ctx, inode.into(), None)?;
        Ok(is_device(st.st_mode))
    }

    /// The credentials a creation in `parent` runs with on the host. FUSE carries the caller's
    /// uid and gid but not its supplementary groups, and the server creates as exactly that uid
    /// and gid: a container user who may write a directory only through a supplementary group
    /// (Kubernetes' `fsGroup`: the kubelet makes the volume `root:<fsGroup>`, mode `2775`) got
    /// `EACCES` from the host after the guest kernel had allowed it (virtio-fs always mounts with
    /// `default_permissions`). For a setgid directory, whose new entries take its group
    /// whatever the creator's, creating as the directory's group gives the same owner and group
    /// the kernel gives under runc, so that is what runs. The guest chooses uid and gid of every
    /// request anyway; this grants it nothing it could not name itself.
    fn creator(&self, ctx: &Context, parent: u64) -> io::Result<Context> {
        if ctx.uid == 0 {
            // Root creates through CAP_DAC_OVERRIDE: no need to look at the directory.
            return Ok(*ctx);
        }
        let (st, _) = self.inner.getattr(ctx, parent.into(), None)?;
        let group_may_write =
            st.st_mode & (libc::S_IWGRP | libc::S_IXGRP) == libc::S_IWGRP | libc::S_IXGRP;
        if st.st_mode & libc::S_ISGID != 0
            && group_may_write
            && ctx.uid != st.st_uid
            && ctx.gid != st.st_gid
        {
            return Ok(Context {
                gid: st.st_gid,
                ..*ctx
            });
        }
        Ok(*ctx)
    }

    /// Clears the setuid/setgid-exec bits of a non-directory `inode` that has them (before the
    /// guest writes to it).
    fn kill_privilege(&self, ctx: &Context, inode: u64) -> io::Result<()> {
        let (mut st, _) = self.inner.getattr(ctx, inode.into(), None)?;
        let bits = privilege_bits(st.st_mode);
        if bits == 0 || st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return Ok(());
        }
        st.st_mode &= !bits;
        guest_warn!("virtio-fs: cleared setuid/setgid of inode {inode} before a write");
        self.inner
            .setattr(ctx, inode.into(), st, None, SetattrValid::MODE)
            .map(|_| ())
    }
}

/// Whether open(2) `flags` may change the file's contents.
fn writes(flags: u32) -> bool {
    let flags = flags as i32;
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

impl<F: FileSystem + HostPath> FileSystem for PolicyFs<F> {
    type Inode = F::Inode;
    type Handle = F::Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.inner.init(capable)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        self.inner.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: Self::Inode, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Self::Inode, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Option<Self::Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        attr: stat64,
        handle: Option<Self::Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let raw: u64 = inode.into();
        if valid.intersects(SETATTR_GUARDED) && self.is_device(ctx, raw)? {
            return Err(refused("setattr", raw, libc::EPERM));
        }
        let mut attr = attr;
        if valid.contains(SetattrValid::MODE) && privilege_bits(attr.st_mode) != 0 {
            // The guest's mode carries no trustworthy file type: ask the host.
            let (st, _) = self.inner.getattr(ctx, raw.into(), None)?;
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                attr.st_mode &= !privilege_bits(attr.st_mode);
            }
        }
        if valid.contains(SetattrValid::SIZE) {
            self.kill_privilege(ctx, raw)?;
        }
        self.inner.setattr(ctx, raw.into(), attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Self::Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Self::Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        let parent: u64 = parent.into();
        let ctx = self.creator(ctx, parent)?;
        self.inner.symlink(&ctx, linkname, parent.into(), name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        if !mknod_allowed(mode, rdev) {
            return Err(refused("mknod", inode.into(), libc::EPERM));
        }
        let mode = mode & !privilege_bits(mode);
        let parent: u64 = inode.into();
        let ctx = self.creator(ctx, parent)?;
        self.inner
            .mknod(&ctx, parent.into(), name, mode, rdev, umask)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let parent: u64 = parent.into();
        let ctx = self.creator(ctx, parent)?;
        self.inner.mkdir(&ctx, parent.into(), name, mode, umask)
    }

    fn unlink(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Self::Inode,
        oldname: &CStr,
        newdir: Self::Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        newparent: Self::Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        // Not the server's own link: it needs a capability the jailed VMM lacks (see fs_link).
        fs_link::link(&self.inner, ctx, inode.into(), newparent.into(), newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions, Option<u32>)> {
        let raw: u64 = inode.into();
        if self.is_device(ctx, raw)? {
            return Err(refused("open", raw, libc::EACCES));
        }
        if writes(flags) {
            self.kill_privilege(ctx, raw)?;
        }
        self.inner.open(ctx, raw.into(), flags, fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions, Option<u32>)> {
        let parent: u64 = parent.into();
        // Without O_EXCL, FUSE_CREATE opens a file that already exists under `name`. Refuse
        // a device there before anything opens it...
        if let Ok(e) = self.inner.lookup(ctx, parent.into(), name) {
            if e.inode != 0 {
                let checked = if is_device(e.attr.st_mode) {
                    Err(refused("create", e.inode, libc::EACCES))
                } else if writes(args.flags) {
                    self.kill_privilege(ctx, e.inode)
                } else {
                    Ok(())
                };
                self.inner.forget(ctx, e.inode.into(), 1);
                checked?;
            }
        }
        let mut args = args;
        args.mode &= !privilege_bits(args.mode);
        // ... and check what was actually opened (the name may have been swapped in between:
        // the entry is the inode the server opened).
        let creator = self.creator(ctx, parent)?;
        let (entry, handle, opts, passthrough) =
            self.inner.create(&creator, parent.into(), name, args)?;
        if is_device(entry.attr.st_mode) {
            if let Some(h) = handle {
                let _ =
                    self.inner
                        .release(ctx, entry.inode.into(), args.flags, h, false, false, None);
            }
            self.inner.forget(ctx, entry.inode.into(), 1);
            return Err(refused("create", entry.inode, libc::EACCES));
        }
        Ok((entry, handle, opts, passthrough))
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: Self::Inode) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        if name.to_bytes() == CAPABILITY_XATTR {
            guest_warn!("virtio-fs: refused setting file capabilities");
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        size: u32,
    ) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        self.inner.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    #[allow(clippy::too_many_arguments)]
    fn setupmapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        let raw: u64 = inode.into();
        if self.is_device(ctx, raw)? {
            return Err(refused("setupmapping", raw, libc::EACCES));
        }
        self.inner.setupmapping(
            ctx,
            raw.into(),
            handle,
            foffset,
            len,
            flags,
            moffset,
            vu_req,
        )
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        requests: Vec<RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner.removemapping(ctx, inode, requests, vu_req)
    }

    fn access(&self, ctx: &Context, inode: Self::Inode, mask: u32) -> io::Result<()> {
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.inner.getlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlkw(ctx, inode, handle, owner, lock, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        self.inner
            .ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }

    fn bmap(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        block: u64,
        blocksize: u32,
    ) -> io::Result<u64> {
        self.inner.bmap(ctx, inode, block, blocksize)
    }

    fn poll(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        khandle: Self::Handle,
        flags: u32,
        events: u32,
    ) -> io::Result<u32> {
        self.inner.poll(ctx, inode, handle, khandle, flags, events)
    }

    fn notify_reply(&self) -> io::Result<()> {
        self.inner.notify_reply()
    }

    #[inline]
    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.inner.id_remap(ctx)
    }
}

#[cfg(test)]
#[path = "fs_policy_tests.rs"]
mod tests;
