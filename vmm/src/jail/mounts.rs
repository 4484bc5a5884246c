//! The jail's file system view: canonical paths, the bind plan (what of the host the VMM
//! sees and how), mount propagation of virtio-fs shares, and the new root itself — a
//! read-only tmpfs holding only the planned binds and a process-only `/proc`, entered with
//! `pivot_root`.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::pivot_root;

use super::error::{io_err, sys, JailError};
use crate::config::{SerialOut, VmConfig};

/// Where the new root is assembled before `pivot_root` (in the VMM's own mount namespace;
/// the host's /tmp is not touched).
const STAGING: &str = "/tmp";

/// Devices the VMM may open, bound into the jail when they exist on the host.
const DEVICES: [&str; 3] = ["/dev/kvm", "/dev/null", "/dev/urandom"];
/// The tap clone device, bound only when the VM has `--net` devices.
const TUN: &str = "/dev/net/tun";

/// How a path is bound into the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Kind {
    /// A file the VMM only reads.
    ReadOnly,
    /// A file the VMM writes.
    ReadWrite,
    /// A directory the VMM creates files or sockets in, or serves over virtio-fs
    /// (recursively, with later host mounts below it propagating in).
    Dir,
    /// A device node.
    Device,
}

/// Makes `p` canonical. A path that does not resolve is only made absolute: it is not bound
/// into the jail, and the VMM reports it when it opens it, as it would unconfined.
fn canonical(p: &Path) -> PathBuf {
    fs::canonicalize(p)
        .or_else(|_| std::path::absolute(p))
        .unwrap_or_else(|_| p.to_owned())
}

/// Makes the directory of `p` canonical (the file itself may not exist yet).
fn canonical_parent(p: &Path) -> PathBuf {
    match (p.parent(), p.file_name()) {
        (Some(d), Some(name)) if !d.as_os_str().is_empty() => canonical(d).join(name),
        (_, Some(_)) => canonical(Path::new(".")).join(p),
        _ => canonical(p),
    }
}

/// Rewrites every path of `cfg` to its canonical form, so that it names the same file inside
/// the jail (whose root holds no symlinks and whose working directory is `/`).
pub fn canonicalize(cfg: &mut VmConfig) {
    cfg.kernel = canonical(&cfg.kernel);
    if let Some(i) = cfg.initrd.as_mut() {
        *i = canonical(i);
    }
    for b in &mut cfg.blk {
        b.path = canonical(&b.path);
    }
    for f in &mut cfg.fs {
        f.dir = canonical(&f.dir);
    }
    if let SerialOut::File(p) = &mut cfg.serial {
        *p = canonical_parent(p);
    }
    if let Some(v) = cfg.vsock.as_mut() {
        v.uds = canonical_parent(&v.uds);
    }
    if let Some(a) = cfg.api_sock.as_mut() {
        *a = canonical_parent(a);
    }
}

/// The paths to bind into the jail, parents before children (a canonical `cfg`); of those,
/// only the ones `exists` says are there.
pub(super) fn plan(cfg: &VmConfig, exists: impl Fn(&Path) -> bool) -> Vec<(PathBuf, Kind)> {
    let mut binds: BTreeMap<PathBuf, Kind> = BTreeMap::new();
    let mut add = |p: &Path, k: Kind| {
        if !exists(p) {
            return;
        }
        let e = binds.entry(p.to_owned()).or_insert(k);
        // The same file named twice (say, read-only and read-write) gets the wider access.
        *e = (*e).max(k);
    };
    add(&cfg.kernel, Kind::ReadOnly);
    if let Some(i) = &cfg.initrd {
        add(i, Kind::ReadOnly);
    }
    for b in &cfg.blk {
        add(
            &b.path,
            if b.read_only {
                Kind::ReadOnly
            } else {
                Kind::ReadWrite
            },
        );
    }
    for f in &cfg.fs {
        add(&f.dir, Kind::Dir);
    }
    let sockets = [
        match &cfg.serial {
            SerialOut::File(p) => Some(p),
            _ => None,
        },
        cfg.vsock.as_ref().map(|v| &v.uds),
        cfg.api_sock.as_ref(),
    ];
    for p in sockets.into_iter().flatten() {
        if let Some(d) = p.parent() {
            add(d, Kind::Dir);
        }
    }
    for d in DEVICES {
        add(Path::new(d), Kind::Device);
    }
    if !cfg.net.is_empty() {
        add(Path::new(TUN), Kind::Device);
    }
    binds.into_iter().collect()
}

/// One line of /proc/self/mountinfo, the fields the jail needs.
#[derive(Debug, PartialEq, Eq)]
struct MountEntry {
    mount_point: PathBuf,
    shared: bool,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let digits = b.get(i + 1..i + 4);
        if b[i] == b'\\' && digits.is_some_and(|d| d.iter().all(|c| (b'0'..=b'7').contains(c))) {
            let v = digits
                .unwrap_or_default()
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let mount_point = PathBuf::from(unescape(fields.get(4)?));
            let shared = fields.get(6..sep)?.iter().any(|f| f.starts_with("shared:"));
            Some(MountEntry {
                mount_point,
                shared,
            })
        })
        .collect()
}

/// Whether mounts the host makes below `dir` later reach a copy of it in another mount
/// namespace: the topmost mount holding `dir` must be shared.
fn propagates(entries: &[MountEntry], dir: &Path) -> bool {
    let mut best: Option<&MountEntry> = None;
    for e in entries {
        if dir.starts_with(&e.mount_point)
            && best.is_none_or(|b| {
                e.mount_point.components().count() >= b.mount_point.components().count()
            })
        {
            best = Some(e);
        }
    }
    best.is_some_and(|e| e.shared)
}

/// Host side, for each virtio-fs share: the shim mounts container root file systems below the
/// share after the VM started, and the guest must see them. They reach the jail's copy of the
/// share only through mount propagation, so a share whose host mount is not shared is made a
/// shared bind mount of itself (undone by the supervisor when the VMM exits). Returns what to
/// undo.
pub(super) fn make_shares_propagate(cfg: &VmConfig) -> Result<Vec<PathBuf>, JailError> {
    if cfg.fs.is_empty() {
        return Ok(Vec::new());
    }
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(|err| JailError::Io {
        op: "read",
        path: "/proc/self/mountinfo".into(),
        err,
    })?;
    let entries = parse_mountinfo(&info);
    let mut made = Vec::new();
    for share in &cfg.fs {
        if propagates(&entries, &share.dir) || made.contains(&share.dir) {
            continue;
        }
        let d = share.dir.as_path();
        let res = mount(
            Some(d),
            d,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(sys(format!("bind {} on itself", d.display())));
        if let Err(e) = res {
            undo_shares(&made);
            return Err(e);
        }
        made.push(share.dir.clone());
        if let Err(err) = mount(
            None::<&str>,
            d,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        ) {
            undo_shares(&made);
            return Err(sys(format!("make {} a shared mount", d.display()))(err));
        }
    }
    Ok(made)
}

pub(super) fn undo_shares(made: &[PathBuf]) {
    for d in made.iter().rev() {
        if let Err(e) = umount2(d, MntFlags::MNT_DETACH) {
            tracing::warn!("jail: cannot unmount {}: {e}", d.display());
        }
    }
}

/// Assembles the new root on a tmpfs at [`STAGING`] and pivots into it.
pub(super) fn build_root(binds: &[(PathBuf, Kind)]) -> Result<(), JailError> {
    // Held open first: the tmpfs below may hide some of them.
    let mut sources = Vec::with_capacity(binds.len());
    for (path, kind) in binds {
        // O_PATH: nothing is read or written through it, device nodes are not opened.
        let fd: OwnedFd = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(path)
            .map_err(|err| JailError::Path {
                what: "bind source",
                path: path.clone(),
                err,
            })?
            .into();
        sources.push((path, *kind, fd));
    }
    let staging = Path::new(STAGING);
    let common = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("moat-vmm-root"),
        staging,
        Some("tmpfs"),
        common,
        Some("mode=0755,size=1m,nr_inodes=4096"),
    )
    .map_err(sys(format!("mount a tmpfs on {STAGING}")))?;
    for (path, kind, fd) in &sources {
        let target = staging.join(path.strip_prefix("/").unwrap_or(path));
        let parent = target.parent().unwrap_or(staging);
        fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        if fs::symlink_metadata(&target).is_err() {
            if *kind == Kind::Dir {
                fs::create_dir(&target).map_err(io_err("create", &target))?;
            } else {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(io_err("create", &target))?;
            }
        }
        let source = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(sys(format!("bind {} into the jail", path.display())))?;
        let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID;
        flags |= MsFlags::MS_NOEXEC;
        if *kind != Kind::Device {
            // A guest that creates a device node in a virtio-fs share cannot open it through
            // the VMM.
            flags |= MsFlags::MS_NODEV;
        }
        if *kind == Kind::ReadOnly {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
            .map_err(sys(format!("restrict the bind of {}", path.display())))?;
    }
    drop(sources);
    mount_proc(&staging.join("proc"))?;
    std::env::set_current_dir(staging).map_err(io_err("chdir", staging))?;
    pivot_root(".", ".").map_err(sys("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detach the old root"))?;
    std::env::set_current_dir("/").map_err(io_err("chdir", Path::new("/")))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | common,
        None::<&str>,
    )
    .map_err(sys("make the jail root read-only"))
}

/// A proc of the VMM's own pid namespace (the virtio-fs server reopens files through
/// /proc/self/fd). With `subset=pid` (Linux 5.8+) it holds only process directories; on
/// older kernels /proc/sys and /proc/sysrq-trigger, writable by uid 0 without capabilities,
/// are made read-only.
fn mount_proc(target: &Path) -> Result<(), JailError> {
    fs::create_dir(target).map_err(io_err("create", target))?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if mount(
        Some("proc"),
        target,
        Some("proc"),
        flags,
        Some("subset=pid"),
    )
    .is_ok()
    {
        return Ok(());
    }
    mount(Some("proc"), target, Some("proc"), flags, None::<&str>)
        .map_err(sys("mount /proc in the jail"))?;
    for p in ["sys", "sysrq-trigger"] {
        let p = target.join(p);
        mount(
            Some(&p),
            &p,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(sys(format!("bind {}", p.display())))?;
        mount(
            None::<&str>,
            &p,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | flags,
            None::<&str>,
        )
        .map_err(sys(format!("make {} read-only", p.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(args: &str) -> VmConfig {
        VmConfig::from_args(args.split_whitespace().map(String::from)).unwrap()
    }

    #[test]
    fn plan_binds_what_the_config_names_parents_first() {
        let c = cfg(
            "--kernel /k/vmlinux --initrd /k/initrd --blk /d/a:ro --blk /d/b --fs r=/s/shared \
             --serial file:/s/console.log --vsock-uds /s/vsock.sock --api-sock /s/api.sock \
             --net tap=t0",
        );
        let p = plan(&c, |_| true);
        let want: Vec<(PathBuf, Kind)> = vec![
            ("/d/a".into(), Kind::ReadOnly),
            ("/d/b".into(), Kind::ReadWrite),
            ("/dev/kvm".into(), Kind::Device),
            ("/dev/net/tun".into(), Kind::Device),
            ("/dev/null".into(), Kind::Device),
            ("/dev/urandom".into(), Kind::Device),
            ("/k/initrd".into(), Kind::ReadOnly),
            ("/k/vmlinux".into(), Kind::ReadOnly),
            ("/s".into(), Kind::Dir),
            ("/s/shared".into(), Kind::Dir),
        ];
        assert_eq!(p, want);
        // No tun without --net, nothing missing, wider access wins on duplicates.
        let p = plan(&cfg("--kernel /k --blk /k:rw --initrd /i"), |p| {
            [Path::new("/k"), Path::new("/dev/kvm")].contains(&p)
        });
        assert_eq!(
            p,
            vec![
                ("/dev/kvm".into(), Kind::Device),
                ("/k".into(), Kind::ReadWrite)
            ]
        );
    }

    #[test]
    fn canonicalize_resolves_relative_paths_and_new_files() {
        let dir = std::env::temp_dir().join(format!("moat-jail-canon-{}", std::process::id()));
        fs::create_dir_all(dir.join("real")).unwrap();
        let _ = fs::remove_file(dir.join("link"));
        std::os::unix::fs::symlink(dir.join("real"), dir.join("link")).unwrap();
        fs::write(dir.join("real/k"), b"").unwrap();
        let l = dir.join("link");
        let mut c = cfg(&format!(
            "--kernel {0}/k --serial file:{0}/console --api-sock {0}/api.sock",
            l.display()
        ));
        canonicalize(&mut c);
        let real = fs::canonicalize(dir.join("real")).unwrap();
        assert_eq!(c.kernel, real.join("k"));
        assert_eq!(c.serial, SerialOut::File(real.join("console")));
        assert_eq!(c.api_sock, Some(real.join("api.sock")));
        // Missing paths are made absolute and left for the VMM to report.
        let mut c = cfg("--kernel missing/k --api-sock a.sock");
        canonicalize(&mut c);
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(c.kernel, cwd.join("missing/k"));
        assert_eq!(
            c.api_sock,
            Some(fs::canonicalize(&cwd).unwrap().join("a.sock"))
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn mountinfo_propagation() {
        let info = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 22 0:40 / /run rw shared:5 - tmpfs tmpfs rw
31 30 0:41 / /run/a\\040b rw master:3 - tmpfs tmpfs rw
32 30 0:42 / /run/p rw - tmpfs tmpfs rw
";
        let e = parse_mountinfo(info);
        assert_eq!(
            e[2],
            MountEntry {
                mount_point: "/run/a b".into(),
                shared: false
            }
        );
        assert!(!propagates(&e, Path::new("/srv/x")));
        assert!(propagates(&e, Path::new("/run/x/y")));
        assert!(!propagates(&e, Path::new("/run/a b/c")));
        assert!(!propagates(&e, Path::new("/run/p")));
        // A later mount on the same point is the visible one.
        let e = parse_mountinfo(&format!(
            "{info}33 32 0:43 / /run/p rw shared:9 - tmpfs t rw\n"
        ));
        assert!(propagates(&e, Path::new("/run/p/q")));
    }

    #[test]
    fn unescape_octal() {
        assert_eq!(unescape("a\\040b\\011c\\\\d"), "a b\tc\\\\d");
        assert_eq!(unescape("end\\04"), "end\\04");
    }
}
