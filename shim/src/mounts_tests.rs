//! Tests of [`super`] (mounts.rs) on the real mount table (as root).

use super::*;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

#[test]
fn mountinfo_escapes_are_decoded() {
    assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
    assert_eq!(unescape_mountinfo("/plain"), "/plain");
}

#[test]
fn mountinfo_lines_are_parsed() {
    let t = parse_mountinfo(
        "36 35 98:0 /mnt1 /mnt\\040x rw,noatime master:1 - ext3 /dev/root rw\n\
         37 36 0:5 / /mnt\\040x/sub ro,nosuid,nodev - tmpfs t rw\n",
    );
    assert_eq!(t.len(), 2);
    assert_eq!((t[0].id, t[0].parent), (36, 35));
    assert_eq!(t[0].mount_point, Path::new("/mnt x"));
    assert_eq!(t[1].options, "ro,nosuid,nodev");
}

/// Real mounts need root; the tests below skip (with a message) without it.
pub(crate) fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        moat_test_support::skip("needs root (real mounts)");
    }
    root
}

/// Unmounts everything below a test's directory, also when the test fails.
pub(crate) struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        unmount_below(&self.0);
    }
}

/// Mount points at or below `dir` with their per-mount options.
pub(crate) fn options_below(dir: &Path) -> Vec<(PathBuf, String)> {
    lines_below(dir)
        .into_iter()
        .map(|m| (m.mount_point, m.options))
        .collect()
}

fn lines_below(dir: &Path) -> Vec<MountLine> {
    mount_table()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .collect()
}

fn write_err(path: &Path) -> Option<i32> {
    fs::write(path, b"changed")
        .err()
        .and_then(|e| e.raw_os_error())
}

fn open_dir(p: &Path) -> fs::File {
    fs::File::open(p).unwrap()
}

/// Mounts a 1 MiB tmpfs on `dir` (made first if missing).
pub(crate) fn mount_tmpfs(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
}

/// [`bind_restricted`] of `src` with its submounts on the directory `target`.
fn bind_dir(src: &Path, target: &Path, restriction: Restriction) -> Result<u64, MountError> {
    bind_restricted(src, true, open_dir(target).as_fd(), target, restriction)
}

/// A shared directory as the shim makes it, a source with a file and a submount (a tmpfs
/// with a file of its own), and an empty target directory below the share.
fn fixture(tmp: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let share = tmp.join("share");
    let src = tmp.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("file"), b"host").unwrap();
    mount_tmpfs(&src.join("sub"));
    fs::write(src.join("sub/file"), b"host").unwrap();
    fs::create_dir_all(&share).unwrap();
    make_share(&share).unwrap();
    let target = share.join("c1/mounts/0");
    fs::create_dir_all(&target).unwrap();
    (share, src, target)
}

/// `ro` (runc's `rbind,ro`, Kubernetes' non-recursive read-only volume): the bind is
/// read-only, a host mount below its source keeps its own flags (but nodev,nosuid).
#[test]
fn ro_bind_is_read_only_on_the_host_and_its_submounts_keep_their_flags() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _u = Unmount(tmp.path().to_owned());
    let (_share, src, target) = fixture(tmp.path());
    bind_dir(&src, &target, Restriction::READ_ONLY).unwrap();

    assert_eq!(write_err(&target.join("file")), Some(libc::EROFS));
    assert_eq!(write_err(&target.join("new")), Some(libc::EROFS));
    assert_eq!(write_err(&target.join("sub/file")), None);
    let lines = lines_below(&target);
    assert_eq!(lines.len(), 2, "{lines:?}");
    for m in &lines {
        let o: Vec<&str> = m.options.split(',').collect();
        let want: &[&str] = if m.mount_point == target {
            &["ro", "nodev", "nosuid"]
        } else {
            &["rw", "nodev", "nosuid"]
        };
        for w in want {
            assert!(o.contains(w), "{m:?} lacks {w}");
        }
    }
}

/// `rro`: every mount of the tree is read-only on the host.
#[test]
fn rro_bind_is_read_only_on_the_host_with_its_submounts() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _u = Unmount(tmp.path().to_owned());
    let (_share, src, target) = fixture(tmp.path());
    bind_dir(&src, &target, Restriction::READ_ONLY_RECURSIVE).unwrap();

    assert_eq!(write_err(&target.join("file")), Some(libc::EROFS));
    assert_eq!(write_err(&target.join("sub/file")), Some(libc::EROFS));
    assert_eq!(write_err(&target.join("new")), Some(libc::EROFS));
    assert_eq!(fs::read(src.join("file")).unwrap(), b"host");
    // The host's own paths stay writable: only the share's view is restricted.
    fs::write(src.join("sub/file"), b"host2").unwrap();
    let lines = lines_below(&target);
    assert_eq!(lines.len(), 2, "{lines:?}");
    for m in &lines {
        let o: Vec<&str> = m.options.split(',').collect();
        for want in ["ro", "nodev", "nosuid"] {
            assert!(o.contains(&want), "{m:?} lacks {want}");
        }
    }
}

/// The VMM serves the share from a slave copy in its own mount namespace. A remount after
/// attaching would leave that copy writable; restricting before attaching does not.
#[test]
fn propagated_copies_are_restricted_too() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _u = Unmount(tmp.path().to_owned());
    let (share, src, target) = fixture(tmp.path());
    // Like the jail: a new mount namespace whose mounts are slaves of ours.
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "slave", "sh", "-c"])
        .arg(
            "echo ready; read go; \
             grep \" $1\" /proc/self/mountinfo; \
             { echo x > \"$1/file\"; } 2>/dev/null && echo WROTE; \
             { echo x > \"$1/sub/file\"; } 2>/dev/null && echo WROTE-SUB; \
             [ -e \"$2\" ] && echo SAW-LATER-HOST-MOUNT; echo done",
        )
        .arg("sh")
        .arg(&target)
        .arg(target.join("late/file"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    bind_dir(&src, &target, Restriction::READ_ONLY_RECURSIVE).unwrap();
    // A host mount appearing below the source later does not reach the share.
    let late = src.join("late");
    mount_tmpfs(&late);
    fs::write(late.join("file"), b"x").unwrap();
    assert!(!target.join("late/file").exists());

    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    child.wait().unwrap();
    assert!(rest.contains("done"), "{rest}");
    assert!(
        rest.contains(" ro,nodev,nosuid") || rest.contains(" ro,nosuid,nodev"),
        "the copy in the other namespace: {rest}"
    );
    for bad in ["WROTE", "SAW-LATER-HOST-MOUNT"] {
        assert!(!rest.contains(bad), "{bad}: {rest}");
    }
    assert_eq!(fs::read(src.join("file")).unwrap(), b"host");
    drop(share);
}

#[test]
fn writable_bind_is_nodev_nosuid() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _u = Unmount(tmp.path().to_owned());
    let (_share, src, target) = fixture(tmp.path());
    nix::sys::stat::mknod(
        &src.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    bind_dir(&src, &target, Restriction::WRITABLE).unwrap();
    fs::write(target.join("file"), b"guest").unwrap();
    let err = fs::File::open(target.join("null")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    for m in lines_below(&target) {
        assert!(
            m.options.contains("nodev") && m.options.contains("nosuid"),
            "{m:?}"
        );
        assert!(m.options.starts_with("rw"), "{m:?}");
    }
}

#[test]
fn share_is_its_own_nodev_nosuid_shared_mount() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _u = Unmount(tmp.path().to_owned());
    let share = tmp.path().join("share");
    fs::create_dir(&share).unwrap();
    make_share(&share).unwrap();
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = text
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&*share.to_string_lossy()))
        .expect("the share is a mount");
    assert!(line.contains("nosuid") && line.contains("nodev"), "{line}");
    assert!(line.contains(" shared:"), "{line}");
    assert!(
        line.contains(" - tmpfs moat-share ") && line.contains("size=1024k"),
        "{line}"
    );
    // Bounded: a guest writing into the share itself runs out of space at 1 MiB.
    let err = fs::write(share.join("fill"), vec![0u8; 2 << 20]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(unmount_below(tmp.path()));
    assert!(lines_below(tmp.path()).is_empty());
}

/// A restriction the kernel refuses: the error names the bind, nothing is attached.
#[test]
fn failed_restriction_is_a_clear_error_and_leaves_nothing() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _u = Unmount(tmp.path().to_owned());
    let (_share, src, target) = fixture(tmp.path());
    let before = lines_below(&target).len();
    let t = open_dir(&target);
    // An attribute bit the kernel does not know: mount_setattr fails with EINVAL.
    let err = bind_with_attrs(
        &src,
        true,
        t.as_fd(),
        &target,
        Restriction::READ_ONLY.attrs() | 1 << 30,
        Restriction::READ_ONLY,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("mount_setattr")
            && msg.contains(&*src.to_string_lossy())
            && msg.contains(&*target.to_string_lossy()),
        "{msg}"
    );
    assert_eq!(lines_below(&target).len(), before);
    assert_eq!(fs::read_dir(&target).unwrap().count(), 0);

    // A mount found unrestricted afterwards is refused with its name and the missing flag.
    let plain = tmp.path().join("plain");
    fs::create_dir(&plain).unwrap();
    nix::mount::mount(
        Some(&src),
        &plain,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let id = mount_id(open_dir(&plain).as_fd(), &plain).unwrap();
    let err = check_tree(id, Restriction::READ_ONLY).unwrap_err();
    assert!(
        matches!(&err, MountError::NotRestricted { mount_point, missing: "ro", .. } if mount_point == &plain),
        "{err}"
    );
}
