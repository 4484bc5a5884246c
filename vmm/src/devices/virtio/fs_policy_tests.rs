//! Tests of the virtio-fs policy layer ([`super`]) on a real passthrough server over a temp dir
//! (as root: device nodes, ownership).

use super::*;
use fuse_backend_rs::api::filesystem::ROOT_ID;
use fuse_backend_rs::passthrough::{Config, PassthroughFs};
use std::ffi::CString;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

struct Share(PathBuf);

impl Drop for Share {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn share(name: &str) -> (PolicyFs<PassthroughFs>, Share) {
    let dir = std::env::temp_dir().join(format!("moat-fs-policy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Writable for the container users the tests act as (as an emptyDir is).
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    let fs = PassthroughFs::new(Config {
        root_dir: dir.display().to_string(),
        do_import: true,
        xattr: true,
        ..Default::default()
    })
    .unwrap();
    fs.import().unwrap();
    (PolicyFs::new(fs), Share(dir))
}

fn ctx(uid: u32) -> Context {
    Context {
        uid,
        gid: uid,
        pid: 1,
    }
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn errno(e: io::Error) -> i32 {
    e.raw_os_error().unwrap_or_default()
}

/// A host-side `mknod` (the test runs as root), as an image layer or the host could leave.
fn host_mknod(path: &Path, mode: u32, dev: libc::dev_t) -> bool {
    let p = c(path.to_str().unwrap());
    // SAFETY: `p` is a valid NUL-terminated path.
    unsafe { libc::mknod(p.as_ptr(), mode, dev) == 0 }
}

#[test]
fn mode_classification() {
    assert!(is_device(libc::S_IFCHR | 0o666) && is_device(libc::S_IFBLK));
    assert!(!is_device(libc::S_IFIFO) && !is_device(libc::S_IFREG | 0o4755));
    for ok in [0, libc::S_IFREG, libc::S_IFIFO, libc::S_IFSOCK] {
        assert!(mknod_allowed(ok | 0o644, 0), "{ok:o}");
    }
    assert!(mknod_allowed(libc::S_IFCHR, 0), "whiteout");
    assert!(!mknod_allowed(libc::S_IFCHR | 0o666, (1 << 8) | 3));
    assert!(!mknod_allowed(libc::S_IFBLK | 0o660, 0));
    assert!(!mknod_allowed(libc::S_IFDIR | 0o755, 0));
    assert!(!mknod_allowed(libc::S_IFLNK | 0o777, 0));
}

#[test]
fn mknod_refuses_devices_and_allows_fifos_sockets_files() {
    let (fs, dir) = share("mknod");
    let root = ctx(0);
    let null = c("null");
    let e = fs
        .mknod(
            &root,
            ROOT_ID,
            &null,
            libc::S_IFCHR | 0o666,
            (1 << 8) | 3,
            0,
        )
        .unwrap_err();
    assert_eq!(errno(e), libc::EPERM);
    assert!(std::fs::symlink_metadata(dir.0.join("null")).is_err());
    let e = fs
        .mknod(&root, ROOT_ID, &c("sda"), libc::S_IFBLK | 0o660, 8 << 8, 0)
        .unwrap_err();
    assert_eq!(errno(e), libc::EPERM);
    assert!(std::fs::symlink_metadata(dir.0.join("sda")).is_err());

    // A container user makes a FIFO, a socket node and a file: allowed, owned by it.
    let user = ctx(1000);
    for (name, mode) in [
        ("fifo", libc::S_IFIFO | 0o644),
        ("sock", libc::S_IFSOCK | 0o644),
        ("file", libc::S_IFREG | 0o644),
    ] {
        let e = fs.mknod(&user, ROOT_ID, &c(name), mode, 0, 0o022).unwrap();
        assert_eq!(e.attr.st_mode & libc::S_IFMT, mode & libc::S_IFMT, "{name}");
        let m = std::fs::symlink_metadata(dir.0.join(name)).unwrap();
        assert_eq!((m.uid(), m.gid()), (1000, 1000), "{name}");
    }
    assert!(std::fs::symlink_metadata(dir.0.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    // The overlayfs whiteout (0:0) is no device.
    let w = fs
        .mknod(&root, ROOT_ID, &c("wh"), libc::S_IFCHR, 0, 0)
        .unwrap();
    assert!(std::fs::symlink_metadata(dir.0.join("wh"))
        .unwrap()
        .file_type()
        .is_char_device());
    assert_eq!(w.attr.st_rdev, 0);
}

#[test]
fn privilege_bits_are_setuid_and_setgid_with_group_exec() {
    assert_eq!(privilege_bits(0o4755), libc::S_ISUID);
    assert_eq!(privilege_bits(0o6755), libc::S_ISUID | libc::S_ISGID);
    assert_eq!(
        privilege_bits(0o2644),
        0,
        "setgid without group execute: locking"
    );
    assert_eq!(privilege_bits(0o0755), 0);
}

#[test]
fn the_guest_cannot_leave_setuid_files_or_file_capabilities_on_the_host() {
    let (fs, dir) = share("suid");
    let root = ctx(0);
    let mode_of = |name: &str| std::fs::metadata(dir.0.join(name)).unwrap().mode() & 0o7777;

    // Created setuid (FUSE_CREATE and FUSE_MKNOD): the bits do not stick.
    let args = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o6755,
        umask: 0,
        fuse_flags: 0,
    };
    let (e, h, _, _) = fs.create(&root, ROOT_ID, &c("created"), args).unwrap();
    if let Some(h) = h {
        fs.release(&root, e.inode, 0, h, false, false, None)
            .unwrap();
    }
    assert_eq!(mode_of("created"), 0o755);
    fs.mknod(&root, ROOT_ID, &c("made"), libc::S_IFREG | 0o4755, 0, 0)
        .unwrap();
    assert_eq!(mode_of("made"), 0o755);

    // chmod u+s, g+s (FUSE_SETATTR): accepted, stripped; a directory keeps setgid.
    let (mut st, _) = fs.getattr(&root, e.inode, None).unwrap();
    st.st_mode = libc::S_IFREG | 0o6755;
    fs.setattr(&root, e.inode, st, None, SetattrValid::MODE)
        .unwrap();
    assert_eq!(mode_of("created"), 0o755);
    // A lying file type in the guest's mode changes nothing.
    st.st_mode = libc::S_IFDIR | 0o4755;
    fs.setattr(&root, e.inode, st, None, SetattrValid::MODE)
        .unwrap();
    assert_eq!(mode_of("created"), 0o755);
    let d = fs.mkdir(&root, ROOT_ID, &c("dir"), 0o755, 0).unwrap();
    let (mut dst, _) = fs.getattr(&root, d.inode, None).unwrap();
    dst.st_mode = libc::S_IFDIR | 0o2775;
    fs.setattr(&root, d.inode, dst, None, SetattrValid::MODE)
        .unwrap();
    assert_eq!(mode_of("dir"), 0o2775);

    // A setuid file already on the host loses the bits before the guest writes to it,
    // keeps them when only read.
    let host = dir.0.join("host-suid");
    std::fs::write(&host, b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&host, std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    let e = fs.lookup(&root, ROOT_ID, &c("host-suid")).unwrap();
    let (h, _, _) = fs.open(&root, e.inode, libc::O_RDONLY as u32, 0).unwrap();
    if let Some(h) = h {
        fs.release(&root, e.inode, 0, h, false, false, None)
            .unwrap();
    }
    assert_eq!(mode_of("host-suid"), 0o4755);
    let (h, _, _) = fs.open(&root, e.inode, libc::O_WRONLY as u32, 0).unwrap();
    if let Some(h) = h {
        fs.release(&root, e.inode, 0, h, false, false, None)
            .unwrap();
    }
    assert_eq!(mode_of("host-suid"), 0o755);

    // File capabilities: refused.
    let err = fs
        .setxattr(&root, e.inode, &c("security.capability"), &[1, 0, 0, 2], 0)
        .unwrap_err();
    assert_eq!(errno(err), libc::EPERM);
    fs.setxattr(&root, e.inode, &c("user.moat"), b"ok", 0)
        .unwrap();
}

#[test]
fn existing_device_nodes_are_never_opened_or_changed() {
    let (fs, dir) = share("open");
    let dev = dir.0.join("null");
    assert!(
        host_mknod(&dev, libc::S_IFCHR | 0o666, libc::makedev(1, 3)),
        "mknod: {} (this test needs root)",
        io::Error::last_os_error()
    );
    std::fs::write(dir.0.join("plain"), b"x").unwrap();
    let root = ctx(0);
    let e = fs.lookup(&root, ROOT_ID, &c("null")).unwrap();
    assert!(is_device(e.attr.st_mode));
    for flags in [
        libc::O_RDONLY,
        libc::O_RDWR,
        libc::O_WRONLY | libc::O_NONBLOCK,
    ] {
        let err = fs.open(&root, e.inode, flags as u32, 0).unwrap_err();
        assert_eq!(errno(err), libc::EACCES, "flags {flags:#o}");
    }
    // FUSE_CREATE without O_EXCL on the existing name.
    let args = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let err = fs.create(&root, ROOT_ID, &c("null"), args).unwrap_err();
    assert_eq!(errno(err), libc::EACCES);
    // chmod/chown/truncate of the node: refused; its times may change.
    // SAFETY: stat64 is plain old data; all-zero is a valid value.
    let mut attr: stat64 = unsafe { std::mem::zeroed() };
    attr.st_mode = libc::S_IFCHR | 0o777;
    attr.st_uid = 1000;
    for valid in [SetattrValid::MODE, SetattrValid::UID, SetattrValid::SIZE] {
        let err = fs.setattr(&root, e.inode, attr, None, valid).unwrap_err();
        assert_eq!(errno(err), libc::EPERM, "{valid:?}");
    }
    fs.setattr(&root, e.inode, attr, None, SetattrValid::MTIME_NOW)
        .unwrap();
    let m = std::fs::symlink_metadata(&dev).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid()), (0o666, 0));

    // Regular files still open, create and chmod as usual.
    let p = fs.lookup(&root, ROOT_ID, &c("plain")).unwrap();
    let (h, _, _) = fs.open(&root, p.inode, libc::O_RDWR as u32, 0).unwrap();
    fs.release(&root, p.inode, 0, h.unwrap(), false, false, None)
        .unwrap();
    let (n, h, _, _) = fs.create(&ctx(1000), ROOT_ID, &c("new"), args).unwrap();
    fs.release(&root, n.inode, 0, h.unwrap(), false, false, None)
        .unwrap();
    assert_eq!(std::fs::metadata(dir.0.join("new")).unwrap().uid(), 1000);
    attr.st_mode = 0o600;
    fs.setattr(&root, p.inode, attr, None, SetattrValid::MODE)
        .unwrap();
    // Links and renames of the node are no new device: allowed.
    fs.link(&root, e.inode, ROOT_ID, &c("null2")).unwrap();
    fs.rename(&root, ROOT_ID, &c("null2"), ROOT_ID, &c("null3"), 0)
        .unwrap();
}

/// Drops `CAP_DAC_READ_SEARCH` from the calling thread's effective set (capabilities are per
/// thread), as the jailed VMM lacks it in the initial user namespace.
fn drop_dac_read_search() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: `h` and `d` have the layout capget(2) expects for version 3 (two data structs).
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) };
    assert_eq!(r, 0, "capget");
    d[0].effective &= !(1 << 2); // CAP_DAC_READ_SEARCH
                                 // SAFETY: as above; capset only changes this thread's sets.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) };
    assert_eq!(r, 0, "capset");
}

#[test]
fn hard_links_work_without_cap_dac_read_search() {
    let (fs, dir) = share("link");
    std::fs::create_dir(dir.0.join("sub")).unwrap();
    std::fs::write(dir.0.join("f"), b"data").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.0.join("outside")).unwrap();
    let passwd_links = std::fs::metadata("/etc/passwd").unwrap().nlink();
    let user = ctx(1000);
    std::thread::scope(|s| {
        s.spawn(|| {
            drop_dac_read_search();
            let f = fs.lookup(&user, ROOT_ID, &c("f")).unwrap();
            let sub = fs.lookup(&user, ROOT_ID, &c("sub")).unwrap();
            let e = fs.link(&user, f.inode, sub.inode, &c("hl")).unwrap();
            assert_eq!(e.attr.st_ino, f.attr.st_ino);
            assert_eq!(e.attr.st_nlink, 2);
            // A symbolic link is linked as itself, never followed on the host.
            let l = fs.lookup(&user, ROOT_ID, &c("outside")).unwrap();
            let e = fs.link(&user, l.inode, ROOT_ID, &c("hl-link")).unwrap();
            assert_eq!(e.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
            assert_eq!(e.attr.st_ino, l.attr.st_ino);
            // Names that are not one component are refused; existing names are EEXIST.
            for bad in ["", ".", "..", "a/b"] {
                let err = fs.link(&user, f.inode, ROOT_ID, &c(bad)).unwrap_err();
                assert_eq!(errno(err), libc::EINVAL, "{bad:?}");
            }
            let err = fs.link(&user, f.inode, ROOT_ID, &c("f")).unwrap_err();
            assert_eq!(errno(err), libc::EEXIST);
        });
    });
    assert_eq!(std::fs::read(dir.0.join("sub/hl")).unwrap(), b"data");
    let m = std::fs::symlink_metadata(dir.0.join("hl-link")).unwrap();
    assert!(m.file_type().is_symlink());
    assert_eq!(
        std::fs::metadata("/etc/passwd").unwrap().nlink(),
        passwd_links
    );
}

#[test]
fn a_link_source_swapped_on_the_host_is_not_linked() {
    let (fs, dir) = share("link-race");
    std::fs::write(dir.0.join("f"), b"mine").unwrap();
    let root = ctx(0);
    let f = fs.lookup(&root, ROOT_ID, &c("f")).unwrap();
    // The server's fd still names the (now unlinked) file; its path shows " (deleted)", and a
    // new file at the old name is another inode: nothing may be linked.
    std::fs::remove_file(dir.0.join("f")).unwrap();
    std::fs::write(dir.0.join("f"), b"other").unwrap();
    let err = fs.link(&root, f.inode, ROOT_ID, &c("hl")).unwrap_err();
    assert_eq!(errno(err), libc::ENOENT);
    assert!(std::fs::symlink_metadata(dir.0.join("hl")).is_err());
}

/// Kubernetes' fsGroup: a volume `root:4000` mode `2775` is writable by a container user
/// through its supplementary group 4000, which FUSE does not carry to the host.
#[test]
fn creations_in_a_setgid_group_writable_directory_work_without_the_supplementary_group() {
    let (fs, dir) = share("fsgroup");
    let vol = dir.0.join("vol");
    std::fs::create_dir(&vol).unwrap();
    std::os::unix::fs::chown(&vol, Some(0), Some(4000)).unwrap();
    std::fs::set_permissions(&vol, std::os::unix::fs::PermissionsExt::from_mode(0o2775)).unwrap();
    let user = ctx(1000);
    let v = fs.lookup(&user, ROOT_ID, &c("vol")).unwrap();
    let args = CreateIn {
        flags: libc::O_WRONLY as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0o022,
        fuse_flags: 0,
    };
    fs.create(&user, v.inode, &c("file"), args).unwrap();
    fs.mkdir(&user, v.inode, &c("dir"), 0o755, 0o022).unwrap();
    fs.mknod(&user, v.inode, &c("fifo"), libc::S_IFIFO | 0o644, 0, 0o022)
        .unwrap();
    fs.symlink(&user, &c("file"), v.inode, &c("link")).unwrap();
    for name in ["file", "dir", "fifo", "link"] {
        let m = std::fs::symlink_metadata(vol.join(name)).unwrap();
        assert_eq!(
            (m.uid(), m.gid()),
            (1000, 4000),
            "{name}: owner as under runc"
        );
    }
    assert_ne!(
        std::fs::metadata(vol.join("dir")).unwrap().mode() & libc::S_ISGID,
        0,
        "a new directory keeps the setgid bit"
    );
    // Without setgid the group of a new entry would be the creator's: no substitution, and the
    // host refuses as before (the caller's membership of 4000 is unknown to the host).
    std::fs::set_permissions(&vol, std::os::unix::fs::PermissionsExt::from_mode(0o0775)).unwrap();
    let err = fs
        .mkdir(&user, v.inode, &c("dir2"), 0o755, 0o022)
        .unwrap_err();
    assert_eq!(errno(err), libc::EACCES);
}
