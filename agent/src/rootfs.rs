//! The container's mount tree, built by the `__init` helper inside the container's new mount
//! namespace (runc's order): `/` made rslave, the rootfs bind-mounted, the OCI mounts (bind
//! and rbind with remount flags and propagation, proc, sysfs, tmpfs, devpts, mqueue,
//! cgroup → cgroup2), default and `linux.devices` nodes when `/dev` is a mount, the `/dev`
//! symlinks, `pivot_root` ([`setup_rootfs`]), then — after the helper wrote the sysctls —
//! masked and read-only paths and a read-only root ([`finish_rootfs`]). Also the parser
//! of OCI mount options, which the agent uses for shared and block mounts too.
//!
//! Every destination is resolved inside the rootfs ([`resolve_in_root`]): nothing is mounted
//! outside it.

use std::collections::HashSet;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chdir, pivot_root, Gid, Uid};
use oci_spec::runtime::Mount;

use crate::ipc::RootfsPlan;
use crate::spec::{resolve_in_root, SpecError};

/// Errors building the container's mount tree.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A path was refused (it escapes the rootfs, or cannot be resolved).
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A bind mount (on the given destination) has no source.
    #[error("bind mount on {0} without source")]
    BindWithoutSource(String),
}

type Result<T> = std::result::Result<T, RootfsError>;

fn sys(what: impl FnOnce() -> String) -> impl FnOnce(nix::Error) -> RootfsError {
    move |source| RootfsError::Sys {
        what: what(),
        source,
    }
}

fn io(what: impl FnOnce() -> String) -> impl FnOnce(std::io::Error) -> RootfsError {
    move |source| RootfsError::Io {
        what: what(),
        source,
    }
}

/// Parses OCI mount options into flags, propagation flags and data.
pub fn parse_options(opts: &[String]) -> (MsFlags, MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut prop = MsFlags::empty();
    let mut data = Vec::new();
    for o in opts {
        let (set, clear, p) = match o.as_str() {
            // `rro` (recursive read-only): the host makes every mount below read-only; here
            // the bind itself shows it.
            "ro" | "rro" => (MsFlags::MS_RDONLY, MsFlags::empty(), MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty(), MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID, MsFlags::empty()),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty(), MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV, MsFlags::empty()),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty(), MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty(), MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty(), MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty(), MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty(), MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty(), MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty(), MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty(), MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty(), MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty(), MsFlags::empty()),
            "rbind" => (
                MsFlags::MS_BIND | MsFlags::MS_REC,
                MsFlags::empty(),
                MsFlags::empty(),
            ),
            "private" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_PRIVATE),
            "rprivate" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            ),
            "shared" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SHARED),
            "rshared" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SHARED | MsFlags::MS_REC,
            ),
            "slave" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SLAVE),
            "rslave" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
            ),
            "unbindable" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_UNBINDABLE),
            "runbindable" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
            ),
            other => {
                data.push(other.to_owned());
                continue;
            }
        };
        flags = (flags | set) & !clear;
        prop |= p;
    }
    (flags, prop, data.join(","))
}

fn mkdir_p(p: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(p)
        .map_err(io(|| format!("creating {}", p.display())))
}

fn do_mount(
    src: Option<&str>,
    dst: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    mount(src, dst, fstype, flags, data).map_err(sys(|| {
        format!(
            "mount {:?} on {} (type {:?}, flags {flags:?}, data {data:?})",
            src,
            dst.display(),
            fstype
        )
    }))
}

/// Builds the container's mount tree from `plan` and makes it the root (`pivot_root`); runs
/// in the helper, in the container's new mount namespace. [`finish_rootfs`] follows, after
/// the sysctls are written (runc's order: `/proc/sys` is usually one of the read-only paths).
pub fn setup_rootfs(plan: &RootfsPlan) -> Result<()> {
    let root = &plan.path;
    // Nothing we mount may propagate back to the agent's namespace.
    do_mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None,
    )?;
    do_mount(
        Some(&root.to_string_lossy()),
        root,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;

    let mut dev_mounted = false;
    for m in &plan.mounts {
        mount_entry(root, m)?;
        if m.destination() == Path::new("/dev") {
            dev_mounted = true;
        }
    }
    if dev_mounted {
        create_default_devices(root, plan)?;
    }

    chdir(root).map_err(sys(|| format!("chdir {}", root.display())))?;
    pivot_root(".", ".").map_err(sys(|| format!("pivot_root to {}", root.display())))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys(|| "detaching the old root".into()))?;
    chdir("/").map_err(sys(|| "chdir /".into()))?;
    Ok(())
}

/// Finishes the mount tree after [`setup_rootfs`] (and the sysctls): masked paths, read-only
/// paths and the read-only root.
pub fn finish_rootfs(plan: &RootfsPlan) -> Result<()> {
    for p in &plan.masked_paths {
        mask_path(p)?;
    }
    for p in &plan.readonly_paths {
        readonly_path(p)?;
    }
    if plan.readonly {
        do_mount(
            None,
            Path::new("/"),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        )?;
    }
    Ok(())
}

fn mount_entry(root: &Path, m: &Mount) -> Result<()> {
    let dest_str = m.destination().to_string_lossy().into_owned();
    let dest = resolve_in_root(root, &dest_str)?;
    let opts: Vec<String> = m.options().clone().unwrap_or_default();
    let (mut flags, prop, data) = parse_options(&opts);
    let typ = m.typ().clone().unwrap_or_else(|| "bind".into());
    let src = m
        .source()
        .as_ref()
        .map(|s| s.to_string_lossy().into_owned());
    let is_bind = typ == "bind" || flags.contains(MsFlags::MS_BIND);
    let data_opt = (!data.is_empty()).then_some(data.as_str());

    if is_bind {
        let src = src.ok_or_else(|| RootfsError::BindWithoutSource(dest_str.clone()))?;
        let md = std::fs::metadata(&src).map_err(io(|| format!("bind source {src}")))?;
        if md.is_dir() {
            mkdir_p(&dest)?;
        } else {
            if let Some(parent) = dest.parent() {
                mkdir_p(parent)?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o644)
                .open(&dest)
                .map_err(io(|| format!("creating mount point {}", dest.display())))?;
        }
        flags |= MsFlags::MS_BIND;
        do_mount(
            Some(&src),
            &dest,
            None,
            flags & (MsFlags::MS_BIND | MsFlags::MS_REC),
            None,
        )?;
        let extra = flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        if !extra.is_empty() {
            do_mount(
                None,
                &dest,
                None,
                extra | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                None,
            )?;
        }
    } else {
        mkdir_p(&dest)?;
        let fstype = if typ == "cgroup" {
            "cgroup2".to_owned()
        } else {
            typ.clone()
        };
        let src = src.unwrap_or_else(|| fstype.clone());
        let data_opt = if fstype == "cgroup2" { None } else { data_opt };
        do_mount(Some(&src), &dest, Some(&fstype), flags, data_opt)?;
    }
    if !prop.is_empty() {
        do_mount(None, &dest, None, prop, None)?;
    }
    Ok(())
}

fn create_default_devices(root: &Path, plan: &RootfsPlan) -> Result<()> {
    let dev = root.join("dev");
    let defaults: [(&str, u64, u64); 6] = [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ];
    let old = nix::sys::stat::umask(Mode::empty());
    let mut made = HashSet::new();
    let res = (|| -> Result<()> {
        for d in &plan.devices {
            let rel = d.path().to_string_lossy().into_owned();
            let path = resolve_in_root(root, &rel)?;
            if let Some(parent) = path.parent() {
                mkdir_p(parent)?;
            }
            let kind = match d.typ() {
                oci_spec::runtime::LinuxDeviceType::B => SFlag::S_IFBLK,
                oci_spec::runtime::LinuxDeviceType::P => SFlag::S_IFIFO,
                _ => SFlag::S_IFCHR,
            };
            let mode = Mode::from_bits_truncate(d.file_mode().unwrap_or(0o666));
            let _ = std::fs::remove_file(&path);
            mknod(
                &path,
                kind,
                mode,
                makedev(d.major() as u64, d.minor() as u64),
            )
            .map_err(sys(|| format!("mknod {rel}")))?;
            let uid = d.uid().map(Uid::from_raw);
            let gid = d.gid().map(Gid::from_raw);
            nix::unistd::chown(&path, uid, gid).map_err(sys(|| format!("chown {rel}")))?;
            made.insert(rel);
        }
        for (name, major, minor) in defaults {
            if made.contains(&format!("/dev/{name}")) {
                continue;
            }
            let path = dev.join(name);
            let _ = std::fs::remove_file(&path);
            mknod(
                &path,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                makedev(major, minor),
            )
            .map_err(sys(|| format!("mknod /dev/{name}")))?;
        }
        Ok(())
    })();
    nix::sys::stat::umask(old);
    res?;
    let links = [
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
        ("/proc/kcore", "core"),
    ];
    for (target, name) in links {
        let p = dev.join(name);
        if std::fs::symlink_metadata(&p).is_err() {
            std::os::unix::fs::symlink(target, &p)
                .map_err(io(|| format!("symlink /dev/{name}")))?;
        }
    }
    if dev.join("pts/ptmx").exists() {
        let p = dev.join("ptmx");
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink("pts/ptmx", &p).map_err(io(|| "symlink /dev/ptmx".into()))?;
    }
    Ok(())
}

fn mask_path(p: &str) -> Result<()> {
    let path = resolve_in_root(Path::new("/"), p)?;
    match std::fs::metadata(&path) {
        Err(_) => Ok(()),
        Ok(md) if md.is_dir() => do_mount(
            Some("tmpfs"),
            &path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("size=0k"),
        ),
        Ok(_) => do_mount(Some("/dev/null"), &path, None, MsFlags::MS_BIND, None),
    }
}

fn readonly_path(p: &str) -> Result<()> {
    let path = resolve_in_root(Path::new("/"), p)?;
    if std::fs::symlink_metadata(&path).is_err() {
        return Ok(());
    }
    do_mount(
        Some(&path.to_string_lossy()),
        &path,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    do_mount(
        None,
        &path,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_REC
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None,
    )
}
